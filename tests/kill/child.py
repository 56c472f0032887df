"""The child of the kill-anywhere harness: one flow, killed with SIGKILL at a named point.

``python -m tests.kill.child --database URL --schema S --base-url U --api-key K --log F
--flow worker|submit|fetch [--batch ID ...] [--kill-at POINT --kill-after N --hit-file H]
[--plain-file P]``

- ``worker``: ``bi.worker(poll_schedule=(0.05,), idle_seconds=0.05, lease_seconds=1).run()``
  with two handlers: ``tx`` (named, transactional: inserts ``(batch_id, pid)`` into
  ``<schema>.handler_runs`` on the handler's connection) and an unnamed plain one (appends
  ``"<batch_id> <pid>"`` to ``--plain-file``). Runs until SIGTERM (exit 0) or SIGKILL.
- ``submit``: ``await bi.submit_batch(id)`` for each ``--batch``, in order.
- ``fetch``: ``await bi.fetch_batch_results(id)`` for each ``--batch``, in order.

The ``BatchInfer`` uses ``claim_seconds=1`` and ``apply_chunk_size=7`` (a results pass has many
chunks). ``--kill-at`` wraps one method of the real objects (see :data:`POINTS`); the
``--kill-after``-th time that point is reached the child appends ``"POINT N"`` to
``--hit-file`` and sends itself SIGKILL, before or after the real call as the point says.

``python -m tests.kill.child --zygote`` is the harness's fork server: it imports everything
once, then forks one such child per request (see :func:`zygote`), so a run does not wait a
second of CPU for imports; each forked child is a process of its own, killed for real.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any

import sqlalchemy as sa
import sqlalchemy.dialects.postgresql.asyncpg  # imported while warming up
from sqlalchemy.ext.asyncio import AsyncConnection

from batchinfer import Batch, BatchInfer, OpenAIProvider, Price

logger = logging.getLogger("kill_child")

MODEL = "gpt-4o-mini"
#: Every BatchInfer of the harness prices with these (USD per million tokens, live rate), so
#: the expected cost of each result can be computed from its line without the price table.
PRICES = {
    MODEL: Price(
        input_per_mtok=Decimal("0.15"),
        output_per_mtok=Decimal("0.60"),
        cached_input_per_mtok=Decimal("0.075"),
    )
}
BATCH_DISCOUNT = Decimal("0.5")
CLAIM_SECONDS = 1.0
LEASE_SECONDS = 1.0
APPLY_CHUNK_SIZE = 7
TX_HANDLER = "tx"


@dataclass(frozen=True)
class Point:
    """Where a child can be killed: what it wraps, when, and in which flows."""

    name: str
    where: str
    flows: tuple[str, ...]


WORKER, SUBMIT, FETCH = "worker", "submit", "fetch"
_SUBMITTING = (WORKER, SUBMIT)
_APPLYING = (WORKER, FETCH)

#: Every kill point, in the order of a batch's life.
POINTS: dict[str, Point] = {
    p.name: p
    for p in (
        Point(
            "claim_due:after",
            "claims.claim_due committed: the worker holds fresh claims, has done nothing",
            (WORKER,),
        ),
        Point(
            "claim_unsubmitted:after",
            "claims.claim_unsubmitted committed: submit_batch holds the claim, nothing sent",
            (SUBMIT,),
        ),
        Point(
            "input_stream:mid",
            "mid-upload: the first half of the JSONL body sent, the rest never",
            _SUBMITTING,
        ),
        Point(
            "upload_input:after",
            "provider.upload_input returned: uploaded, the file id not recorded",
            _SUBMITTING,
        ),
        Point(
            "record_input_file:after",
            "batches.record_input_file committed: the provider batch not created",
            _SUBMITTING,
        ),
        Point(
            "create_batch:after",
            "provider.create_batch returned: created at the provider, not recorded",
            _SUBMITTING,
        ),
        Point(
            "record_submission:after",
            "batches.record_submission committed: submitted, not yet polled",
            _SUBMITTING,
        ),
        Point(
            "record_status:before",
            "a poll answered, about to call batches.record_status",
            (WORKER,),
        ),
        Point(
            "record_status:after",
            "batches.record_status committed (a status, maybe terminal, recorded)",
            (WORKER,),
        ),
        Point(
            "apply_rows:after",
            "results.apply_rows committed the N-th chunk: mid-apply",
            _APPLYING,
        ),
        Point(
            "finish_results:before",
            "every chunk applied, about to sweep and total (results.finish_results)",
            _APPLYING,
        ),
        Point(
            "finish_results:after",
            "results.finish_results committed: applied, input file not deleted, no handler",
            _APPLYING,
        ),
        Point(
            "handler_tx:mid",
            "inside the transactional handler, after its insert, before it returns",
            (WORKER,),
        ),
        Point(
            "handler_plain:after",
            "the plain handler did its work, its record not yet written",
            (WORKER,),
        ),
        Point(
            "dispatch:after",
            "handlers.dispatch committed the N-th handler record",
            (WORKER,),
        ),
        Point(
            "record_dispatched:before",
            "every handler recorded, handler_dispatched_at not yet set",
            (WORKER,),
        ),
    )
}


# -- the kill -------------------------------------------------------------------------------------


class Killer:
    """Counts how often the chosen point is reached; SIGKILLs this process at the N-th time."""

    def __init__(self, point: str | None, after: int, hit_file: Path | None) -> None:
        self.point = point
        self.after = after
        self.hit_file = hit_file
        self.count = 0

    def reached(self, point: str) -> None:
        if point != self.point:
            return
        self.count += 1
        if self.count != self.after:
            return
        if self.hit_file is not None:
            fd = os.open(self.hit_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, f"{point} {self.count}\n".encode())
            finally:
                os.close(fd)
        logger.info("kill point %s reached (time %d): SIGKILL", point, self.count)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _wrap(killer: Killer, obj: Any, attr: str, point: str, *, before: bool) -> None:
    """Replace the bound method ``obj.attr`` (an instance attribute shadows it) by one that
    reaches ``point`` before or after awaiting the real one."""
    real = getattr(obj, attr)

    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        if before:
            killer.reached(point)
        result = await real(*args, **kwargs)
        if not before:
            killer.reached(point)
        return result

    setattr(obj, attr, wrapped)


class _KillAfterExit:
    """Wraps the async context manager of a handler record: reaches the point once its
    transaction has committed (the block ended without an error)."""

    def __init__(self, inner: Any, killer: Killer, point: str) -> None:
        self.inner = inner
        self.killer = killer
        self.point = point

    async def __aenter__(self) -> Any:
        return await self.inner.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        suppressed: bool | None = await self.inner.__aexit__(exc_type, exc, tb)
        if exc_type is None:
            self.killer.reached(self.point)
        return suppressed


def install(killer: Killer, bi: BatchInfer, provider: OpenAIProvider) -> None:
    """Wrap the one method the chosen point names, on this process's real objects."""
    point = killer.point
    if point is None:
        return
    store = bi._store
    if point == "claim_due:after":
        real_claim_due = store.claims.claim_due

        async def claim_due(*args: Any, **kwargs: Any) -> Any:
            claimed = await real_claim_due(*args, **kwargs)
            if claimed:  # a cycle that claimed nothing does not count
                killer.reached(point)
            return claimed

        store.claims.claim_due = claim_due  # type: ignore[method-assign]
    elif point == "claim_unsubmitted:after":
        _wrap(killer, store.claims, "claim_unsubmitted", point, before=False)
    elif point == "input_stream:mid":
        real_upload = provider.upload_input

        async def upload(stream: Callable[[], AsyncIterator[bytes]], *, filename: str) -> str:
            def halves() -> AsyncIterator[bytes]:
                async def chunks() -> AsyncIterator[bytes]:
                    # The real bytes, each chunk sent in two writes: the kill comes between
                    # them, once the first half has been handed to the connection.
                    async for chunk in stream():
                        half = max(1, len(chunk) // 2)
                        yield chunk[:half]
                        killer.reached(point)
                        yield chunk[half:]

                return chunks()

            return await real_upload(halves, filename=filename)

        provider.upload_input = upload  # type: ignore[method-assign]
    elif point == "upload_input:after":
        _wrap(killer, provider, "upload_input", point, before=False)
    elif point == "record_input_file:after":
        _wrap(killer, store.batches, "record_input_file", point, before=False)
    elif point == "create_batch:after":
        _wrap(killer, provider, "create_batch", point, before=False)
    elif point == "record_submission:after":
        _wrap(killer, store.batches, "record_submission", point, before=False)
    elif point in ("record_status:before", "record_status:after"):
        _wrap(killer, store.batches, "record_status", point, before=point.endswith("before"))
    elif point == "apply_rows:after":
        _wrap(killer, store.results, "apply_rows", point, before=False)
    elif point in ("finish_results:before", "finish_results:after"):
        _wrap(killer, store.results, "finish_results", point, before=point.endswith("before"))
    elif point == "dispatch:after":
        real_dispatch = store.handlers.dispatch

        def dispatch(*args: Any, **kwargs: Any) -> _KillAfterExit:
            return _KillAfterExit(real_dispatch(*args, **kwargs), killer, point)

        store.handlers.dispatch = dispatch  # type: ignore[method-assign,assignment]
    elif point == "record_dispatched:before":
        _wrap(killer, store.handlers, "record_dispatched", point, before=True)
    elif point in ("handler_tx:mid", "handler_plain:after"):
        pass  # reached inside the handlers themselves
    else:
        raise SystemExit(f"unknown kill point {point!r}; one of {', '.join(POINTS)}")


# -- the flows ------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.kill.child")
    p.add_argument("--database")
    p.add_argument("--schema")
    p.add_argument("--base-url")
    p.add_argument("--api-key")
    p.add_argument("--log", type=Path)
    p.add_argument("--flow", choices=(WORKER, SUBMIT, FETCH))
    p.add_argument("--batch", action="append", default=[])
    p.add_argument("--kill-at", choices=sorted(POINTS))
    p.add_argument("--kill-after", type=int, default=1)
    p.add_argument("--hit-file", type=Path)
    p.add_argument("--plain-file", type=Path)
    return p


async def main(args: argparse.Namespace) -> None:
    killer = Killer(args.kill_at, args.kill_after, args.hit_file)
    provider = OpenAIProvider(api_key=args.api_key, base_url=args.base_url)
    async with BatchInfer(
        args.database,
        providers=[provider],
        schema=args.schema,
        prices=PRICES,
        claim_seconds=CLAIM_SECONDS,
        apply_chunk_size=APPLY_CHUNK_SIZE,
        poll_interval=0.05,
    ) as bi:
        orphaned = asyncio.create_task(_exit_when_orphaned())
        install(killer, bi, provider)
        logger.info("ready: flow %s, kill at %s after %s", args.flow, args.kill_at, args.kill_after)
        if args.flow == SUBMIT:
            for batch_id in args.batch:
                batch = await bi.submit_batch(batch_id)
                logger.info("submitted %s as %s", batch.id, batch.provider_batch_id)
        elif args.flow == FETCH:
            for batch_id in args.batch:
                batch = await bi.fetch_batch_results(batch_id)
                logger.info("results of %s applied: %s", batch.id, batch.results_applied_at)
        else:
            await run_worker(bi, killer, args)
        orphaned.cancel()


async def _exit_when_orphaned() -> None:
    """A child whose parent (the harness, or its fork server) died goes too."""
    parent = os.getppid()
    while True:
        await asyncio.sleep(0.5)
        if os.getppid() != parent:
            os._exit(3)


async def run_worker(bi: BatchInfer, killer: Killer, args: argparse.Namespace) -> None:
    runs = sa.text(f'INSERT INTO "{args.schema}".handler_runs (batch_id, pid) VALUES (:b, :p)')

    @bi.on_batch_end(name=TX_HANDLER)
    async def tx(batch: Batch, conn: AsyncConnection) -> None:
        await conn.execute(runs, {"b": batch.id, "p": os.getpid()})
        killer.reached("handler_tx:mid")

    plain_file: Path = args.plain_file

    @bi.on_batch_end
    async def plain(batch: Batch) -> None:
        with plain_file.open("a") as out:
            out.write(f"{batch.id} {os.getpid()}\n")
        killer.reached("handler_plain:after")

    worker = bi.worker(poll_schedule=(0.05,), idle_seconds=0.05, lease_seconds=LEASE_SECONDS)
    run = asyncio.create_task(worker.run())
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, run.cancel)
    logger.info("worker %s running", worker.id)
    with contextlib.suppress(asyncio.CancelledError):
        await run
    logger.info("worker %s stopped", worker.id)


def arguments(argv: list[str]) -> argparse.Namespace:
    args = parser().parse_args(argv)
    missing = [
        n for n in ("database", "schema", "base_url", "api_key", "flow") if not vars(args)[n]
    ]
    if missing:
        raise SystemExit(f"missing arguments: {', '.join(missing)}")
    if args.kill_at is not None and (args.kill_after < 1 or args.hit_file is None):
        raise SystemExit("--kill-at needs --kill-after >= 1 and --hit-file")
    if args.flow == WORKER and args.plain_file is None:
        raise SystemExit("the worker flow needs --plain-file")
    return args


def run(argv: list[str]) -> int:
    """One child, start to end; the exit code."""
    args = arguments(argv)
    logging.basicConfig(
        filename=args.log,
        level=logging.INFO,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
        force=True,
    )
    asyncio.run(main(args))
    return 0


# -- the fork server ------------------------------------------------------------------------------


def _say(line: str) -> None:
    os.write(1, line.encode() + b"\n")  # unbuffered: whole lines, never interleaved


def _forked(argv: list[str], log: str) -> None:
    """In the forked child: output to ``log``, run, and exit without returning."""
    code = 1
    try:
        os.setpgid(0, 0)  # a group of its own: a signal to the fork server is not its
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(devnull)
        os.close(out)
        code = run([*argv, "--log", log])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def zygote() -> None:
    """Import everything once, then fork a child per line of stdin (``{"args", "log"}``).

    Says ``started PID`` for each child and ``exit PID CODE`` once it is reaped (CODE is
    minus the signal's number for a child killed by one). Holds no event loop, thread or
    connection, so each forked child starts clean; exits at end-of-file on stdin.
    """
    import select

    children: set[int] = set()
    pending = b""
    while True:
        ready, _, _ = select.select([0], [], [], 0.01)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            children.discard(pid)
            _say(f"exit {pid} {os.waitstatus_to_exitcode(status)}")
        if not ready:
            continue
        data = os.read(0, 65536)
        if not data:
            break
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                _forked(request["args"], request["log"])
            children.add(pid)
            _say(f"started {pid}")
    # The harness is gone: end what is left, say so, and go.
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in children:
        _, status = os.waitpid(pid, 0)
        _say(f"exit {pid} {os.waitstatus_to_exitcode(status)}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--zygote"]:
        zygote()
    else:
        sys.exit(run(sys.argv[1:]))
