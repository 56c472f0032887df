"""One results pass: stream the provider's files, parse each line, apply chunks, then sweep.

Parsing runs in one task while writer tasks apply chunks of outcomes, each in one statement
conditional on the row not yet being terminal, so a pass that stops anywhere can be run again
and changes nothing already applied. Each pass returns its own report.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from datetime import datetime, timedelta

from batchinfer.domain import (
    ApplyReport,
    Batch,
    BatchStatus,
    CompletionStatus,
    Pricer,
    ResultOutcome,
    ResultSource,
    ResultSources,
    Usage,
)
from batchinfer.errors import (
    BatchInferError,
    DataRejectedError,
    InvalidBatchError,
    JsonlError,
    ResultsNotReadyError,
)
from batchinfer.jsonl import DEFAULT_MAX_LINE_BYTES, RawLine, decode_object, iter_lines
from batchinfer.lifecycle.common import Providers, finish_even_if_cancelled, log
from batchinfer.pricing import Pricing
from batchinfer.providers.base import Provider
from batchinfer.storage.results import ApplyResult
from batchinfer.storage.rows import ResultColumns
from batchinfer.storage.store import Store

_YIELD_EVERY = 100
_SOURCE_CHANGES = 3
#: Seconds before a worker tries again to delete files the provider would not delete.
_DELETE_RETRY = 600.0


@dataclasses.dataclass(slots=True)
class _Tally:
    applied: int = 0
    already_applied: int = 0
    unknown: int = 0
    duplicates: int = 0
    malformed: int = 0


class ResultsPass:
    """Applies a terminal batch's results; safe to run again, and concurrently."""

    def __init__(
        self,
        store: Store,
        providers: Providers,
        pricing: Pricing,
        *,
        chunk_size: int = 1_000,
        writers: int = 2,
        delete_input_files: bool = True,
        delete_result_files: bool = False,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        max_concurrent: int = 2,
        not_ready_grace: float = 3600.0,
    ) -> None:
        self.store = store
        self.providers = providers
        self.pricing = pricing
        self.chunk_size = chunk_size
        self.writers = writers
        self.delete_input_files = delete_input_files
        self.delete_result_files = delete_result_files
        #: Memory stays bounded whatever the file: a longer line is skipped, counted as
        #: malformed and logged with its number, and its completion swept as missing.
        self.max_line_bytes = max_line_bytes
        self._turns = asyncio.Semaphore(max_concurrent)
        #: Seconds after a batch's end that results still to come are waited for.
        self.not_ready_grace = not_ready_grace

    async def run(
        self, batch_id: uuid.UUID, *, force: bool = False, now: datetime | None = None
    ) -> tuple[Batch, ApplyReport | None]:
        """The batch with its results applied, and what this pass did (None: already done).

        Results the provider says are still to come are waited for (ResultsNotReadyError)
        until ``not_ready_grace`` seconds after the batch ended, by ``now`` (this machine's
        clock when None); past that, what is there is applied and the rest swept as missing,
        rather than the batch waiting for ever.

        At most ``max_concurrent`` passes run at once in this process (the others wait their
        turn), so memory is bounded by that limit, not by how many batches end together.
        """
        async with self._turns:
            for _ in range(_SOURCE_CHANGES):
                try:
                    return await self._once(batch_id, force=force, now=now)
                except _SourcesChanged:
                    # A poll changed where the results are while we applied; again (idempotent).
                    continue
        raise ResultsNotReadyError(
            f"batch {batch_id}: where the provider keeps its results kept changing while they were "
            "applied; fetch the results again later"
        )

    async def _once(
        self, batch_id: uuid.UUID, *, force: bool, now: datetime | None
    ) -> tuple[Batch, ApplyReport | None]:
        batch = await self.store.batches.get(batch_id)
        if batch.results_applied_at is not None:
            # A pass that died before deleting the files leaves that to the next.
            return await self.delete_files(batch), None
        if not batch.is_terminal:
            raise InvalidBatchError(
                f"batch {batch.id} is {batch.status.value}; results can be fetched once it is "
                "completed, expired or cancelled (use wait() to poll until then)"
            )
        tally = _Tally()
        sources = batch.result_sources or ResultSources()
        if batch.status.has_results:
            if sources.waiting_for and not force:
                if self._given_up_waiting(batch, now):
                    # What the counts promised never came: apply what is there.
                    log(
                        "results_forced",
                        batch,
                        level=logging.WARNING,
                        reason=sources.waiting_for,
                        waited_seconds=self.not_ready_grace,
                    )
                else:
                    raise ResultsNotReadyError(
                        f"batch {batch.id} is {batch.status.value} with "
                        f"{sources.waiting_for}; poll its status again before fetching (or pass "
                        "force=True to fail what is not there)"
                    )
            await self._apply_sources(batch, sources, tally)
        line_reasons: dict[int, str] = {}
        if batch.status is BatchStatus.FAILED:
            failure_error = f"{batch.provider} batch failed"
            failure_reason = (
                f"batch {batch.id} failed at the provider: "
                f"{batch.failure_reason or 'no reason given'}"
            )
            for err in batch.provider_errors:
                if isinstance(err.get("line"), int):
                    code = f" [{err['code']}]" if err.get("code") else ""
                    line_reasons[err["line"]] = f"{err.get('message')}{code}"
        else:
            failure_error = f"{batch.provider} batch entry missing"
            failure_reason = (
                f"result not present in {sources.described_as} (batch {batch.id}, "
                f"provider batch {batch.provider_batch_id}, status {batch.status.value})"
            )
            if batch.failure_reason:  # e.g. expired here after its maximum age
                failure_reason += f": {batch.failure_reason}"
        finished = await self.store.results.finish_results(
            batch.id,
            applied_sources=sources,
            failure_error=failure_error,
            failure_reason=failure_reason,
            line_reasons=line_reasons,
        )
        if finished is None:
            raise _SourcesChanged
        batch, swept = finished
        report = ApplyReport(**dataclasses.asdict(tally), swept=swept)
        log("results_applied", batch, status=batch.status.value, **dataclasses.asdict(report))
        return await self.delete_files(batch), report

    async def apply_arrived(self, batch_id: uuid.UUID) -> ApplyReport | None:
        """Apply what a running batch's provider can already give (``while_running``
        sources), so results arrive as they are made; the sweep waits for the end. None: the
        provider gives nothing before the end, or the batch has ended (``run`` is for that)."""
        async with self._turns:
            batch = await self.store.batches.get(batch_id)
            sources = batch.result_sources
            if batch.is_terminal or sources is None or not sources.while_running:
                return None
            tally = _Tally()
            await self._apply_sources(batch, sources, tally)
        report = ApplyReport(**dataclasses.asdict(tally), swept=0)
        if report.applied:
            log("results_arrived", batch, status=batch.status.value, **dataclasses.asdict(report))
        return report

    def _given_up_waiting(self, batch: Batch, now: datetime | None) -> bool:
        if batch.ended_at is None:
            return False
        current = now or datetime.now(batch.ended_at.tzinfo)
        return current - batch.ended_at > timedelta(seconds=self.not_ready_grace)

    async def delete_files(self, batch: Batch) -> Batch:
        """The provider keeps files (and bills their storage) until deleted; once the results
        are in our rows, ours are not needed there. Best effort: a failure is logged, and a
        worker tries again ten minutes later (as does any later results pass)."""
        if batch.files_deleted_at is not None or batch.results_applied_at is None:
            return batch
        doomed = [batch.input_file_id] if self.delete_input_files and batch.input_file_id else []
        if self.delete_result_files and batch.result_sources is not None:
            doomed += [s.ref for s in batch.result_sources.sources if s.deletable]
        if not doomed:
            return await self.store.batches.record_files_deleted(batch.id)  # nothing to do
        adapter = self.providers.get(batch.provider)
        failed = False
        for file_id in doomed:
            try:
                await adapter.delete_file(file_id)
            except BatchInferError as exc:
                failed = True
                log(
                    "file_delete_failed",
                    batch,
                    level=logging.WARNING,
                    file_id=file_id,
                    error=str(exc),
                )
            else:
                log("file_deleted", batch, level=logging.DEBUG, file_id=file_id)
        if failed:
            # A worker tries again then; a results pass called meanwhile does too.
            await self.store.batches.reschedule(batch.id, seconds=_DELETE_RETRY)
            return batch
        return await self.store.batches.record_files_deleted(batch.id)

    async def _apply_sources(self, batch: Batch, sources: ResultSources, tally: _Tally) -> None:
        """Every source, in order, as one pass: a custom_id met twice is a duplicate."""
        seen = _Seen(since=await self.store.results.clock())
        for source in sources.sources:
            await self._apply_source(batch, source, seen, tally)

    async def _apply_source(
        self, batch: Batch, source: ResultSource, seen: _Seen, tally: _Tally
    ) -> None:
        """Stream one source: parse in this task, write chunks from ``writers`` tasks."""
        file_id = source.ref
        # As deep as there are writers: each has its next chunk ready, and no more is held.
        queue: asyncio.Queue[ResultColumns | None] = asyncio.Queue(maxsize=self.writers)

        async def writer() -> None:
            while (chunk := await queue.get()) is not None:
                result = await self._write_chunk(batch, file_id, chunk, since=seen.since)
                seen.written(chunk.custom_ids, result)
                tally.applied += result.applied
                tally.already_applied += len(result.already_applied)
                tally.unknown += len(result.unknown)
                tally.duplicates += len(result.applied_since)
                odd = dict.fromkeys(result.unknown, "result_unknown_custom_id")
                odd.update((c, "result_duplicate") for c in result.applied_since)
                if odd:
                    for line_no, custom_id in zip(chunk.line_nos, chunk.custom_ids, strict=True):
                        if custom_id in odd:
                            log(
                                odd[custom_id],
                                batch,
                                level=logging.WARNING,
                                file_id=file_id,
                                line_no=line_no,
                                custom_id=custom_id,
                            )

        adapter = self.providers.get(batch.provider)
        price = self.pricing.pricer(adapter.pricing_id, batch.model, adapter.batch_discount)
        # The first price lookup loads the price table: not on the event loop, mid-file.
        await asyncio.to_thread(price, batch.model, Usage(prompt_tokens=1, completion_tokens=1))

        async def producer() -> None:
            chunk = ResultColumns()
            async with adapter.open_results(source) as chunks:
                async for line in iter_lines(chunks, max_line_bytes=self.max_line_bytes):
                    outcome = self._parse_line(batch, adapter, file_id, line, price, tally)
                    if outcome is None:
                        continue
                    if seen.before(outcome.custom_id):
                        tally.duplicates += 1
                        log(
                            "result_duplicate",
                            batch,
                            level=logging.WARNING,
                            file_id=file_id,
                            line_no=line.line_no,
                            custom_id=outcome.custom_id,
                        )
                        continue
                    seen.pending.add(outcome.custom_id)
                    chunk.add(outcome, line.line_no)
                    if len(chunk) >= self.chunk_size:
                        await queue.put(chunk)
                        chunk = ResultColumns()
                    elif len(chunk) % _YIELD_EVERY == 0:
                        # Buffered reads do not suspend; let finished writes be picked up.
                        await asyncio.sleep(0)
            if len(chunk):
                await queue.put(chunk)
            for _ in range(self.writers):
                await queue.put(None)

        try:
            async with asyncio.TaskGroup() as tg:
                for i in range(self.writers):
                    tg.create_task(writer(), name=f"batchinfer-apply-{batch.id}-{i}")
                tg.create_task(producer(), name=f"batchinfer-download-{batch.id}")
        except BaseExceptionGroup as group:
            # Callers expect the one error that stopped the pass, not a group: a database
            # restart fails every writer at once, and each one's error says the same.
            errors = [e for e in group.exceptions if isinstance(e, Exception)]
            if errors and len(errors) == len(group.exceptions):
                first = next((e for e in errors if isinstance(e, BatchInferError)), errors[0])
                raise first from first.__cause__
            raise

    async def _write_chunk(
        self, batch: Batch, file_id: str, chunk: ResultColumns, *, since: datetime
    ) -> ApplyResult:
        """One chunk in one statement; should the database refuse a value, row by row, so one
        bad result fails alone (logged with its line) instead of stopping the pass."""
        try:
            return await finish_even_if_cancelled(
                self.store.results.apply_rows(batch.id, chunk, since=since)
            )
        except DataRejectedError:
            pass
        results = [
            await self._write_one(batch, file_id, chunk.row(i), since=since)
            for i in range(len(chunk))
        ]
        return ApplyResult(
            applied=sum(r.applied for r in results),
            already_applied=[c for r in results for c in r.already_applied],
            unknown=[c for r in results for c in r.unknown],
            applied_since=[c for r in results for c in r.applied_since],
        )

    async def _write_one(
        self,
        batch: Batch,
        file_id: str,
        row: ResultColumns,
        *,
        since: datetime,
    ) -> ApplyResult:
        line_no, custom_id = row.line_nos[0], row.custom_ids[0]
        try:
            return await finish_even_if_cancelled(
                self.store.results.apply_rows(batch.id, row, since=since)
            )
        except DataRejectedError as exc:
            log(
                "result_unstorable",
                batch,
                level=logging.WARNING,
                file_id=file_id,
                line_no=line_no,
                custom_id=custom_id,
                error=str(exc),
            )
            status_code = row.field("status_code", 0)  # the value refused, perhaps
            if not (isinstance(status_code, int) and 0 <= status_code <= 999):
                status_code = None
            failed = ResultOutcome(
                custom_id=custom_id,
                status=CompletionStatus.FAILED,
                status_code=status_code,
                failure_error="batchinfer could not store this result",
                failure_reason=f"line {line_no} of file {file_id}: {exc}"[:255],
            )
            return await finish_even_if_cancelled(
                self.store.results.apply_outcomes(batch.id, [failed])
            )

    def _parse_line(
        self,
        batch: Batch,
        adapter: Provider,
        file_id: str,
        line: RawLine,
        price: Pricer,
        tally: _Tally,
    ) -> ResultOutcome | None:
        try:
            record = decode_object(line)
            return adapter.parse_result(record, endpoint=batch.endpoint, price=price)
        except (JsonlError, ValueError) as exc:
            tally.malformed += 1
            log(
                "result_malformed",
                batch,
                level=logging.WARNING,
                file_id=file_id,
                line_no=line.line_no,
                error=str(exc),
            )
            return None
        except Exception as exc:
            # One odd response must not stop its siblings: fail that entry, keep going.
            custom_id = record.get("custom_id")
            if not isinstance(custom_id, str):
                tally.malformed += 1
                return None
            return ResultOutcome(
                custom_id=custom_id,
                status=CompletionStatus.FAILED,
                failure_error="batchinfer could not read this result",
                failure_reason=f"{type(exc).__name__}: {exc}"[:255],
            )


class _Seen:
    """The custom_ids a pass has met, kept in as little memory as a batch of any size allows.

    Ids whose chunk is queued or being written are held here: a few chunks' worth. Once a
    chunk is written its rows remember for it: a later line for one of its ids finds the row
    ended since the pass began (``applied_since``), a duplicate, and changes nothing, so the
    first line wins. Kept for the whole pass are only the ids the rows cannot answer for:
    unknown ones, and those an earlier pass applied.
    """

    __slots__ = ("kept", "pending", "since")

    def __init__(self, *, since: datetime) -> None:
        self.since = since
        self.pending: set[str] = set()
        self.kept: set[str] = set()

    def before(self, custom_id: str) -> bool:
        """Whether an earlier line of this pass had this id (and its row does not say so)."""
        return custom_id in self.pending or custom_id in self.kept

    def written(self, custom_ids: list[str], result: ApplyResult) -> None:
        self.kept.update(result.unknown, result.already_applied)
        self.pending.difference_update(custom_ids)


class _SourcesChanged(Exception):
    """The batch's result sources changed between reading and sweeping it."""
