"""The ``batchinfer`` command. Environment variables are read here, never in the library.

``run`` lives in :mod:`batchinfer.cli.run`, the commands on stored batches in
:mod:`batchinfer.cli.inspect`, ``worker`` in :mod:`batchinfer.cli.worker`; this module wires
them and the demo, emulator and migrate commands into one parser.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import os
import sys
from collections.abc import Sequence
from importlib.metadata import version

from batchinfer.cli import inspect, run, worker
from batchinfer.cli.common import DATABASE_ENV, CliError
from batchinfer.errors import BatchInferError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batchinfer",
        description="LLM batch inference on Postgres: every request a row, every result "
        "applied exactly once.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('batchinfer')}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="run a whole batch against a local emulator and an embedded Postgres",
        description="Create a batch of chat requests, submit it to the local emulator (OpenAI's, "
        "Anthropic's, Azure OpenAI's, xAI's or Gemini's batch API), "
        "show progress until it ends, then report counts, tokens and costs. Uses "
        f"${DATABASE_ENV} if set, else starts an embedded Postgres in a temporary directory.",
    )
    demo.add_argument("--requests", type=int, default=1_000, help="how many (default 1000)")
    demo.add_argument(
        "--database", default=os.environ.get(DATABASE_ENV), help=f"Postgres URL (${DATABASE_ENV})"
    )
    demo.add_argument(
        "--step-seconds",
        type=float,
        default=1.0,
        help="how long the emulator spends in each batch status (default 1.0)",
    )
    demo.add_argument(
        "--provider",
        choices=["openai", "anthropic", "azure", "xai", "gemini"],
        default="openai",
        help="whose batch API the emulator plays (default openai)",
    )
    demo.add_argument(
        "--model",
        help="model name (default gpt-4o-mini; claude-haiku-4-5 for anthropic, grok-4 for "
        "xai, gemini-2.5-flash for gemini)",
    )

    emulator = commands.add_parser(
        "emulator",
        help="serve the providers' emulator for any client or SDK",
        description="Serve, with a deterministic fake model, on one port: OpenAI's Files, "
        "Batches and live endpoints (http://HOST:PORT/v1), Azure OpenAI's (/openai/v1, and "
        "/openai with api-version), Anthropic's Message Batches (http://HOST:PORT, paths "
        "/v1/messages...), xAI's Batch API (/xai/v1) and Gemini's batch mode (/v1beta). "
        "Batches advance on their own every --step-seconds.",
    )
    emulator.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    emulator.add_argument("--port", type=int, default=8089, help="port (default 8089)")
    emulator.add_argument(
        "--step-seconds", type=float, default=2.0, help="seconds per batch status (default 2)"
    )
    emulator.add_argument(
        "--api-key", default="sk-emulator", help="the key accepted, however each API sends it"
    )

    migrate = commands.add_parser(
        "migrate", help="create or upgrade the batchinfer tables in a database"
    )
    migrate.add_argument(
        "--database", default=os.environ.get(DATABASE_ENV), help=f"Postgres URL (${DATABASE_ENV})"
    )
    migrate.add_argument("--schema", default="batchinfer", help="schema (default batchinfer)")

    run.add_parser(commands)
    inspect.add_parsers(commands)
    worker.add_parser(commands)
    return parser


async def _emulator(host: str, port: int, step_seconds: float, api_key: str) -> None:
    from batchinfer.testing import Emulator

    emu = Emulator(host=host, port=port, step_seconds=step_seconds, api_key=api_key)
    try:
        await emu.start()
    except OSError as exc:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if exc.errno == errno.EADDRINUSE:
            raise CliError(f"{where} is already in use; pick another port with --port") from None
        raise CliError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    async with emu:
        print(f"Serving the batch API emulator (api key {api_key!r}):")
        print(f"  OpenAI        base_url={emu.base_url}")
        print(f"  Azure OpenAI  endpoint={emu.azure_endpoint}")
        print(f"  Anthropic     base_url={emu.anthropic_base_url}")
        print(f"  xAI           base_url={emu.xai_base_url}")
        print(f"  Gemini        base_url={emu.gemini_base_url} (api_version v1beta)")
        print("Batches advance every", step_seconds, "s. Press Ctrl-C to stop.", flush=True)
        await asyncio.Event().wait()


async def _migrate(database: str, schema: str) -> None:
    from batchinfer.client import BatchInfer

    async with BatchInfer(database, providers=[], schema=schema) as bi:
        await bi.migrate()
    print(f"Schema {schema!r} is up to date.")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if hasattr(args, "handler"):
            code: int = args.handler(args)
            return code
        if args.command == "demo":
            from batchinfer.demo import run_demo

            if args.requests < 1:
                print("batchinfer demo: --requests must be at least 1", file=sys.stderr)
                return 2
            asyncio.run(
                run_demo(
                    requests=args.requests,
                    database_url=args.database,
                    step_seconds=args.step_seconds,
                    model=args.model,
                    provider=args.provider,
                )
            )
        elif args.command == "emulator":
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(_emulator(args.host, args.port, args.step_seconds, args.api_key))
        elif args.command == "migrate":
            if not args.database:
                print(
                    f"batchinfer migrate: give --database or set ${DATABASE_ENV}", file=sys.stderr
                )
                return 2
            asyncio.run(_migrate(args.database, args.schema))
    except CliError as exc:
        print(f"batchinfer {args.command}: {exc}", file=sys.stderr)
        return exc.code
    except (BatchInferError, ValueError) as exc:
        print(f"batchinfer {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.command == "demo":
            raise
        print(f"batchinfer {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
