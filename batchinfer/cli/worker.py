"""``batchinfer worker``: drive the batches of one database until told to stop.

Apps create batches with ``submit=True`` and return at once; this process (as many copies as
wanted, on any machines) submits them, polls them on the backoff schedule and applies their
results. It stops on SIGTERM or Ctrl-C the way ``Worker.run`` does when cancelled: writes in
flight finish and every claim is released, so a deploy hands the batches to the next process
without waiting for leases to lapse.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from batchinfer.cli.common import (
    DATABASE_ENV,
    CliError,
    add_provider_flags,
    positive_number,
    provider_from,
    say,
    whole_number,
)
from batchinfer.client import BatchInfer
from batchinfer.errors import SchemaNotReadyError
from batchinfer.providers.base import Provider
from batchinfer.worker import DEFAULT_POLL_SCHEDULE, Worker

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def add_parser(commands: Any) -> None:
    parser: argparse.ArgumentParser = commands.add_parser(
        "worker",
        help="drive batches created with submit=True: submit, poll, collect, until stopped",
        description="Claim the batches of the database that are due (created with "
        "submit=True, or due for their next poll), submit them, poll them on the backoff "
        "schedule, and apply their results, until SIGTERM or Ctrl-C; then finish the writes "
        "in flight, release every claim and exit 0. Run as many as you like, on any "
        "machines. The tables must exist: run `batchinfer migrate` first. Completion "
        "handlers run only where they are registered: give the app's with --handlers, or a "
        "batch naming one waits, once its results are applied, for a worker that knows it.",
    )
    group = parser.add_argument_group("database")
    group.add_argument(
        "--database",
        metavar="URL",
        default=os.environ.get(DATABASE_ENV),
        help=f"Postgres URL (default ${DATABASE_ENV})",
    )
    group.add_argument(
        "--schema", default="batchinfer", help="schema of the tables (default batchinfer)"
    )
    add_provider_flags(parser)
    work = parser.add_argument_group("worker")
    work.add_argument(
        "--once",
        action="store_true",
        help="do one cycle (claim what is due now, one step each), print how many batches "
        "were worked on, and exit: for cron",
    )
    work.add_argument(
        "--handlers",
        action="append",
        default=[],
        metavar="MODULE:FUNCTION",
        help="import MODULE (from the current directory too) and call FUNCTION(bi) to register "
        "the app's completion handlers with bi.on_batch_end; repeatable",
    )
    work.add_argument(
        "--concurrency",
        type=whole_number,
        default=4,
        metavar="N",
        help="batches driven at once (default 4)",
    )
    work.add_argument(
        "--poll-schedule",
        type=_schedule,
        default=DEFAULT_POLL_SCHEDULE,
        metavar="SECONDS,...",
        help="seconds before each poll of a batch, the last repeating (default "
        f"{','.join(f'{d:g}' for d in DEFAULT_POLL_SCHEDULE)})",
    )
    work.add_argument(
        "--lease-seconds",
        type=_lease,
        default=30.0,
        metavar="SECONDS",
        help="how long a claim lasts unless renewed; a dead worker's batches are taken over "
        "after it (default 30)",
    )
    work.add_argument(
        "--max-age-hours",
        type=positive_number,
        default=26.0,
        metavar="HOURS",
        help="cancel a batch still running this long after submission and end it as expired "
        "(default 26)",
    )
    work.add_argument(
        "--idle-seconds",
        type=positive_number,
        default=5.0,
        metavar="SECONDS",
        help="how often an idle worker looks for due work besides being woken (default 5)",
    )
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="info",
        help="level of the batchinfer.* events logged on stderr (default info)",
    )
    parser.set_defaults(handler=worker_command)


def _lease(text: str) -> float:
    value = positive_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError("a lease lasts at least 1 second")
    return value


def _schedule(text: str) -> tuple[float, ...]:
    try:
        return tuple(positive_number(part.strip()) for part in text.split(","))
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r}: {exc}; expected seconds separated by commas, such as 60,120,300"
        ) from None


def worker_command(args: argparse.Namespace) -> int:
    if not args.database:
        raise CliError(f"give --database or set ${DATABASE_ENV}", code=2)
    provider = provider_from(args)
    registrars = [(spec, _registrar(spec)) for spec in args.handlers]
    _configure_logging(args.log_level)
    return asyncio.run(_work(args, provider, registrars))


Registrar = Callable[[BatchInfer], object]


def _registrar(spec: str) -> Registrar:
    """The app's function that registers its handlers, imported before any connection."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise CliError(
            f"--handlers {spec!r}: expected MODULE:FUNCTION, such as myapp.batches:register",
            code=2,
        )
    # As uvicorn does: the app's package is usually where the command is run from.
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CliError(f"--handlers {spec!r}: cannot import {module_name}: {exc}", code=2) from None
    function = getattr(module, name, None)
    if not callable(function):
        raise CliError(f"--handlers {spec!r}: {module_name} has no function {name!r}", code=2)
    registrar: Registrar = function
    return registrar


def _configure_logging(level: str) -> None:
    # Other libraries keep to warnings, so --log-level debug shows batchinfer's own detail.
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format=LOG_FORMAT)
    logging.getLogger("batchinfer").setLevel(level.upper())


async def _work(
    args: argparse.Namespace, provider: Provider, registrars: list[tuple[str, Registrar]]
) -> int:
    try:
        async with BatchInfer(args.database, providers=[provider], schema=args.schema) as bi:
            for spec, register in registrars:
                try:
                    registered = register(bi)
                    if inspect.isawaitable(registered):
                        await registered
                except (TypeError, ValueError) as exc:  # what on_batch_end refuses
                    raise CliError(f"--handlers {spec!r}: {exc}", code=2) from None
            try:
                await bi.stats()  # the tables are there, before any work is claimed
            except SchemaNotReadyError:
                raise CliError(
                    f"schema {args.schema!r} has no batchinfer tables, or older ones: run "
                    f"`batchinfer migrate --schema {args.schema}` first"
                ) from None
            worker = bi.worker(
                poll_schedule=args.poll_schedule,
                lease_seconds=args.lease_seconds,
                max_age_seconds=args.max_age_hours * 3600,
                concurrency=args.concurrency,
                idle_seconds=args.idle_seconds,
            )
            if args.once:
                worked = await worker.run_once()
                print(f"Worked on {worked} batch{'' if worked == 1 else 'es'}.")
                return 0
            say(
                f"Worker {worker.id} driving the batches of schema {args.schema!r}; "
                "stop it with SIGTERM or Ctrl-C"
            )
            stopped_by = await _run_until_signalled(worker)
        say(f"Worker {worker.id} stopped on {stopped_by}; its batches are free for others.")
        return 0
    finally:
        await provider.aclose()


async def _run_until_signalled(worker: Worker) -> str:
    """Run the worker until SIGTERM or SIGINT cancels it; return the signal's name.

    A second signal cancels the shutdown too: claims then lapse after their lease.
    """
    loop = asyncio.get_running_loop()
    run = asyncio.create_task(worker.run(), name=f"batchinfer-worker-{worker.id}")
    received: list[str] = []

    def stop(sig: signal.Signals) -> None:
        received.append(sig.name)
        run.cancel()

    handled = (signal.SIGTERM, signal.SIGINT)
    for sig in handled:
        loop.add_signal_handler(sig, stop, sig)
    try:
        await asyncio.wait([run])
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
    if not run.cancelled():
        run.result()  # the worker ended on its own: raise what ended it
    return received[0] if received else "cancellation"
