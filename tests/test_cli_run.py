"""``batchinfer run``: real Postgres, the real emulator over loopback, and the real command.

In-process runs call ``main`` in a worker thread (it runs its own event loop) while the test's
loop serves the emulator; the interruption test runs the command as a child process and sends
it SIGINT, as Ctrl-C would.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

import batchinfer
from batchinfer import BatchInfer, BatchStatus
from batchinfer.cli import main
from batchinfer.errors import SchemaNotReadyError
from batchinfer.testing import Emulator

CHAT = "/v1/chat/completions"
MODEL = "gpt-4o-mini"
ROOT = Path(batchinfer.__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_provider_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "BATCHINFER_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def fast_emulator() -> AsyncIterator[Emulator]:
    async with Emulator(step_seconds=0.05) as emu:
        yield emu


def request_line(i: int, *, model: str = MODEL, url: str = CHAT, **changes: Any) -> dict[str, Any]:
    line: dict[str, Any] = {
        "custom_id": f"q{i}",
        "method": "POST",
        "url": url,
        "body": {"model": model, "messages": [{"role": "user", "content": f"question {i}"}]},
    }
    line.update(changes)
    return line


def write_input(path: Path, lines: list[Any]) -> Path:
    path.write_bytes(
        b"".join(line if isinstance(line, bytes) else orjson.dumps(line) + b"\n" for line in lines)
    )
    return path


def run_args(
    source: Path, output: Path, emulator: Emulator, database_url: str, schema: str
) -> list[str]:
    return [
        "run", str(source), "-o", str(output),
        "--api-key", emulator.api_key, "--base-url", emulator.base_url,
        "--database", database_url, "--schema", schema,
        "--poll-interval", "0.05",
    ]  # fmt: skip


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def batch_posts(emulator: Emulator) -> int:
    return sum(1 for m, p in emulator.requests if m == "POST" and p == "/v1/batches")


async def stored_batches(database_url: str, schema: str) -> list[Any]:
    async with BatchInfer(database_url, providers=[], schema=schema) as bi:
        try:
            return await bi.list_batches()
        except SchemaNotReadyError:
            return []


# -- a whole run -------------------------------------------------------------------------------


async def test_run_writes_openai_output_lines_in_request_order(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    fast_emulator: Emulator,
    database_url: str,
    schema: str,
) -> None:
    fast_emulator.fail_request("q3", status=400, message="Invalid 'messages'.")
    fast_emulator.drop_request("q7")
    source = write_input(tmp_path / "in.jsonl", [request_line(i) for i in range(12)])
    output = tmp_path / "out.jsonl"
    args = run_args(source, output, fast_emulator, database_url, schema)

    code, out, err = await cli(capsys, *args, "--metadata", "team=search")

    assert code == 0, err
    assert out == ""
    assert "Created batch" in err
    assert "10 completed, 2 failed" in err
    assert "cost $" in err
    lines = read_jsonl(output)
    assert [line["custom_id"] for line in lines] == [f"q{i}" for i in range(12)]
    (pbid,) = fast_emulator.batches
    provider_batch = fast_emulator.batches[pbid]
    theirs = {
        line["custom_id"]: line
        for line in read_jsonl_bytes(
            fast_emulator.file_content(str(provider_batch["output_file_id"]))
        )
    }
    for line in lines:
        if line["custom_id"] in ("q3", "q7"):
            continue
        assert line["error"] is None
        assert line["response"]["status_code"] == 200
        assert line["response"]["body"] == theirs[line["custom_id"]]["response"]["body"]
        assert line["response"]["request_id"] == theirs[line["custom_id"]]["response"]["request_id"]
    failed = lines[3]
    assert failed["response"]["status_code"] == 400
    assert "400" in failed["error"]["code"]
    assert failed["error"]["message"] == "Invalid 'messages'."
    missing = lines[7]
    assert missing["response"] is None
    assert "missing" in missing["error"]["code"]
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl"]  # no temp file left

    (batch,) = await stored_batches(database_url, schema)
    assert batch.metadata["team"] == "search"
    assert len(batch.metadata["batchinfer_run_key"]) == 64

    # The same command again re-attaches to the finished batch and writes the same lines.
    output.unlink()
    code, _, err = await cli(capsys, *args)
    assert code == 0, err
    assert f"Re-attaching to batch {batch.id} (completed)" in err
    assert read_jsonl(output) == lines
    assert batch_posts(fast_emulator) == 1


def read_jsonl_bytes(data: bytes) -> Iterator[dict[str, Any]]:
    return (orjson.loads(line) for line in data.splitlines() if line.strip())


async def test_new_starts_a_second_batch_and_a_failed_submit_is_submitted_on_rerun(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    fast_emulator: Emulator,
    database_url: str,
    schema: str,
) -> None:
    source = write_input(tmp_path / "in.jsonl", [request_line(i) for i in range(5)])
    output = tmp_path / "out.jsonl"
    args = run_args(source, output, fast_emulator, database_url, schema)
    # The upload is refused: the batch is created, stays pending, and nothing is submitted.
    fast_emulator.fail_http("POST", "/files", 401)

    code, _, err = await cli(capsys, *args)

    assert code == 1
    assert err.strip().splitlines()[-1].startswith("batchinfer run: ")
    (pending,) = await stored_batches(database_url, schema)
    assert pending.status is BatchStatus.PENDING
    assert batch_posts(fast_emulator) == 0

    code, _, err = await cli(capsys, *args)

    assert code == 0, err
    assert f"Re-attaching to batch {pending.id} (pending)" in err
    assert "Submitted as batch_" in err
    assert len(read_jsonl(output)) == 5
    assert batch_posts(fast_emulator) == 1

    code, _, err = await cli(capsys, *args, "--new")
    assert code == 0, err
    assert "Re-attaching" not in err
    assert batch_posts(fast_emulator) == 2
    assert len(await stored_batches(database_url, schema)) == 2


# -- bad input ---------------------------------------------------------------------------------


def _bad_cases() -> list[Any]:
    ok = request_line
    return [
        pytest.param([ok(0), b"{not json\n"], "line 2: not valid JSON", id="not-json"),
        pytest.param([ok(0), ok(1), b"[1, 2]\n"], "line 3: expected a JSON object", id="array"),
        pytest.param(
            [ok(0), {k: v for k, v in ok(1).items() if k != "custom_id"}],
            "line 2: no 'custom_id'",
            id="no-custom-id",
        ),
        pytest.param(
            [{k: v for k, v in ok(0).items() if k != "body"}], "line 1: no 'body'", id="no-body"
        ),
        pytest.param(
            [ok(0), {k: v for k, v in ok(1).items() if k != "url"}], "line 2: no 'url'", id="no-url"
        ),
        pytest.param(
            [ok(0), ok(1), ok(2, url="/v1/embeddings")],
            "line 3: url '/v1/embeddings' differs",
            id="mixed-url",
        ),
        pytest.param(
            [ok(0), ok(1, model="gpt-4o")], "line 2: body.model 'gpt-4o' differs", id="mixed-model"
        ),
        pytest.param(
            [ok(0), ok(1, body={"messages": []})], "line 2: body.model is missing", id="no-model"
        ),
        # Found by create_batch, which counts requests from 0 and skips nothing: the blank
        # line 2 makes request 2 line 4.
        pytest.param(
            [ok(0), b"\n", ok(1), ok(0)], "line 4: custom_id 'q0': duplicate", id="duplicate"
        ),
        pytest.param(
            [ok(0), ok(1, body={"model": MODEL})],
            "line 2: custom_id 'q1': body.messages is required",
            id="no-messages",
        ),
        pytest.param([], "holds no requests", id="empty"),
    ]


@pytest.mark.parametrize(("lines", "message"), _bad_cases())
async def test_bad_input_names_the_line_and_creates_nothing(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    emulator: Emulator,
    database_url: str,
    schema: str,
    lines: list[Any],
    message: str,
) -> None:
    source = write_input(tmp_path / "in.jsonl", lines)

    code, out, err = await cli(
        capsys, *run_args(source, tmp_path / "out.jsonl", emulator, database_url, schema)
    )

    assert code == 2
    assert out == ""
    (error,) = [line for line in err.splitlines() if line.startswith("batchinfer run:")]
    assert error.startswith(f"batchinfer run: {source} {message}"), error
    assert err.rstrip().endswith(error)
    assert await stored_batches(database_url, schema) == []
    assert emulator.requests == []
    assert not (tmp_path / "out.jsonl").exists()


async def test_missing_file_key_and_metadata_are_one_line_each(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, emulator: Emulator, database_url: str
) -> None:
    source = write_input(tmp_path / "in.jsonl", [request_line(0)])
    args = run_args(tmp_path / "nope.jsonl", tmp_path / "o.jsonl", emulator, database_url, "s")

    code, _, err = await cli(capsys, *args)
    assert (code, err) == (2, f"batchinfer run: cannot read {tmp_path / 'nope.jsonl'}: "
                              "No such file or directory\n")  # fmt: skip

    code, _, err = await cli(capsys, "run", str(source), "-o", str(tmp_path / "o.jsonl"))
    assert (code, err) == (2, "batchinfer run: no API key: give --api-key or set $OPENAI_API_KEY\n")

    args[1] = str(source)
    code, _, err = await cli(capsys, *args, "--metadata", "nokey")
    assert (code, err) == (2, "batchinfer run: --metadata 'nokey': expected KEY=VALUE\n")

    code, _, err = await cli(
        capsys, "run", str(source), "-o", str(tmp_path / "no" / "o.jsonl"), "--api-key", "k"
    )
    assert code == 2
    assert "does not exist" in err


# -- interrupted and re-run --------------------------------------------------------------------


async def _child(argv: list[str]) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "batchinfer.cli",
        *argv,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _until(condition: Any, what: str, seconds: float = 15.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"waited {seconds} s: {what}")


async def test_interrupted_run_reattaches_on_rerun_without_a_second_batch(
    tmp_path: Path, database_url: str, schema: str
) -> None:
    source = write_input(tmp_path / "in.jsonl", [request_line(i) for i in range(20)])
    output = tmp_path / "out.jsonl"
    # An hour per step: the batch is still validating when the first run is interrupted.
    async with Emulator(step_seconds=3600) as emulator:
        args = run_args(source, output, emulator, database_url, schema)
        first = await _child(args)

        def polled() -> bool:
            # A GET of the batch means submit is recorded and the run is following it.
            return any(m == "GET" and p.startswith("/v1/batches/") for m, p in emulator.requests)

        try:
            await _until(lambda: polled() or first.returncode is not None, "no poll")
        finally:
            if first.returncode is None:
                first.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(first.communicate(), 15)
        assert first.returncode == 130, err.decode()
        assert b"goes on at the provider" in err
        assert b"run the same command again to re-attach" in err
        assert not output.exists()
        (pbid,) = emulator.batches

        await emulator.finish(pbid)
        second = await _child(args)
        _, err = await asyncio.wait_for(second.communicate(), 15)

        assert second.returncode == 0, err.decode()
        assert b"Re-attaching to batch" in err
        assert b"(validating) from an earlier run" in err
        assert [line["custom_id"] for line in read_jsonl(output)] == [f"q{i}" for i in range(20)]
        assert all(line["response"]["status_code"] == 200 for line in read_jsonl(output))
        assert batch_posts(emulator) == 1


# -- the embedded database ---------------------------------------------------------------------


async def test_without_a_database_an_embedded_one_keeps_batches_between_commands(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    async with Emulator(step_seconds=0.05) as emulator:
        source = write_input(tmp_path / "in.jsonl", [request_line(i) for i in range(3)])
        data = ("--data-dir", str(tmp_path / "data"))
        run = ["run", str(source), "-o", str(tmp_path / "out.jsonl"), *data]
        provider = ("--api-key", emulator.api_key, "--base-url", emulator.base_url)

        code, _, err = await cli(capsys, *run, *provider, "--poll-interval", "0.05")
        assert code == 0, err
        assert f"embedded Postgres in {tmp_path / 'data' / 'pgdata'}" in err

        code, out, _ = await cli(capsys, "ls", *data)
        assert code == 0
        assert len(out.splitlines()) == 2


async def test_run_takes_anthropic_lines_with_provider_anthropic(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    fast_emulator: Emulator,
    database_url: str,
    schema: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    params = {"model": "claude-3-5-haiku-20241022", "max_tokens": 16}
    lines = [
        {"custom_id": f"a{i}", "params": {**params, "messages": [{"role": "user", "content": "x"}]}}
        for i in range(4)
    ]
    source = write_input(tmp_path / "in.jsonl", lines)
    output = tmp_path / "out.jsonl"
    monkeypatch.setenv("ANTHROPIC_API_KEY", fast_emulator.api_key)
    code, _, err = await cli(
        capsys,
        "run", str(source), "-o", str(output), "--provider", "anthropic",
        "--base-url", fast_emulator.anthropic_base_url,
        "--database", database_url, "--schema", schema, "--poll-interval", "0.05",
    )  # fmt: skip
    assert code == 0, err
    assert "4 completed" in err
    written = read_jsonl(output)
    assert [w["custom_id"] for w in written] == ["a0", "a1", "a2", "a3"]
    assert {w["response"]["body"]["type"] for w in written} == {"message"}
    assert batch_posts(fast_emulator) == 0
    (batch,) = await stored_batches(database_url, schema)
    assert (batch.provider, batch.endpoint) == ("anthropic", "/v1/messages")


async def test_run_takes_gemini_lines_with_provider_gemini(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    fast_emulator: Emulator,
    database_url: str,
    schema: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lines = [
        {
            "key": f"g{i}",
            "request": {
                "model": "models/gemini-2.5-flash",
                "contents": [{"role": "user", "parts": [{"text": f"q{i}"}]}],
            },
        }
        for i in range(3)
    ]
    source = write_input(tmp_path / "in.jsonl", lines)
    output = tmp_path / "out.jsonl"
    monkeypatch.setenv("GEMINI_API_KEY", fast_emulator.api_key)
    code, _, err = await cli(
        capsys,
        "run", str(source), "-o", str(output), "--provider", "gemini",
        "--base-url", fast_emulator.gemini_base_url,
        "--database", database_url, "--schema", schema, "--poll-interval", "0.05",
    )  # fmt: skip
    assert code == 0, err
    written = read_jsonl(output)
    assert [w["custom_id"] for w in written] == ["g0", "g1", "g2"]
    assert written[0]["response"]["body"]["candidates"][0]["content"]["parts"][0]["text"] == (
        "Echo: q0"
    )
    (batch,) = await stored_batches(database_url, schema)
    assert (batch.provider, batch.endpoint) == ("gemini", "generateContent")
    assert batch.total_cost is not None
    assert batch.total_cost > 0
