"""Checks every request of a new batch before anything is written or sent.

The provider would find most of these problems too, but only after an upload and up to 24 hours of
waiting, and it would fail the whole batch for one bad line. Here the error names the request.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from typing import Any

import orjson

from batchinfer.domain import BatchLimits, NewRequest
from batchinfer.errors import InvalidRequestError
from batchinfer.jsonl import encode_request_line

_REQUEST_KEYS = frozenset({"custom_id", "body", "metadata", "method", "url"})

# Postgres text and jsonb cannot hold U+0000; orjson writes it as \u0000, a backslash as \\.
# (The body is stored as json, which keeps the escape as text and so may contain it.)
_ENCODED_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


def has_encoded_nul(data: bytes) -> bool:
    # The substring test is cheap; the regex only runs to rule out an escaped backslash.
    return b"\\u0000" in data and _ENCODED_NUL.search(data) is not None


# The field each endpoint cannot do without; the provider rejects a body without it.
_REQUIRED_BODY_FIELD = {
    "/v1/chat/completions": "messages",
    "/v1/responses": "input",
    "/v1/embeddings": "input",
    "/v1/completions": "prompt",
    "/v1/moderations": "input",
}

RequestInput = Mapping[str, Any]
Requests = Iterable[RequestInput] | AsyncIterable[RequestInput]


async def _aiter(requests: Requests) -> AsyncIterator[Any]:
    if isinstance(requests, AsyncIterable):
        async for item in requests:
            yield item
    else:
        for item in requests:
            yield item


def check_batch_metadata(metadata: Any) -> dict[str, Any]:
    """The batch's own metadata: a JSON-serialisable dict without NUL characters."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidRequestError(f"metadata must be a dict, got {type(metadata).__name__}")
    try:
        encoded = orjson.dumps(metadata)
    except TypeError as exc:
        raise InvalidRequestError(f"metadata is not JSON-serialisable: {exc}") from exc
    if has_encoded_nul(encoded):
        raise InvalidRequestError("metadata contains a NUL character, which Postgres cannot store")
    return dict(metadata)


def check_batch_params(*, endpoint: str, model: str, limits: BatchLimits) -> None:
    if endpoint not in limits.endpoints:
        raise InvalidRequestError(
            f"endpoint {endpoint!r} is not accepted by the batch API; "
            f"use one of {', '.join(sorted(limits.endpoints))}"
        )
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequestError("model must be a non-empty string")


async def validate_requests(
    requests: Requests,
    *,
    endpoint: str,
    model: str,
    limits: BatchLimits,
) -> AsyncIterator[NewRequest]:
    """Yield each request validated and encoded; raise InvalidRequestError at the first bad one.

    The caller writes what this yields inside one transaction, so an error leaves nothing behind.
    """
    check_batch_params(endpoint=endpoint, model=model, limits=limits)
    seen: set[str] = set()
    total_bytes = 0
    position = -1
    async for item in _aiter(requests):
        position += 1
        request = _check_request(item, position, endpoint=endpoint, model=model, limits=limits)
        if request.custom_id in seen:
            raise InvalidRequestError(
                "duplicate custom_id; each request in a batch needs its own",
                position=position,
                custom_id=request.custom_id,
            )
        seen.add(request.custom_id)
        if position >= limits.max_requests:
            raise InvalidRequestError(
                f"a batch holds at most {limits.max_requests:,} requests; split the work into "
                "several batches",
                position=position,
                custom_id=request.custom_id,
            )
        total_bytes += request.line_bytes
        if total_bytes > limits.max_bytes:
            raise InvalidRequestError(
                f"the batch's JSONL would exceed {limits.max_bytes:,} bytes at this request; "
                "split the work into several batches",
                position=position,
                custom_id=request.custom_id,
            )
        yield request
    if position < 0:
        raise InvalidRequestError("a batch needs at least one request")


def _check_request(
    item: Any, position: int, *, endpoint: str, model: str, limits: BatchLimits
) -> NewRequest:
    if not isinstance(item, Mapping):
        raise InvalidRequestError(
            f"expected a dict with 'custom_id' and 'body', got {type(item).__name__}",
            position=position,
        )
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id.strip():
        raise InvalidRequestError("custom_id is missing or empty", position=position)

    def fail(message: str) -> InvalidRequestError:
        return InvalidRequestError(message, position=position, custom_id=custom_id)

    unknown = set(item) - _REQUEST_KEYS
    if unknown:
        raise fail(
            f"unknown key(s) {', '.join(sorted(map(str, unknown)))}; a request has "
            "custom_id, body and optionally metadata"
        )
    if len(custom_id) > limits.max_custom_id_length:
        raise fail(f"custom_id is longer than {limits.max_custom_id_length} characters")
    if item.get("method", "POST") != "POST":
        raise fail("method must be POST")
    if item.get("url", endpoint) != endpoint:
        raise fail(f"url {item.get('url')!r} differs from the batch endpoint {endpoint!r}")
    body = item.get("body")
    if not isinstance(body, Mapping):
        raise fail("body must be a dict holding the endpoint's request parameters")
    body = dict(body)
    body_model = body.setdefault("model", model)
    if body_model != model:
        raise fail(
            f"body.model {body_model!r} differs from the batch model {model!r}; "
            "a batch uses one model"
        )
    if body.get("stream"):
        raise fail("stream is not supported by the batch API; remove it from the body")
    required = _REQUIRED_BODY_FIELD.get(endpoint)
    if required is not None and required not in body:
        raise fail(f"body.{required} is required for {endpoint}")
    metadata = item.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, Mapping):
        raise fail("metadata must be a dict")
    try:
        body_json = orjson.dumps(body)
        metadata_json = orjson.dumps(metadata)
        line_bytes = len(encode_request_line(custom_id, endpoint, body_json))
    except TypeError as exc:
        raise fail(f"not JSON-serialisable: {exc}") from exc
    if "\x00" in custom_id or has_encoded_nul(metadata_json):
        raise fail("custom_id or metadata contains a NUL character, which Postgres cannot store")
    return NewRequest(
        custom_id=custom_id,
        line_no=position + 1,
        body_json=body_json,
        metadata=dict(metadata),
        line_bytes=line_bytes,
    )
