"""A worker process for tests/test_processes.py: ``python worker_proc.py --database URL ...``.

It builds a ``BatchInfer`` on the test's Postgres schema and emulator, registers two handlers
and runs ``bi.worker(...).run()`` until SIGTERM (which cancels the run and exits 0) or SIGKILL.

- ``tx`` (named, transactional): inserts ``(batch_id, pid)`` into ``<schema>.handler_runs`` on
  the handler's connection, so the row commits only with the dispatch record. With
  ``--tx-sleep S`` it then creates ``--inside-file`` and sleeps S seconds before returning.
- an unnamed plain handler, only with ``--plain-file``: appends ``"<batch_id> <pid>"`` to that
  file (at-least-once), then with ``--plain-sleep S`` creates ``--inside-file`` and sleeps.

The worker's row in ``<schema>.workers`` (pid = this process) says it is working. Logs go to
``--log``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from batchinfer import Batch, BatchInfer, OpenAIProvider

logger = logging.getLogger("worker_proc")


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--database", required=True)
    parser.add_argument("--schema", required=True)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--lease", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--tx-sleep", type=float, default=0.0)
    parser.add_argument("--plain-file", type=Path)
    parser.add_argument("--plain-sleep", type=float, default=0.0)
    parser.add_argument("--inside-file", type=Path)
    return parser.parse_args()


def _inside(args: argparse.Namespace, batch: Batch) -> None:
    if args.inside_file is not None:
        args.inside_file.write_text(f"{batch.id} {os.getpid()}\n")


async def main(args: argparse.Namespace) -> None:
    provider = OpenAIProvider(api_key=args.api_key, base_url=args.base_url)
    async with BatchInfer(args.database, providers=[provider], schema=args.schema) as bi:
        runs = sa.text(f'INSERT INTO "{args.schema}".handler_runs (batch_id, pid) VALUES (:b, :p)')

        @bi.on_batch_end(name="tx")
        async def tx(batch: Batch, conn: AsyncConnection) -> None:
            await conn.execute(runs, {"b": batch.id, "p": os.getpid()})
            logger.info("tx handler inserted its row for batch %s", batch.id)
            if args.tx_sleep:
                _inside(args, batch)
                await asyncio.sleep(args.tx_sleep)

        if args.plain_file is not None:
            plain_file: Path = args.plain_file

            async def plain(batch: Batch) -> None:
                with plain_file.open("a") as out:
                    out.write(f"{batch.id} {os.getpid()}\n")
                if args.plain_sleep:
                    _inside(args, batch)
                    await asyncio.sleep(args.plain_sleep)

            bi.on_batch_end(plain)

        worker = bi.worker(
            poll_schedule=(0.05,),
            idle_seconds=0.05,
            lease_seconds=args.lease,
            concurrency=args.concurrency,
        )
        run = asyncio.create_task(worker.run())
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, run.cancel)
        logger.info("ready: worker %s", worker.id)
        with contextlib.suppress(asyncio.CancelledError):
            await run
        logger.info("worker %s stopped", worker.id)


if __name__ == "__main__":
    arguments = _args()
    logging.basicConfig(
        filename=arguments.log,
        level=logging.INFO,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
    asyncio.run(main(arguments))
