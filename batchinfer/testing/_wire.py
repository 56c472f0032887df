"""OpenAI wire conventions shared by the routes.

JSON bodies, error envelopes, list pages, and the parameter checks the real API applies before it
touches any state.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

__all__ = [
    "MAX_TTL",
    "MIN_TTL",
    "Unsatisfiable",
    "byte_range",
    "close_connection",
    "error_response",
    "int_query",
    "json_body",
    "json_response",
    "list_envelope",
    "metadata_error",
    "not_found",
    "ttl_seconds",
]

MIN_TTL, MAX_TTL = 3600, 2_592_000


def _default_error_type(status: int) -> tuple[str, str | None]:
    if status == 429:
        return "requests", "rate_limit_exceeded"
    if status >= 500:
        return "server_error", None
    return "invalid_request_error", None


def json_response(
    payload: object, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(payload),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_response(
    status: int,
    message: str,
    *,
    type: str | None = None,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    default_type, default_code = _default_error_type(status)
    body = {
        "error": {
            "message": message,
            "type": type or default_type,
            "param": param,
            "code": code if code is not None else default_code,
        }
    }
    return json_response(body, status=status, headers=headers)


def close_connection(request: web.Request) -> None:
    # close() rather than abort(): bytes already written still reach the client before the FIN.
    transport = request.transport
    if transport is not None:
        transport.close()


class Unsatisfiable(ValueError):
    """A Range no byte of the representation falls in: answered 416."""


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The ``[start, end)`` span a ``Range`` header asks of ``size`` bytes; None to send all.

    One ``bytes=`` range is honoured (``N-``, ``N-M`` or the suffix ``-K``). Anything else (no
    header, another unit, several ranges, bad syntax) is ignored, as RFC 9110 allows, and the
    whole representation goes out as a 200.
    """
    if header is None:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (first.isdigit() or last.isdigit()):
        return None
    if not first:  # the suffix form: the last K bytes
        if not last.isdigit():
            return None
        length = int(last)
        if length == 0 or size == 0:
            raise Unsatisfiable
        return max(size - length, 0), size
    if not first.isdigit() or (last and not last.isdigit()):
        return None
    start = int(first)
    end = size if not last else min(int(last) + 1, size)
    if last and int(last) < start:
        return None
    if start >= size:
        raise Unsatisfiable
    return start, end


def int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise web.HTTPBadRequest(
            body=orjson.dumps(
                {
                    "error": {
                        "message": f"{name} must be an integer between {low} and {high}.",
                        "type": "invalid_request_error",
                        "param": name,
                        "code": "invalid_value",
                    }
                }
            ),
            content_type="application/json",
        )
    return value


def list_envelope(data: list[dict[str, object]], has_more: bool) -> dict[str, object]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def not_found(kind: str, object_id: str) -> web.Response:
    return error_response(404, f"No such {kind} object: {object_id}", param="id")


def ttl_seconds(anchor: object, seconds: object, param: str) -> int | web.Response:
    if anchor != "created_at":
        return error_response(400, "anchor must be 'created_at'.", param=f"{param}.anchor")
    try:
        value = int(str(seconds))
    except ValueError:
        value = 0
    if not MIN_TTL <= value <= MAX_TTL:
        return error_response(
            400,
            f"seconds must be between {MIN_TTL} and {MAX_TTL}.",
            param=f"{param}.seconds",
            code="invalid_value",
        )
    return value


def metadata_error(metadata: object) -> web.Response | None:
    if not isinstance(metadata, dict):
        return error_response(
            400, "metadata must be an object.", param="metadata", code="invalid_type"
        )
    if len(metadata) > 16:
        return error_response(
            400, "metadata may hold at most 16 keys.", param="metadata", code="invalid_value"
        )
    for key, value in metadata.items():
        if len(key) > 64:
            return error_response(
                400,
                "metadata keys may be at most 64 characters.",
                param="metadata",
                code="invalid_value",
            )
        if not isinstance(value, str):
            return error_response(
                400,
                f"metadata.{key} must be a string.",
                param=f"metadata.{key}",
                code="invalid_type",
            )
        if len(value) > 512:
            return error_response(
                400,
                "metadata values may be at most 512 characters.",
                param=f"metadata.{key}",
                code="invalid_value",
            )
    return None


async def json_body(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return error_response(400, "The request body is not valid JSON.")
    if not isinstance(body, dict):
        return error_response(400, "The request body must be a JSON object.")
    return body
