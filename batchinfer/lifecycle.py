"""The batch lifecycle as provider calls and store writes: submit, poll, cancel, apply results.

Every step records its outcome in the database before the next starts, and every write is
conditional on the current state, so any step can crash and simply be run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Coroutine, Mapping
from decimal import Decimal
from typing import Any

import orjson

from batchinfer.domain import (
    ApplyReport,
    Batch,
    BatchStatus,
    Completion,
    CompletionStatus,
    Costs,
    Pricer,
    ResultOutcome,
    Usage,
)
from batchinfer.errors import (
    DataRejectedError,
    InvalidBatchError,
    JsonlError,
    ProviderError,
    ProviderRejectedError,
    ResultsNotReadyError,
)
from batchinfer.jsonl import RawLine, decode_object, iter_lines
from batchinfer.pricing import Pricing
from batchinfer.providers.base import Provider
from batchinfer.storage.store import ApplyResult, Store
from batchinfer.validation import Requests, check_batch_metadata, validate_requests

logger = logging.getLogger(__name__)

_UPLOAD_LINES_PER_CHUNK = 2_000
_YIELD_EVERY = 100
_FILE_ID_CHANGES = 3
#: Live calls are priced at the full rate.
_LIVE_RATE = Decimal(1)


@dataclasses.dataclass(slots=True)
class _Tally:
    applied: int = 0
    already_applied: int = 0
    unknown: int = 0
    duplicates: int = 0
    malformed: int = 0


class Lifecycle:
    """Runs each step of a batch's life against one store and the configured providers."""

    def __init__(
        self,
        store: Store,
        providers: Mapping[str, Provider],
        pricing: Pricing,
        *,
        apply_chunk_size: int = 1_000,
        apply_writers: int = 2,
    ) -> None:
        self.store = store
        self.providers = dict(providers)
        self.pricing = pricing
        self.apply_chunk_size = apply_chunk_size
        self.apply_writers = apply_writers
        #: How many of the provider's newest batches a retried submit looks through.
        self.reattach_scan = 1_000
        #: Seconds one caller holds the right to submit a batch (a 200 MB upload fits).
        self.submit_lease = 900.0
        self.last_report: ApplyReport | None = None

    def provider(self, name: str) -> Provider:
        try:
            return self.providers[name]
        except KeyError:
            known = ", ".join(sorted(self.providers)) or "none"
            raise InvalidBatchError(
                f"no provider named {name!r} is configured (configured: {known}); pass it in "
                "BatchInfer(providers=[...])"
            ) from None

    # -- create and submit --------------------------------------------------------------------

    async def create(
        self,
        *,
        provider: str,
        endpoint: str,
        model: str,
        requests: Requests,
        metadata: Mapping[str, Any] | None,
    ) -> Batch:
        adapter = self.provider(provider)
        checked_metadata = check_batch_metadata(metadata)
        validated = validate_requests(
            requests, endpoint=endpoint, model=model, limits=adapter.limits
        )
        batch = await self.store.create_batch(
            provider=provider,
            endpoint=endpoint,
            model=model,
            metadata=checked_metadata,
            requests=validated,
        )
        _log("batch_created", batch, requests=batch.request_total, bytes=batch.input_bytes)
        return batch

    async def submit(self, batch_id: uuid.UUID) -> Batch:
        batch = _submittable(await self.store.get_batch(batch_id))
        adapter = self.provider(batch.provider)
        held_until = await self.store.claim_submission(batch.id, seconds=self.submit_lease)
        if held_until is not None:
            _submittable(await self.store.get_batch(batch_id))  # submitted meanwhile?
            raise InvalidBatchError(
                f"batch {batch.id} is being submitted by another caller (its claim lasts until "
                f"{held_until:%Y-%m-%d %H:%M:%S %Z}); if that caller died, submit again after"
            )
        try:
            return await self._submit_claimed(batch, adapter)
        except BaseException:
            # Let a retry go ahead at once; the shield keeps the release if we are cancelled.
            await asyncio.shield(self.store.release_submission(batch.id))
            raise

    async def _submit_claimed(self, batch: Batch, adapter: Provider) -> Batch:
        tag = {"batchinfer_batch_id": str(batch.id)}
        file_id = batch.input_file_id
        pb = None
        if file_id is None:
            source_errors: list[Exception] = []

            async def stream() -> AsyncIterator[bytes]:
                try:
                    async for chunk in self._input_stream(batch, adapter):
                        yield chunk
                except Exception as exc:
                    source_errors.append(exc)
                    raise

            try:
                file_id = await adapter.upload_input(
                    stream, filename=f"batchinfer-{batch.id}.jsonl"
                )
            except ProviderError:
                # The body stopped because reading it failed: that is the error to report.
                if source_errors:
                    raise source_errors[-1] from None
                raise
            await self.store.record_input_file(batch.id, file_id)
            _log("input_uploaded", batch, input_file_id=file_id)
        else:
            # An earlier submit got as far as uploading; it may also have created the batch
            # (a timeout, or a crash before recording it). Re-attach rather than pay twice.
            pb = await adapter.find_batch(metadata=tag, max_batches=self.reattach_scan)
            if pb is not None:
                _log("batch_reattached", batch, provider_batch_id=pb.id)
        if pb is None:
            pb = await adapter.create_batch(
                input_file_id=file_id, endpoint=batch.endpoint, metadata=tag
            )
        batch = await self.store.record_submission(batch.id, pb)
        _log("batch_submitted", batch, status=batch.status.value)
        return batch

    async def _input_stream(self, batch: Batch, adapter: Provider) -> AsyncIterator[bytes]:
        async for page in self.store.request_pages(batch.id, page_size=_UPLOAD_LINES_PER_CHUNK):
            yield b"".join(adapter.encode_line(cid, batch.endpoint, body) for cid, body in page)

    # -- status and cancel --------------------------------------------------------------------

    async def refresh(self, batch_id: uuid.UUID) -> Batch:
        batch = await self.store.get_batch(batch_id)
        if batch.provider_batch_id is None:
            raise InvalidBatchError(f"batch {batch.id} has not been submitted; nothing to poll")
        if batch.results_applied_at is not None:
            return batch
        pb = await self.provider(batch.provider).retrieve_batch(batch.provider_batch_id)
        updated = await self.store.record_status(batch.id, pb)
        if updated.status is not batch.status:
            _log(
                "batch_status_changed",
                updated,
                previous=batch.status.value,
                status=updated.status.value,
                completed=updated.request_counts.completed,
                failed=updated.request_counts.failed,
            )
        return updated

    async def cancel(self, batch_id: uuid.UUID) -> Batch:
        batch = await self.store.get_batch(batch_id)
        if batch.provider_batch_id is None:
            raise InvalidBatchError(
                f"batch {batch.id} was never submitted, so there is nothing to cancel at the "
                "provider"
            )
        if batch.is_terminal:
            raise InvalidBatchError(f"batch {batch.id} is already {batch.status.value}")
        adapter = self.provider(batch.provider)
        try:
            pb = await adapter.cancel_batch(batch.provider_batch_id)
        except ProviderRejectedError as exc:
            if exc.status != 409:
                raise
            # The provider finished it first; record what it says so nothing is lost.
            pb = await adapter.retrieve_batch(batch.provider_batch_id)
            batch = await self.store.record_status(batch.id, pb)
            raise InvalidBatchError(
                f"batch {batch.id} can no longer be cancelled: the provider reports it "
                f"{pb.raw_status}; its status is recorded, fetch its results"
            ) from exc
        batch = await self.store.record_status(batch.id, pb)
        _log("batch_cancel_requested", batch, status=batch.status.value)
        return batch

    # -- results ------------------------------------------------------------------------------

    async def fetch_results(self, batch_id: uuid.UUID, *, force: bool = False) -> Batch:
        for _ in range(_FILE_ID_CHANGES):
            try:
                return await self._fetch_results_once(batch_id, force=force)
            except _FilesChanged:
                # A poll recorded a file id while we applied; apply again (idempotent).
                continue
        raise ResultsNotReadyError(
            f"batch {batch_id}: the provider's result file ids kept changing while they were "
            "applied; fetch the results again later"
        )

    async def _fetch_results_once(self, batch_id: uuid.UUID, *, force: bool) -> Batch:
        batch = await self.store.get_batch(batch_id)
        if batch.results_applied_at is not None:
            return batch
        if not batch.is_terminal:
            raise InvalidBatchError(
                f"batch {batch.id} is {batch.status.value}; results can be fetched once it is "
                "completed, expired or cancelled (use wait() to poll until then)"
            )
        tally = _Tally()
        if batch.status.has_results:
            missing = None if force else _missing_file(batch)
            if missing:
                raise ResultsNotReadyError(
                    f"batch {batch.id} is {batch.status.value} with {missing}; poll its status "
                    "again before fetching (or pass force=True to fail what is not there)"
                )
            seen: set[str] = set()
            for file_id in (batch.output_file_id, batch.error_file_id):
                if file_id is not None:
                    await self._apply_file(batch, file_id, seen, tally)
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
                f"result not present in the output or error file (batch {batch.id}, "
                f"provider batch {batch.provider_batch_id}, status {batch.status.value})"
            )
        finished = await self.store.finish_results(
            batch.id,
            applied_files=(batch.output_file_id, batch.error_file_id),
            failure_error=failure_error,
            failure_reason=failure_reason,
            line_reasons=line_reasons,
        )
        if finished is None:
            raise _FilesChanged
        batch, swept = finished
        self.last_report = ApplyReport(**dataclasses.asdict(tally), swept=swept)
        _log("results_applied", batch, **dataclasses.asdict(self.last_report))
        return batch

    async def _apply_file(self, batch: Batch, file_id: str, seen: set[str], tally: _Tally) -> None:
        """Stream one file: parse in this task, write chunks from ``apply_writers`` tasks."""
        queue: asyncio.Queue[list[tuple[int, ResultOutcome]] | None] = asyncio.Queue(
            maxsize=self.apply_writers * 2
        )

        async def writer() -> None:
            while (chunk := await queue.get()) is not None:
                result = await self._write_chunk(batch, file_id, chunk)
                tally.applied += result.applied
                tally.already_applied += len(result.already_applied)
                if result.unknown:
                    unknown = set(result.unknown)
                    tally.unknown += len(unknown)
                    for line_no, o in chunk:
                        if o.custom_id in unknown:
                            logger.warning(
                                "batchinfer.result_unknown_custom_id",
                                extra=_extra(
                                    batch, file_id=file_id, line_no=line_no, custom_id=o.custom_id
                                ),
                            )

        adapter = self.provider(batch.provider)
        price = self.pricer(batch.provider, batch.model, adapter.batch_discount)

        async def producer() -> None:
            chunk: list[tuple[int, ResultOutcome]] = []
            async with adapter.open_file(file_id) as chunks:
                async for line in iter_lines(chunks):
                    outcome = self._parse_line(batch, adapter, file_id, line, price, tally)
                    if outcome is None:
                        continue
                    if outcome.custom_id in seen:
                        tally.duplicates += 1
                        logger.warning(
                            "batchinfer.result_duplicate",
                            extra=_extra(
                                batch,
                                file_id=file_id,
                                line_no=line.line_no,
                                custom_id=outcome.custom_id,
                            ),
                        )
                        continue
                    seen.add(outcome.custom_id)
                    chunk.append((line.line_no, outcome))
                    if len(chunk) >= self.apply_chunk_size:
                        await queue.put(chunk)
                        chunk = []
                    elif len(chunk) % _YIELD_EVERY == 0:
                        # Buffered reads do not suspend; let finished writes be picked up.
                        await asyncio.sleep(0)
            if chunk:
                await queue.put(chunk)
            for _ in range(self.apply_writers):
                await queue.put(None)

        try:
            async with asyncio.TaskGroup() as tg:
                for i in range(self.apply_writers):
                    tg.create_task(writer(), name=f"batchinfer-apply-{batch.id}-{i}")
                tg.create_task(producer(), name=f"batchinfer-download-{batch.id}")
        except BaseExceptionGroup as group:
            # Callers expect the one error that stopped the pass, not a group of one.
            first = group.exceptions[0]
            if len(group.exceptions) == 1 and isinstance(first, Exception):
                raise first from first.__cause__
            raise

    async def _write_chunk(
        self, batch: Batch, file_id: str, chunk: list[tuple[int, ResultOutcome]]
    ) -> ApplyResult:
        """One chunk in one statement; should the database refuse a value, row by row, so one
        bad result fails alone (logged with its line) instead of stopping the pass."""
        try:
            return await _finish_even_if_cancelled(
                self.store.apply_outcomes(batch.id, [o for _, o in chunk])
            )
        except DataRejectedError:
            pass
        results = [await self._write_one(batch, file_id, line_no, o) for line_no, o in chunk]
        return ApplyResult(
            applied=sum(r.applied for r in results),
            already_applied=[c for r in results for c in r.already_applied],
            unknown=[c for r in results for c in r.unknown],
        )

    async def _write_one(
        self, batch: Batch, file_id: str, line_no: int, outcome: ResultOutcome
    ) -> ApplyResult:
        try:
            return await _finish_even_if_cancelled(self.store.apply_outcomes(batch.id, [outcome]))
        except DataRejectedError as exc:
            logger.warning(
                "batchinfer.result_unstorable",
                extra=_extra(
                    batch,
                    file_id=file_id,
                    line_no=line_no,
                    custom_id=outcome.custom_id,
                    error=str(exc),
                ),
            )
            failed = ResultOutcome(
                custom_id=outcome.custom_id,
                status=CompletionStatus.FAILED,
                status_code=outcome.status_code,
                failure_error="batchinfer could not store this result",
                failure_reason=f"line {line_no} of file {file_id}: {exc}"[:255],
            )
            return await _finish_even_if_cancelled(self.store.apply_outcomes(batch.id, [failed]))

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
            logger.warning(
                "batchinfer.result_malformed",
                extra=_extra(batch, file_id=file_id, line_no=line.line_no, error=str(exc)),
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

    def pricer(self, provider: str, model: str, discount: Decimal) -> Pricer:
        """Prices responses times ``discount``: by ``model`` when the caller set its price,
        else by the (often dated) model each response names, else by ``model``."""
        pricing = self.pricing

        def price(named: str | None, usage: Usage) -> Costs | None:
            try:
                if named and named != model and not pricing.has_override(model):
                    costs = pricing.costs(provider, named, usage, discount=discount)
                    if costs is not None:
                        return costs
                return pricing.costs(provider, model, usage, discount=discount)
            except Exception:
                # A price table problem must not cost the result; the row just has no cost.
                logger.warning("batchinfer.pricing_failed", exc_info=True)
                return None

        return price

    # -- the realtime path --------------------------------------------------------------------

    async def complete_live(
        self,
        *,
        provider: str,
        endpoint: str,
        model: str,
        body: Mapping[str, Any],
        custom_id: str,
        metadata: Mapping[str, Any] | None,
    ) -> Completion:
        """One live call, checked, parsed, priced (at the full rate) and stored as batch results
        are; a provider error is recorded on the row before it is raised."""
        adapter = self.provider(provider)
        request = {"custom_id": custom_id, "body": body, "metadata": metadata or {}}
        [checked] = [
            r
            async for r in validate_requests(
                [request], endpoint=endpoint, model=model, limits=adapter.limits
            )
        ]
        sent = orjson.loads(checked.body_json)
        completion_id = await self.store.create_live_completion(
            custom_id=custom_id, body=sent, metadata=checked.metadata
        )
        try:
            parsed = await adapter.complete(endpoint, sent)
            named = parsed.body.get("model")
            outcome = ResultOutcome(
                custom_id=custom_id,
                status=CompletionStatus.COMPLETED,
                response=parsed,
                status_code=200,
                costs=self.pricer(provider, model, _LIVE_RATE)(
                    named if isinstance(named, str) else None, parsed.usage
                ),
            )
            await self.store.apply_outcomes(None, [outcome], completion_id=completion_id)
        except BaseException as exc:
            # Whatever stopped it (provider error, unreadable answer, cancellation), the row
            # says so instead of staying "submitted" for ever.
            status = exc.status if isinstance(exc, ProviderError) else None
            failed = ResultOutcome(
                custom_id=custom_id,
                status=CompletionStatus.FAILED,
                status_code=status,
                failure_error=f"{adapter.name} live request failed (status: {status})",
                failure_reason=f"{type(exc).__name__}: {exc}"[:255],
            )
            await _finish_even_if_cancelled(
                self.store.apply_outcomes(None, [failed], completion_id=completion_id)
            )
            raise
        return await self.store.get_completion(completion_id)


async def _finish_even_if_cancelled(write: Coroutine[Any, Any, ApplyResult]) -> ApplyResult:
    """Run the write that records outcomes to its end even if the caller is cancelled, then
    let the cancellation go on: nothing outlives the call, and nothing is left half-done."""
    task = asyncio.ensure_future(write)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await task
        raise


def _submittable(batch: Batch) -> Batch:
    if batch.status is not BatchStatus.PENDING or batch.provider_batch_id is not None:
        raise InvalidBatchError(
            f"batch {batch.id} is {batch.status.value} (provider batch "
            f"{batch.provider_batch_id}); only a pending batch can be submitted"
        )
    return batch


class _FilesChanged(Exception):
    """The batch's file ids changed between reading and sweeping it."""


def _missing_file(batch: Batch) -> str | None:
    """Why the provider's files cannot all be there yet, judging by its counts; else None."""
    counts = batch.request_counts
    if counts.completed > 0 and batch.output_file_id is None:
        return f"{counts.completed} completed requests but no output file yet"
    if counts.failed > 0 and batch.error_file_id is None:
        return f"{counts.failed} failed requests but no error file yet"
    if (
        batch.status is BatchStatus.COMPLETED
        and batch.output_file_id is None
        and batch.error_file_id is None
    ):
        return "neither an output nor an error file yet"
    return None


def _extra(batch: Batch, **fields: Any) -> dict[str, Any]:
    extra: dict[str, Any] = {
        "batchinfer.batch_id": str(batch.id),
        "batchinfer.provider": batch.provider,
        "batchinfer.provider_batch_id": batch.provider_batch_id,
    }
    extra.update({f"batchinfer.{k}": v for k, v in fields.items()})
    return extra


def _log(event: str, batch: Batch, **fields: Any) -> None:
    logger.info(f"batchinfer.{event}", extra=_extra(batch, **fields))
