"""Hostile result files, property-tested against a simple model of what applying them means.

Each example makes a fresh batch of 1..40 requests (all in one schema, so earlier batches'
rows share custom_ids with this one's unknown ids), submits it to the emulator, and then serves
result files written here instead of the emulator's: valid successes and errors in random
order, duplicates, unknown ids, malformed and non-object JSON, objects without a usable
custom_id, blank lines, CRLF endings and a truncated last line; written by the real applier in
random chunk sizes with 1..3 writers. The model: the first line of a known custom_id (output
file first, then the error file) decides its completion; what no line names is swept as failed.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncEngine

from batchinfer import (
    ApplyReport,
    Batch,
    BatchInfer,
    BatchStatus,
    Completion,
    CompletionStatus,
    OpenAIProvider,
    Price,
)
from batchinfer.testing import Emulator
from tests.helpers import chat_requests

CHAT = "/v1/chat/completions"
MODEL = "prop-test-model"
PRICES = {
    MODEL: Price(
        input_per_mtok=Decimal("2"),
        output_per_mtok=Decimal("8"),
        cached_input_per_mtok=Decimal("1"),
    )
}
DISCOUNT = Decimal("0.5")  # OpenAIProvider's batch discount
MTOK = Decimal(1_000_000)
FAILURE_TEXT = 255


# -- the lines --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One generated line: its bytes and, for a readable one, the custom_id it names."""

    kind: str  # success | http_error | error_object | malformed | blank
    data: bytes
    custom_id: str | None = None
    request_id: str | None = None
    status_code: int | None = None
    content: str | None = None
    usage: dict[str, int] | None = None
    message: str | None = None
    truncated: bool = False


def _clean(text: str) -> str:
    # jsonb and text cannot hold U+0000; the store writes U+FFFD in its place.
    return text.replace("\x00", "\ufffd")


def expected_costs(usage: dict[str, int] | None) -> tuple[Decimal, Decimal] | None:
    if usage is None:
        return None
    prompt = usage["prompt_tokens"]
    cached = min(usage["cached_tokens"], prompt)
    per_token = DISCOUNT / MTOK
    return (
        (
            (prompt - cached) * PRICES[MODEL].input_per_mtok
            + cached * (PRICES[MODEL].cached_input_per_mtok or Decimal(0))
        )
        * per_token,
        usage["completion_tokens"] * PRICES[MODEL].output_per_mtok * per_token,
    )


messages = st.text(min_size=1, max_size=300)
tokens = st.integers(min_value=0, max_value=2_000_000)


@st.composite
def success(draw: st.DrawFn, custom_id: str, k: int) -> Entry:
    content = draw(st.text(max_size=30))
    status = draw(st.sampled_from([200, 200, 200, 201, 299]))
    usage = draw(
        st.none()
        | st.fixed_dictionaries(
            {
                "prompt_tokens": tokens,
                "completion_tokens": tokens,
                "cached_tokens": tokens,  # may exceed prompt_tokens: priced as at most it
                "reasoning_tokens": tokens,
            }
        )
    )
    body: dict[str, Any] = {
        "id": f"chatcmpl-{k}",
        "object": "chat.completion",
        "created": 1_700_000_000,
        # Whatever model the body names, the price set for the batch's model is used.
        "model": draw(st.sampled_from([MODEL, "gpt-4o-mini", "no-such-model"])),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
    }
    if usage is not None:
        body["usage"] = {
            "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"],
            "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": usage["cached_tokens"]},
            "completion_tokens_details": {"reasoning_tokens": usage["reasoning_tokens"]},
        }
    record = {
        "id": f"batch_req_{k}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": f"req_{k}", "body": body},
        "error": None,
    }
    return Entry(
        "success",
        orjson.dumps(record),
        custom_id=custom_id,
        request_id=f"req_{k}",
        status_code=status,
        content=content,
        usage=usage,
    )


@st.composite
def http_error(draw: st.DrawFn, custom_id: str, k: int) -> Entry:
    status = draw(st.sampled_from([400, 401, 404, 408, 409, 422, 429, 500, 502, 503]))
    message = draw(messages)
    record = {
        "id": f"batch_req_{k}",
        "custom_id": custom_id,
        "response": {
            "status_code": status,
            "request_id": f"req_{k}",
            "body": {
                "error": {
                    "message": message,
                    "type": "invalid_request_error",
                    "param": None,
                    "code": draw(st.none() | st.sampled_from(["bad", "rate_limit_exceeded"])),
                }
            },
        },
        "error": None,
    }
    return Entry(
        "http_error",
        orjson.dumps(record),
        custom_id=custom_id,
        request_id=f"req_{k}",
        status_code=status,
        message=message,
    )


@st.composite
def error_object(draw: st.DrawFn, custom_id: str, k: int) -> Entry:
    message = draw(messages)
    record = {
        "id": f"batch_req_{k}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": draw(st.sampled_from(["batch_expired", "x"])), "message": message},
    }
    return Entry("error_object", orjson.dumps(record), custom_id=custom_id, message=message)


NOT_JSON = [
    b'{"custom_id": "q0", "response": ',
    b"not json",
    b"{]",
    b'{"custom_id": "q0"',
    b"\xff\xfe{}",
    b'{"a": 1}{"b": 2}',
    b"NaN",
    b"{'custom_id': 'q0'}",
]
NOT_OBJECTS = [b"[1, 2]", b'"q0"', b"42", b"null", b"true", b"[]", b'[{"custom_id": "q0"}]']
NO_CUSTOM_ID = [
    b'{"response": {"status_code": 200, "body": {}}}',
    b'{"custom_id": 5, "response": null, "error": {"message": "m"}}',
    b'{"custom_id": "", "response": null, "error": {"message": "m"}}',
    b'{"custom_id": null}',
    b'{"custom_id": ["q0"]}',
    b'{"custom_id": "q\\u00000", "error": {"message": "m"}}',
]
BLANK = [b"", b" ", b"  \t ", b"\r"]


def malformed() -> st.SearchStrategy[Entry]:
    return st.sampled_from(NOT_JSON + NOT_OBJECTS + NO_CUSTOM_ID).map(
        lambda data: Entry("malformed", data)
    )


def blank() -> st.SearchStrategy[Entry]:
    return st.sampled_from(BLANK).map(lambda data: Entry("blank", data))


@dataclass
class Scenario:
    n: int
    output: list[Entry]
    errors: list[Entry]
    output_bytes: bytes | None
    error_bytes: bytes | None
    chunk_size: int
    writers: int
    notes: list[str] = field(default_factory=list)


def _file(
    draw: st.DrawFn, entries: list[Entry], *, truncate_last: bool
) -> tuple[list[Entry], bytes | None]:
    """The file's bytes (None: no such file); a truncated last line becomes malformed."""
    present = draw(st.booleans()) if not entries else True
    if not present:
        return entries, None
    newline = draw(st.sampled_from([b"\n", b"\r\n"]))
    if not entries:
        return entries, b""
    body = [e.data for e in entries]
    if truncate_last and entries[-1].kind != "blank" and len(entries[-1].data) > 1:
        # A download cut short: the last line stops mid-way, with no newline after it.
        cut = draw(st.integers(min_value=1, max_value=len(entries[-1].data) - 1))
        entries = [*entries[:-1], Entry("malformed", entries[-1].data[:cut], truncated=True)]
        return entries, newline.join([*body[:-1], entries[-1].data])
    final = newline if draw(st.booleans()) else b""
    return entries, newline.join(body) + final


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    n = draw(st.integers(min_value=1, max_value=40))
    known = [f"q{i}" for i in range(n)]
    # Unknown here; q{n}.. and q0 variants exist as rows of earlier batches in the schema.
    unknown = st.sampled_from(
        [f"q{n}", f"q{n + 7}", "Q0", "q0 ", " q0", "nobody", "q" + "9" * 70, "é"]
    )
    custom_ids = st.one_of(st.sampled_from(known), st.sampled_from(known), unknown)
    counter = iter(range(1_000_000))

    @st.composite
    def entry(draw: st.DrawFn) -> Entry:
        kind = draw(
            st.sampled_from(
                ["success", "success", "success", "http_error", "error_object", "bad", "blank"]
            )
        )
        if kind == "bad":
            return draw(malformed())
        if kind == "blank":
            return draw(blank())
        make = {"success": success, "http_error": http_error, "error_object": error_object}
        return draw(make[kind](draw(custom_ids), next(counter)))

    size = draw(st.integers(min_value=0, max_value=70))
    entries = draw(st.lists(entry(), min_size=size, max_size=size))
    # Each line goes to the output or the error file (a real error file holds only errors,
    # but nothing here relies on that), in the random order drawn.
    in_output = draw(st.lists(st.booleans(), min_size=len(entries), max_size=len(entries)))
    output = [e for e, o in zip(entries, in_output, strict=True) if o]
    errors = [e for e, o in zip(entries, in_output, strict=True) if not o]
    truncate = draw(st.sampled_from(["none", "output", "error"]))
    output, output_bytes = _file(draw, output, truncate_last=truncate == "output")
    errors, error_bytes = _file(draw, errors, truncate_last=truncate == "error")
    notes = ["10+ lines" if len(entries) >= 10 else "under 10 lines"]
    if any(e.truncated for e in [*output, *errors]):
        notes.append("a truncated last line")
    if b"\r\n" in (output_bytes or b"") + (error_bytes or b""):
        notes.append("CRLF")
    return Scenario(
        notes=notes,
        n=n,
        output=output,
        errors=errors,
        output_bytes=output_bytes,
        error_bytes=error_bytes,
        chunk_size=draw(st.integers(min_value=1, max_value=7)),
        writers=draw(st.integers(min_value=1, max_value=3)),
    )


# -- the model --------------------------------------------------------------------------------


@dataclass
class Model:
    winners: dict[str, Entry]
    report: ApplyReport


def model(s: Scenario) -> Model:
    known = {f"q{i}" for i in range(s.n)}
    seen: set[str] = set()
    winners: dict[str, Entry] = {}
    unknown = duplicates = malformed_lines = 0
    for e in [
        *(s.output if s.output_bytes is not None else []),
        *(s.errors if s.error_bytes is not None else []),
    ]:
        if e.kind == "blank":
            continue
        if e.kind == "malformed":
            malformed_lines += 1
            continue
        assert e.custom_id is not None
        if e.custom_id in seen:
            duplicates += 1
            continue
        seen.add(e.custom_id)
        if e.custom_id in known:
            winners[e.custom_id] = e
        else:
            unknown += 1
    return Model(
        winners=winners,
        report=ApplyReport(
            applied=len(winners),
            unknown=unknown,
            duplicates=duplicates,
            malformed=malformed_lines,
            swept=s.n - len(winners),
        ),
    )


def check_completion(c: Completion, winner: Entry | None, batch: Batch) -> None:
    assert c.completed_at is not None
    if winner is None:
        assert c.status is CompletionStatus.FAILED
        assert "missing" in (c.failure_error or "")
        assert "not present in the output or error file" in (c.failure_reason or "")
        assert str(batch.id) in (c.failure_reason or "")
        assert (c.response_body, c.status_code, c.total_cost) == (None, None, None)
        return
    if winner.kind == "success":
        assert c.status is CompletionStatus.COMPLETED
        assert c.provider_request_id == winner.request_id
        assert c.status_code == winner.status_code
        assert c.output_text == _clean(winner.content or "")
        assert c.finish_reason == "stop"
        assert c.response_body is not None
        assert c.response_body["id"] == f"chatcmpl-{(winner.request_id or '')[4:]}"
        assert (c.failure_error, c.failure_reason) == (None, None)
        usage = winner.usage
        if usage is None:
            assert (c.prompt_tokens, c.completion_tokens, c.total_tokens) == (None, None, None)
            assert (c.input_cost, c.output_cost, c.total_cost) == (None, None, None)
        else:
            assert c.prompt_tokens == usage["prompt_tokens"]
            assert c.completion_tokens == usage["completion_tokens"]
            assert c.total_tokens == usage["prompt_tokens"] + usage["completion_tokens"]
            assert c.cached_tokens == usage["cached_tokens"]
            assert c.reasoning_tokens == usage["reasoning_tokens"]
            costs = expected_costs(usage)
            assert costs is not None
            assert (c.input_cost, c.output_cost) == costs
            assert c.total_cost == costs[0] + costs[1]
        return
    assert c.status is CompletionStatus.FAILED
    assert c.failure_reason == _clean((winner.message or "")[:FAILURE_TEXT])
    assert c.failure_error is not None
    assert len(c.failure_error) <= FAILURE_TEXT
    assert (c.response_body, c.output_text, c.total_cost) == (None, None, None)
    if winner.kind == "http_error":
        assert c.status_code == winner.status_code
        assert c.provider_request_id == winner.request_id
        assert str(winner.status_code) in c.failure_error
    else:
        assert c.status_code is None
        assert c.provider_request_id is None


# -- the test ---------------------------------------------------------------------------------


@pytest.fixture
async def migrated(engine: AsyncEngine, schema: str, emulator: Emulator) -> str:
    provider = OpenAIProvider(api_key=emulator.api_key, base_url=emulator.base_url)
    async with BatchInfer(engine, providers=[provider], schema=schema) as bi:
        await bi.migrate()
    return schema


#: Each example's batch and its completions once applied, to check later examples leave them be.
_previous: dict[str, tuple[Batch, list[Completion]]] = {}


@settings(
    max_examples=int(os.environ.get("PROP_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(s=scenarios())
async def test_hostile_result_files_end_as_the_model_says(
    engine: AsyncEngine, migrated: str, emulator: Emulator, s: Scenario
) -> None:
    provider = OpenAIProvider(api_key=emulator.api_key, base_url=emulator.base_url)
    async with BatchInfer(
        engine,
        providers=[provider],
        schema=migrated,
        prices=PRICES,
        apply_chunk_size=s.chunk_size,
        apply_writers=s.writers,
    ) as bi:
        batch = await bi.create_batch(
            provider="openai", endpoint=CHAT, model=MODEL, requests=chat_requests(s.n)
        )
        batch = await bi.submit_batch(batch)
        pbid = batch.provider_batch_id
        assert pbid is not None

        # The provider "finishes" the batch with files written here.
        file_ids: dict[str, str | None] = {"output_file_id": None, "error_file_id": None}
        for key, content in (("output_file_id", s.output_bytes), ("error_file_id", s.error_bytes)):
            if content is not None:
                file_id = f"file-prop-{uuid.uuid4().hex[:20]}"
                emulator.files[file_id] = content
                file_ids[key] = file_id
        emulator.batches[pbid].update(
            status="completed",
            completed_at=1_700_000_100,
            request_counts={"total": s.n, "completed": len(s.output), "failed": len(s.errors)},
            **file_ids,
        )
        assert await bi.fetch_batch_status(batch) is BatchStatus.COMPLETED

        done = await bi.fetch_batch_results(batch, force=True)

        expected = model(s)
        r = expected.report
        for name in ("unknown", "duplicates", "malformed", "swept"):
            event(f"{name}: {'some' if getattr(r, name) else 'none'}")
        event(f"writers={s.writers} chunk_size={'1' if s.chunk_size == 1 else '2..7'}")
        for note in s.notes:
            event(note)
        assert bi.last_apply_report == expected.report
        assert done.results_applied_at is not None
        comps = [c async for c in bi.completions(done)]
        assert [c.custom_id for c in comps] == [f"q{i}" for i in range(s.n)]
        for c in comps:
            check_completion(c, expected.winners.get(c.custom_id), done)
        costs = [c.total_cost for c in comps if c.total_cost is not None]
        assert done.total_cost == (sum(costs, Decimal(0)) if costs else None)
        priced = [
            cost
            for w in expected.winners.values()
            if w.kind == "success" and (cost := expected_costs(w.usage)) is not None
        ]
        assert done.total_cost == (sum((i + o for i, o in priced), Decimal(0)) if priced else None)
        assert done.input_cost == (
            sum((c.input_cost for c in comps if c.input_cost is not None), Decimal(0))
            if costs
            else None
        )

        # A second pass changes nothing and reads no file.
        requests_before = len(emulator.requests)
        assert await bi.fetch_batch_results(batch, force=True) == done
        assert len(emulator.requests) == requests_before
        assert [c async for c in bi.completions(done)] == comps

        # Unknown ids that name rows of an earlier batch in the schema left that batch alone.
        if migrated in _previous:
            earlier, earlier_comps = _previous[migrated]
            assert await bi.get_batch(earlier) == earlier
            assert [c async for c in bi.completions(earlier)] == earlier_comps
        _previous[migrated] = (done, comps)
