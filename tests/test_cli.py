from __future__ import annotations

import io

import pytest

from batchinfer.cli import main
from batchinfer.demo import run_demo


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "emulator", "migrate", "run", "ls", "status", "cancel", "results"):
        assert f"    {command} " in out


@pytest.mark.parametrize(
    ("command", "words"),
    [
        ("run", ("--output", "--api-key", "--poll-interval", "--metadata", "re-attaches")),
        ("ls", ("--status", "--limit", "--database")),
        ("status", ("BATCH", "--schema")),
        ("cancel", ("BATCH", "--api-key", "--base-url")),
        ("results", ("BATCH", "--output", "--data-dir")),
    ],
)
def test_every_command_explains_itself(
    capsys: pytest.CaptureFixture[str], command: str, words: tuple[str, ...]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for word in words:
        assert word in out


def test_migrate_without_a_database_says_what_to_do(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BATCHINFER_DATABASE_URL", raising=False)
    assert main(["migrate", "--database", ""]) == 2
    assert "BATCHINFER_DATABASE_URL" in capsys.readouterr().err


def test_migrate_reports_bad_arguments_and_unreachable_databases(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["migrate", "--database", "postgresql://u@127.0.0.1:1/db", "--schema", "ok"]) == 1
    assert "cannot reach the database" in capsys.readouterr().err
    assert main(["migrate", "--database", "postgresql://u@h/db", "--schema", "Bad-Name"]) == 1
    assert "lower-case SQL identifier" in capsys.readouterr().err


@pytest.mark.parametrize("provider", ["openai", "anthropic", "azure", "xai", "gemini"])
async def test_demo_runs_a_batch_and_reports_costs(
    database_url: str, schema: str, provider: str
) -> None:
    out = io.StringIO()
    batch = await run_demo(
        requests=200,
        database_url=database_url,
        step_seconds=0.05,
        schema=schema,
        out=out,
        provider=provider,
    )
    text = out.getvalue()
    assert batch.provider == provider
    assert batch.status.value == "completed"
    assert batch.results_applied_at is not None
    assert "completed" in text
    assert "failed" in text
    assert "missing from the results 2" in text
    assert "the same work live would cost" in text
    assert batch.total_cost is not None
    assert batch.total_cost > 0


async def test_the_emulator_command_serves_every_provider_on_one_port() -> None:
    """`batchinfer emulator` in a process of its own: each API it names answers its own
    client's kind of request, with the key sent the way that API sends it."""
    import asyncio
    import socket
    import sys

    import aiohttp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "batchinfer.cli", "emulator", "--port", str(port),
        "--api-key", "k", stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = [(await asyncio.wait_for(proc.stdout.readline(), 30)).decode() for _ in range(7)]
        urls = {line.split()[0]: line.split("=")[1].split()[0] for line in lines if "=" in line}
        assert set(urls) == {"OpenAI", "Azure", "Anthropic", "xAI", "Gemini"}
        calls = [
            (f"{urls['OpenAI']}/batches", {"Authorization": "Bearer k"}),
            (f"{urls['Azure']}/openai/v1/batches", {"api-key": "k"}),
            (
                f"{urls['Anthropic']}/v1/messages/batches",
                {"x-api-key": "k", "anthropic-version": "2023-06-01"},
            ),
            (f"{urls['xAI']}/batches", {"Authorization": "Bearer k"}),
            (f"{urls['Gemini']}/v1beta/batches", {"x-goog-api-key": "k"}),
        ]
        async with aiohttp.ClientSession() as http:
            for url, headers in calls:
                async with http.get(url, headers=headers) as resp:
                    assert resp.status == 200, (url, await resp.text())
                async with http.get(url) as resp:
                    assert resp.status in (400, 401), url  # no key: refused
    finally:
        proc.terminate()
        await proc.wait()
