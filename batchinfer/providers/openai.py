"""OpenAI's Files + Batches API, and the live endpoints for the realtime path.

Request bodies are the same for both paths, and ``parse_response`` is the one function that reads
a response body, whether it came from a batch output line or a live call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
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
from batchinfer.jsonl import encode_request_line
from batchinfer.providers.base import InputStream, RequestPages, SubmitCheckpoint
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
from batchinfer.providers.http import HttpClient, retry_hook

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"

#: Endpoints the Batch API accepts; only the first three are parsed into text and usage.
BATCH_ENDPOINTS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/responses",
        "/v1/embeddings",
        "/v1/completions",
        "/v1/moderations",
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/videos",
    }
)


# The field each endpoint cannot do without; OpenAI rejects a body without it.
_REQUIRED_BODY_FIELD = {
    "/v1/chat/completions": "messages",
    "/v1/responses": "input",
    "/v1/embeddings": "input",
    "/v1/completions": "prompt",
    "/v1/moderations": "input",
}


class OpenAIRules:
    """What OpenAI's Batch API asks of each line of an input file: POST to the batch's own
    endpoint, one model for the whole file, no streaming, the endpoint's required field."""

    request_keys = frozenset({"method", "url"})

    def __init__(self, limits: BatchLimits) -> None:
        self.limits = limits

    def check_request(
        self, item: Mapping[str, Any], body: dict[str, Any], *, endpoint: str, model: str
    ) -> str | None:
        if item.get("method", "POST") != "POST":
            return "method must be POST"
        if item.get("url", endpoint) != endpoint:
            return f"url {item.get('url')!r} differs from the batch endpoint {endpoint!r}"
        body_model = body.setdefault("model", model)
        if body_model != model:
            return (
                f"body.model {body_model!r} differs from the batch model {model!r}; "
                "a batch uses one model"
            )
        if body.get("stream"):
            return "stream is not supported by the batch API; remove it from the body"
        required = _REQUIRED_BODY_FIELD.get(endpoint)
        if required is not None and required not in body:
            return f"body.{required} is required for {endpoint}"
        return None

    def line_bytes(self, custom_id: str, endpoint: str, body_json: bytes) -> int:
        return len(encode_request_line(custom_id, endpoint, body_json))


#: How long after this process created an object a 404 for it is taken for the provider's
#: eventual consistency, and retried.
_FRESH_SECONDS = 60.0
_FRESH_KEPT = 10_000


class OpenAIProvider(HttpProvider[OpenAIRules]):
    """OpenAI, or any server speaking its Files and Batches API (``base_url``).

    ``batch_discount`` is the factor batch results are priced at relative to live calls;
    ``pricing_id`` is whose prices they are (genai-prices' provider id), whatever ``name`` the
    provider is registered under. A given ``session`` is borrowed and never closed.
    """

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        session: aiohttp.ClientSession | None = None,
        batch_discount: Decimal | float | str = Decimal("0.5"),
        organization: str | None = None,
        project: str | None = None,
        name: str = "openai",
        pricing_id: str = "openai",
        limits: BatchLimits | None = None,
        attempts: int = 5,
        verify_tls: bool = True,
    ) -> None:
        api_key = checked_api_key(api_key, provider="OpenAIProvider", variable="OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"}
        if organization:
            headers["OpenAI-Organization"] = organization
        if project:
            headers["OpenAI-Project"] = project
        warn_if_unverified(base_url, verify_tls)
        self._start(
            HttpClient(
                base_url, headers, session=session, attempts=attempts, verify_tls=verify_tls
            ),
            name=name,
            pricing_id=pricing_id,
            batch_discount=batch_discount,
            limits=limits or BatchLimits(endpoints=BATCH_ENDPOINTS),
        )

    def _start(
        self,
        http: HttpClient,
        *,
        name: str,
        pricing_id: str,
        batch_discount: Decimal | float | str,
        limits: BatchLimits,
    ) -> None:
        """Everything but the client and its auth, which services speaking this API differ in."""
        super().__init__(
            http=http,
            name=name,
            pricing_id=pricing_id,
            batch_discount=batch_discount,
            rules=OpenAIRules(limits),
        )
        self._created: dict[str, float] = {}
        #: How many of the provider's newest batches a retried submit looks through.
        self.reattach_scan = 1_000

    def encode_line(self, custom_id: str, endpoint: str, body_json: bytes) -> bytes:
        return encode_request_line(custom_id, endpoint, body_json)

    async def submit(
        self, requests: RequestPages, *, key: SubmitKey, checkpoint: SubmitCheckpoint
    ) -> ProviderBatch:
        """Upload the input file, then create the batch over it, tagged with our id.

        A retry finishes what an earlier try began: a file it uploaded but did not record is
        found by its name and adopted; once a file is recorded, a batch an earlier try created
        over it (a timeout, a crash before recording) is found by its tag and re-attached.
        """
        tag = {"batchinfer_batch_id": str(key.batch_id)}
        filename = f"batchinfer-{key.batch_id}.jsonl"
        file_id = checkpoint.input_ref
        if file_id is None:
            file_id = await self.find_input_file(filename)
            if file_id is not None:
                await checkpoint.record_input(file_id)
                submit_event(logger, "input_file_adopted", key, input_file_id=file_id)
        if file_id is None:

            async def lines() -> AsyncIterator[bytes]:
                async for page in requests():
                    yield b"".join(self.encode_line(c, key.endpoint, body) for c, body in page)

            file_id = await self.upload_input(lines, filename=filename)
            await checkpoint.record_input(file_id)
            submit_event(logger, "input_uploaded", key, input_file_id=file_id)
        else:
            found = await self.find_batch(metadata=tag, max_batches=self.reattach_scan)
            if found is not None:
                submit_event(logger, "batch_reattached", key, provider_batch_id=found.id)
                return found
        return await self.create_batch(input_file_id=file_id, endpoint=key.endpoint, metadata=tag)

    async def upload_input(self, stream: InputStream, *, filename: str) -> str:
        """Upload the input file; a retry first adopts a file an earlier attempt stored (its
        answer lost), rather than leaving that one stranded and storing a second."""

        def multipart() -> aiohttp.MultipartWriter:
            writer = aiohttp.MultipartWriter("form-data")
            purpose = writer.append("batch")
            purpose.set_content_disposition("form-data", name="purpose")
            file_part = writer.append_payload(
                aiohttp.payload.AsyncIterablePayload(stream(), content_type="application/jsonl")
            )
            file_part.set_content_disposition("form-data", name="file", filename=filename)
            return writer

        async def upload() -> str:
            body = await self._http.request_json(
                "POST",
                "/files",
                data=multipart,
                what="uploading the batch input file",
                retry_on=never,
            )
            file_id = body.get("id")
            if not isinstance(file_id, str):
                raise PermanentProviderError("the file upload answer has no file id")
            self._remember(file_id)
            return file_id

        def adopted(found: str) -> None:
            logger.info(
                "batchinfer.input_file_adopted %s: an earlier upload arrived",
                found,
                extra={"batchinfer.event": "input_file_adopted", "file_id": found},
            )

        return await create_or_adopt(
            self._http, upload, lambda: self.find_input_file(filename), adopted=adopted
        )

    async def find_input_file(self, filename: str) -> str | None:
        """The newest uploaded batch input file named ``filename``, if any."""
        page = await self._http.request_json(
            "GET", "/files?purpose=batch&limit=100&order=desc", what="listing files"
        )
        for obj in page.get("data") or []:
            if (
                isinstance(obj, dict)
                and obj.get("filename") == filename
                and isinstance(obj.get("id"), str)
                and obj.get("status") not in ("error", "deleted")
            ):
                file_id: str = obj["id"]
                return file_id
        return None

    async def delete_file(self, file_id: str) -> None:
        """Delete a file; one already gone is fine."""
        try:
            await self._http.request_json(
                "DELETE", f"/files/{file_id}", what=f"deleting file {file_id}"
            )
        except ProviderRejectedError as exc:
            if exc.status != 404:
                raise

    async def create_batch(
        self, *, input_file_id: str, endpoint: str, metadata: dict[str, str]
    ) -> ProviderBatch:
        """Start the batch. Creating is not idempotent: a timeout or a dropped connection may
        hide a batch that was created, so before each retry the provider is searched for one
        carrying ``metadata`` (our id), and that one is adopted instead of paying twice."""
        fresh_file = self._is_fresh(input_file_id)

        def retry_on(exc: BaseException) -> bool | float:
            if fresh_file and isinstance(exc, ProviderRejectedError) and exc.status == 404:
                return True  # the file we just uploaded is not visible everywhere yet
            return retry_hook(exc)

        async def create() -> ProviderBatch:
            body = await self._http.request_json(
                "POST",
                "/batches",
                json={
                    "input_file_id": input_file_id,
                    "endpoint": self.wire_endpoint(endpoint),
                    "completion_window": "24h",
                    "metadata": metadata,
                },
                what="creating the batch",
                retry_on=never,
            )
            pb = self._batch(body)
            self._remember(pb.id)
            return pb

        def adopted(found: ProviderBatch) -> None:
            logger.info(
                "batchinfer.batch_adopted %s: an earlier create went through",
                found.id,
                extra={"batchinfer.event": "batch_adopted", "id": found.id},
            )

        return await create_or_adopt(
            self._http,
            create,
            lambda: self.find_batch(metadata=metadata, max_batches=100),
            adopted=adopted,
            retry_on=retry_on,
        )

    async def retrieve_batch(self, provider_batch_id: str) -> ProviderBatch:
        body = await self._http.request_json(
            "GET",
            f"/batches/{provider_batch_id}",
            what=f"reading batch {provider_batch_id}",
            retry_on=self._fresh_404_hook(provider_batch_id),
        )
        return self._batch(body)

    async def find_batch(
        self, *, metadata: dict[str, str], max_batches: int = 1_000
    ) -> ProviderBatch | None:
        after: str | None = None
        seen = 0
        while seen < max_batches:
            query = f"/batches?limit={min(100, max_batches - seen)}"
            if after:
                query += f"&after={after}"
            page = await self._http.request_json("GET", query, what="listing batches")
            data = [b for b in page.get("data") or [] if isinstance(b, dict)]
            for body in data:
                tags = as_dict(body.get("metadata"))
                if all(tags.get(k) == v for k, v in metadata.items()):
                    return self._batch(body)
            seen += len(data)
            if not data or not page.get("has_more"):
                return None
            after = data[-1].get("id")
        return None

    def _remember(self, object_id: str) -> None:
        if len(self._created) >= _FRESH_KEPT:
            self._created.clear()  # only the last minute matters
        self._created[object_id] = time.monotonic()

    def _is_fresh(self, object_id: str) -> bool:
        created = self._created.get(object_id)
        return created is not None and time.monotonic() - created < _FRESH_SECONDS

    def _fresh_404_hook(self, object_id: str) -> Callable[[BaseException], bool | float]:
        fresh = self._is_fresh(object_id)

        def hook(exc: BaseException) -> bool | float:
            if fresh and isinstance(exc, ProviderRejectedError) and exc.status == 404:
                return True
            return retry_hook(exc)

        return hook

    async def cancel_batch(self, provider_batch_id: str) -> ProviderBatch:
        body = await self._http.request_json(
            "POST",
            f"/batches/{provider_batch_id}/cancel",
            what=f"cancelling batch {provider_batch_id}",
        )
        return self._batch(body)

    def open_file(self, file_id: str) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        return self._http.stream(f"/files/{file_id}/content", what=f"downloading file {file_id}")

    def open_results(
        self, source: ResultSource
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        return self.open_file(source.ref)

    def wire_endpoint(self, endpoint: str) -> str:
        """The batch's endpoint as this service's create call names it."""
        return endpoint

    def live_path(self, endpoint: str, body: dict[str, Any]) -> str:
        """Where a live call to ``endpoint`` goes, under the base URL."""
        return endpoint.removeprefix("/v1")

    async def complete(self, endpoint: str, body: dict[str, Any]) -> ParsedResponse:
        path = self.live_path(endpoint, body)
        answer = await self._http.request_json("POST", path, json=body, what=f"POST {endpoint}")
        return _parse_paid(endpoint, answer)

    def _batch(self, body: dict[str, Any]) -> ProviderBatch:
        """Normalise a batch object, trusting none of its fields' types."""
        batch_id = body.get("id")
        if not isinstance(batch_id, str) or not batch_id:
            raise PermanentProviderError("the batch object from the provider has no id")
        raw_status = str(body.get("status"))
        try:
            # Azure's own examples write "Validating" as well as "validating".
            status = BatchStatus(raw_status.lower())
        except ValueError:
            logger.warning(
                "batchinfer.unknown_provider_status",
                extra={"batchinfer.provider_batch_id": batch_id, "batchinfer.status": raw_status},
            )
            status = BatchStatus.IN_PROGRESS
        if status is BatchStatus.PENDING:  # ours alone; the provider has the batch
            status = BatchStatus.VALIDATING
        raw_counts = as_dict(body.get("request_counts"))
        errors = as_dict(body.get("errors")).get("data")
        counts = RequestCounts(
            total=as_int(raw_counts.get("total")) or 0,
            completed=as_int(raw_counts.get("completed")) or 0,
            failed=as_int(raw_counts.get("failed")) or 0,
        )
        output_file_id = _file_id(body, "output_file_id")
        error_file_id = _file_id(body, "error_file_id")
        return ProviderBatch(
            id=batch_id,
            status=status,
            raw_status=raw_status,
            input_file_id=_file_id(body, "input_file_id"),
            output_file_id=output_file_id,
            error_file_id=error_file_id,
            request_counts=counts,
            errors=tuple(_batch_error(e) for e in errors) if isinstance(errors, list) else (),
            raw=body,
            results=_result_sources(status, counts, output_file_id, error_file_id),
        )

    def parse_result(
        self, record: dict[str, Any], *, endpoint: str, price: Pricer | None = None
    ) -> ResultOutcome:
        custom_id = record.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id or "\x00" in custom_id:
            raise ValueError("the result line has no usable custom_id")
        response = record.get("response")
        error = record.get("error")
        status_code: int | None = None
        body: Any = None
        request_id = None
        if isinstance(response, dict):
            status_code = _status_code(response.get("status_code", 200))
            request_id = as_str(response.get("request_id"))
            body = response.get("body")
            if isinstance(body, str | bytes):
                # Some OpenAI-compatible servers send the body as a JSON-encoded string.
                try:
                    body = orjson.loads(body)
                except orjson.JSONDecodeError:
                    body = None
            if status_code is not None and 200 <= status_code < 300 and isinstance(body, dict):
                parsed = _parse_paid(endpoint, body)
                model = body.get("model")
                return ResultOutcome(
                    custom_id=custom_id,
                    status=CompletionStatus.COMPLETED,
                    response=parsed,
                    status_code=status_code,
                    provider_request_id=request_id,
                    costs=None
                    if price is None
                    else price(model if isinstance(model, str) else None, parsed.usage),
                )
        message = None
        code = None
        if isinstance(error, dict):
            message, code = error.get("message"), error.get("code")
        elif isinstance(error, str):
            message = error
        if not message and isinstance(body, dict) and isinstance(body.get("error"), dict):
            message = body["error"].get("message")
            code = code or body["error"].get("code") or body["error"].get("type")
        if not message and status_code is not None and 200 <= status_code < 300:
            message = "the response body is missing or not a JSON object"
        label = f"status: {status_code if status_code is not None else 'none'}"
        if code:
            label += f", code: {code}"
        return ResultOutcome(
            custom_id=custom_id,
            status=CompletionStatus.FAILED,
            status_code=status_code,
            provider_request_id=request_id,
            failure_error=f"OpenAI batch entry failed ({label})"[:FAILURE_TEXT_LIMIT],
            failure_reason=str(message or "unknown OpenAI batch failure")[:FAILURE_TEXT_LIMIT],
        )


def parse_response(endpoint: str, body: dict[str, Any]) -> ParsedResponse:
    """Read a 2xx body of a chat, responses or embeddings call; others keep only the body."""
    usage = _usage(body.get("usage"))
    if endpoint == "/v1/chat/completions":
        choices = body.get("choices") or [{}]
        choice = choices[0] if isinstance(choices[0], dict) else {}
        message = choice.get("message") or {}
        tool_calls = message.get("tool_calls") or None
        return ParsedResponse(
            body=body,
            output_text=_text(message.get("content")),
            tool_calls=list(tool_calls) if tool_calls else None,
            finish_reason=choice.get("finish_reason"),
            usage=usage,
        )
    if endpoint == "/v1/responses":
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for item in body.get("output") or []:
            if not isinstance(item, dict):
                continue
            if item.get("type") == "message":
                for part in item.get("content") or []:
                    if isinstance(part, dict) and part.get("type") == "output_text":
                        texts.append(str(part.get("text", "")))
            elif str(item.get("type", "")).endswith("_call"):
                calls.append(item)
        finish = body.get("status")
        incomplete = body.get("incomplete_details")
        if isinstance(incomplete, dict) and incomplete.get("reason"):
            finish = incomplete["reason"]
        return ParsedResponse(
            body=body,
            output_text="".join(texts) if texts else None,
            tool_calls=calls or None,
            finish_reason=finish,
            usage=usage,
        )
    return ParsedResponse(body=body, usage=usage)


def _text(content: Any) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p
        )
    return str(content)


def _usage(raw: Any) -> Usage:
    if not isinstance(raw, dict):
        return Usage()
    # Chat and embeddings say prompt/completion; the Responses API says input/output.
    if "prompt_tokens" in raw:
        prompt = raw["prompt_tokens"]
        completion = raw.get("completion_tokens")
        prompt_details = raw.get("prompt_tokens_details")
        completion_details = raw.get("completion_tokens_details")
    else:
        prompt = raw.get("input_tokens")
        completion = raw.get("output_tokens")
        prompt_details = raw.get("input_tokens_details")
        completion_details = raw.get("output_tokens_details")
    total = raw.get("total_tokens")
    if total is None and (prompt is not None or completion is not None):
        total = (as_int(prompt) or 0) + (as_int(completion) or 0)
    return Usage(
        prompt_tokens=as_int(prompt),
        completion_tokens=as_int(completion),
        total_tokens=as_int(total),
        cached_tokens=as_int(prompt_details.get("cached_tokens"))
        if isinstance(prompt_details, dict)
        else None,
        reasoning_tokens=as_int(completion_details.get("reasoning_tokens"))
        if isinstance(completion_details, dict)
        else None,
    )


def _status_code(value: Any) -> int | None:
    if type(value) is str and value.isdigit():
        value = int(value)
    return value if type(value) is int and 0 <= value <= 999 else None


def _file_id(body: dict[str, Any], field: str) -> str | None:
    value = body.get(field)
    if value is None or value == "":  # Azure says "" for a file there is not (yet)
        return None
    if isinstance(value, str):
        return value
    raise PermanentProviderError(
        f"the batch object's {field} is {value!r}, not a file id; the provider's answer is "
        "malformed"
    )


def _result_sources(
    status: BatchStatus,
    counts: RequestCounts,
    output_file_id: str | None,
    error_file_id: str | None,
) -> ResultSources:
    """The output file, then the error file; judged by the counts, which of them is still to
    come (the file ids can lag behind a batch's end)."""
    waiting_for = None
    if counts.completed > 0 and output_file_id is None:
        waiting_for = f"{counts.completed} completed requests but no output file yet"
    elif counts.failed > 0 and error_file_id is None:
        waiting_for = f"{counts.failed} failed requests but no error file yet"
    elif status is BatchStatus.COMPLETED and output_file_id is None and error_file_id is None:
        waiting_for = "neither an output nor an error file yet"
    files = (("output", output_file_id), ("error", error_file_id))
    return ResultSources(
        sources=tuple(ResultSource(key=k, ref=f, deletable=True) for k, f in files if f),
        waiting_for=waiting_for,
        described_as="the output or error file",
    )


def _batch_error(raw: Any) -> ProviderBatchError:
    if not isinstance(raw, dict):
        return ProviderBatchError(code=None, message=str(raw))
    line = raw.get("line")
    return ProviderBatchError(
        code=as_str(raw.get("code")),
        message=str(raw.get("message") or "no message"),
        param=as_str(raw.get("param")),
        line=line if type(line) is int and 0 < line <= INT4_MAX else None,
    )


def _parse_paid(endpoint: str, body: dict[str, Any]) -> ParsedResponse:
    return read_paid(lambda b: parse_response(endpoint, b), body, what=endpoint)
