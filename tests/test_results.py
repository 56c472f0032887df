from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from batchinfer import (
    ApplyReport,
    Batch,
    BatchInfer,
    BatchStatus,
    Completion,
    CompletionStatus,
    InvalidBatchError,
    OpenAIProvider,
    ProviderUnavailableError,
    ResultsNotReadyError,
)
from batchinfer.testing import Emulator
from tests.helpers import chat_requests

CHAT = "/v1/chat/completions"
MODEL = "gpt-4o-mini"
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
CANCELLED_MESSAGE = "This request was not executed because the batch was cancelled."

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}


# -- helpers ----------------------------------------------------------------------------------


@asynccontextmanager
async def make_bi(
    engine: AsyncEngine, schema: str, emulator: Emulator, **kwargs: Any
) -> AsyncIterator[BatchInfer]:
    provider = OpenAIProvider(api_key=emulator.api_key, base_url=emulator.base_url)
    async with BatchInfer(engine, providers=[provider], schema=schema, **kwargs) as client:
        await client.migrate()
        yield client


async def submit(
    bi: BatchInfer,
    requests: list[dict[str, Any]],
    *,
    model: str = MODEL,
    endpoint: str = CHAT,
) -> Batch:
    batch = await bi.create_batch(
        provider="openai", endpoint=endpoint, model=model, requests=requests
    )
    batch = await bi.submit_batch(batch)
    assert batch.provider_batch_id is not None
    return batch


async def finished(
    bi: BatchInfer,
    emulator: Emulator,
    requests: list[dict[str, Any]],
    *,
    model: str = MODEL,
    endpoint: str = CHAT,
) -> Batch:
    """A batch the emulator has completed and whose final status is recorded."""
    batch = await submit(bi, requests, model=model, endpoint=endpoint)
    assert batch.provider_batch_id is not None
    await emulator.finish(batch.provider_batch_id)
    assert await bi.fetch_batch_status(batch) is BatchStatus.COMPLETED
    return await bi.get_batch(batch)


async def completions(bi: BatchInfer, batch: Batch) -> dict[str, Completion]:
    return {c.custom_id: c async for c in bi.completions(batch)}


def file_records(emulator: Emulator, file_id: str | None) -> dict[str, dict[str, Any]]:
    assert file_id is not None
    lines = emulator.file_content(file_id).splitlines()
    records = [orjson.loads(line) for line in lines if line.strip()]
    return {r["custom_id"]: r for r in records}


def jsonl(*records: Any) -> bytes:
    return b"".join(r if isinstance(r, bytes) else orjson.dumps(r) for r in records)


def lines(*parts: bytes) -> bytes:
    return b"\n".join(parts) + b"\n"


def report(bi: BatchInfer) -> ApplyReport:
    assert bi.last_apply_report is not None
    return bi.last_apply_report


def extra(record: logging.LogRecord, key: str) -> Any:
    return record.__dict__.get(f"batchinfer.{key}")


# -- the ordinary path ------------------------------------------------------------------------


async def test_output_then_error_file_applied(bi: BatchInfer, emulator: Emulator) -> None:
    emulator.fail_request("q1", status=400, message="bad one")
    emulator.fail_request("q3", status=500, message="server hiccup", type="server_error")
    batch = await finished(bi, emulator, chat_requests(5))
    assert batch.output_file_id is not None
    assert batch.error_file_id is not None

    done = await bi.fetch_batch_results(batch)

    downloads = [p for m, p in emulator.requests if m == "GET" and p.endswith("/content")]
    assert downloads == [
        f"/v1/files/{batch.output_file_id}/content",
        f"/v1/files/{batch.error_file_id}/content",
    ]
    comps = await completions(bi, done)
    assert {k for k, c in comps.items() if c.status is CompletionStatus.COMPLETED} == {
        "q0",
        "q2",
        "q4",
    }
    assert {k for k, c in comps.items() if c.status is CompletionStatus.FAILED} == {"q1", "q3"}
    assert comps["q3"].status_code == 500
    assert comps["q3"].failure_reason == "server hiccup"
    assert done.results_applied_at is not None
    assert report(bi) == ApplyReport(applied=5)


async def test_every_completion_ends_terminal(bi: BatchInfer, emulator: Emulator) -> None:
    emulator.fail_request("q2")
    emulator.drop_request("q4")
    batch = await finished(bi, emulator, chat_requests(8))
    before = await completions(bi, batch)
    assert {c.status for c in before.values()} == {CompletionStatus.SUBMITTED}

    done = await bi.fetch_batch_results(batch)

    comps = await completions(bi, done)
    assert len(comps) == 8
    for c in comps.values():
        assert c.status in (CompletionStatus.COMPLETED, CompletionStatus.FAILED)
        assert c.completed_at is not None
        assert c.started_at is not None
        assert c.started_at <= c.completed_at
    assert report(bi) == ApplyReport(applied=7, swept=1)


async def test_2xx_line_fills_every_field(bi: BatchInfer, emulator: Emulator) -> None:
    long_prompt = " ".join(f"word{i % 50}" for i in range(1200))
    requests = [
        {"custom_id": "plain", "body": {"messages": [{"role": "user", "content": "hello there"}]}},
        {
            "custom_id": "tools",
            "body": {
                "messages": [{"role": "user", "content": "weather in Paris?"}],
                "tools": [WEATHER_TOOL],
            },
        },
        {"custom_id": "long", "body": {"messages": [{"role": "user", "content": long_prompt}]}},
    ]
    batch = await finished(bi, emulator, requests, model="o3-mini")
    lines_by_id = file_records(emulator, batch.output_file_id)

    await bi.fetch_batch_results(batch)
    comps = await completions(bi, batch)

    for cid, c in comps.items():
        line = lines_by_id[cid]
        body = line["response"]["body"]
        usage = body["usage"]
        assert c.status is CompletionStatus.COMPLETED
        assert c.response_body == body
        assert c.status_code == 200
        assert c.provider_request_id == line["response"]["request_id"]
        assert (c.provider_request_id or "").startswith("req_")
        assert c.prompt_tokens == usage["prompt_tokens"]
        assert c.completion_tokens == usage["completion_tokens"]
        assert c.total_tokens == usage["total_tokens"]
        assert c.cached_tokens == usage["prompt_tokens_details"]["cached_tokens"]
        assert c.reasoning_tokens == usage["completion_tokens_details"]["reasoning_tokens"]
        assert (c.reasoning_tokens or 0) > 0  # o3-mini reasons
        assert c.failure_error is None
        assert c.failure_reason is None

    assert comps["plain"].output_text == "Echo: hello there"
    assert comps["plain"].finish_reason == "stop"
    assert comps["plain"].tool_calls is None

    tools = comps["tools"]
    assert tools.output_text is None
    assert tools.finish_reason == "tool_calls"
    assert tools.tool_calls is not None
    assert len(tools.tool_calls) == 1
    call = tools.tool_calls[0]
    assert call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert orjson.loads(call["function"]["arguments"]) == {"city": "echo", "days": 0}
    assert (
        tools.tool_calls
        == lines_by_id["tools"]["response"]["body"]["choices"][0]["message"]["tool_calls"]
    )

    long = comps["long"]
    assert long.prompt_tokens is not None
    assert long.prompt_tokens >= 1024
    assert long.cached_tokens is not None
    assert long.cached_tokens >= 1024
    assert long.cached_tokens % 128 == 0
    assert comps["plain"].cached_tokens == 0


async def test_responses_and_embeddings_endpoints(bi: BatchInfer, emulator: Emulator) -> None:
    resp = await finished(
        bi,
        emulator,
        [{"custom_id": "r1", "body": {"input": "tell me a story"}}],
        endpoint="/v1/responses",
    )
    emb = await finished(
        bi,
        emulator,
        [{"custom_id": "e1", "body": {"input": ["one two", "three"]}}],
        model="text-embedding-3-small",
        endpoint="/v1/embeddings",
    )
    await bi.fetch_batch_results(resp)
    await bi.fetch_batch_results(emb)

    r1 = (await completions(bi, resp))["r1"]
    assert r1.status is CompletionStatus.COMPLETED
    assert r1.output_text == "Echo: tell me a story"
    assert r1.finish_reason == "completed"
    assert r1.prompt_tokens == r1.response_body["usage"]["input_tokens"]  # type: ignore[index]
    assert r1.completion_tokens == r1.response_body["usage"]["output_tokens"]  # type: ignore[index]

    e1 = (await completions(bi, emb))["e1"]
    assert e1.status is CompletionStatus.COMPLETED
    assert e1.output_text is None
    assert e1.response_body is not None
    assert len(e1.response_body["data"]) == 2
    assert e1.prompt_tokens == e1.response_body["usage"]["prompt_tokens"]
    assert e1.completion_tokens is None


async def test_other_endpoint_stored_raw(bi: BatchInfer, emulator: Emulator) -> None:
    batch = await submit(
        bi,
        [{"custom_id": "m1", "body": {"input": "is this fine?"}}],
        model="omni-moderation-latest",
        endpoint="/v1/moderations",
    )
    assert batch.provider_batch_id is not None
    await emulator.finish(batch.provider_batch_id)
    # The fake model does not answer moderations; serve a result file of our own instead.
    body = {
        "id": "modr-1",
        "model": "omni-moderation-latest",
        "results": [{"flagged": False, "categories": {"violence": False}}],
    }
    emulator.files["file-custom-output"] = jsonl(
        {"custom_id": "m1", "response": {"status_code": 200, "request_id": "req_m", "body": body}}
    )
    emulator.batches[batch.provider_batch_id]["output_file_id"] = "file-custom-output"
    emulator.batches[batch.provider_batch_id]["error_file_id"] = None
    emulator.batches[batch.provider_batch_id]["request_counts"] = {
        "total": 1,
        "completed": 1,
        "failed": 0,
    }
    await bi.fetch_batch_status(batch)

    await bi.fetch_batch_results(batch)

    m1 = (await completions(bi, batch))["m1"]
    assert m1.status is CompletionStatus.COMPLETED
    assert m1.response_body == body
    assert m1.provider_request_id == "req_m"
    assert m1.output_text is None
    assert m1.tool_calls is None
    assert m1.prompt_tokens is None
    assert m1.total_cost is None


# -- failures ---------------------------------------------------------------------------------


async def test_scripted_error_line(bi: BatchInfer, emulator: Emulator) -> None:
    emulator.fail_request("q0", status=422, message="The prompt is not acceptable.", code="nope")
    batch = await finished(bi, emulator, chat_requests(2))
    err = file_records(emulator, batch.error_file_id)["q0"]

    await bi.fetch_batch_results(batch)

    q0 = (await completions(bi, batch))["q0"]
    assert q0.status is CompletionStatus.FAILED
    assert q0.failure_error is not None
    assert "422" in q0.failure_error
    assert "nope" in q0.failure_error
    assert q0.failure_reason == "The prompt is not acceptable."
    assert q0.status_code == 422
    assert q0.provider_request_id == err["response"]["request_id"]
    assert q0.response_body is None
    assert q0.output_text is None
    assert q0.total_cost is None
    assert q0.completed_at is not None


async def test_long_error_message_truncated(bi: BatchInfer, emulator: Emulator) -> None:
    message = "".join(chr(ord("a") + i % 26) for i in range(1000))
    emulator.fail_request("q1", status=400, message=message)
    batch = await finished(bi, emulator, chat_requests(2))

    await bi.fetch_batch_results(batch)

    q1 = (await completions(bi, batch))["q1"]
    assert q1.failure_reason == message[:255]
    assert q1.failure_error is not None
    assert len(q1.failure_error) <= 255
    assert "400" in q1.failure_error


async def test_dropped_request_is_swept(bi: BatchInfer, emulator: Emulator) -> None:
    emulator.drop_request("q1")
    batch = await finished(bi, emulator, chat_requests(3))

    done = await bi.fetch_batch_results(batch)

    comps = await completions(bi, done)
    q1 = comps["q1"]
    assert q1.status is CompletionStatus.FAILED
    assert q1.failure_reason is not None
    assert "not present in the output or error file" in q1.failure_reason
    assert str(batch.id) in q1.failure_reason
    assert len(q1.failure_reason) <= 255
    assert q1.failure_error is not None
    assert "missing" in q1.failure_error
    assert q1.completed_at is not None
    assert comps["q0"].status is CompletionStatus.COMPLETED
    assert report(bi).swept == 1
    assert report(bi).applied == 2


# -- idempotency and crash safety -------------------------------------------------------------


async def test_second_fetch_changes_nothing(bi: BatchInfer, emulator: Emulator) -> None:
    emulator.fail_request("q1")
    emulator.drop_request("q2")
    batch = await finished(bi, emulator, chat_requests(6))

    first = await bi.fetch_batch_results(batch)
    comps_first = [c async for c in bi.completions(first)]
    downloads = len(emulator.requests)

    second = await bi.fetch_batch_results(batch)
    comps_second = [c async for c in bi.completions(first)]

    assert second == first
    assert second.results_applied_at == first.results_applied_at
    assert comps_second == comps_first
    assert [c.completed_at for c in comps_second] == [c.completed_at for c in comps_first]
    # Already applied: no file is read again.
    assert len(emulator.requests) == downloads
    assert await bi.get_batch(batch) == first


async def test_crash_half_way_then_resume(
    engine: AsyncEngine, schema: str, emulator: Emulator
) -> None:
    total = 60
    async with make_bi(engine, schema, emulator, apply_chunk_size=1, apply_writers=2) as bi:
        emulator.fail_request("q7")
        batch = await finished(bi, emulator, chat_requests(total))
        assert batch.output_file_id is not None
        content = emulator.file_content(batch.output_file_id)
        cut = sum(len(line) + 1 for line in content.split(b"\n")[:40]) + 5
        emulator.drop_connection("GET", f"/files/{batch.output_file_id}/content", after_bytes=cut)
        # ... and every resume (3 attempts in tests) drops too: the pass gives up half-way.
        emulator.drop_connection("GET", f"/files/{batch.output_file_id}/content", times=3)

        with pytest.raises(ProviderUnavailableError, match="dropped mid-download"):
            await bi.fetch_batch_results(batch)

        half = await bi.get_batch(batch)
        assert half.results_applied_at is None
        assert half.total_cost is None
        snapshot = await completions(bi, batch)
        applied = {k: c for k, c in snapshot.items() if c.status is CompletionStatus.COMPLETED}
        assert 0 < len(applied) <= 40
        assert all(
            c.status is CompletionStatus.SUBMITTED for k, c in snapshot.items() if k not in applied
        )
        assert snapshot["q7"].status is CompletionStatus.SUBMITTED

        done = await bi.fetch_batch_results(batch)

        assert done.results_applied_at is not None
        rep = report(bi)
        # A write still in flight when the download broke may land after the snapshot.
        assert rep.already_applied >= len(applied)
        assert rep.applied + rep.already_applied == total
        assert rep.swept == 0
        after = await completions(bi, batch)
        assert sum(c.status is CompletionStatus.COMPLETED for c in after.values()) == total - 1
        assert after["q7"].status is CompletionStatus.FAILED
        for cid, c in applied.items():
            assert after[cid] == c, cid  # untouched, completed_at included


async def test_drop_before_any_byte_applies_nothing(bi: BatchInfer, emulator: Emulator) -> None:
    batch = await finished(bi, emulator, chat_requests(4))
    assert batch.output_file_id is not None
    # The first request and every resume (3 attempts in tests).
    emulator.drop_connection("GET", f"/files/{batch.output_file_id}/content", times=4)

    with pytest.raises(ProviderUnavailableError):
        await bi.fetch_batch_results(batch)
    comps = await completions(bi, batch)
    assert {c.status for c in comps.values()} == {CompletionStatus.SUBMITTED}
    assert (await bi.get_batch(batch)).results_applied_at is None

    done = await bi.fetch_batch_results(batch)
    assert done.results_applied_at is not None
    comps = await completions(bi, batch)
    assert {c.status for c in comps.values()} == {CompletionStatus.COMPLETED}


async def test_error_file_failure_keeps_output_rows(bi: BatchInfer, emulator: Emulator) -> None:
    emulator.fail_request("q0")
    emulator.fail_request("q1")
    batch = await finished(bi, emulator, chat_requests(5))
    assert batch.error_file_id is not None
    emulator.fail_http("GET", f"/files/{batch.error_file_id}/content", 503)

    with pytest.raises(ProviderUnavailableError):
        await bi.fetch_batch_results(batch)
    snapshot = await completions(bi, batch)
    assert {k for k, c in snapshot.items() if c.status.is_terminal} == {"q2", "q3", "q4"}
    assert (await bi.get_batch(batch)).results_applied_at is None

    await bi.fetch_batch_results(batch)
    assert report(bi) == ApplyReport(applied=2, already_applied=3)
    after = await completions(bi, batch)
    assert after["q0"].status is CompletionStatus.FAILED
    for cid in ("q2", "q3", "q4"):
        assert after[cid] == snapshot[cid]


# -- terminal statuses other than completed ---------------------------------------------------


async def test_expired_batch_with_partial_output(bi: BatchInfer, emulator: Emulator) -> None:
    batch = await submit(bi, chat_requests(6))
    assert batch.provider_batch_id is not None
    assert await emulator.advance(batch.provider_batch_id) == "in_progress"
    await emulator.process(batch.provider_batch_id, 3)
    await emulator.expire(batch.provider_batch_id)
    assert await bi.fetch_batch_status(batch) is BatchStatus.EXPIRED

    done = await bi.fetch_batch_results(batch)

    assert done.status is BatchStatus.EXPIRED
    assert done.results_applied_at is not None
    comps = await completions(bi, done)
    ok = {k for k, c in comps.items() if c.status is CompletionStatus.COMPLETED}
    assert ok == {"q0", "q1", "q2"}
    for cid in ("q3", "q4", "q5"):
        c = comps[cid]
        assert c.status is CompletionStatus.FAILED
        assert c.failure_reason == EXPIRED_MESSAGE
        assert c.failure_error is not None
        assert "batch_expired" in c.failure_error
    # Partial results are paid for.
    assert done.total_cost is not None
    assert done.total_cost > 0
    assert report(bi) == ApplyReport(applied=6)


async def test_cancelled_batch_with_partial_output(bi: BatchInfer, emulator: Emulator) -> None:
    batch = await submit(bi, chat_requests(5))
    assert batch.provider_batch_id is not None
    await emulator.advance(batch.provider_batch_id)
    await emulator.process(batch.provider_batch_id, 2)
    assert await bi.cancel_batch(batch) is BatchStatus.CANCELLING
    assert await emulator.advance(batch.provider_batch_id) == "cancelled"
    assert await bi.fetch_batch_status(batch) is BatchStatus.CANCELLED

    done = await bi.fetch_batch_results(batch)

    assert done.status is BatchStatus.CANCELLED
    comps = await completions(bi, done)
    assert {k for k, c in comps.items() if c.status is CompletionStatus.COMPLETED} == {"q0", "q1"}
    for cid in ("q2", "q3", "q4"):
        assert comps[cid].status is CompletionStatus.FAILED
        assert comps[cid].failure_reason == CANCELLED_MESSAGE
        assert "batch_cancelled" in (comps[cid].failure_error or "")
    assert comps["q0"].output_text is not None
    assert done.total_cost is not None
    assert done.total_cost > 0


async def test_all_failed_batch_without_output_file(bi: BatchInfer, emulator: Emulator) -> None:
    for i in range(3):
        emulator.fail_request(f"q{i}", status=400, message=f"no {i}")
    batch = await finished(bi, emulator, chat_requests(3))
    assert batch.output_file_id is None
    assert batch.error_file_id is not None
    assert batch.request_counts.completed == 0

    done = await bi.fetch_batch_results(batch)

    assert done.results_applied_at is not None
    comps = await completions(bi, done)
    for i in range(3):
        c = comps[f"q{i}"]
        assert c.status is CompletionStatus.FAILED
        assert c.failure_reason == f"no {i}"
        assert c.status_code == 400
    assert report(bi) == ApplyReport(applied=3)
    assert done.total_cost is None


async def test_failed_validation_batch(bi: BatchInfer, emulator: Emulator) -> None:
    emulator.fail_validation(
        [
            {
                "code": "invalid_url",
                "message": "The URL provided for this request does not match.",
                "param": "url",
                "line": 2,
            }
        ]
    )
    batch = await submit(bi, chat_requests(4))
    assert batch.provider_batch_id is not None
    assert await emulator.advance(batch.provider_batch_id) == "failed"
    assert await bi.fetch_batch_status(batch) is BatchStatus.FAILED
    failed = await bi.get_batch(batch)
    assert failed.failure_reason is not None
    assert "line 2" in failed.failure_reason
    assert failed.provider_errors[0]["code"] == "invalid_url"

    done = await bi.fetch_batch_results(batch)

    assert done.results_applied_at is not None
    comps = await completions(bi, done)
    assert {c.status for c in comps.values()} == {CompletionStatus.FAILED}
    assert comps["q1"].failure_reason == (
        "The URL provided for this request does not match. [invalid_url]"
    )
    for cid in ("q0", "q2", "q3"):
        reason = comps[cid].failure_reason
        assert reason is not None
        assert str(batch.id) in reason
        assert "failed at the provider" in reason
        assert "invalid_url" in reason
    assert all(c.failure_error == "openai batch failed" for c in comps.values())
    # No result file exists for a failed batch; none was asked for.
    assert not [p for m, p in emulator.requests if p.endswith("/content")]
    assert report(bi) == ApplyReport(swept=4)


async def test_non_terminal_batch_is_refused(bi: BatchInfer, emulator: Emulator) -> None:
    pending = await bi.create_batch(
        provider="openai", endpoint=CHAT, model=MODEL, requests=chat_requests(2)
    )
    with pytest.raises(InvalidBatchError, match="pending"):
        await bi.fetch_batch_results(pending)

    batch = await submit(bi, chat_requests(2, prefix="r"))
    assert batch.provider_batch_id is not None
    await emulator.advance(batch.provider_batch_id)
    assert await bi.fetch_batch_status(batch) is BatchStatus.IN_PROGRESS
    with pytest.raises(InvalidBatchError, match="in_progress"):
        await bi.fetch_batch_results(batch)

    assert (await bi.get_batch(batch)).results_applied_at is None
    comps = await completions(bi, batch)
    assert {c.status for c in comps.values()} == {CompletionStatus.SUBMITTED}


async def test_completed_without_output_file_is_not_ready(
    bi: BatchInfer, emulator: Emulator
) -> None:
    batch = await submit(bi, chat_requests(3))
    pbid = batch.provider_batch_id
    assert pbid is not None
    await emulator.finish(pbid)
    real_output = emulator.batches[pbid]["output_file_id"]
    assert real_output is not None
    emulator.batches[pbid]["output_file_id"] = None
    assert await bi.fetch_batch_status(batch) is BatchStatus.COMPLETED
    lagging = await bi.get_batch(batch)
    assert lagging.request_counts.completed == 3
    assert lagging.output_file_id is None

    with pytest.raises(ResultsNotReadyError, match="no output file"):
        await bi.fetch_batch_results(batch)

    assert (await bi.get_batch(batch)).results_applied_at is None
    comps = await completions(bi, batch)
    assert {c.status for c in comps.values()} == {CompletionStatus.SUBMITTED}

    # The file id arrives on a later poll; then the results go in.
    emulator.batches[pbid]["output_file_id"] = real_output
    await bi.fetch_batch_status(batch)
    done = await bi.fetch_batch_results(batch)
    assert done.output_file_id == real_output
    comps = await completions(bi, done)
    assert {c.status for c in comps.values()} == {CompletionStatus.COMPLETED}


# -- hostile result files ---------------------------------------------------------------------


async def test_hostile_lines_never_abort(
    bi: BatchInfer, emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    batch = await finished(bi, emulator, chat_requests(6))
    assert batch.output_file_id is not None
    good = file_records(emulator, batch.output_file_id)
    q1_response = good["q1"]["response"]
    string_body = {**q1_response, "body": orjson.dumps(q1_response["body"]).decode()}
    second_q0 = orjson.loads(orjson.dumps(good["q0"]))
    second_q0["response"]["body"]["choices"][0]["message"]["content"] = "SECOND COPY"
    odd = {
        "custom_id": "q4",
        "response": {"status_code": 200, "body": {"choices": [{"message": "not an object"}]}},
    }
    emulator.files[batch.output_file_id] = lines(
        jsonl(good["q0"]),  # 1
        b"",  # 2: blank, counted
        b'{"custom_id": "q5", "response": ',  # 3: malformed JSON
        b"[1, 2, 3]",  # 4: JSON, not an object
        jsonl({"response": good["q2"]["response"]}),  # 5: no custom_id
        jsonl({**good["q3"], "custom_id": "nobody"}),  # 6: unknown custom_id
        jsonl(second_q0),  # 7: duplicate of q0
        jsonl({"custom_id": "q1", "response": string_body}),  # 8: body as a JSON string
        jsonl({"custom_id": "q2", "response": {**good["q2"]["response"], "status_code": 0}}),
        jsonl(odd),  # 10: a 2xx body the parser cannot read
    )
    caplog.set_level(logging.WARNING, logger="batchinfer")

    done = await bi.fetch_batch_results(batch)

    assert done.results_applied_at is not None
    assert report(bi) == ApplyReport(applied=4, unknown=1, duplicates=1, malformed=3, swept=2)
    comps = await completions(bi, done)
    assert comps["q0"].status is CompletionStatus.COMPLETED
    assert (
        comps["q0"].output_text
        == good["q0"]["response"]["body"]["choices"][0]["message"]["content"]
    )
    assert comps["q0"].output_text != "SECOND COPY"
    assert comps["q1"].status is CompletionStatus.COMPLETED
    assert comps["q1"].response_body == q1_response["body"]
    assert comps["q1"].output_text == q1_response["body"]["choices"][0]["message"]["content"]
    assert comps["q1"].prompt_tokens == q1_response["body"]["usage"]["prompt_tokens"]
    assert comps["q2"].status is CompletionStatus.FAILED
    assert comps["q2"].status_code == 0
    assert "status: 0" in (comps["q2"].failure_error or "")
    # A 2xx was paid for: a body the parser cannot read is kept whole, with no fields read.
    assert comps["q4"].status is CompletionStatus.COMPLETED
    assert comps["q4"].response_body == odd["response"]["body"]
    assert comps["q4"].output_text is None
    assert any(r.getMessage().startswith("batchinfer.response_unreadable") for r in caplog.records)
    for cid in ("q3", "q5"):
        assert comps[cid].status is CompletionStatus.FAILED
        assert "not present in the output or error file" in (comps[cid].failure_reason or "")

    def line_nos(message: str) -> list[int]:
        return sorted(
            extra(r, "line_no")
            for r in caplog.records
            if r.getMessage().startswith(message) and extra(r, "batch_id") == str(batch.id)
        )

    assert line_nos("batchinfer.result_malformed") == [3, 4, 5]
    assert line_nos("batchinfer.result_unknown_custom_id") == [6]
    assert line_nos("batchinfer.result_duplicate") == [7]
    malformed = [
        r for r in caplog.records if r.getMessage().startswith("batchinfer.result_malformed")
    ]
    assert all(extra(r, "file_id") == batch.output_file_id for r in malformed)
    assert "line 3" in str(extra(malformed[0], "error"))
    dup = next(
        r for r in caplog.records if r.getMessage().startswith("batchinfer.result_duplicate")
    )
    assert extra(dup, "custom_id") == "q0"


async def test_duplicate_across_output_and_error_file(bi: BatchInfer, emulator: Emulator) -> None:
    emulator.fail_request("q1", message="error copy")
    batch = await finished(bi, emulator, chat_requests(3))
    good = file_records(emulator, batch.output_file_id)
    assert batch.error_file_id is not None
    # The error file repeats q0 (already in the output file) after its own q1 line.
    emulator.files[batch.error_file_id] += jsonl(
        {"custom_id": "q0", "response": None, "error": {"code": "x", "message": "late copy"}}
    )

    await bi.fetch_batch_results(batch)

    comps = await completions(bi, batch)
    assert comps["q0"].status is CompletionStatus.COMPLETED
    assert comps["q0"].response_body == good["q0"]["response"]["body"]
    assert comps["q1"].failure_reason == "error copy"
    assert report(bi) == ApplyReport(applied=3, duplicates=1)


async def test_ten_megabyte_line_applied(bi: BatchInfer, emulator: Emulator) -> None:
    batch = await finished(bi, emulator, chat_requests(2))
    assert batch.output_file_id is not None
    good = file_records(emulator, batch.output_file_id)
    big = orjson.loads(orjson.dumps(good["q0"]))
    text = "long answer " * (10 * 1024 * 1024 // 12 + 1)
    big["response"]["body"]["choices"][0]["message"]["content"] = text
    content = lines(jsonl(big), jsonl(good["q1"]))
    assert len(content) > 10 * 1024 * 1024
    emulator.files[batch.output_file_id] = content

    await bi.fetch_batch_results(batch)

    comps = await completions(bi, batch)
    assert comps["q0"].status is CompletionStatus.COMPLETED
    assert comps["q0"].output_text == text
    assert comps["q1"].status is CompletionStatus.COMPLETED
    assert report(bi) == ApplyReport(applied=2)


async def test_result_line_without_response_or_error(bi: BatchInfer, emulator: Emulator) -> None:
    batch = await finished(bi, emulator, chat_requests(1))
    assert batch.output_file_id is not None
    emulator.files[batch.output_file_id] = lines(jsonl({"custom_id": "q0"}))

    await bi.fetch_batch_results(batch)

    q0 = (await completions(bi, batch))["q0"]
    assert q0.status is CompletionStatus.FAILED
    assert q0.failure_reason == "unknown OpenAI batch failure"
    assert q0.failure_error is not None
    assert "status: none" in q0.failure_error


# -- volume -----------------------------------------------------------------------------------


def _expected_text(i: int, words: int = 5) -> str:
    return "Echo: " + " ".join([f"question {i}"] * words)


async def test_many_rows_span_chunks(
    bi: BatchInfer, emulator: Emulator, engine: AsyncEngine
) -> None:
    n = 2_500
    emulator.fail_request("q1234", message="one bad apple")
    emulator.drop_request("q2499")
    batch = await finished(bi, emulator, chat_requests(n))

    done = await bi.fetch_batch_results(batch)

    assert report(bi) == ApplyReport(applied=n - 1, swept=1)
    comps = [c async for c in bi.completions(done)]
    assert len(comps) == n
    assert [c.custom_id for c in comps] == [f"q{i}" for i in range(n)]
    for i, c in enumerate(comps):
        if i == 1234:
            assert c.failure_reason == "one bad apple"
        elif i == 2499:
            assert c.status is CompletionStatus.FAILED
        else:
            assert c.status is CompletionStatus.COMPLETED, c.custom_id
            assert c.output_text == _expected_text(i)
            assert c.metadata == {"row": i}
    summary = await bi.summary(done)
    assert summary["by_status"] == {"completed": n - 2, "failed": 2}


async def test_small_chunks(engine: AsyncEngine, schema: str, emulator: Emulator) -> None:
    n = 350
    async with make_bi(engine, schema, emulator, apply_chunk_size=100, apply_writers=3) as bi:
        for i in range(0, n, 50):
            emulator.fail_request(f"q{i}", message=f"bad {i}")
        batch = await finished(bi, emulator, chat_requests(n))

        done = await bi.fetch_batch_results(batch)

        assert report(bi) == ApplyReport(applied=n)
        comps = await completions(bi, done)
        for i in range(n):
            c = comps[f"q{i}"]
            if i % 50 == 0:
                assert c.status is CompletionStatus.FAILED
                assert c.failure_reason == f"bad {i}"
            else:
                assert c.status is CompletionStatus.COMPLETED
                assert c.output_text == _expected_text(i)
        async with engine.connect() as conn:
            open_rows = (
                await conn.execute(
                    sa.text(
                        f'SELECT count(*) FROM "{schema}".completions '
                        "WHERE batch_id = :b AND status NOT IN ('completed', 'failed')"
                    ),
                    {"b": batch.id},
                )
            ).scalar_one()
        assert open_rows == 0
