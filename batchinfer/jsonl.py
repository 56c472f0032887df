"""JSONL both ways, on byte chunks: nothing here knows about HTTP or SQL.

Lines are split from raw chunks here rather than with aiohttp's ``readline()``, which raises on
lines longer than its buffer; a 10 MB response body is an ordinary line for us.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson

from batchinfer.errors import JsonlError

#: Lines longer than this are reported as too long instead of being buffered whole.
DEFAULT_MAX_LINE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class RawLine:
    """One line of a file: ``data`` is empty and ``too_long`` set when the line was skipped."""

    line_no: int
    data: bytes
    too_long: bool = False


async def iter_lines(
    chunks: AsyncIterable[bytes], *, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES
) -> AsyncIterator[RawLine]:
    """Yield the non-blank lines of a byte stream, numbered from 1 (blank lines count)."""
    buffer = bytearray()
    line_no = 0
    skipping = False
    async for chunk in chunks:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end == -1:
                if not skipping:
                    buffer += chunk[start:]
                    if len(buffer) > max_line_bytes:
                        skipping = True
                        buffer.clear()
                break
            line_no += 1
            if skipping:
                skipping = False
                yield RawLine(line_no, b"", too_long=True)
            else:
                if buffer:
                    buffer += chunk[start:end]
                    line = bytes(buffer)
                    buffer.clear()
                else:
                    line = chunk[start:end]
                if len(line) > max_line_bytes:
                    yield RawLine(line_no, b"", too_long=True)
                elif line.strip():
                    yield RawLine(line_no, line)
            start = end + 1
    if skipping:
        yield RawLine(line_no + 1, b"", too_long=True)
    elif buffer.strip():
        # A last line without a trailing newline is still a line.
        yield RawLine(line_no + 1, bytes(buffer))


def decode_object(line: RawLine) -> dict[str, Any]:
    """Parse one line as a JSON object, or raise JsonlError naming the line."""
    if line.too_long:
        raise JsonlError("line longer than the limit; skipped", line_no=line.line_no)
    try:
        value = orjson.loads(line.data)
    except orjson.JSONDecodeError as exc:
        raise JsonlError(f"not valid JSON ({exc})", line_no=line.line_no) from exc
    if not isinstance(value, dict):
        raise JsonlError(
            f"expected a JSON object, got {type(value).__name__}", line_no=line.line_no
        )
    return value


def encode_request_line(custom_id: str, url: str, body_json: bytes) -> bytes:
    """One input line; ``body_json`` is the already-encoded request body."""
    return b"".join(
        (
            b'{"custom_id":',
            orjson.dumps(custom_id),
            b',"method":"POST","url":',
            orjson.dumps(url),
            b',"body":',
            body_json,
            b"}\n",
        )
    )
