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
