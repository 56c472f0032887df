"""Google's Gemini Developer API batch mode (``generativelanguage.googleapis.com``).

A batch is a long-running operation made by ``models/{model}:batchGenerateContent`` (or
``:asyncBatchEmbedContent``). A small batch's requests go inline in that call, streamed from the
database; a large one's go first into a JSONL file by the resumable Files upload, in chunks. The
batch is named ``batchinfer-<id>`` (its display name), so a create whose answer was lost is found
and adopted, never made twice; an uploaded file is found the same way. Results come back inline
in the operation or as a responses file, each keyed by our custom_id.

Chat (``generateContent``) and embeddings (``embedContent``). Proto3 JSON: camelCase, int64 as
strings, zero counts left out.
"""

from __future__ import annotations

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
    ParsedResponse,
    Pricer,
    ProviderBatch,
    ProviderBatchError,
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

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
GENERATE = "generateContent"
EMBED = "embedContent"
_CREATE = {GENERATE: "batchGenerateContent", EMBED: "asyncBatchEmbedContent"}
_STATES = {
    "BATCH_STATE_PENDING": BatchStatus.VALIDATING,
    "BATCH_STATE_RUNNING": BatchStatus.IN_PROGRESS,
    "BATCH_STATE_SUCCEEDED": BatchStatus.COMPLETED,
    "BATCH_STATE_FAILED": BatchStatus.FAILED,
    "BATCH_STATE_CANCELLED": BatchStatus.CANCELLED,
    "BATCH_STATE_EXPIRED": BatchStatus.EXPIRED,
}
_NOTE = "create_started"


def _google_error(parsed: Any) -> tuple[str | None, str | None]:
    """``{"error": {"code": <http>, "message", "status": "<CANONICAL_CODE>"}}``."""
    error = as_dict(as_dict(parsed).get("error"))
    status = error.get("status") or error.get("code")
    return as_str(error.get("message")), None if status is None else str(status)


GEMINI_ERRORS = ErrorDialect(read=_google_error, request_id_headers=(), not_found_hint=None)


class GeminiRules:
    """A ``GenerateContentRequest`` with some ``contents`` (or an ``EmbedContentRequest`` with
    its ``content``); ``model``, if given, is the batch's."""

    request_keys: frozenset[str] = frozenset()

    def __init__(self, limits: BatchLimits) -> None:
        self.limits = limits

    def check_request(
        self, item: Mapping[str, Any], body: dict[str, Any], *, endpoint: str, model: str
    ) -> str | None:
        body_model = body.setdefault("model", _model_name(model))
        if _model_name(str(body_model)) != _model_name(model):
            return (
                f"body.model {body_model!r} differs from the batch model {model!r}; "
                "a batch uses one model"
            )
        if endpoint == GENERATE:
            contents = body.get("contents")
            if not isinstance(contents, list) or not contents:
                return "body.contents is required: a non-empty list of contents"
        elif not isinstance(body.get("content"), dict):
            return "body.content is required for embedContent: a content with parts"
        return None

    def line_bytes(self, custom_id: str, endpoint: str, body_json: bytes) -> int:
        return len(_file_line(custom_id, body_json))


def _model_name(model: str) -> str:
    return model if model.startswith("models/") else f"models/{model}"


def _file_line(custom_id: str, body_json: bytes) -> bytes:
    return b'{"key":' + orjson.dumps(custom_id) + b',"request":' + body_json + b"}\n"


def _inline_item(custom_id: str, body_json: bytes) -> bytes:
    return b'{"request":' + body_json + b',"metadata":{"key":' + orjson.dumps(custom_id) + b"}}"


class GeminiProvider(HttpProvider[GeminiRules]):
    """Gemini's batch mode on the Developer API (an API key). Batches whose JSONL stays under
    ``inline_max_bytes`` go inline in the create call; larger ones are uploaded first, in
    ``upload_chunk_bytes`` chunks."""

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        api_version: str = "v1beta",
        session: aiohttp.ClientSession | None = None,
        batch_discount: Decimal | float | str = Decimal("0.5"),
        name: str = "gemini",
        pricing_id: str = "google",
        limits: BatchLimits | None = None,
        attempts: int = 5,
        verify_tls: bool = True,
        inline_max_bytes: int = 10 * 1024 * 1024,
        upload_chunk_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        api_key = checked_api_key(api_key, provider="GeminiProvider", variable="GEMINI_API_KEY")
        warn_if_unverified(base_url, verify_tls)
        super().__init__(
            http=HttpClient(
                base_url,
                {"x-goog-api-key": api_key},
                session=session,
                attempts=attempts,
                verify_tls=verify_tls,
                dialect=GEMINI_ERRORS,
            ),
            name=name,
            pricing_id=pricing_id,
            batch_discount=batch_discount,
            rules=GeminiRules(
                limits
                or BatchLimits(
                    endpoints=frozenset({GENERATE, EMBED}),
                    max_requests=1_000_000,
                    max_bytes=2 * 1024**3,
                )
            ),
        )
        self.version = api_version
        self.inline_max_bytes = inline_max_bytes
        self.upload_chunk_bytes = upload_chunk_bytes
        #: How many of the newest batches (or files) a retried submit looks through.
        self.reattach_scan = 1_000

    # ---- submitting

    async def submit(
        self, requests: RequestPages, *, key: SubmitKey, checkpoint: SubmitCheckpoint
    ) -> ProviderBatch:
        display = f"batchinfer-{key.batch_id}"
        if _NOTE in checkpoint.notes:
            found = await self.find_named(display)
            if found is not None:
                submit_event(logger, "batch_reattached", key, provider_batch_id=found.id)
                return found
        file_name: str | None = None
        if key.input_bytes > self.inline_max_bytes:
            file_name = checkpoint.input_ref or await self.find_file(f"{display}.jsonl")
            if file_name is None:
                file_name = await self._upload(requests, key, f"{display}.jsonl")
                submit_event(logger, "input_uploaded", key, input_file_id=file_name)
            await checkpoint.record_input(file_name)
        await checkpoint.note(**{_NOTE: "1"})
        path = f"/{self.version}/{_model_name(key.model)}:{_CREATE[key.endpoint]}"

        def body() -> aiohttp.payload.Payload:
            if file_name is not None:
                batch = {"displayName": display, "inputConfig": {"fileName": file_name}}
                return aiohttp.payload.BytesPayload(
                    orjson.dumps({"batch": batch}), content_type="application/json"
                )
            return aiohttp.payload.AsyncIterablePayload(
                _inline_body(display, requests), content_type="application/json"
            )

        async def create() -> ProviderBatch:
            answer = await self._http.request_json(
                "POST", path, data=body, what="creating the batch", retry_on=never
            )
            return self._batch(answer)

        return await create_or_adopt(
            self._http,
            create,
            lambda: self.find_named(display),
            adopted=lambda found: submit_event(
                logger, "batch_adopted", key, provider_batch_id=found.id
            ),
        )

    async def _upload(self, requests: RequestPages, key: SubmitKey, display: str) -> str:
        """The resumable Files protocol: start a session, send the JSONL in chunks at their
        offsets, the last one finalizing; the file's name comes back."""
        _, headers, _ = await self._http.exchange(
            "POST",
            f"/upload/{self.version}/files",
            json={"file": {"display_name": display}},
            headers={
                "X-Goog-Upload-Protocol": "resumable",
                "X-Goog-Upload-Command": "start",
                "X-Goog-Upload-Header-Content-Length": str(key.input_bytes),
                "X-Goog-Upload-Header-Content-Type": "application/jsonl",
            },
            what="starting the input file upload",
        )
        session = headers.get("x-goog-upload-url")
        if not session:
            raise PermanentProviderError("the upload start answer has no x-goog-upload-url")
        offset = 0
        pending = bytearray()
        last = b""

        async def send(chunk: bytes, *, final: bool) -> bytes:
            command = "upload, finalize" if final else "upload"
            _, answer, body = await self._http.exchange(
                "POST",
                session,
                data=chunk,
                headers={"X-Goog-Upload-Command": command, "X-Goog-Upload-Offset": str(offset)},
                what=f"uploading the input file at byte {offset}",
            )
            expected = "final" if final else "active"
            if answer.get("x-goog-upload-status") != expected:
                raise PermanentProviderError(
                    f"the upload at byte {offset} answered status "
                    f"{answer.get('x-goog-upload-status')!r}, not {expected!r}"
                )
            return body

        async for page in requests():
            pending += b"".join(_file_line(c, body) for c, body in page)
            while len(pending) > self.upload_chunk_bytes:
                chunk = bytes(pending[: self.upload_chunk_bytes])
                del pending[: self.upload_chunk_bytes]
                await send(chunk, final=False)
                offset += len(chunk)
        last = await send(bytes(pending), final=True)
        name = as_str(as_dict(as_dict(_loads(last)).get("file")).get("name"))
        if not name:
            raise PermanentProviderError("the finished upload did not name its file")
        return name

    async def find_named(self, display: str) -> ProviderBatch | None:
        """The batch whose display name is ``display``, among the newest ``reattach_scan``."""
        token: str | None = None
        seen = 0
        while seen < self.reattach_scan:
            query = f"/{self.version}/batches?pageSize=100" + (
                f"&pageToken={token}" if token else ""
            )
            page = await self._http.request_json("GET", query, what="listing batches")
            ops = [o for o in page.get("operations") or [] if isinstance(o, dict)]
            for op in ops:
                if as_dict(op.get("metadata")).get("displayName") == display:
                    # List entries carry no results: read it whole.
                    return await self.retrieve_batch(str(op.get("name")))
            seen += len(ops)
            token = as_str(page.get("nextPageToken"))
            if not ops or not token:
                return None
        return None

    async def find_file(self, display: str) -> str | None:
        page = await self._http.request_json(
            "GET", f"/{self.version}/files?pageSize=100", what="listing files"
        )
        for item in page.get("files") or []:
            if isinstance(item, dict) and item.get("displayName") == display:
                return as_str(item.get("name"))
        return None

    # ---- following a batch

    async def retrieve_batch(self, provider_batch_id: str) -> ProviderBatch:
        answer = await self._http.request_json(
            "GET", f"/{self.version}/{provider_batch_id}", what=f"reading {provider_batch_id}"
        )
        return self._batch(answer)

    async def cancel_batch(self, provider_batch_id: str) -> ProviderBatch:
        # Best effort, answered with {}: what it did is read back.
        await self._http.request_json(
            "POST",
            f"/{self.version}/{provider_batch_id}:cancel",
            what=f"cancelling {provider_batch_id}",
        )
        return await self.retrieve_batch(provider_batch_id)

    async def delete_file(self, ref: str) -> None:
        try:
            await self._http.request_json(
                "DELETE", f"/{self.version}/{ref}", what=f"deleting {ref}"
            )
        except ProviderRejectedError as exc:
            if exc.status != 404:
                raise

    def _batch(self, op: dict[str, Any]) -> ProviderBatch:
        name = as_str(op.get("name"))
        if not name:
            raise PermanentProviderError("the batch operation from Gemini has no name")
        meta = as_dict(op.get("metadata"))
        raw_state = str(meta.get("state") or "BATCH_STATE_UNSPECIFIED")
        status = _STATES.get(raw_state, BatchStatus.IN_PROGRESS)
        stats = as_dict(meta.get("batchStats"))
        succeeded, failed = (
            _count(stats, "successfulRequestCount"),
            _count(stats, "failedRequestCount"),
        )
        output = as_dict(meta.get("output")) or as_dict(op.get("response"))
        sources: tuple[ResultSource, ...] = ()
        responses_file = as_str(output.get("responsesFile"))
        if responses_file:
            sources = (ResultSource(key="responses", ref=responses_file, deletable=True),)
        elif output.get("inlinedResponses"):
            sources = (ResultSource(key="inline", ref=name),)
        waiting_for = None
        if status is BatchStatus.COMPLETED and not sources and succeeded + failed:
            waiting_for = "the batch succeeded but names no output yet"
        error = as_dict(op.get("error"))
        errors: tuple[ProviderBatchError, ...] = ()
        if status is BatchStatus.FAILED and error:
            errors = (
                ProviderBatchError(
                    code=str(error.get("code")), message=str(error.get("message") or "failed")
                ),
            )
        return ProviderBatch(
            id=name,
            status=status,
            raw_status=raw_state,
            input_file_id=as_str(as_dict(meta.get("inputConfig")).get("fileName")),
            request_counts=RequestCounts(
                total=_count(stats, "requestCount"), completed=succeeded, failed=failed
            ),
            errors=errors,
            raw=op,
            results=ResultSources(
                sources=sources,
                waiting_for=waiting_for,
                described_as="the batch's responses",
            ),
        )

    def open_results(
        self, source: ResultSource
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        if source.key == "responses":
            return self._http.stream(
                f"/{self.version}/{source.ref}:download?alt=media",
                what=f"downloading {source.ref}",
            )
        return self._inlined(source.ref)

    @asynccontextmanager
    async def _inlined(self, name: str) -> AsyncIterator[AsyncIterator[bytes]]:
        """A batch's inline results, as the lines of a responses file would be."""
        op = await self._http.request_json(
            "GET", f"/{self.version}/{name}", what=f"reading the results of {name}"
        )
        output = as_dict(as_dict(op.get("metadata")).get("output")) or as_dict(op.get("response"))
        items = as_dict(output.get("inlinedResponses")).get("inlinedResponses") or []

        async def lines() -> AsyncIterator[bytes]:
            for item in items:
                if isinstance(item, dict):
                    key = as_dict(item.get("metadata")).get("key")
                    rest = {k: v for k, v in item.items() if k != "metadata"}
                    yield orjson.dumps({"key": key, **rest}) + b"\n"

        yield lines()

    # ---- results

    def parse_result(
        self, record: dict[str, Any], *, endpoint: str, price: Pricer | None = None
    ) -> ResultOutcome:
        custom_id = record.get("key")
        if not isinstance(custom_id, str) or not custom_id or "\x00" in custom_id:
            raise ValueError("the result line has no usable key")
        response = record.get("response")
        if isinstance(response, dict):
            parsed = _parse_paid(endpoint, response)
            version = response.get("modelVersion")
            return ResultOutcome(
                custom_id=custom_id,
                status=CompletionStatus.COMPLETED,
                response=parsed,
                status_code=200,
                costs=None
                if price is None
                else price(version if isinstance(version, str) else None, parsed.usage),
            )
        error = record.get("error")
        code: Any = None
        message: Any = error
        if isinstance(error, dict):
            code, message = error.get("code"), error.get("message")
        return ResultOutcome(
            custom_id=custom_id,
            status=CompletionStatus.FAILED,
            status_code=code if type(code) is int and 0 <= code <= 999 else None,
            failure_error=f"Gemini batch request failed (code: {code})"[:FAILURE_TEXT_LIMIT],
            failure_reason=str(message or "no response and no error given")[:FAILURE_TEXT_LIMIT],
        )

    # ---- the realtime path

    async def complete(self, endpoint: str, body: dict[str, Any]) -> ParsedResponse:
        if endpoint != GENERATE:
            raise ProviderRejectedError(f"the live path here is {GENERATE}, not {endpoint}")
        sent = dict(body)
        model = _model_name(str(sent.pop("model")))
        answer = await self._http.request_json(
            "POST", f"/{self.version}/{model}:{GENERATE}", json=sent, what=f"{model}:{GENERATE}"
        )
        return _parse_paid(endpoint, answer)


async def _inline_body(display: str, requests: RequestPages) -> AsyncIterator[bytes]:
    head = orjson.dumps(display)
    yield b'{"batch":{"displayName":' + head + b',"inputConfig":{"requests":{"requests":['
    first = True
    async for page in requests():
        if page:
            items = b",".join(_inline_item(custom_id, body) for custom_id, body in page)
            yield items if first else b"," + items
            first = False
    yield b"]}}}}"


def parse_content(endpoint: str, response: dict[str, Any]) -> ParsedResponse:
    """A GenerateContentResponse's text, function calls, finish reason and usage (thinking
    tokens are completion tokens here); an EmbedContentResponse's token count."""
    if endpoint == EMBED:
        tokens = _count(response, "tokenCount")
        return ParsedResponse(body=response, usage=Usage(prompt_tokens=tokens, total_tokens=tokens))
    candidates = response.get("candidates") or [{}]
    first = as_dict(candidates[0])
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for part in as_dict(first.get("content")).get("parts") or []:
        if not isinstance(part, dict) or part.get("thought"):
            continue
        if isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(part.get("functionCall"), dict):
            calls.append(part["functionCall"])
    meta = as_dict(response.get("usageMetadata"))
    visible = as_int(meta.get("candidatesTokenCount"))
    thoughts = as_int(meta.get("thoughtsTokenCount"))
    completion = None if visible is None and thoughts is None else (visible or 0) + (thoughts or 0)
    return ParsedResponse(
        body=response,
        output_text="".join(texts) if texts else None,
        tool_calls=calls or None,
        finish_reason=as_str(first.get("finishReason"))
        or as_str(as_dict(response.get("promptFeedback")).get("blockReason")),
        usage=Usage(
            prompt_tokens=as_int(meta.get("promptTokenCount")),
            completion_tokens=completion,
            total_tokens=as_int(meta.get("totalTokenCount")),
            cached_tokens=as_int(meta.get("cachedContentTokenCount")),
            reasoning_tokens=thoughts,
        ),
    )


def _parse_paid(endpoint: str, response: dict[str, Any]) -> ParsedResponse:
    return read_paid(lambda r: parse_content(endpoint, r), response, what=endpoint)


def _count(values: dict[str, Any], name: str) -> int:
    """An int64 count, sent as a string (and left out when 0)."""
    value = values.get(name)
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    return as_int(value) or 0


def _loads(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
