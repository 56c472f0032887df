"""Developer sessions: `nox -s tests`, `nox -s lint`, `nox -s typing`, `nox -s examples`."""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.sessions = ["lint", "typing", "tests", "examples"]


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (BATCHINFER_TEST_DATABASE_URL, or an embedded Postgres)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typing(session: nox.Session) -> None:
    """mypy --strict on the package, and the import rules between its layers."""
    session.install("-e", ".[dev]")
    session.run("mypy")
    session.run("lint-imports")


@nox.session
def examples(session: nox.Session) -> None:
    """Every file in examples/ runs against the emulator."""
    session.install("-e", ".[test]")
    for example in sorted(Path("examples").glob("*.py")):
        session.run("python", str(example))


@nox.session
def kill(session: nox.Session) -> None:
    """The kill-anywhere harness, long: processes SIGKILLed at named points, then recovered and
    checked (`nox -s kill -- --runs 300 --seed 1`; see tests/kill)."""
    session.install("-e", ".[test]")
    args = session.posargs or ["--runs", "300", "--seed", "1"]
    session.run("python", "-m", "tests.kill", *args)


@nox.session
def benchmark(session: nox.Session) -> None:
    """Throughput of create, submit and apply, with the floor and the baseline measured in the
    same run: `nox -s benchmark -- --sizes 5000,50000,500000 --json out.json` (`--quick` for a
    2,000-line smoke run; BATCHINFER_DATABASE_URL or --database, else an embedded Postgres)."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "benchmarks.run", *session.posargs)
