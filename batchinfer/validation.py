"""Checks every request of a new batch before anything is written or sent.

The provider would find most of these problems too, but only after an upload and up to 24 hours of
waiting, and it would fail the whole batch for one bad line. Here the error names the request.
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping
from typing import Any, Protocol

import orjson

from batchinfer.domain import BatchLimits, NewRequest
from batchinfer.errors import InvalidRequestError

_REQUEST_KEYS = frozenset({"custom_id", "body", "metadata"})


class RequestRules(Protocol):
    """What one provider asks of the requests of a batch, beyond the checks every provider
    shares (made here): the provider that sends them implements it."""

    @property
    def limits(self) -> BatchLimits: ...

    @property
    def request_keys(self) -> frozenset[str]:
        """Keys a request may carry besides custom_id, body and metadata."""
        ...

    def check_request(
        self, item: Mapping[str, Any], body: dict[str, Any], *, endpoint: str, model: str
    ) -> str | None:
        """What is wrong with one request, or None; may complete ``body`` (its model)."""
        ...

    def line_bytes(self, custom_id: str, endpoint: str, body_json: bytes) -> int:
        """How many bytes the request takes of the batch's size limit."""
        ...


#: The largest metadata, of one request or of a batch, accepted (bytes of its JSON encoding).
#: Metadata is read back with every completion, so megabytes there slow every read; Postgres
#: refuses a jsonb string over 256 MB outright, with an error naming neither request nor field.
#: Assign a new value to change it (it is read at each check).
MAX_METADATA_BYTES = 1_000_000

# Control characters in a custom_id break the line-oriented tools ids are pasted into (logs,
# grep, CSV); NUL has its own message because Postgres cannot store it at all.
_CONTROL = re.compile(r"[\x01-\x1f\x7f]")

# Postgres text and jsonb cannot hold U+0000; orjson writes it as \u0000, a backslash as \\.
# (The body is stored as json, which keeps the escape as text and so may contain it.)
_ENCODED_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


def has_encoded_nul(data: bytes) -> bool:
    # The substring test is cheap; the regex only runs to rule out an escaped backslash.
    return b"\\u0000" in data and _ENCODED_NUL.search(data) is not None


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
    """The batch's own metadata: a JSON-serialisable dict without NUL characters, NaN or
    Infinity, of at most MAX_METADATA_BYTES."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidRequestError(f"metadata must be a dict, got {type(metadata).__name__}")
    checked: dict[str, Any] = dict(metadata)
    encoded = _encode(checked, "metadata", InvalidRequestError)
    if has_encoded_nul(encoded):
        raise InvalidRequestError("metadata contains a NUL character, which Postgres cannot store")
    too_big = _metadata_too_big(checked, len(encoded))
    if too_big is not None:
        raise InvalidRequestError(too_big)
    return checked


def _encode(value: Any, field: str, fail: Callable[[str], InvalidRequestError]) -> bytes:
    """``value`` as JSON, or ``fail`` saying which part of it JSON cannot hold as given."""
    try:
        encoded = orjson.dumps(value)
    except TypeError as exc:
        raise fail(
            _find_unencodable(value, field) or f"{field} is not JSON-serialisable: {exc}"
        ) from exc
    # orjson writes NaN and Infinity as null without a word; only an encoding that contains
    # a null can hide one, so the walk is skipped for nearly every value.
    if b"null" in encoded:
        problem = _find_unencodable(value, field)
        if problem is not None:
            raise fail(problem)
    return encoded


def _find_unencodable(value: Any, field: str) -> str | None:
    """The first value, in document order, that JSON cannot hold, described with its path."""
    found = _scan(value, set(), 0)
    if found is None:
        return None
    steps, problem = found
    path = field
    for step in reversed(steps):
        path = f"{path}[{step}]" if isinstance(step, int) else _child(path, step)
    return f"{path} {problem}"


#: orjson refuses deeper nesting anyway; the scan stops there rather than chase a cycle.
_MAX_DEPTH = 256
_Found = tuple[list[int | str], str]


def _scan(item: Any, seen: set[int], depth: int) -> _Found | None:
    # Recursive with exact type checks and the path built only on the way out: this runs for
    # every request whose JSON holds a null, so it must cost little more than the encoding.
    kind = type(item)
    if kind is str or kind is bool or item is None:
        return None
    if kind is int and -(1 << 63) <= item < (1 << 64):
        return None
    if kind is float:
        if math.isfinite(item):
            return None
        name = "NaN" if math.isnan(item) else ("Infinity" if item > 0 else "-Infinity")
        return [], (
            f"is {name}, which JSON cannot hold (it would be sent and stored as null); "
            "use null or a string"
        )
    if isinstance(item, dict | list | tuple):
        if id(item) in seen or depth >= _MAX_DEPTH:
            return None
        seen.add(id(item))
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    return [], (
                        f"has the key {key!r} ({type(key).__name__}); JSON keys must be strings"
                    )
                found = _scan(child, seen, depth + 1)
                if found is not None:
                    found[0].append(key)
                    return found
        else:
            for index, child in enumerate(item):
                found = _scan(child, seen, depth + 1)
                if found is not None:
                    found[0].append(index)
                    return found
        return None
    try:
        orjson.dumps(item)
    except TypeError as exc:
        return [], f"({type(item).__name__}) is not JSON-serialisable: {exc}"
    return None


def _child(path: str, key: str) -> str:
    return f"{path}.{key}" if key.isidentifier() else f"{path}[{key!r}]"


def _metadata_too_big(metadata: Mapping[str, Any], size: int) -> str | None:
    limit = MAX_METADATA_BYTES
    if size <= limit:
        return None
    largest = max(metadata, key=lambda k: len(orjson.dumps(metadata[k])))
    return (
        f"metadata is {size:,} bytes as JSON ({_child('metadata', largest)} alone is "
        f"{len(orjson.dumps(metadata[largest])):,}), over the limit of {limit:,} "
        "(batchinfer.validation.MAX_METADATA_BYTES); keep large data in your own tables and "
        "put its key in the metadata"
    )


def check_batch_params(*, endpoint: str, model: str, limits: BatchLimits) -> None:
    if endpoint not in limits.endpoints:
        raise InvalidRequestError(
            f"endpoint {endpoint!r} is not accepted by the batch API; "
            f"use one of {', '.join(sorted(limits.endpoints))}"
        )
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequestError("model must be a non-empty string")


def validate_requests(
    requests: Requests,
    *,
    endpoint: str,
    model: str,
    rules: RequestRules,
) -> AsyncIterator[NewRequest]:
    """Yield each request validated and encoded; raise InvalidRequestError at the first bad one.

    The batch's own parameters are checked here, at the call, before the caller starts its
    transaction (a model of None would otherwise reach the batch row first, as a StorageError);
    the requests are checked as they are iterated. The caller writes what this yields inside
    one transaction, so an error leaves nothing behind.
    """
    check_batch_params(endpoint=endpoint, model=model, limits=rules.limits)
    if isinstance(requests, Mapping | str | bytes) or not isinstance(
        requests, Iterable | AsyncIterable
    ):
        raise InvalidRequestError(
            "requests must be a list or (async) iterable of request dicts, got "
            f"{type(requests).__name__}"
        )
    return _validated(requests, endpoint=endpoint, model=model, rules=rules)


async def _validated(
    requests: Requests, *, endpoint: str, model: str, rules: RequestRules
) -> AsyncIterator[NewRequest]:
    limits = rules.limits
    keys = _REQUEST_KEYS | rules.request_keys
    seen: set[str] = set()
    total_bytes = 0
    position = -1
    async for item in _aiter(requests):
        position += 1
        request = _check_request(
            item, position, endpoint=endpoint, model=model, rules=rules, keys=keys
        )
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
        if request.line_bytes > limits.max_bytes:
            raise InvalidRequestError(
                f"body is {request.line_bytes:,} bytes as a JSONL line, more than the "
                f"{limits.max_bytes:,} bytes a batch's whole JSONL may hold; shorten it",
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
    item: Any,
    position: int,
    *,
    endpoint: str,
    model: str,
    rules: RequestRules,
    keys: frozenset[str],
) -> NewRequest:
    limits = rules.limits
    if not isinstance(item, Mapping):
        raise InvalidRequestError(
            f"expected a dict with 'custom_id' and 'body', got {type(item).__name__}",
            position=position,
        )
    custom_id = item.get("custom_id")
    if custom_id is not None and not isinstance(custom_id, str):
        shown = repr(custom_id)
        shown = shown if len(shown) <= 60 else f"{shown[:57]}..."
        raise InvalidRequestError(
            f"custom_id must be a string, got {type(custom_id).__name__} {shown}",
            position=position,
        )
    if not custom_id or not custom_id.strip():
        raise InvalidRequestError("custom_id is missing or empty", position=position)

    def fail(message: str) -> InvalidRequestError:
        return InvalidRequestError(message, position=position, custom_id=custom_id)

    unknown = set(item) - keys
    if unknown:
        raise fail(
            f"unknown key(s) {', '.join(sorted(map(str, unknown)))}; a request has "
            "custom_id, body and optionally metadata"
        )
    if len(custom_id) > limits.max_custom_id_length:
        raise fail(f"custom_id is longer than {limits.max_custom_id_length} characters")
    control = _CONTROL.search(custom_id)
    if control is not None:
        raise fail(
            f"custom_id contains the control character {control.group()!r}; use printable text"
        )
    body = item.get("body")
    if not isinstance(body, Mapping):
        raise fail("body must be a dict holding the endpoint's request parameters")
    body = dict(body)
    problem = rules.check_request(item, body, endpoint=endpoint, model=model)
    if problem is not None:
        raise fail(problem)
    metadata = item.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, Mapping):
        raise fail("metadata must be a dict")
    metadata = dict(metadata)
    body_json = _encode(body, "body", fail)
    metadata_json = _encode(metadata, "metadata", fail)
    line_bytes = rules.line_bytes(custom_id, endpoint, body_json)
    if "\x00" in custom_id or has_encoded_nul(metadata_json):
        raise fail("custom_id or metadata contains a NUL character, which Postgres cannot store")
    too_big = _metadata_too_big(metadata, len(metadata_json))
    if too_big is not None:
        raise fail(too_big)
    return NewRequest(
        custom_id=custom_id,
        line_no=position + 1,
        body_json=body_json,
        metadata=metadata,
        line_bytes=line_bytes,
    )
