"""xAI's Batch API (REST): a batch is a container, filled with requests page by page.

There is no status word: a batch is done when nothing is pending, failed when xAI cancelled it
with a message, cancelled when we asked. Results are one paginated JSON list, readable while the
batch runs, so they are applied as they arrive (``ResultSources.while_running``); each success
carries its own price in ``usage.cost_in_usd_ticks`` (1e-10 USD), which is what is recorded.

The container is named after our batch, so a submit that died is finished by the next one: the
container is found by name, and adding the requests again from where the last recorded page
ended is harmless (a re-add of the same request is a no-op at xAI).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from decimal import Decimal
from typing import Any

import aiohttp
import orjson

from batchinfer.domain import (
    BatchLimits,
    BatchStatus,
    CompletionStatus,
    Costs,
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
from batchinfer.providers.openai import parse_response

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.x.ai/v1"
CHAT = "/v1/chat/completions"
#: 1 tick is 1e-10 USD.
_TICK = Decimal("1e-10")
_PAGE = 1_000
_CONTAINER = "container"
_ADDED = "added"


def _xai_error(parsed: Any) -> tuple[str | None, str | None]:
    """``{"code": "<gRPC status text>", "error": "<message>"}``, or OpenAI's shape."""
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        code = parsed.get("code")
        return parsed["error"], code if isinstance(code, str) else None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        error = parsed["error"]
        return as_str(error.get("message")), as_str(error.get("code"))
    return None, None


XAI_ERRORS = ErrorDialect(read=_xai_error, not_found_hint=None)


class XAIRules:
    """xAI batches take chat completions: the batch's model, some messages, no streaming."""

    request_keys = frozenset({"method", "url"})

    def __init__(self, limits: BatchLimits) -> None:
        self.limits = limits

    def check_request(
        self, item: Mapping[str, Any], body: dict[str, Any], *, endpoint: str, model: str
    ) -> str | None:
        if item.get("url", endpoint) != endpoint:
            return f"url {item.get('url')!r} differs from the batch endpoint {endpoint!r}"
        body_model = body.setdefault("model", model)
        if body_model != model:
            return (
                f"body.model {body_model!r} differs from the batch model {model!r}; "
                "a batch uses one model"
            )
        if body.get("stream"):
            return "stream is not supported in a batch; remove it from the body"
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return "body.messages is required: a non-empty list of messages"
        return None

    def line_bytes(self, custom_id: str, endpoint: str, body_json: bytes) -> int:
        return len(_request_item(custom_id, body_json)) + 1


def _request_item(custom_id: str, body_json: bytes) -> bytes:
    return (
        b'{"batch_request_id":'
        + orjson.dumps(custom_id)
        + b',"batch_request":{"chat_get_completion":'
        + body_json
        + b"}}"
    )


class XAIProvider(HttpProvider[XAIRules]):
    """xAI's batches (``base_url`` ends in ``/v1``). Batch results carry their own cost, which
    is recorded as is; ``batch_discount`` prices only results that come without one."""

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        session: aiohttp.ClientSession | None = None,
        batch_discount: Decimal | float | str = Decimal("0.5"),
        name: str = "xai",
        pricing_id: str = "x-ai",
        limits: BatchLimits | None = None,
        attempts: int = 5,
        verify_tls: bool = True,
        page_size: int = 1_000,
    ) -> None:
        api_key = checked_api_key(api_key, provider="XAIProvider", variable="XAI_API_KEY")
        warn_if_unverified(base_url, verify_tls)
        super().__init__(
            http=HttpClient(
                base_url,
                {"Authorization": f"Bearer {api_key}"},
                session=session,
                attempts=attempts,
                verify_tls=verify_tls,
                dialect=XAI_ERRORS,
            ),
            name=name,
            pricing_id=pricing_id,
            batch_discount=batch_discount,
            rules=XAIRules(
                limits
                or BatchLimits(
                    endpoints=frozenset({CHAT}), max_requests=1_000_000, max_bytes=1 << 40
                )
            ),
        )
        #: Requests sent per add call (xAI allows a limited number of add calls per 30 s).
        self.page_size = page_size
        #: How many of the provider's newest batches a retried submit looks through.
        self.reattach_scan = 1_000

    # ---- submitting

    async def submit(
        self, requests: RequestPages, *, key: SubmitKey, checkpoint: SubmitCheckpoint
    ) -> ProviderBatch:
        """Create the container (or find the one an earlier try made), then add the requests,
        noting in the checkpoint how many went in, so a retry sends only the rest."""
        name = f"batchinfer-{key.batch_id}"
        batch_id = checkpoint.notes.get(_CONTAINER)
        if batch_id is None:
            found = await self.find_named(name)
            if found is not None:
                submit_event(logger, "batch_reattached", key, provider_batch_id=found)
            batch_id = found or await self._create(name)
            await checkpoint.note(**{_CONTAINER: batch_id})
        added = int(checkpoint.notes.get(_ADDED, "0"))
        position = 0
        async for page in requests():
            for start in range(0, len(page), self.page_size):
                chunk = page[start : start + self.page_size]
                position += len(chunk)
                if position <= added:
                    continue  # an earlier try added these
                await self._add(batch_id, chunk)
                await checkpoint.note(**{_ADDED: str(position)})
        submit_event(logger, "requests_added", key, provider_batch_id=batch_id, added=str(position))
        return await self.retrieve_batch(batch_id)

    async def _create(self, name: str) -> str:
        """Creating is not idempotent: before a retry, the container is looked for by name."""

        async def create() -> str:
            answer = await self._http.request_json(
                "POST", "/batches", json={"name": name}, what="creating the batch",
                retry_on=never,
            )  # fmt: skip
            batch_id = as_str(answer.get("batch_id"))
            if not batch_id:
                raise PermanentProviderError("the created batch has no batch_id")
            return batch_id

        return await create_or_adopt(self._http, create, lambda: self.find_named(name))

    async def _add(self, batch_id: str, page: Any) -> None:
        body = b'{"batch_requests":[' + b",".join(_request_item(c, b) for c, b in page) + b"]}"
        # Adding the same request again is a no-op at xAI: retrying is safe.
        await self._http.request_json(
            "POST",
            f"/batches/{batch_id}/requests",
            data=lambda: aiohttp.payload.BytesPayload(body, content_type="application/json"),
            what=f"adding {len(page)} requests to batch {batch_id}",
        )

    async def find_named(self, name: str) -> str | None:
        """The id of the newest batch called ``name``, among the newest ``reattach_scan``."""
        token: str | None = None
        seen = 0
        while seen < self.reattach_scan:
            query = "/batches?limit=100" + (f"&pagination_token={token}" if token else "")
            page = await self._http.request_json("GET", query, what="listing batches")
            found = [b for b in page.get("batches") or [] if isinstance(b, dict)]
            for body in found:
                if body.get("name") == name and isinstance(body.get("batch_id"), str):
                    return str(body["batch_id"])
            seen += len(found)
            token = as_str(page.get("pagination_token")) or None
            if not found or token is None:
                return None
        return None

    # ---- following a batch

    async def retrieve_batch(self, provider_batch_id: str) -> ProviderBatch:
        answer = await self._http.request_json(
            "GET", f"/batches/{provider_batch_id}", what=f"reading batch {provider_batch_id}"
        )
        return self._batch(answer)

    async def cancel_batch(self, provider_batch_id: str) -> ProviderBatch:
        answer = await self._http.request_json(
            "POST",
            f"/batches/{provider_batch_id}:cancel",
            what=f"cancelling batch {provider_batch_id}",
        )
        return self._batch(answer)

    async def delete_file(self, ref: str) -> None:
        """xAI keeps no file of ours (requests are added inline) and deletes no batch: there is
        nothing to delete, and nothing is marked deletable."""
        return

    def _batch(self, body: dict[str, Any]) -> ProviderBatch:
        batch_id = as_str(body.get("batch_id"))
        if not batch_id:
            raise PermanentProviderError("the batch object from xAI has no batch_id")
        state = as_dict(body.get("state"))
        total = as_int(state.get("num_requests")) or 0
        pending = as_int(state.get("num_pending")) or 0
        success = as_int(state.get("num_success")) or 0
        errors = as_int(state.get("num_error")) or 0
        cancelled = as_int(state.get("num_cancelled")) or 0
        by_xai = as_str(body.get("cancel_by_xai_message"))
        if by_xai:
            status, raw = BatchStatus.FAILED, "cancelled by xAI"
        elif body.get("cancel_time"):
            status = BatchStatus.CANCELLING if pending else BatchStatus.CANCELLED
            raw = "cancelling" if pending else "cancelled"
        elif pending or not total:
            status, raw = BatchStatus.IN_PROGRESS, "pending" if pending else "empty"
        elif cancelled:
            # Nothing pending, some never ran, and nobody asked: its time ran out.
            status, raw = BatchStatus.EXPIRED, "done (some cancelled)"
        else:
            status, raw = BatchStatus.COMPLETED, "done"
        return ProviderBatch(
            id=batch_id,
            status=status,
            raw_status=raw,
            request_counts=RequestCounts(total=total, completed=success, failed=errors + cancelled),
            errors=(),
            raw=body,
            results=ResultSources(
                sources=(ResultSource(key="results", ref=batch_id),),
                described_as="the batch's results",
                while_running=True,
            ),
        )

    def open_results(
        self, source: ResultSource
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        return self._results(source.ref)

    @asynccontextmanager
    async def _results(self, batch_id: str) -> AsyncIterator[AsyncIterator[bytes]]:
        async def lines() -> AsyncIterator[bytes]:
            token: str | None = None
            while True:
                query = f"/batches/{batch_id}/results?limit={_PAGE}"
                if token:
                    query += f"&pagination_token={token}"
                page = await self._http.request_json(
                    "GET", query, what=f"reading the results of batch {batch_id}"
                )
                results = page.get("results") or []
                if results:
                    yield b"".join(orjson.dumps(r) + b"\n" for r in results)
                token = as_str(page.get("pagination_token")) or None
                if token is None or not results:
                    return

        yield lines()

    # ---- results

    def parse_result(
        self, record: dict[str, Any], *, endpoint: str, price: Pricer | None = None
    ) -> ResultOutcome:
        custom_id = record.get("batch_request_id")
        if not isinstance(custom_id, str) or not custom_id or "\x00" in custom_id:
            raise ValueError("the result has no usable batch_request_id")
        result = as_dict(record.get("batch_result"))
        completion = as_dict(as_dict(result.get("response")).get("chat_get_completion"))
        if completion:
            parsed = _parse_paid(completion)
            model = completion.get("model")
            return ResultOutcome(
                custom_id=custom_id,
                status=CompletionStatus.COMPLETED,
                response=parsed,
                status_code=200,
                costs=_costs(completion, parsed.usage, model, price),
            )
        error = result.get("error")
        code: Any = None
        if isinstance(error, dict):
            code, error = error.get("code"), error.get("message")
        message = str(error or "no result and no error given")
        label = (
            f"xAI batch request failed (code: {code})"
            if code is not None
            else ("xAI batch request failed")
        )
        return ResultOutcome(
            custom_id=custom_id,
            status=CompletionStatus.FAILED,
            failure_error=label[:FAILURE_TEXT_LIMIT],
            failure_reason=message[:FAILURE_TEXT_LIMIT],
        )

    # ---- the realtime path

    async def complete(self, endpoint: str, body: dict[str, Any]) -> ParsedResponse:
        if endpoint != CHAT:
            raise ProviderRejectedError(f"xAI's live endpoint here is {CHAT}, not {endpoint}")
        answer = await self._http.request_json(
            "POST", "/chat/completions", json=body, what=f"POST {CHAT}"
        )
        return _parse_paid(answer)


def _parse_paid(completion: dict[str, Any]) -> ParsedResponse:
    return read_paid(_read_completion, completion, what=CHAT)


def _read_completion(completion: dict[str, Any]) -> ParsedResponse:
    """A chat completion, read as OpenAI's; xAI counts reasoning apart from completion tokens,
    ours includes it (see ``Usage``)."""
    parsed = parse_response(CHAT, completion)
    usage = parsed.usage
    if usage.reasoning_tokens and usage.completion_tokens is not None:
        both = usage.completion_tokens + usage.reasoning_tokens
        usage = Usage(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=both if both <= INT4_MAX else None,
            total_tokens=usage.total_tokens,
            cached_tokens=usage.cached_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            cache_write_tokens=usage.cache_write_tokens,
        )
    return dataclasses.replace(parsed, usage=usage)


def _costs(
    completion: dict[str, Any], usage: Usage, model: Any, price: Pricer | None
) -> Costs | None:
    """What xAI says the request cost, split between input and output as the price table
    would split it (all input when the table does not know the model)."""
    estimated = None if price is None else price(model if isinstance(model, str) else None, usage)
    ticks = as_dict(completion.get("usage")).get("cost_in_usd_ticks")
    if type(ticks) is not int or ticks < 0:
        return estimated
    total = Decimal(ticks) * _TICK
    if estimated is None or not estimated.total:
        return Costs(input=total, output=Decimal(0))
    output = (total * estimated.output / estimated.total).quantize(Decimal("1e-12"))
    return Costs(input=total - output, output=output)
