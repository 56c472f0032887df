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
    assert version == "0006"
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


async def test_upgrading_turns_the_two_file_ids_into_result_sources(
    engine: AsyncEngine, schema: str, emulator: Emulator
) -> None:
    """Batches submitted before 0004 keep their files, and what is still to come, in the
    provider-neutral form the results pass reads."""
    from batchinfer.storage.database import Database
    from batchinfer.storage.schema import migrate

    await migrate(Database(engine, schema=schema), revision="0003")
    rows = [  # (status, output, error, completed, failed)
        ("completed", "file-out", "file-err", 2, 1),
        ("completed", None, None, 2, 0),
        ("expired", "file-out2", None, 1, 3),
        ("in_progress", None, None, 0, 0),
    ]
    async with engine.begin() as conn:
        for n, (status, out, err, done, failed) in enumerate(rows):
            await conn.execute(
                sa.text(
                    f'INSERT INTO "{schema}".batches (id, provider, endpoint, model, status, '
                    "provider_batch_id, output_file_id, error_file_id, counts_completed, "
                    "counts_failed, request_total, input_bytes, created_at) VALUES "
                    "(gen_random_uuid(), 'openai', '/v1/chat/completions', 'm', :s, :pb, :o, "
                    ":e, :c, :f, 3, 0, now() - make_interval(secs => :n))"
                ),
                {
                    "s": status,
                    "pb": f"batch_{n}",
                    "o": out,
                    "e": err,
                    "c": done,
                    "f": failed,
                    "n": n,
                },
            )
        await conn.execute(  # never submitted: nothing reported yet
            sa.text(
                f'INSERT INTO "{schema}".batches (id, provider, endpoint, model, request_total, '
                "input_bytes, created_at) VALUES (gen_random_uuid(), 'openai', 'e', 'm', 1, 0, "
                "now() - interval '1 hour')"
            )
        )
    async with _client(engine, schema, emulator) as bi:
        await bi.migrate()
        found = {b.provider_batch_id: b.result_sources for b in await bi.list_batches()}
    both, neither, partial, running = (found[f"batch_{n}"] for n in range(4))
    assert both is not None
    assert both.ready
    assert [(s.key, s.ref, s.deletable) for s in both.sources] == [
        ("output", "file-out", True),
        ("error", "file-err", True),
    ]
    assert both.described_as == "the output or error file"
    assert neither is not None
    assert neither.sources == ()
    assert neither.waiting_for == "2 completed requests but no output file yet"
    assert partial is not None
    assert [s.ref for s in partial.sources] == ["file-out2"]
    assert partial.waiting_for == "3 failed requests but no error file yet"
    assert running is not None
    assert running.ready
    assert running.sources == ()
    assert found[None] is None
