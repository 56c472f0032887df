"""Fixtures: a real Postgres and the real emulator over loopback HTTP.

Postgres comes from BATCHINFER_TEST_DATABASE_URL when set; otherwise an embedded server is
started once for the whole run. Each test gets a schema of its own (created by ``migrate()``,
dropped afterwards), so tests never see each other's rows.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import sqlalchemy as sa
import stamina
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from batchinfer import BatchInfer, OpenAIProvider
from batchinfer.testing import Emulator
from batchinfer.testing.postgres import database_or_embedded


@pytest.fixture(autouse=True, scope="session")
def _fast_retries() -> Iterator[None]:
    # Retries are exercised, but without real backoff sleeps.
    stamina.set_testing(True, attempts=3)
    yield
    stamina.set_testing(False)


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    with database_or_embedded(os.environ.get("BATCHINFER_TEST_DATABASE_URL")) as url:
        yield url


@pytest.fixture(scope="session")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    from batchinfer.client import _asyncpg_url

    eng = create_async_engine(_asyncpg_url(database_url), pool_size=10)
    yield eng
    await eng.dispose()


@pytest.fixture
async def schema(engine: AsyncEngine) -> AsyncIterator[str]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    async with engine.begin() as conn:
        await conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    async with Emulator() as emu:
        yield emu


@pytest.fixture
async def bi(engine: AsyncEngine, schema: str, emulator: Emulator) -> AsyncIterator[BatchInfer]:
    provider = OpenAIProvider(api_key=emulator.api_key, base_url=emulator.base_url)
    async with BatchInfer(engine, providers=[provider], schema=schema, poll_interval=0) as client:
        await client.migrate()
        yield client
