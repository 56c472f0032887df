"""The parent side of the kill-anywhere harness: make batches, kill a child, recover, check.

One run (its parameters depend only on the seed and the run's number):

1. A fresh schema (migrated, plus ``handler_runs`` and an audit trigger on ``completions``
   that records every change of a row from a non-terminal status to a terminal one, and any
   later rewrite of a terminal row) and a fresh emulator on loopback. Its batches advance on
   their own (``step_seconds=0.02``), or, in a run where a batch is to expire part-way, the
   parent ends each one as planned (``emulator.process`` then ``emulator.expire``, or
   ``emulator.finish``).
2. 1 to 3 batches of 3 to 40 requests, some scripted to fail (``emulator.fail_request``) and
   some to go missing (``emulator.drop_request``); in one run of ten the first provider batch
   fails validation (``emulator.fail_validation``). They are created by the parent's
   ``BatchInfer``: with ``submit=True`` for the worker flow; submitted by the parent and ended
   at the emulator for the fetch flow.
3. A child (:mod:`tests.kill.child`) runs the flow with a kill point and N. It dies by
   SIGKILL at that point (a hit), or ends without reaching it (a worker is stopped with
   SIGTERM once every batch has run its handlers).
4. The flow again, without a kill: a worker child until every batch has
   ``handler_dispatched_at``, or the parent calling ``submit_batch`` then ``wait``, or
   ``fetch_batch_results`` (twice at once for each batch: a results pass may run
   concurrently).
5. Every batch is checked against the emulator's own batches and result files (see
   :meth:`Harness.check`); what does not hold is an anomaly, printed with the seed, the run's
   parameters, the command that repeats it and the children's logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import shutil
import signal
import sys
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import batchinfer
from batchinfer import BatchInfer, InvalidBatchError, OpenAIProvider
from batchinfer.testing import Emulator
from tests.kill.child import (
    APPLY_CHUNK_SIZE,
    BATCH_DISCOUNT,
    CLAIM_SECONDS,
    FETCH,
    MODEL,
    POINTS,
    PRICES,
    SUBMIT,
    TX_HANDLER,
    WORKER,
)

ROOT = Path(batchinfer.__file__).resolve().parents[1]
CHAT = "/v1/chat/completions"
TAG = "batchinfer_batch_id"
TERMINAL = ("completed", "failed", "expired", "cancelled")
#: How long the killed flow, and then the recovery, may take before the run is an anomaly.
FLOW_SECONDS = 30.0
MISSING_ERROR = "openai batch entry missing"
REJECTED_ERROR = "openai batch failed"
MISSING_REASON = "result not present in the output or error file"
FAILED_ERROR_PREFIX = "OpenAI batch entry failed"
_MTOK = Decimal(1_000_000)


# -- a run's parameters -------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchPlan:
    size: int
    words: list[int]
    #: custom_id -> (HTTP status, message) scripted with ``emulator.fail_request``.
    failed: dict[str, tuple[int, str]]
    dropped: list[str]
    #: "completed", or "expired" after the first ``processed`` requests have run.
    ending: str = "completed"
    processed: int = 0

    def ids(self, index: int) -> list[str]:
        return [f"b{index}-{j}" for j in range(self.size)]


@dataclass(frozen=True)
class Params:
    seed: int
    run: int
    flow: str
    point: str
    after: int
    batches: list[BatchPlan]
    #: Errors (line or None, message) of the run's first provider batch, which then fails
    #: validation (``emulator.fail_validation``); empty: none does.
    rejected: list[tuple[int | None, str]] = field(default_factory=list)

    @property
    def driven(self) -> bool:
        """The parent drives the emulator's batches (to expire some part-way); else they
        advance on their own."""
        return any(b.ending == "expired" for b in self.batches)

    def describe(self) -> str:
        shapes = ", ".join(
            f"{b.size} req/{len(b.failed)} failed/{len(b.dropped)} missing"
            + (f"/expired after {b.processed}" if b.ending == "expired" else "")
            for b in self.batches
        )
        rejected = f" first-provider-batch-rejected={self.rejected}" if self.rejected else ""
        return (
            f"seed={self.seed} run={self.run} flow={self.flow} kill-at={self.point} "
            f"kill-after={self.after} batches=[{shapes}]{rejected}"
        )

    def command(self) -> str:
        return f"python -m tests.kill --seed {self.seed} --run {self.run}"


def combos() -> list[tuple[str, str]]:
    """Every (flow, kill point) pair the harness picks from."""
    return [(flow, name) for name, point in POINTS.items() for flow in point.flows]


def params(seed: int, run: int) -> Params:
    """Run ``run`` of seed ``seed``: the (flow, point) pairs are dealt in shuffled rounds, so
    every pair comes up once per round; the rest is drawn at random."""
    pairs = combos()
    random.Random(f"kill:{seed}:round:{run // len(pairs)}").shuffle(pairs)
    flow, point = pairs[run % len(pairs)]
    rng = random.Random(f"kill:{seed}:run:{run}")
    plans: list[BatchPlan] = []
    for i in range(rng.randint(1, 3)):
        size = rng.randint(3, 40)
        fail_rate = rng.choice((0.0, 0.1, 0.1, 0.3, 1.0))
        drop_rate = rng.choice((0.0, 0.05, 0.15))
        failed: dict[str, tuple[int, str]] = {}
        dropped: list[str] = []
        for j in range(size):
            custom_id = f"b{i}-{j}"
            draw = rng.random()
            if draw < fail_rate:
                status = rng.choice((400, 404, 500))
                failed[custom_id] = (
                    status,
                    f"scripted {status} for {custom_id} #{rng.randrange(1000)}",
                )
            elif draw < fail_rate + drop_rate:
                dropped.append(custom_id)
        if len(dropped) == size:
            dropped.pop()  # a batch with no line in either file is never ready: keep one
        words = [rng.randint(1, 40) for _ in range(size)]
        expired = rng.random() < 0.15
        plans.append(
            BatchPlan(
                size,
                words,
                failed,
                dropped,
                ending="expired" if expired else "completed",
                processed=rng.randint(0, size) if expired else 0,
            )
        )
    rejected: list[tuple[int | None, str]] = []
    if rng.random() < 0.1:
        smallest = min(b.size for b in plans)
        lines = sorted(rng.sample(range(1, smallest + 1), rng.randint(0, min(2, smallest))))
        rejected = [(line, f"scripted rejection of line {line}") for line in lines] or [
            (None, "scripted rejection of the whole file")
        ]
    n = len(plans)
    chunks = sum(
        math.ceil((b.size - len(b.failed) - len(b.dropped)) / APPLY_CHUNK_SIZE)
        + math.ceil(len(b.failed) / APPLY_CHUNK_SIZE)
        for b in plans
    )
    most = {
        "apply_rows:after": max(1, chunks),
        "dispatch:after": 2 * n,
    }.get(point, n)
    return Params(seed, run, flow, point, rng.randint(1, most), plans, rejected)


def requests_of(plan: BatchPlan, index: int) -> list[dict[str, Any]]:
    return [
        {
            "custom_id": custom_id,
            "body": {
                "messages": [
                    {"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": " ".join([f"question {j}"] * plan.words[j])},
                ]
            },
            "metadata": {"j": j},
        }
        for j, custom_id in enumerate(plan.ids(index))
    ]


# -- figures ------------------------------------------------------------------------------------


@dataclass
class Figures:
    runs: int = 0
    hits: Counter[str] = field(default_factory=Counter)
    not_hit: Counter[str] = field(default_factory=Counter)
    flows: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    completions: int = 0
    anomalies: list[str] = field(default_factory=list)
    plain_reruns: int = 0
    inputs_left: Counter[str] = field(default_factory=Counter)
    partial_uploads: int = 0
    seconds: float = 0.0

    def report(self, seed: int | None = None) -> str:
        hit = sum(self.hits.values())
        lines = [
            f"kill-anywhere: {self.runs} runs"
            + (f" (seed {seed})" if seed is not None else "")
            + f" in {self.seconds:.1f} s: kill points hit {hit}, not reached "
            f"{sum(self.not_hit.values())}; {self.batches} batches and {self.completions} "
            f"completions checked; anomalies {len(self.anomalies)}",
            "  flows: " + ", ".join(f"{f} {n}" for f, n in sorted(self.flows.items())),
            f"  {'kill point':<26} {'hit':>5} {'not hit':>8}",
        ]
        for name in POINTS:
            if self.hits[name] or self.not_hit[name]:
                lines.append(f"  {name:<26} {self.hits[name]:>5} {self.not_hit[name]:>8}")
        lines.append(
            f"  plain handler run again after a kill: {self.plain_reruns}; unused partial "
            f"uploads left at the provider: {self.partial_uploads}; input files never deleted "
            f"at the provider: {sum(self.inputs_left.values())}"
            + (
                " (" + ", ".join(f"{p} {n}" for p, n in sorted(self.inputs_left.items())) + ")"
                if self.inputs_left
                else ""
            )
        )
        return "\n".join(lines)


@dataclass
class RunResult:
    params: Params
    hit: bool = False
    anomalies: list[str] = field(default_factory=list)
    completions: int = 0
    plain_reruns: int = 0
    inputs_left: int = 0
    partial_uploads: int = 0
    seconds: float = 0.0
    killed_seconds: float = 0.0
    recovery_seconds: float = 0.0
    children: list[Child] = field(default_factory=list)
    server_log: list[str] = field(default_factory=list)
    kept: str = ""


# -- children -------------------------------------------------------------------------------------


class Child:
    """A child forked by the fork server: signalled by pid, its exit reported by the server."""

    def __init__(self, pid: int, log: Path, exited: asyncio.Future[int]) -> None:
        self.pid = pid
        self.log = log
        self.exited = exited

    @property
    def returncode(self) -> int | None:
        return self.exited.result() if self.exited.done() else None

    async def wait(self, seconds: float | None = None) -> int:
        return await asyncio.wait_for(asyncio.shield(self.exited), seconds)

    async def stop(self, sig: int = signal.SIGKILL, seconds: float = 10.0) -> int:
        if not self.exited.done():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
        try:
            return await self.wait(seconds)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            return await self.wait(seconds)


class ForkServer:
    """``python -m tests.kill.child --zygote``: imports batchinfer once and forks each child
    from there, so a child starts in milliseconds instead of a second of CPU for imports."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.reader: asyncio.Task[None] | None = None
        self.starting: list[asyncio.Future[int]] = []
        self.exits: dict[int, asyncio.Future[int]] = {}

    async def _ensure(self) -> asyncio.subprocess.Process:
        if self.proc is None:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.kill.child",
                "--zygote",
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            self.reader = asyncio.create_task(self._read(self.proc))
        return self.proc

    def _exit_future(self, pid: int) -> asyncio.Future[int]:
        if pid not in self.exits:
            self.exits[pid] = asyncio.get_running_loop().create_future()
        return self.exits[pid]

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            what, pid, *rest = line.decode().split()
            if what == "started":
                self.starting.pop(0).set_result(int(pid))
            elif what == "exit":
                future = self._exit_future(int(pid))
                if not future.done():
                    future.set_result(int(rest[0]))
        for future in [*self.starting, *self.exits.values()]:
            if not future.done():
                future.set_exception(RuntimeError("the fork server ended"))

    async def start(self, args: list[str], log: Path) -> Child:
        """A child forked with ``args``, its output and logs going to ``log``."""
        proc = await self._ensure()
        assert proc.stdin is not None
        started = asyncio.get_running_loop().create_future()
        self.starting.append(started)
        proc.stdin.write(orjson.dumps({"args": args, "log": str(log)}) + b"\n")
        await proc.stdin.drain()
        pid = await asyncio.wait_for(started, 30)
        return Child(pid, log, self._exit_future(pid))

    async def close(self) -> None:
        for pid, future in self.exits.items():
            if not future.done():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        proc, self.proc = self.proc, None
        if proc is None:
            return
        assert proc.stdin is not None
        proc.stdin.close()  # the server kills what is left and exits
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        if self.reader is not None:
            await self.reader
        self.exits.clear()


# -- the harness ----------------------------------------------------------------------------------


def _asyncpg(url: str) -> str:
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    return url


class Harness:
    def __init__(
        self,
        database_url: str,
        workdir: Path,
        *,
        out: Callable[[str], None] = print,
        verbose: bool = False,
    ) -> None:
        self.database_url = database_url
        self.workdir = workdir
        self.out = out
        self.verbose = verbose
        self.engine: AsyncEngine = create_async_engine(_asyncpg(database_url), pool_size=5)
        self.children = ForkServer()
        # The emulator's server logs a cut-short upload as an error with a traceback: keep
        # such lines with the run, shown only with its anomalies.
        self.server_log = _Captured()
        self._server_logger = logging.getLogger("aiohttp.server")
        self._server_propagate = self._server_logger.propagate
        self._server_logger.addHandler(self.server_log)
        self._server_logger.propagate = False

    async def aclose(self) -> None:
        self._server_logger.removeHandler(self.server_log)
        self._server_logger.propagate = self._server_propagate
        await self.children.close()
        await self.engine.dispose()

    async def run_many(self, seed: int, runs: Iterator[int] | list[int]) -> Figures:
        figures = Figures()
        started = time.monotonic()
        for run in runs:
            p = params(seed, run)
            result = await self.run(p)
            figures.runs += 1
            figures.flows[p.flow] += 1
            (figures.hits if result.hit else figures.not_hit)[p.point] += 1
            figures.batches += len(p.batches)
            figures.completions += result.completions
            figures.plain_reruns += result.plain_reruns
            figures.partial_uploads += result.partial_uploads
            if result.inputs_left:
                figures.inputs_left[p.point] += result.inputs_left
            if result.anomalies:
                self.out(self.explain(result))
                figures.anomalies.extend(f"{p.describe()}: {a}" for a in result.anomalies)
            elif self.verbose:
                self.out(
                    f"run {run:>4} {p.flow:<6} {p.point:<25} N={p.after:<3} "
                    f"{'hit    ' if result.hit else 'not hit'} {len(p.batches)} batches "
                    f"{result.completions:>3} completions {result.seconds:5.2f}s "
                    f"(killed flow {result.killed_seconds:.2f}s, "
                    f"recovery {result.recovery_seconds:.2f}s) ok"
                )
        figures.seconds = time.monotonic() - started
        return figures

    def explain(self, result: RunResult) -> str:
        p = result.params
        text = [
            f"ANOMALY in {p.describe()} ({'point hit' if result.hit else 'point not hit'})",
            *(f"  - {a}" for a in result.anomalies),
            f"  repeat it: {p.command()}",
            f"  ({result.kept})",
        ]
        if result.server_log:
            text.append("  ----- the emulator's server log -----")
            text.extend(result.server_log)
        for child in result.children:
            log = child.log
            content = log.read_text(errors="replace") if log.exists() else "(no log)"
            text.append(
                f"  ----- {log.name} (pid {child.pid}, exit {child.returncode}) -----\n"
                f"{content[-4000:]}"
            )
        return "\n".join(text)

    # -- one run ----------------------------------------------------------------------------

    async def run(self, p: Params) -> RunResult:
        result = RunResult(p)
        self.server_log.lines = result.server_log
        started = time.monotonic()
        schema = f"kill_{uuid.uuid4().hex[:16]}"
        rundir = self.workdir / f"run-{p.run}"
        shutil.rmtree(rundir, ignore_errors=True)  # nothing left from an earlier invocation
        rundir.mkdir(parents=True)
        try:
            step = None if p.driven else 0.02
            async with Emulator(step_seconds=step, seed=p.seed * 100_003 + p.run) as emulator:
                provider = OpenAIProvider(api_key=emulator.api_key, base_url=emulator.base_url)
                async with BatchInfer(
                    self.engine,
                    providers=[provider],
                    schema=schema,
                    prices=PRICES,
                    claim_seconds=CLAIM_SECONDS,
                    apply_chunk_size=APPLY_CHUNK_SIZE,
                    poll_interval=0.05,
                ) as bi:
                    await bi.migrate()
                    await self._install(schema)
                    await self._run(p, result, bi, emulator, schema, rundir)
        except Exception:
            result.anomalies.append("the run itself failed:\n" + traceback.format_exc())
        finally:
            for child in result.children:
                if child.returncode is None:
                    await child.stop()
        result.seconds = time.monotonic() - started
        if not result.anomalies:
            async with self.engine.begin() as conn:
                await conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        else:
            result.kept = f"schema {schema} kept; files in {rundir}"
        return result

    async def _install(self, schema: str) -> None:
        s = f'"{schema}"'
        statements = [
            f"CREATE TABLE {s}.handler_runs (batch_id uuid NOT NULL, pid integer NOT NULL, "
            "at timestamptz NOT NULL DEFAULT clock_timestamp())",
            f"CREATE TABLE {s}.completion_audit (completion_id bigint NOT NULL, batch_id uuid, "
            "custom_id text, old_status text, new_status text, kind text NOT NULL, "
            "at timestamptz NOT NULL DEFAULT clock_timestamp())",
            f"""CREATE FUNCTION {s}.audit_completion() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF OLD.status NOT IN ('completed', 'failed')
                   AND NEW.status IN ('completed', 'failed') THEN
                    INSERT INTO {s}.completion_audit
                        (completion_id, batch_id, custom_id, old_status, new_status, kind)
                    VALUES (NEW.id, NEW.batch_id, NEW.custom_id, OLD.status, NEW.status,
                            'terminal');
                ELSIF OLD.status IN ('completed', 'failed')
                   AND (NEW.status, NEW.response_body, NEW.failure_error, NEW.failure_reason,
                        NEW.total_cost, NEW.prompt_tokens, NEW.completion_tokens)
                       IS DISTINCT FROM
                       (OLD.status, OLD.response_body, OLD.failure_error, OLD.failure_reason,
                        OLD.total_cost, OLD.prompt_tokens, OLD.completion_tokens) THEN
                    INSERT INTO {s}.completion_audit
                        (completion_id, batch_id, custom_id, old_status, new_status, kind)
                    VALUES (NEW.id, NEW.batch_id, NEW.custom_id, OLD.status, NEW.status,
                            'rewrite');
                END IF;
                RETURN NULL;
            END $$""",
            f"CREATE TRIGGER completion_audit AFTER UPDATE ON {s}.completions "
            f"FOR EACH ROW EXECUTE FUNCTION {s}.audit_completion()",
        ]
        async with self.engine.begin() as conn:
            for statement in statements:
                await conn.execute(sa.text(statement))

    def _child_args(self, emulator: Emulator, schema: str, flow: str, rundir: Path) -> list[str]:
        return [
            "--database", self.database_url, "--schema", schema,
            "--base-url", emulator.base_url, "--api-key", emulator.api_key,
            "--flow", flow, "--plain-file", str(rundir / "plain.txt"),
        ]  # fmt: skip

    async def _run(
        self,
        p: Params,
        result: RunResult,
        bi: BatchInfer,
        emulator: Emulator,
        schema: str,
        rundir: Path,
    ) -> None:
        for plan in p.batches:
            for custom_id, (status, message) in plan.failed.items():
                emulator.fail_request(custom_id, status=status, message=message)
            for custom_id in plan.dropped:
                emulator.drop_request(custom_id)
        ids: list[uuid.UUID] = []
        for i, plan in enumerate(p.batches):
            batch = await bi.create_batch(
                provider="openai",
                endpoint=CHAT,
                model=MODEL,
                requests=requests_of(plan, i),
                metadata={"run": p.run, "index": i},
                submit=p.flow == WORKER,
                handler=TX_HANDLER if p.flow == WORKER else None,
            )
            ids.append(batch.id)
        if p.rejected:
            emulator.fail_validation(
                [
                    {"code": "invalid_request", "message": message, "line": line}
                    for line, message in p.rejected
                ]
            )
        plans = {str(batch_id): plan for batch_id, plan in zip(ids, p.batches, strict=True)}
        if p.flow == FETCH:
            for batch_id in ids:
                submitted = await bi.submit_batch(batch_id)
                assert submitted.provider_batch_id is not None
                await _end(emulator, submitted.provider_batch_id, plans[str(batch_id)])
                ended = await bi.fetch_batch_status(batch_id)
                assert ended.is_terminal, ended
        driver = asyncio.create_task(_drive(emulator, plans)) if p.driven else None
        try:
            await self._flows(p, result, bi, emulator, schema, ids, rundir)
        finally:
            if driver is not None:
                driver.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await driver
        await self.check(p, result, emulator, schema, ids, rundir)

    async def _flows(
        self,
        p: Params,
        result: RunResult,
        bi: BatchInfer,
        emulator: Emulator,
        schema: str,
        ids: list[uuid.UUID],
        rundir: Path,
    ) -> None:
        """The flow killed at its point, then again without a kill."""

        # -- the flow, killed -------------------------------------------------------------
        hit_file = rundir / "hit.txt"
        args = self._child_args(emulator, schema, p.flow, rundir)
        args += [f"--batch={b}" for b in ids] if p.flow != WORKER else []
        args += ["--kill-at", p.point, "--kill-after", str(p.after), "--hit-file", str(hit_file)]
        began = time.monotonic()
        child = await self.children.start(args, rundir / "killed.log")
        result.children.append(child)
        if p.flow == WORKER:
            await self._until_dispatched(child, schema, ids, killed_flow=True)
        else:
            await child.wait(FLOW_SECONDS)
        code = child.returncode
        hits = hit_file.read_text().split() if hit_file.exists() else []
        result.hit = hits[:1] == [p.point]
        if result.hit and code != -signal.SIGKILL:
            result.anomalies.append(f"the kill point was reached but the child exited {code}")
        elif not result.hit and code != 0:
            result.anomalies.append(f"the killed flow's child exited {code} without a kill")

        result.killed_seconds = time.monotonic() - began

        # -- the flow again, without a kill ------------------------------------------------
        began = time.monotonic()
        if p.flow == WORKER:
            child = await self.children.start(
                self._child_args(emulator, schema, WORKER, rundir), rundir / "recovery.log"
            )
            result.children.append(child)
            if not await self._until_dispatched(child, schema, ids, killed_flow=False):
                result.anomalies.append("recovery: not every batch ran its handlers in time")
            code = await child.stop(signal.SIGTERM)
            if code != 0:
                result.anomalies.append(f"recovery: the worker exited {code} on SIGTERM")
        elif p.flow == SUBMIT:
            async with asyncio.timeout(FLOW_SECONDS):
                for batch_id in ids:
                    await _submit_when_free(bi, batch_id)
                for batch_id in ids:
                    await bi.wait(batch_id, poll_interval=0.05)
        else:
            # Two callers at once for each batch: a results pass is safe to run concurrently.
            async with asyncio.timeout(FLOW_SECONDS):
                for batch_id in ids:
                    await asyncio.gather(
                        bi.fetch_batch_results(batch_id), bi.fetch_batch_results(batch_id)
                    )

        result.recovery_seconds = time.monotonic() - began

    async def _until_dispatched(
        self, child: Child, schema: str, ids: list[uuid.UUID], *, killed_flow: bool
    ) -> bool:
        """Wait until every batch has run its handlers (True) or the child has exited. The
        recovery's worker must also have started (its row in ``workers``), so that it has
        looked at the batches; the killed flow's worker is stopped with SIGTERM if it got
        there without reaching its kill point."""
        deadline = time.monotonic() + FLOW_SECONDS
        query = sa.text(
            f'SELECT (SELECT count(*) FROM "{schema}".batches WHERE handler_dispatched_at IS '
            f'NULL AND id = ANY(:ids)), (SELECT count(*) FROM "{schema}".workers '
            "WHERE pid = :pid)"
        )
        while True:
            async with self.engine.connect() as conn:
                left, alive = (await conn.execute(query, {"ids": ids, "pid": child.pid})).one()
            if left == 0 and (killed_flow or alive):
                if killed_flow:
                    await child.stop(signal.SIGTERM)
                return True
            if child.returncode is not None:
                return False
            if time.monotonic() > deadline:
                await child.stop()
                return False
            await asyncio.sleep(0.05)

    # -- the checks -------------------------------------------------------------------------

    async def check(
        self,
        p: Params,
        result: RunResult,
        emulator: Emulator,
        schema: str,
        ids: list[uuid.UUID],
        rundir: Path,
    ) -> None:
        bad = result.anomalies.append
        s = f'"{schema}"'
        async with self.engine.connect() as conn:
            rows = {r.id: r for r in await conn.execute(sa.text(f"SELECT * FROM {s}.batches"))}
            completions = list(
                await conn.execute(
                    sa.text(
                        f"SELECT id, batch_id, custom_id, line_no, status, failure_error, "
                        f"failure_reason, prompt_tokens, completion_tokens, cached_tokens, "
                        f"total_cost "
                        f"FROM {s}.completions ORDER BY batch_id, line_no"
                    )
                )
            )
            audit = list(
                await conn.execute(sa.text(f"SELECT completion_id, kind FROM {s}.completion_audit"))
            )
            handler_runs = Counter(
                r[0] for r in await conn.execute(sa.text(f"SELECT batch_id FROM {s}.handler_runs"))
            )
        plain_file = rundir / "plain.txt"
        plain_runs = Counter(
            uuid.UUID(line.split()[0])
            for line in (plain_file.read_text().splitlines() if plain_file.exists() else [])
        )
        transitions = Counter(c for c, kind in audit if kind == "terminal")
        for completion_id, kind in audit:
            if kind != "terminal":
                bad(f"completion {completion_id}: a terminal row was rewritten ({kind})")
        by_batch: dict[uuid.UUID, list[Any]] = {}
        for c in completions:
            by_batch.setdefault(c.batch_id, []).append(c)

        # No provider batch unaccounted for, none created twice.
        tags = Counter(_tag(pb) for pb in emulator.batches.values())
        for tag, count in tags.items():
            if tag not in {str(i) for i in ids}:
                bad(f"a provider batch tagged {tag!r} belongs to no batch of this run")
            elif count > 1:
                bad(f"batch {tag}: {count} provider batches created (paid {count} times)")

        # Input files: the one each provider batch used, and any other upload still there.
        inputs = _input_files(emulator)
        used = {str(pb.get("input_file_id")) for pb in emulator.batches.values()}
        for file_id, owner in inputs.items():
            if file_id in used:
                result.inputs_left += 1
            elif p.point == "input_stream:mid" and result.hit:
                result.partial_uploads += 1  # the upload the kill cut short
            else:
                bad(f"input file {file_id} of batch b{owner} was uploaded but never used")

        for index, (batch_id, plan) in enumerate(zip(ids, p.batches, strict=True)):
            row = rows.get(batch_id)
            if row is None:
                bad(f"batch b{index} ({batch_id}) is gone")
                continue
            name = f"batch b{index} ({batch_id})"
            pbs = [pb for pb in emulator.batches.values() if _tag(pb) == str(batch_id)]
            if len(pbs) != 1:
                bad(f"{name}: {len(pbs)} provider batches")
                continue
            pb = pbs[0]
            if row.provider_batch_id != pb["id"]:
                bad(f"{name}: provider_batch_id {row.provider_batch_id}, provider has {pb['id']}")
            if pb["status"] not in TERMINAL or row.status != pb["status"]:
                bad(f"{name}: status {row.status}, at the provider {pb['status']}")
            if row.input_file_id != pb["input_file_id"]:
                bad(f"{name}: input file {row.input_file_id}, provider used {pb['input_file_id']}")
            counts = pb.get("request_counts") or {}
            rejected = pb["status"] == "failed"
            if not rejected and isinstance(counts, dict) and counts.get("total") != plan.size:
                bad(f"{name}: the provider ran {counts.get('total')} of {plan.size} requests")
            if row.results_applied_at is None:
                bad(f"{name}: results never applied")
            expected = _expected(emulator, pb, bad, name)
            line_reasons = _line_reasons(pb) if rejected else {}
            seen = by_batch.get(batch_id, [])
            if len(seen) != plan.size:
                bad(f"{name}: {len(seen)} completions stored for {plan.size} requests")
            total = Decimal(0)
            any_cost = False
            for c in seen:
                result.completions += 1
                what = f"{name} completion {c.custom_id}"
                if transitions[c.id] != 1:
                    bad(f"{what}: {transitions[c.id]} transitions to a terminal status")
                want = expected.get(c.custom_id)
                if rejected:
                    # The provider refused the input: each line fails with its own error or
                    # the batch's.
                    reason = line_reasons.get(c.line_no)
                    if (
                        c.status != "failed"
                        or c.failure_error != REJECTED_ERROR
                        or (reason is not None and c.failure_reason != reason[:255])
                        or (
                            reason is None
                            and not str(c.failure_reason).startswith(
                                f"batch {batch_id} failed at the provider"
                            )
                        )
                    ):
                        bad(
                            f"{what}: the provider rejected the batch ({reason!r} for line "
                            f"{c.line_no}), stored {c.status} {c.failure_error!r} "
                            f"{c.failure_reason!r}"
                        )
                elif want is None:
                    if (
                        c.status != "failed"
                        or c.failure_error != MISSING_ERROR
                        or not str(c.failure_reason).startswith(MISSING_REASON)
                    ):
                        bad(f"{what}: in neither file, stored {c.status} {c.failure_error!r}")
                    if c.custom_id not in plan.dropped:
                        bad(f"{what}: not scripted to go missing, yet in neither file")
                elif want[0] == "completed":
                    _, prompt, completion, cached, cost = want
                    if c.status != "completed":
                        bad(f"{what}: a 2xx line in the output file, stored {c.status}")
                    elif (c.prompt_tokens, c.completion_tokens, c.cached_tokens or 0) != (
                        prompt,
                        completion,
                        cached,
                    ):
                        bad(
                            f"{what}: tokens {c.prompt_tokens}/{c.completion_tokens}/"
                            f"{c.cached_tokens}, the line says {prompt}/{completion}/{cached}"
                        )
                    elif c.total_cost != cost:
                        bad(f"{what}: cost {c.total_cost}, expected {cost}")
                else:
                    message = want[1]
                    if (
                        c.status != "failed"
                        or c.failure_reason != message[:255]
                        or not str(c.failure_error).startswith(FAILED_ERROR_PREFIX)
                    ):
                        bad(
                            f"{what}: in the error file ({message!r}), stored {c.status} "
                            f"{c.failure_error!r} {c.failure_reason!r}"
                        )
                if c.total_cost is not None:
                    any_cost = True
                    total += c.total_cost
            expected_total = sum(
                (w[4] for w in expected.values() if w[0] == "completed"), Decimal(0)
            )
            stored_total = row.total_cost if row.total_cost is not None else Decimal(0)
            if (row.total_cost is not None) != any_cost or stored_total != total:
                bad(f"{name}: total_cost {row.total_cost}, its completions sum to {total}")
            if _cents(stored_total) != _cents(expected_total):
                bad(
                    f"{name}: total_cost {row.total_cost}, the output file is worth "
                    f"{expected_total}"
                )

            # Handlers: the transactional one exactly once, the plain one at least once.
            if p.flow == WORKER:
                if handler_runs[batch_id] != 1:
                    bad(
                        f"{name}: the transactional handler committed "
                        f"{handler_runs[batch_id]} times"
                    )
                if plain_runs[batch_id] < 1:
                    bad(f"{name}: the plain handler never ran")
                result.plain_reruns += max(0, plain_runs[batch_id] - 1)
                if row.handler_dispatched_at is None or len(row.handlers_done) != 2:
                    bad(
                        f"{name}: handlers_done {row.handlers_done}, "
                        f"dispatched {row.handler_dispatched_at}"
                    )
                if row.handler_attempts or row.handler_error:
                    bad(f"{name}: handler failures recorded: {row.handler_error}")
            elif handler_runs[batch_id] or plain_runs[batch_id]:
                bad(f"{name}: handlers ran in a flow without workers")


class _Captured(logging.Handler):
    """Keeps log records as text in ``lines`` (the current run's)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def _tag(pb: dict[str, object]) -> object:
    metadata = pb.get("metadata")
    return metadata.get(TAG) if isinstance(metadata, dict) else None


def _cents(value: Decimal) -> Decimal:
    return value.quantize(Decimal("0.01"))


def _cost(prompt: int, completion: int, cached: int) -> Decimal:
    price = PRICES[MODEL]
    cached_rate = price.cached_input_per_mtok or price.input_per_mtok
    cost = (
        (
            (prompt - cached) * price.input_per_mtok
            + cached * cached_rate
            + completion * price.output_per_mtok
        )
        * BATCH_DISCOUNT
        / _MTOK
    )
    return cost.quantize(Decimal("1e-12"))


def _expected(
    emulator: Emulator, pb: dict[str, Any], bad: Callable[[str], None], name: str
) -> dict[str, tuple[Any, ...]]:
    """custom_id -> ("completed", prompt, completion, cached, cost) or ("failed", message),
    read from the provider's own output and error files."""
    expected: dict[str, tuple[Any, ...]] = {}
    for key in ("output_file_id", "error_file_id"):
        file_id = pb.get(key)
        if file_id is None:
            continue
        content = emulator.files.get(str(file_id))
        if content is None:
            bad(f"{name}: the provider's {key} {file_id} is gone")
            continue
        for line in content.splitlines():
            if not line.strip():
                continue
            record = orjson.loads(line)
            custom_id = record["custom_id"]
            if custom_id in expected:
                bad(f"{name}: {custom_id} twice in the provider's files")
            response = record.get("response") or {}
            body = response.get("body") or {}
            code = response.get("status_code")
            if isinstance(code, int) and 200 <= code < 300:
                usage = body["usage"]
                prompt, completion = usage["prompt_tokens"], usage["completion_tokens"]
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                expected[custom_id] = (
                    "completed",
                    prompt,
                    completion,
                    cached,
                    _cost(prompt, completion, cached),
                )
            else:
                error = record.get("error")
                if isinstance(error, dict) and error.get("message"):
                    message = error["message"]
                else:
                    message = (body.get("error") or {}).get("message")
                expected[custom_id] = ("failed", str(message))
    return expected


def _line_reasons(pb: dict[str, Any]) -> dict[int, str]:
    """Line number -> the reason a rejected batch's line fails with: its error's message and
    code, as the provider listed them."""
    errors = (pb.get("errors") or {}).get("data") or []
    return {
        e["line"]: f"{e.get('message')}" + (f" [{e['code']}]" if e.get("code") else "")
        for e in errors
        if isinstance(e, dict) and isinstance(e.get("line"), int)
    }


def _input_files(emulator: Emulator) -> dict[str, str]:
    """Input files still at the provider: file id -> the batch index of its first request."""
    found: dict[str, str] = {}
    for file_id, content in emulator.files.items():
        first = content.split(b"\n", 1)[0]
        if not first.strip():
            continue
        try:
            record = orjson.loads(first)
        except orjson.JSONDecodeError:
            found[file_id] = "?"  # a cut-short upload may end mid-line
            continue
        if isinstance(record, dict) and "method" in record and "body" in record:
            found[file_id] = str(record.get("custom_id", "?")).split("-", 1)[0].lstrip("b")
    return found


async def _end(emulator: Emulator, provider_batch_id: str, plan: BatchPlan | None) -> None:
    """End a provider batch as planned: expired after its first ``processed`` requests ran, or
    completed (a batch rejected at validation fails on the first step either way)."""
    if (
        plan is not None
        and plan.ending == "expired"
        and await emulator.advance(provider_batch_id) == "in_progress"
    ):
        await emulator.process(provider_batch_id, plan.processed)
        await emulator.expire(provider_batch_id)
    await emulator.finish(provider_batch_id)


async def _drive(emulator: Emulator, plans: dict[str, BatchPlan]) -> None:
    """End each provider batch soon after it is created, as its plan says."""
    ended: set[str] = set()
    while True:
        for provider_batch_id, obj in list(emulator.batches.items()):
            if provider_batch_id not in ended:
                ended.add(provider_batch_id)
                await _end(emulator, provider_batch_id, plans.get(str(_tag(obj))))
        await asyncio.sleep(0.02)


async def _submit_when_free(bi: BatchInfer, batch_id: uuid.UUID) -> None:
    """Submit, waiting out the claim a killed submitter left (it lapses in claim_seconds)."""
    while True:
        batch = await bi.get_batch(batch_id)
        if batch.provider_batch_id is not None:
            return
        try:
            await bi.submit_batch(batch_id)
            return
        except InvalidBatchError as exc:
            if "being submitted by another caller" not in str(exc):
                raise
        await asyncio.sleep(0.05)
