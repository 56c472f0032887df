from __future__ import annotations

import asyncio
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import AsyncEngine

from batchinfer import BatchInfer, OpenAIProvider, SchemaNotReadyError
from batchinfer.storage.tables import metadata
from batchinfer.testing import Emulator
from tests.helpers import chat_requests


def _client(engine: AsyncEngine, schema: str, emulator: Emulator) -> BatchInfer:
    provider = OpenAIProvider(api_key=emulator.api_key, base_url=emulator.base_url)
    return BatchInfer(engine, providers=[provider], schema=schema)


async def test_verbs_before_migrate_say_to_migrate(
    engine: AsyncEngine, schema: str, emulator: Emulator
) -> None:
    async with _client(engine, schema, emulator) as bi:
        with pytest.raises(SchemaNotReadyError, match=r"migrate\(\)"):
            await bi.create_batch(
                provider="openai",
                endpoint="/v1/chat/completions",
                model="gpt-4o-mini",
                requests=chat_requests(1),
            )


async def test_migrate_is_idempotent_and_safe_concurrently(
    engine: AsyncEngine, schema: str, emulator: Emulator
) -> None:
    clients = [_client(engine, schema, emulator) for _ in range(3)]
    await asyncio.gather(*(c.migrate() for c in clients))
    await clients[0].migrate()
    async with engine.connect() as conn:
        tables = set(
            (
                await conn.execute(
                    sa.text("SELECT tablename FROM pg_tables WHERE schemaname = :s"), {"s": schema}
                )
            ).scalars()
        )
        version = (
            await conn.execute(sa.text(f'SELECT version_num FROM "{schema}".alembic_version'))
        ).scalar_one()
    assert tables == {"alembic_version", "batches", "completions", "workers"}
    assert version == "0003"
    for c in clients:
        await c.aclose()


async def test_migrated_schema_matches_the_table_definitions(
    engine: AsyncEngine, schema: str, emulator: Emulator
) -> None:
    async with _client(engine, schema, emulator) as bi:
        await bi.migrate()

    def diff(sync_conn: sa.Connection) -> list[object]:
        translated = sync_conn.execution_options(schema_translate_map={None: schema})
        context = MigrationContext.configure(
            translated,
            opts={"include_schemas": False, "compare_server_default": False},
        )
        return list(compare_metadata(context, metadata))

    async with engine.connect() as conn:
        await conn.execute(sa.text(f'SET search_path TO "{schema}"'))
        differences = await conn.run_sync(diff)
    assert differences == []


async def test_schema_name_is_checked(engine: AsyncEngine, emulator: Emulator) -> None:
    with pytest.raises(ValueError, match="schema"):
        _client(engine, 'bad"; DROP TABLE x; --', emulator)


async def test_wide_columns_use_lz4_where_the_server_has_it(
    engine: AsyncEngine, schema: str, emulator: Emulator
) -> None:
    async with _client(engine, schema, emulator) as bi:
        await bi.migrate()
    async with engine.connect() as conn:
        has_lz4 = (
            await conn.execute(
                sa.text(
                    "SELECT count(*) FROM pg_settings "
                    "WHERE name = 'default_toast_compression' AND 'lz4' = ANY(enumvals)"
                )
            )
        ).scalar_one()
        methods = dict(
            (
                await conn.execute(
                    sa.text(
                        "SELECT attname, attcompression::text FROM pg_attribute "
                        "WHERE attrelid = CAST(:t AS regclass) "
                        "AND attname IN ('request_body', 'response_body')"
                    ),
                    {"t": f'"{schema}".completions'},
                )
            ).all()
        )
    expected = "l" if has_lz4 else ""
    assert methods == {"request_body": expected, "response_body": expected}


async def test_upgrading_leaves_batches_finished_before_alone(
    engine: AsyncEngine, schema: str, emulator: Emulator
) -> None:
    from batchinfer.storage.database import Database
    from batchinfer.storage.schema import migrate

    await migrate(Database(engine, schema=schema), revision="0001")
    async with engine.begin() as conn:  # a batch applied by the version before workers
        await conn.execute(
            sa.text(
                f'INSERT INTO "{schema}".batches (id, provider, endpoint, model, status, '
                "request_total, input_bytes, results_applied_at) VALUES (gen_random_uuid(), "
                "'openai', '/v1/chat/completions', 'm', 'completed', 0, 0, now())"
            )
        )
    async with _client(engine, schema, emulator) as bi:
        await bi.migrate()
        (old,) = await bi.list_batches()
        handled: list[object] = []
        bi.on_batch_end(lambda_free_append(handled))
        assert await bi.worker().run_once() == 0  # its handlers are not due
    assert old.handler_dispatched_at == old.results_applied_at
    assert old.files_deleted_at == old.results_applied_at
    assert handled == []


def lambda_free_append(into: list[object]) -> Any:
    async def record(batch: object) -> None:
        into.append(batch)

    return record
