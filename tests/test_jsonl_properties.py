"""Property tests: however a file is cut into chunks, the same lines come out, numbered alike."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from hypothesis import given, settings
from hypothesis import strategies as st

from batchinfer.jsonl import RawLine, iter_lines

# Lines of printable bytes or spaces, possibly blank; no newline inside a line.
line = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"x"))


def expected(lines: list[bytes], *, limit: int) -> list[RawLine]:
    # A final newline or its absence changes nothing: the last line counts either way.
    out = []
    for number, data in enumerate(lines, start=1):
        if len(data) > limit:
            out.append(RawLine(number, b"", too_long=True))
        elif data.strip():
            out.append(RawLine(number, data))
    return out


async def collect(chunks: list[bytes], limit: int) -> list[RawLine]:
    async def source() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    return [x async for x in iter_lines(source(), max_line_bytes=limit)]


def cut(data: bytes, points: list[int]) -> list[bytes]:
    bounds = sorted({min(p, len(data)) for p in points})
    pieces, start = [], 0
    for b in bounds:
        pieces.append(data[start:b])
        start = b
    pieces.append(data[start:])
    return pieces


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(line, max_size=12),
    points=st.lists(st.integers(min_value=0, max_value=600), max_size=8),
    trailing_newline=st.booleans(),
    limit=st.integers(min_value=1, max_value=50),
)
def test_any_chunking_gives_the_same_lines(
    lines: list[bytes], points: list[int], trailing_newline: bool, limit: int
) -> None:
    data = b"\n".join(lines) + (b"\n" if trailing_newline and lines else b"")
    got = asyncio.run(collect(cut(data, points), limit))
    assert got == expected(lines, limit=limit)
    # And the result does not depend on the cut at all.
    assert got == asyncio.run(collect([data], limit))
