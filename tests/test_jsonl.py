from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import orjson
import pytest

from batchinfer.errors import JsonlError
from batchinfer.jsonl import (
    DEFAULT_MAX_LINE_BYTES,
    RawLine,
    decode_object,
    encode_request_line,
    iter_lines,
)


async def _chunks(parts: Iterable[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def _lines(parts: Iterable[bytes], **kwargs: int) -> list[RawLine]:
    return [line async for line in iter_lines(_chunks(parts), **kwargs)]


def _pairs(lines: list[RawLine]) -> list[tuple[int, bytes, bool]]:
    return [(line.line_no, line.data, line.too_long) for line in lines]


CONTENT = b'{"a":1}\n{"b":22}\n\n{"c":333}\n'
EXPECTED = [(1, b'{"a":1}', False), (2, b'{"b":22}', False), (4, b'{"c":333}', False)]


async def test_single_chunk() -> None:
    assert _pairs(await _lines([CONTENT])) == EXPECTED


@pytest.mark.parametrize("cut", range(len(CONTENT) + 1))
async def test_split_at_every_position(cut: int) -> None:
    assert _pairs(await _lines([CONTENT[:cut], CONTENT[cut:]])) == EXPECTED


@pytest.mark.parametrize("cut", range(1, len(CONTENT)))
async def test_split_at_two_positions(cut: int) -> None:
    second = min(cut + 3, len(CONTENT))
    parts = [CONTENT[:cut], CONTENT[cut:second], CONTENT[second:]]
    assert _pairs(await _lines(parts)) == EXPECTED


async def test_one_byte_chunks() -> None:
    parts = [CONTENT[i : i + 1] for i in range(len(CONTENT))]
    assert _pairs(await _lines(parts)) == EXPECTED


async def test_empty_chunks_are_harmless() -> None:
    parts = [b"", CONTENT[:5], b"", b"", CONTENT[5:], b""]
    assert _pairs(await _lines(parts)) == EXPECTED


async def test_empty_stream_yields_nothing() -> None:
    assert await _lines([]) == []
    assert await _lines([b""]) == []
    assert await _lines([b"\n\n\n"]) == []


async def test_blank_and_whitespace_lines_counted_not_yielded() -> None:
    lines = await _lines([b"\n  \n\t\n{}\n \r\n[1]\n"])
    assert _pairs(lines) == [(4, b"{}", False), (6, b"[1]", False)]


async def test_final_line_without_newline() -> None:
    lines = await _lines([b'{"a":1}\n{"b"', b":2}"])
    assert _pairs(lines) == [(1, b'{"a":1}', False), (2, b'{"b":2}', False)]


async def test_final_line_without_newline_after_blank_lines() -> None:
    assert _pairs(await _lines([b"\n\nlast"])) == [(3, b"last", False)]


async def test_crlf_lines_keep_the_cr_and_still_decode() -> None:
    # Lines are split on LF only; a CRLF file keeps the CR, which JSON treats as whitespace.
    lines = await _lines([b'{"a":1}\r', b'\n{"b":2}\r\n'])
    assert _pairs(lines) == [(1, b'{"a":1}\r', False), (2, b'{"b":2}\r', False)]
    assert [decode_object(line) for line in lines] == [{"a": 1}, {"b": 2}]


async def test_too_long_line_in_one_chunk() -> None:
    content = b"short\n" + b"x" * 11 + b"\nafter\n"
    lines = await _lines([content], max_line_bytes=10)
    assert _pairs(lines) == [(1, b"short", False), (2, b"", True), (3, b"after", False)]


async def test_line_of_exactly_the_limit_is_kept() -> None:
    lines = await _lines([b"x" * 10 + b"\n", b"y" * 10], max_line_bytes=10)
    assert _pairs(lines) == [(1, b"x" * 10, False), (2, b"y" * 10, False)]


@pytest.mark.parametrize("size", [1, 2, 3, 7])
async def test_too_long_line_across_chunks(size: int) -> None:
    content = b"a\n" + b"z" * 40 + b"\n\nb\nc"
    parts = [content[i : i + size] for i in range(0, len(content), size)]
    lines = await _lines(parts, max_line_bytes=10)
    assert _pairs(lines) == [
        (1, b"a", False),
        (2, b"", True),
        (4, b"b", False),
        (5, b"c", False),
    ]


async def test_too_long_lines_back_to_back() -> None:
    content = b"z" * 30 + b"\n" + b"y" * 30 + b"\nok\n"
    parts = [content[:15], content[15:45], content[45:]]
    lines = await _lines(parts, max_line_bytes=10)
    assert _pairs(lines) == [(1, b"", True), (2, b"", True), (3, b"ok", False)]


async def test_too_long_final_line_without_newline() -> None:
    lines = await _lines([b"ok\n", b"z" * 8, b"z" * 8], max_line_bytes=10)
    assert _pairs(lines) == [(1, b"ok", False), (2, b"", True)]


async def test_default_limit_is_64_mib() -> None:
    assert DEFAULT_MAX_LINE_BYTES == 64 * 1024 * 1024
    big = b'{"k":"' + b"v" * (3 * 1024 * 1024) + b'"}'
    lines = await _lines([big[:1000], big[1000:], b"\n{}\n"])
    assert [line.line_no for line in lines] == [1, 2]
    assert decode_object(lines[0]) == {"k": "v" * (3 * 1024 * 1024)}


def test_decode_object_ok() -> None:
    assert decode_object(RawLine(3, b'{"custom_id":"q1","n":[1,2]}')) == {
        "custom_id": "q1",
        "n": [1, 2],
    }


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"a":1', "not valid JSON"),
        (b"[1,2]", "expected a JSON object, got list"),
        (b'"text"', "expected a JSON object, got str"),
        (b"42", "expected a JSON object, got int"),
        (b"null", "expected a JSON object, got NoneType"),
    ],
)
def test_decode_object_errors_name_the_line(data: bytes, fragment: str) -> None:
    with pytest.raises(JsonlError) as info:
        decode_object(RawLine(17, data))
    assert info.value.line_no == 17
    assert str(info.value).startswith("line 17: ")
    assert fragment in str(info.value)


def test_decode_object_too_long_line() -> None:
    with pytest.raises(JsonlError, match=r"^line 9: line longer than the limit") as info:
        decode_object(RawLine(9, b"", too_long=True))
    assert info.value.line_no == 9


def test_jsonl_error_is_a_value_error() -> None:
    assert issubclass(JsonlError, ValueError)


@pytest.mark.parametrize(
    "body",
    [
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        {"model": "m", "input": 'unicode: é ✓ \u2028 \n "quoted" \\ back'},
        {},
    ],
)
def test_encode_request_line_round_trips(body: dict[str, object]) -> None:
    line = encode_request_line('id "1" é', "/v1/chat/completions", orjson.dumps(body))
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert orjson.loads(line) == {
        "custom_id": 'id "1" é',
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": body,
    }


async def test_encoded_lines_split_back_with_iter_lines() -> None:
    encoded = [
        encode_request_line(f"q{i}", "/v1/embeddings", orjson.dumps({"input": "x" * i}))
        for i in range(5)
    ]
    content = b"".join(encoded)
    lines = await _lines([content[i : i + 7] for i in range(0, len(content), 7)])
    assert [decode_object(line)["custom_id"] for line in lines] == [f"q{i}" for i in range(5)]
    assert [line.line_no for line in lines] == [1, 2, 3, 4, 5]
