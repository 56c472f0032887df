"""Workers inside a web app's lifetime: Starlette/FastAPI lifespans and aiohttp cleanup contexts.

The app creates one BatchInfer when it starts (inside its own event loop), migrates, runs a
worker beside its requests, and at shutdown stops the worker (its claims released, its row in
``workers`` gone) before closing the BatchInfer. Starlette and FastAPI are never imported here:
the app is only asked for ``app.state``.

Register completion handlers in the factory, so every process running a worker has them::

    def make_bi() -> BatchInfer:
        bi = BatchInfer(DATABASE_URL, providers=[OpenAIProvider(api_key=KEY)])
        bi.on_batch_end(summaries_done, name="summaries")
        return bi

    app = FastAPI(lifespan=lifespan(make_bi))
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypedDict, Unpack

# Not an optional framework: batchinfer depends on aiohttp for its HTTP already.
from aiohttp import web

from batchinfer.client import BatchInfer
from batchinfer.worker import Clock, Worker

__all__ = [
    "BATCHINFER",
    "BatchInferFactory",
    "WorkerArgs",
    "aiohttp_cleanup_ctx",
    "lifespan",
    "running_worker",
]

logger = logging.getLogger(__name__)

#: Returns the app's BatchInfer, with its handlers registered; called once, at startup.
BatchInferFactory = Callable[[], BatchInfer | Awaitable[BatchInfer]]

#: Where :func:`aiohttp_cleanup_ctx` keeps the BatchInfer unless told otherwise:
#: ``request.app[BATCHINFER]``.
BATCHINFER = web.AppKey("batchinfer", BatchInfer)


class WorkerArgs(TypedDict, total=False):
    """The keyword arguments of :meth:`BatchInfer.worker`, so a type checker sees typos."""

    poll_schedule: Sequence[float]
    lease_seconds: float
    max_age_seconds: float
    handler_attempts: int
    concurrency: int
    idle_seconds: float
    shutdown_seconds: float
    clock: Clock | None


@asynccontextmanager
async def running_worker(
    bi: BatchInfer, **worker_options: Unpack[WorkerArgs]
) -> AsyncIterator[Worker]:
    """Run ``bi.worker(**worker_options).run()`` in a task for the block; yield the worker.

    On exit the task is cancelled and awaited: the worker lets writes in flight finish and
    releases its claims, within its ``shutdown_seconds`` or so. Should the worker die while the
    block runs, that is logged at once (``batchinfer.worker_died``), and its exception raised
    when the block ends (unless the block raised one of its own).
    """
    worker = bi.worker(**worker_options)
    task = asyncio.create_task(worker.run(), name=f"batchinfer-worker-{worker.id}")
    stopping = False

    def ended(task: asyncio.Task[None]) -> None:
        # Nobody awaits the task until the app stops, which may be days away: say so now.
        if not stopping:
            _log_end(
                worker, task, "worker_died", "this process drives no batches until it restarts"
            )

    task.add_done_callback(ended)
    body_raised = True
    try:
        yield worker
        body_raised = False
    finally:
        stopping = not task.done()
        task.cancel()
        await asyncio.wait([task])
        if stopping and body_raised and _error(task) is not None:
            # The block's own exception goes on; this one would be lost without a word.
            _log_end(worker, task, "worker_stop_failed", "while stopping")
    if (error := _error(task)) is not None:
        raise error


def _error(task: asyncio.Task[None]) -> BaseException | None:
    return None if task.cancelled() else task.exception()


def _log_end(worker: Worker, task: asyncio.Task[None], event: str, context: str) -> None:
    error = _error(task)
    if error is not None:
        how = f"{type(error).__name__}: {error}"
    else:
        how = "cancelled by another caller" if task.cancelled() else "returned"
    logger.error(
        "batchinfer.%s worker %s: %s; %s",
        event,
        worker.id,
        how,
        context,
        exc_info=error,
        extra={"batchinfer.event": event, "batchinfer.worker": worker.id},
    )


def lifespan(
    make_bi: BatchInferFactory,
    *,
    worker: bool = True,
    migrate: bool = True,
    **worker_options: Unpack[WorkerArgs],
) -> Callable[[Any], AbstractAsyncContextManager[None]]:
    """A Starlette/FastAPI lifespan: ``FastAPI(lifespan=lifespan(lambda: BatchInfer(...)))``.

    At startup it calls ``make_bi`` (which may be async; register handlers there with
    ``bi.on_batch_end``), runs ``migrate()`` if ``migrate``, puts the BatchInfer on
    ``app.state.batchinfer`` and, if ``worker``, runs a worker with ``worker_options``
    (see :meth:`BatchInfer.worker`). At shutdown it stops the worker, then closes the
    BatchInfer. To add startup work of the app's own, enter it from the app's lifespan:
    ``async with batchinfer_lifespan(app): yield``.
    """
    _check(worker, worker_options)

    @asynccontextmanager
    async def run(app: Any) -> AsyncIterator[None]:
        async with _serving(make_bi, worker=worker, migrate=migrate, options=worker_options) as bi:
            app.state.batchinfer = bi
            yield

    return run


def aiohttp_cleanup_ctx(
    make_bi: BatchInferFactory,
    *,
    key: web.AppKey[BatchInfer] = BATCHINFER,
    worker: bool = True,
    migrate: bool = True,
    **worker_options: Unpack[WorkerArgs],
) -> Callable[[web.Application], AsyncIterator[None]]:
    """For ``app.cleanup_ctx.append(...)``: the same as :func:`lifespan`, for aiohttp.

    The BatchInfer is kept under ``key`` (:data:`BATCHINFER` unless given):
    ``request.app[BATCHINFER]``.
    """
    _check(worker, worker_options)

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        async with _serving(make_bi, worker=worker, migrate=migrate, options=worker_options) as bi:
            app[key] = bi
            yield

    return ctx


def _check(worker: bool, options: WorkerArgs) -> None:
    if options and not worker:
        raise TypeError(f"worker options {sorted(options)} given with worker=False")


@asynccontextmanager
async def _serving(
    make_bi: BatchInferFactory, *, worker: bool, migrate: bool, options: WorkerArgs
) -> AsyncIterator[BatchInfer]:
    made = make_bi()
    bi = await made if inspect.isawaitable(made) else made
    if not isinstance(bi, BatchInfer):
        raise TypeError(f"the factory must return a BatchInfer, not {type(bi).__name__}")
    async with bi:
        if migrate:
            await bi.migrate()
        if not worker:
            yield bi
            return
        async with running_worker(bi, **options):
            yield bi
