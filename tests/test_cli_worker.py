"""``batchinfer worker``: real Postgres, the real emulator over loopback, and the real command.

``--once`` runs in a worker thread (the command runs its own event loop) while the test's loop
serves the emulator; the long-running worker is a child process, stopped with SIGTERM as a
deploy would stop it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

import batchinfer
from batchinfer import Batch, BatchInfer, BatchStatus, OpenAIProvider
from batchinfer.cli import main
from batchinfer.testing import Emulator
from tests.helpers import chat_requests, eventually

ROOT = Path(batchinfer.__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_provider_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "BATCHINFER_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    # The command sets the level of the batchinfer logger; other tests expect it untouched.
    package = logging.getLogger("batchinfer")
    level = package.level
    yield
    package.setLevel(level)


@pytest.fixture
async def fast_emulator() -> AsyncIterator[Emulator]:
    async with Emulator(step_seconds=0.05) as emu:
        yield emu


@pytest.fixture
async def app_bi(
    engine: AsyncEngine, schema: str, fast_emulator: Emulator
) -> AsyncIterator[BatchInfer]:
    """The app's side: it migrates, creates batches with submit=True, and returns at once."""
    provider = OpenAIProvider(api_key=fast_emulator.api_key, base_url=fast_emulator.base_url)
    async with BatchInfer(engine, providers=[provider], schema=schema) as bi:
        await bi.migrate()
        yield bi


async def create(bi: BatchInfer, handler: str | None = None) -> Batch:
    return await bi.create_batch(
        provider="openai",
        endpoint="/v1/chat/completions",
        model="gpt-4o-mini",
        requests=chat_requests(3),
        submit=True,
        handler=handler,
    )


HANDLERS = """
import sqlalchemy as sa


async def reports_done(batch, conn):
    await conn.execute(sa.text('INSERT INTO "{schema}".handled VALUES (:id)'), {{"id": batch.id}})


def register(bi):
    bi.on_batch_end(reports_done, name="reports")
"""


def worker_args(emulator: Emulator, database_url: str, schema: str) -> list[str]:
    return [
        "worker",
        "--database", database_url, "--schema", schema,
        "--api-key", emulator.api_key, "--base-url", emulator.base_url,
        "--poll-schedule", "0.05", "--idle-seconds", "0.05", "--lease-seconds", "2",
    ]  # fmt: skip


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def leftovers(engine: AsyncEngine, schema: str) -> tuple[int, int]:
    """Claims still held, and rows of workers still said to be alive."""
    async with engine.connect() as conn:
        claims = await conn.scalar(
            sa.text(f'SELECT count(*) FROM "{schema}".batches WHERE claimed_by IS NOT NULL')
        )
        workers = await conn.scalar(sa.text(f'SELECT count(*) FROM "{schema}".workers'))
    return int(claims or 0), int(workers or 0)


def test_help_says_what_it_does_and_to_migrate_first(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert "    worker " in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["worker", "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for words in (
        "--once", "--concurrency", "--lease-seconds", "--poll-schedule SECONDS,...",
        "--max-age-hours", "--log-level", "--api-key", "--base-url", "--database", "--schema",
        "SIGTERM", "run `batchinfer migrate` first", "--handlers MODULE:FUNCTION",
    ):  # fmt: skip
        assert words in out


async def test_once_submits_a_batch_created_with_submit_true(
    capsys: pytest.CaptureFixture[str],
    app_bi: BatchInfer,
    fast_emulator: Emulator,
    database_url: str,
    schema: str,
    engine: AsyncEngine,
) -> None:
    batch = await create(app_bi)
    args = worker_args(fast_emulator, database_url, schema)

    # The first poll an hour after submission (a later flag wins over worker_args' own).
    args += ["--poll-schedule", "3600"]
    code, out, err = await cli(capsys, *args, "--once", "--log-level", "warning")

    assert (code, out) == (0, "Worked on 1 batch.\n"), err
    batch = await app_bi.get_batch(batch)
    assert batch.provider_batch_id in fast_emulator.batches
    assert batch.status is BatchStatus.VALIDATING
    assert await leftovers(engine, schema) == (0, 0)
    # Not due again until its first poll.
    code, out, _ = await cli(capsys, *args, "--once")
    assert (code, out) == (0, "Worked on 0 batches.\n")


async def test_a_worker_process_completes_batches_and_stops_cleanly_on_sigterm(
    app_bi: BatchInfer,
    fast_emulator: Emulator,
    database_url: str,
    schema: str,
    engine: AsyncEngine,
    tmp_path: Path,
) -> None:
    # The app's handler, registered in the worker process with --handlers.
    (tmp_path / "app_handlers.py").write_text(HANDLERS.format(schema=schema))
    async with engine.begin() as conn:
        await conn.execute(sa.text(f'CREATE TABLE "{schema}".handled (batch_id uuid)'))
    first = await create(app_bi, handler="reports")
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "batchinfer.cli",
        *worker_args(fast_emulator, database_url, schema),
        "--handlers",
        "app_handlers:register",
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        # One batch waiting when it starts, one created while it runs (a notification wakes it).
        async def handled(batch: Batch) -> bool:
            return (await app_bi.get_batch(batch)).handler_dispatched_at is not None

        await eventually(lambda: handled(first), seconds=15)
        second = await create(app_bi)
        await eventually(lambda: handled(second), seconds=10)
        assert (await app_bi.stats()).workers_alive == 1
    finally:
        if child.returncode is None:
            child.send_signal(signal.SIGTERM)
        started = time.monotonic()
        out, err = await asyncio.wait_for(child.communicate(), 15)
    assert time.monotonic() - started < 5
    assert child.returncode == 0, err.decode()
    lines = err.decode().splitlines()
    assert "batchinfer.worker_started" in err.decode()  # the events show at --log-level info
    assert lines[-1].startswith("Worker ")
    assert lines[-1].endswith("stopped on SIGTERM; its batches are free for others.")
    assert out == b""
    for batch in (first, second):
        done = await app_bi.get_batch(batch)
        assert done.status is BatchStatus.COMPLETED
        assert done.request_counts.completed == 3
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.text(f'SELECT batch_id FROM "{schema}".handled'))).all()
    assert [row[0] for row in rows] == [first.id]  # the named handler, once, for its batch only
    assert await leftovers(engine, schema) == (0, 0)


async def test_without_an_api_key_it_says_so_in_one_line(
    capsys: pytest.CaptureFixture[str], database_url: str
) -> None:
    code, out, err = await cli(capsys, "worker", "--database", database_url)
    assert (code, out) == (2, "")
    assert err == "batchinfer worker: no API key: give --api-key or set $OPENAI_API_KEY\n"

    code, _, err = await cli(capsys, "worker", "--api-key", "sk-x")
    assert code == 2
    assert err == "batchinfer worker: give --database or set $BATCHINFER_DATABASE_URL\n"


async def test_without_the_tables_it_says_to_migrate_in_one_line(
    capsys: pytest.CaptureFixture[str], database_url: str, schema: str
) -> None:
    args = ("worker", "--database", database_url, "--schema", schema, "--api-key", "sk-x")
    for extra in ((), ("--once",)):
        code, out, err = await cli(capsys, *args, *extra)
        assert (code, out) == (1, "")
        assert err == (
            f"batchinfer worker: schema {schema!r} has no batchinfer tables, or older ones: "
            f"run `batchinfer migrate --schema {schema}` first\n"
        )


async def test_handlers_that_cannot_be_loaded_say_so_in_one_line(
    capsys: pytest.CaptureFixture[str], database_url: str, schema: str
) -> None:
    args = ("worker", "--database", database_url, "--schema", schema, "--api-key", "sk-x")
    for spec, says in (
        ("register", "expected MODULE:FUNCTION"),
        ("no_such_module_here:register", "cannot import no_such_module_here"),
        ("json:no_such_function", "json has no function 'no_such_function'"),
        ("json:dumps", "--handlers 'json:dumps': Object of type BatchInfer is not JSON"),
    ):
        code, out, err = await cli(capsys, *args, "--once", "--handlers", spec)
        assert (code, out) == (2, ""), err
        assert err.startswith("batchinfer worker: ")
        assert says in err
        assert len(err.splitlines()) == 1


async def test_bad_numbers_are_refused_by_the_parser(capsys: pytest.CaptureFixture[str]) -> None:
    for flag, value, says in (
        ("--poll-schedule", "60,,300", "expected seconds separated by commas"),
        ("--poll-schedule", "60,-1", "-1 is not more than 0"),
        ("--lease-seconds", "0.5", "at least 1 second"),
        ("--concurrency", "0", "must be at least 1"),
        ("--max-age-hours", "nan", "is not more than 0"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["worker", "--api-key", "k", flag, value])
        assert exit_info.value.code == 2
        assert says in capsys.readouterr().err
