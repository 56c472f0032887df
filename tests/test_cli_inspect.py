"""``batchinfer ls``, ``status``, ``cancel`` and ``results`` on batches made with the library."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import orjson
import pytest

from batchinfer import Batch, BatchInfer, BatchStatus
from batchinfer.cli import main
from batchinfer.testing import Emulator
from tests.helpers import chat_requests

CHAT = "/v1/chat/completions"
MODEL = "gpt-4o-mini"


@pytest.fixture(autouse=True)
def _no_provider_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "BATCHINFER_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    # main runs its own event loop, so it goes to a thread while this loop serves the emulator.
    code = await asyncio.to_thread(main, list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def created(bi: BatchInfer, n: int = 3, **metadata: str) -> Batch:
    return await bi.create_batch(
        provider="openai", endpoint=CHAT, model=MODEL, requests=chat_requests(n), metadata=metadata
    )


async def finished(bi: BatchInfer, emulator: Emulator, n: int = 3) -> Batch:
    batch = await bi.submit_batch(await created(bi, n))
    assert batch.provider_batch_id is not None
    await emulator.finish(batch.provider_batch_id)
    return await bi.wait(batch, poll_interval=0)


# -- ls ----------------------------------------------------------------------------------------


async def test_ls_shows_the_newest_batches_first_and_filters_by_status(
    capsys: pytest.CaptureFixture[str], bi: BatchInfer, database_url: str, schema: str
) -> None:
    db = ("--database", database_url, "--schema", schema)
    code, out, err = await cli(capsys, "ls", *db)
    assert (code, out) == (0, "")
    assert "No batches yet." in err

    first = await created(bi, 3)
    second = await bi.submit_batch(await created(bi, 5))

    code, out, _ = await cli(capsys, "ls", *db)

    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == [
        "ID", "STATUS", "PROVIDER", "BATCH", "REQUESTS", "DONE", "FAILED", "CREATED", "COST",
    ]  # fmt: skip
    assert [row.split()[:4] for row in rows] == [
        [str(second.id), "validating", str(second.provider_batch_id), "5"],
        [str(first.id), "pending", "-", "3"],
    ]

    code, out, _ = await cli(capsys, "ls", *db, "--status", "pending")
    assert [row.split()[0] for row in out.splitlines()[1:]] == [str(first.id)]
    code, out, _ = await cli(capsys, "ls", *db, "--limit", "1")
    assert [row.split()[0] for row in out.splitlines()[1:]] == [str(second.id)]


async def test_ls_on_a_database_without_tables_and_an_unreachable_one(
    capsys: pytest.CaptureFixture[str], database_url: str, schema: str
) -> None:
    code, _, err = await cli(capsys, "ls", "--database", database_url, "--schema", schema)
    assert code == 0
    assert "No batches yet." in err

    code, _, err = await cli(capsys, "ls", "--database", "postgresql://u@127.0.0.1:1/db")
    assert code == 1
    assert err.splitlines()[-1].startswith("batchinfer ls: ")
    assert "cannot reach the database" in err


# -- status ------------------------------------------------------------------------------------


async def test_status_shows_one_batch_in_detail(
    capsys: pytest.CaptureFixture[str],
    bi: BatchInfer,
    emulator: Emulator,
    database_url: str,
    schema: str,
) -> None:
    emulator.fail_request("q1", status=400, message="Bad message list.")
    batch = await finished(bi, emulator, 4)

    code, out, _ = await cli(
        capsys, "status", str(batch.id), "--database", database_url, "--schema", schema
    )

    assert code == 0
    fields = dict(line.split(": ", 1) for line in out.splitlines())
    assert fields["Batch"].strip() == str(batch.id)
    assert fields["Status"].strip() == "completed (the provider says completed)"
    assert str(batch.provider_batch_id) in fields["Provider"]
    assert fields["Model"].strip() == MODEL
    assert fields["Requests"].strip().startswith("4 (")
    assert fields["Provider counts"].strip() == "3 completed, 1 failed of 4"
    assert fields["Input file"].strip() == batch.input_file_id
    assert fields["Results"].strip() == (
        f"output {batch.output_file_id}, error {batch.error_file_id}"
    )
    assert fields["Results applied"].strip() != "-"
    assert fields["Completions"].strip() == "3 completed, 1 failed"
    assert fields["Cost"].strip().startswith(f"${batch.total_cost}"[:6])
    assert "prompt" in fields["Tokens"]


async def test_status_of_an_unknown_id_and_of_something_not_an_id(
    capsys: pytest.CaptureFixture[str], bi: BatchInfer, database_url: str, schema: str
) -> None:
    db = ("--database", database_url, "--schema", schema)
    unknown = uuid.uuid4()

    code, out, err = await cli(capsys, "status", str(unknown), *db)
    assert (code, out) == (1, "")
    assert err.splitlines()[-1].startswith(f"batchinfer status: no batch {unknown}")

    code, _, err = await cli(capsys, "status", "batch_123", *db)
    assert code == 2
    assert err == (
        "batchinfer status: 'batch_123' is not a batch id (a UUID, as `batchinfer ls` shows)\n"
    )


# -- cancel ------------------------------------------------------------------------------------


async def test_cancel_asks_the_provider_and_prints_the_new_status(
    capsys: pytest.CaptureFixture[str],
    bi: BatchInfer,
    emulator: Emulator,
    database_url: str,
    schema: str,
) -> None:
    db = ("--database", database_url, "--schema", schema)
    batch = await bi.submit_batch(await created(bi))
    pending = await created(bi)

    code, _, err = await cli(capsys, "cancel", str(batch.id), *db)
    assert code == 2
    assert "no API key" in err

    provider = ("--api-key", emulator.api_key, "--base-url", emulator.base_url)
    code, out, _ = await cli(capsys, "cancel", str(batch.id), *provider, *db)
    assert (code, out) == (0, f"Batch {batch.id}: cancelling\n")
    assert (await bi.get_batch(batch)).status is BatchStatus.CANCELLING

    code, _, err = await cli(capsys, "cancel", str(pending.id), *provider, *db)
    assert code == 1
    assert "never submitted" in err.splitlines()[-1]


# -- results -----------------------------------------------------------------------------------


async def test_results_writes_the_output_file_once_results_are_applied(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    bi: BatchInfer,
    emulator: Emulator,
    database_url: str,
    schema: str,
) -> None:
    db = ("--database", database_url, "--schema", schema)
    output = tmp_path / "results.jsonl"
    waiting = await bi.submit_batch(await created(bi))

    code, _, err = await cli(capsys, "results", str(waiting.id), "-o", str(output), *db)

    assert code == 1
    assert "not applied yet" in err
    assert f"batchinfer status {waiting.id}" in err
    assert not output.exists()

    emulator.drop_request("q0")
    batch = await finished(bi, emulator, 3)
    code, _, err = await cli(capsys, "results", str(batch.id), "-o", str(output), *db)

    assert code == 0
    assert f"Wrote 3 results to {output}" in err
    lines = [orjson.loads(line) for line in output.read_bytes().splitlines()]
    assert [line["custom_id"] for line in lines] == ["q0", "q1", "q2"]
    assert lines[0]["response"] is None
    assert lines[0]["error"]["message"]
    async for completion in bi.completions(batch, status="completed"):
        line = lines[completion.line_no - 1]
        assert line["response"] == {
            "status_code": 200,
            "request_id": completion.provider_request_id,
            "body": completion.response_body,
        }
        assert line["error"] is None
