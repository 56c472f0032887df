"""Anthropic's Message Batches API, and the Messages API for the realtime path.

A batch is created with its requests inline (``{"requests": [{"custom_id", "params"}]}``, up to
100,000 requests or 256 MB), streamed from the database into the request body. It runs
``in_progress``, maybe ``canceling``, then ``ended``; its results are one JSONL stream at
``results_url``, a line per request: ``succeeded`` (a Message), ``errored``, ``canceled`` or
``expired``. ``parse_message`` reads a Message for both paths.

An Anthropic batch carries no metadata, so a create whose answer was lost cannot be found by a
tag. Before creating, the submit notes the time in its checkpoint; a retry then looks among the
batches created since for one of exactly this many requests. One is adopted; several are a
possible duplicate, reported and never resolved by creating yet another.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import aiohttp
import orjson

from batchinfer.domain import (
    BatchLimits,
    BatchStatus,
    CompletionStatus,
    ParsedResponse,
    Pricer,
    ProviderBatch,
    RequestCounts,
    ResultOutcome,
    ResultSource,
    ResultSources,
    SubmitKey,
    Usage,
)
from batchinfer.errors import PermanentProviderError, ProviderRejectedError
from batchinfer.providers.base import RequestPages, SubmitCheckpoint
from batchinfer.providers.common import (
    FAILURE_TEXT_LIMIT,
    INT4_MAX,
    HttpProvider,
    as_dict,
    as_int,
    as_str,
    checked_api_key,
    create_or_adopt,
    never,
    read_paid,
    submit_event,
    warn_if_unverified,
)
from batchinfer.providers.http import ErrorDialect, HttpClient

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.anthropic.com"
API_VERSION = "2023-06-01"
#: The one endpoint a batch of Messages requests has.
MESSAGES = "/v1/messages"

_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
#: Clocks differ: a batch created up to this long before the noted time may be ours.
_CLOCK_SLACK = timedelta(minutes=5)
_NOTE = "create_started_at"


def _not_found_hint(url: str) -> str | None:
    if "/v1/v1/" in url:
        return "check the provider's base_url: Anthropic's has no /v1 (the paths carry it)"
    return None


ANTHROPIC_ERRORS = ErrorDialect(
    request_id_headers=("request-id",),
    permanent_codes=frozenset({"billing_error"}),
    not_found_hint=_not_found_hint,
)


class AnthropicRules:
    """What a Message Batches request needs: Messages params with the batch's model, a
    ``max_tokens`` of at least 1, some messages, no streaming; a custom_id of 1-64 letters,
    digits, ``_`` or ``-``."""

    request_keys: frozenset[str] = frozenset()

    def __init__(self, limits: BatchLimits) -> None:
        self.limits = limits

    def check_request(
        self, item: Mapping[str, Any], body: dict[str, Any], *, endpoint: str, model: str
    ) -> str | None:
        custom_id = str(item.get("custom_id"))
        if not _CUSTOM_ID.match(custom_id):
            return (
                "custom_id must be 1-64 letters, digits, '_' or '-' for Anthropic "
                f"(got {custom_id[:70]!r})"
            )
        body_model = body.setdefault("model", model)
        if body_model != model:
            return (
                f"body.model {body_model!r} differs from the batch model {model!r}; "
                "a batch uses one model"
            )
        if body.get("stream"):
            return "stream is not supported in a batch; remove it from the body"
        max_tokens = body.get("max_tokens")
        if type(max_tokens) is not int or max_tokens < 1:
            return "body.max_tokens is required by Anthropic: an integer of at least 1"
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "body.messages is required: a non-empty list of messages"
        return None

    def line_bytes(self, custom_id: str, endpoint: str, body_json: bytes) -> int:
        return len(_request_item(custom_id, body_json)) + 1  # and its comma


def _request_item(custom_id: str, body_json: bytes) -> bytes:
    return b'{"custom_id":' + orjson.dumps(custom_id) + b',"params":' + body_json + b"}"


class AnthropicProvider(HttpProvider[AnthropicRules]):
    """Anthropic's Message Batches (``base_url`` without ``/v1``: the paths carry it).

    ``batch_discount`` is the factor batch results are priced at relative to live calls; cache
    writes and reads are priced at their own rates. A given ``session`` is borrowed, never
    closed. ``workspace_id`` sends ``anthropic-workspace-id`` for keys that span workspaces.
    """

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        session: aiohttp.ClientSession | None = None,
        batch_discount: Decimal | float | str = Decimal("0.5"),
        name: str = "anthropic",
        pricing_id: str = "anthropic",
        limits: BatchLimits | None = None,
        attempts: int = 5,
        verify_tls: bool = True,
        workspace_id: str | None = None,
        api_version: str = API_VERSION,
    ) -> None:
        api_key = checked_api_key(
            api_key, provider="AnthropicProvider", variable="ANTHROPIC_API_KEY"
        )
        headers = {"x-api-key": api_key, "anthropic-version": api_version}
        if workspace_id:
            headers["anthropic-workspace-id"] = workspace_id
        warn_if_unverified(base_url, verify_tls)
        http = HttpClient(
            base_url,
            headers,
            session=session,
            attempts=attempts,
            verify_tls=verify_tls,
            dialect=ANTHROPIC_ERRORS,
        )
        limits = limits or BatchLimits(
            endpoints=frozenset({MESSAGES}), max_requests=100_000, max_bytes=256 * 1024 * 1024
        )
        super().__init__(
            http=http,
            name=name,
            pricing_id=pricing_id,
            batch_discount=batch_discount,
            rules=AnthropicRules(limits),
        )
        #: How many of the provider's newest batches a retried submit looks through.
        self.reattach_scan = 1_000

    # ---- submitting

    async def submit(
        self, requests: RequestPages, *, key: SubmitKey, checkpoint: SubmitCheckpoint
    ) -> ProviderBatch:
        """Create the batch with its requests streamed into the body.

        The time is noted before the create is sent; a retry after a crash or a lost answer
        looks for a batch made since then, of this many requests, and adopts it.
        """
        noted = checkpoint.notes.get(_NOTE)
        if noted is not None:
            found = await self.find_created(key, since=datetime.fromisoformat(noted))
            if found is not None:
                submit_event(logger, "batch_reattached", key, provider_batch_id=found.id)
                return found
        since = datetime.now(UTC)
        await checkpoint.note(**{_NOTE: since.isoformat()})

        def body() -> aiohttp.payload.AsyncIterablePayload:
            return aiohttp.payload.AsyncIterablePayload(
                _create_body(requests), content_type="application/json"
            )

        async def create() -> ProviderBatch:
            answer = await self._http.request_json(
                "POST",
                "/v1/messages/batches",
                data=body,
                what="creating the message batch",
                retry_on=never,
            )
            return self._batch(answer)

        # A try whose answer was lost may have created it: found by the time noted and count.
        return await create_or_adopt(
            self._http,
            create,
            lambda: self.find_created(key, since=since),
            adopted=lambda found: submit_event(
                logger, "batch_adopted", key, provider_batch_id=found.id
            ),
        )

    async def find_created(self, key: SubmitKey, *, since: datetime) -> ProviderBatch | None:
        """The batch an earlier try created, if any: made at or after ``since`` (less a few
        minutes for clocks that differ) with exactly ``key.request_total`` requests.

        Several such batches are a possible duplicate that no key can tell apart: that is
        reported (PermanentProviderError naming them) rather than guessed, or made worse.
        """
        oldest = since - _CLOCK_SLACK
        found: list[ProviderBatch] = []
        after: str | None = None
        seen = 0
        while seen < self.reattach_scan:
            query = "/v1/messages/batches?limit=100" + (f"&after_id={after}" if after else "")
            page = await self._http.request_json("GET", query, what="listing message batches")
            data = [b for b in page.get("data") or [] if isinstance(b, dict)]
            seen += len(data)
            too_old = False
            for body in data:
                created = _time(body.get("created_at"))
                if created is None or created < oldest:
                    too_old = True  # newest first: the rest are older still
                    break
                pb = self._batch(body)
                if pb.request_counts.total == key.request_total:
                    found.append(pb)
            if too_old or not data or not page.get("has_more"):
                break
            after = as_str(page.get("last_id")) or as_str(data[-1].get("id"))
        if len(found) > 1:
            raise PermanentProviderError(
                f"batch {key.batch_id}: an earlier submit may have created it, and "
                f"{len(found)} Anthropic batches of {key.request_total} requests were created "
                f"since {oldest:%Y-%m-%d %H:%M:%S} UTC ({', '.join(b.id for b in found)}). "
                "Anthropic batches carry no tag to tell which is ours; cancel the extra ones at "
                "Anthropic, then record the right one or create a new batch here"
            )
        return found[0] if found else None

    # ---- following a batch

    async def retrieve_batch(self, provider_batch_id: str) -> ProviderBatch:
        answer = await self._http.request_json(
            "GET",
            f"/v1/messages/batches/{provider_batch_id}",
            what=f"reading message batch {provider_batch_id}",
        )
        return self._batch(answer)

    async def cancel_batch(self, provider_batch_id: str) -> ProviderBatch:
        answer = await self._http.request_json(
            "POST",
            f"/v1/messages/batches/{provider_batch_id}/cancel",
            what=f"cancelling message batch {provider_batch_id}",
        )
        return self._batch(answer)

    async def delete_file(self, ref: str) -> None:
        """Anthropic keeps no file of ours; a batch's results are deleted with the batch
        (``delete_result_files``). One already gone is not an error."""
        batch_id = _batch_of_results(ref)
        try:
            await self._http.request_json(
                "DELETE",
                f"/v1/messages/batches/{batch_id}",
                what=f"deleting message batch {batch_id}",
            )
        except ProviderRejectedError as exc:
            if exc.status != 404:
                raise

    def open_results(
        self, source: ResultSource
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        # Absolute on the real service; the client sends credentials only to the base URL's host.
        return self._http.stream(source.ref, what=f"downloading {source.ref}")

    def _batch(self, body: dict[str, Any]) -> ProviderBatch:
        """Normalise a MessageBatch, trusting none of its fields' types."""
        batch_id = body.get("id")
        if not isinstance(batch_id, str) or not batch_id:
            raise PermanentProviderError("the message batch from the provider has no id")
        raw_status = str(body.get("processing_status"))
        counts = as_dict(body.get("request_counts"))
        succeeded = as_int(counts.get("succeeded")) or 0
        errored = as_int(counts.get("errored")) or 0
        canceled = as_int(counts.get("canceled")) or 0
        expired = as_int(counts.get("expired")) or 0
        processing = as_int(counts.get("processing")) or 0
        results_url = as_str(body.get("results_url")) or None
        if raw_status == "ended":
            if body.get("cancel_initiated_at"):
                status = BatchStatus.CANCELLED
            elif expired:
                status = BatchStatus.EXPIRED
            else:
                status = BatchStatus.COMPLETED
        elif raw_status == "canceling":
            status = BatchStatus.CANCELLING
        else:
            if raw_status != "in_progress":
                logger.warning(
                    "batchinfer.unknown_provider_status %s: %s",
                    batch_id,
                    raw_status,
                    extra={
                        "batchinfer.provider_batch_id": batch_id,
                        "batchinfer.status": raw_status,
                    },
                )
            status = BatchStatus.IN_PROGRESS
        if status.is_terminal:
            waiting_for = None if results_url else "the batch has ended but has no results_url yet"
            sources = ResultSources(
                sources=(ResultSource(key="results", ref=results_url, deletable=True),)
                if results_url
                else (),
                waiting_for=waiting_for,
                described_as="the batch's results",
            )
        else:
            sources = ResultSources(described_as="the batch's results")
        return ProviderBatch(
            id=batch_id,
            status=status,
            raw_status=raw_status,
            request_counts=RequestCounts(
                total=processing + succeeded + errored + canceled + expired,
                completed=succeeded,
                failed=errored + canceled + expired,
            ),
            raw=body,
            results=sources,
        )

    # ---- results

    def parse_result(
        self, record: dict[str, Any], *, endpoint: str, price: Pricer | None = None
    ) -> ResultOutcome:
        custom_id = record.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id or "\x00" in custom_id:
            raise ValueError("the result line has no usable custom_id")
        result = as_dict(record.get("result"))
        kind = result.get("type")
        message = result.get("message")
        if kind == "succeeded" and isinstance(message, dict):
            parsed = _parse_paid(message)
            model = message.get("model")
            return ResultOutcome(
                custom_id=custom_id,
                status=CompletionStatus.COMPLETED,
                response=parsed,
                status_code=200,
                costs=None
                if price is None
                else price(model if isinstance(model, str) else None, parsed.usage),
            )
        request_id = None
        if kind == "errored":
            envelope = as_dict(result.get("error"))
            error = as_dict(envelope.get("error"))
            request_id = as_str(envelope.get("request_id"))
            label = f"errored: {error.get('type') or 'unknown error'}"
            reason = str(error.get("message") or "no message")
        elif kind == "canceled":
            label, reason = "canceled", "the batch was cancelled before this request ran"
        elif kind == "expired":
            label, reason = "expired", "the batch expired (24 h) before this request ran"
        else:
            label, reason = f"result type {kind!r}", "the result is not one batchinfer reads"
        return ResultOutcome(
            custom_id=custom_id,
            status=CompletionStatus.FAILED,
            provider_request_id=request_id,
            failure_error=f"Anthropic batch entry {label}"[:FAILURE_TEXT_LIMIT],
            failure_reason=reason[:FAILURE_TEXT_LIMIT],
        )

    # ---- the realtime path

    async def complete(self, endpoint: str, body: dict[str, Any]) -> ParsedResponse:
        if endpoint != MESSAGES:
            raise ProviderRejectedError(f"Anthropic's live endpoint is {MESSAGES}, not {endpoint}")
        answer = await self._http.request_json("POST", MESSAGES, json=body, what=f"POST {MESSAGES}")
        return _parse_paid(answer)


async def _create_body(requests: RequestPages) -> AsyncIterator[bytes]:
    """``{"requests": [...]}``, a page of requests at a time, never whole in memory."""
    yield b'{"requests":['
    first = True
    async for page in requests():
        if not page:
            continue
        items = b",".join(_request_item(custom_id, body) for custom_id, body in page)
        yield items if first else b"," + items
        first = False
    yield b"]}"


def parse_message(message: dict[str, Any]) -> ParsedResponse:
    """Read a Message: its text blocks, its tool calls, why it stopped, its usage."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in message.get("content") or []:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            texts.append(str(block.get("text", "")))
        elif block.get("type") in ("tool_use", "server_tool_use"):
            calls.append(block)
    return ParsedResponse(
        body=message,
        output_text="".join(texts) if texts else None,
        tool_calls=calls or None,
        finish_reason=as_str(message.get("stop_reason")),
        usage=_usage(message.get("usage")),
    )


def _usage(raw: Any) -> Usage:
    """Anthropic counts input read from and written to the cache apart from ``input_tokens``;
    ours are included in ``prompt_tokens`` (see ``Usage``)."""
    if not isinstance(raw, dict):
        return Usage()
    plain = as_int(raw.get("input_tokens"))
    written = as_int(raw.get("cache_creation_input_tokens")) or 0
    read = as_int(raw.get("cache_read_input_tokens")) or 0
    output = as_int(raw.get("output_tokens"))
    details = as_dict(raw.get("output_tokens_details"))
    prompt = None if plain is None else plain + written + read
    total = None if prompt is None and output is None else (prompt or 0) + (output or 0)
    return Usage(
        prompt_tokens=_bounded(prompt),
        completion_tokens=output,
        total_tokens=_bounded(total),
        cached_tokens=read,
        cache_write_tokens=written,
        reasoning_tokens=as_int(details.get("thinking_tokens")),
    )


def _parse_paid(message: dict[str, Any]) -> ParsedResponse:
    return read_paid(parse_message, message, what=MESSAGES)


def _batch_of_results(ref: str) -> str:
    """The batch id in a results URL (``.../v1/messages/batches/<id>/results``), or ``ref``."""
    parts = ref.rstrip("/").split("/")
    return parts[-2] if len(parts) >= 2 and parts[-1] == "results" else ref


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _bounded(value: int | None) -> int | None:
    return value if value is None or value <= INT4_MAX else None
