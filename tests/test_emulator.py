from __future__ import annotations

import base64
import io
import struct
from collections.abc import AsyncIterator, Iterator
from typing import Any, Final, Literal

import aiohttp
import openai
import orjson
import pytest

from batchinfer.testing import Emulator, _http

Endpoint = Literal["/v1/chat/completions", "/v1/responses", "/v1/embeddings"]
CHAT: Final = "/v1/chat/completions"
RESPONSES: Final = "/v1/responses"
EMBEDDINGS: Final = "/v1/embeddings"


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    async with Emulator() as emulator:
        yield emulator


@pytest.fixture
async def client(emu: Emulator) -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = openai.AsyncOpenAI(
        api_key=emu.api_key,
        base_url=emu.base_url,
        _strict_response_validation=True,
        max_retries=0,
    )
    yield sdk
    await sdk.close()


@pytest.fixture
async def http(emu: Emulator) -> AsyncIterator[aiohttp.ClientSession]:
    headers = {"Authorization": f"Bearer {emu.api_key}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        yield session


def chat_body(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": f"hello {i}"}],
        **extra,
    }


def line(custom_id: str, body: dict[str, Any], url: str = CHAT) -> bytes:
    return orjson.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def chat_lines(n: int) -> list[bytes]:
    return [line(f"req-{i}", chat_body(i)) for i in range(n)]


def jsonl(content: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(raw) for raw in content.splitlines() if raw.strip()]


async def upload(client: openai.AsyncOpenAI, lines: list[bytes]) -> str:
    created = await client.files.create(file=("input.jsonl", b"\n".join(lines)), purpose="batch")
    return created.id


async def start_batch(
    emu: Emulator, client: openai.AsyncOpenAI, lines: list[bytes], endpoint: Endpoint = CHAT
) -> str:
    file_id = await upload(client, lines)
    batch = await client.batches.create(
        input_file_id=file_id, endpoint=endpoint, completion_window="24h"
    )
    return batch.id


def counts(emu: Emulator, batch_id: str) -> dict[str, int]:
    value = emu.batches[batch_id]["request_counts"]
    assert isinstance(value, dict)
    return value


def results(emu: Emulator, batch_id: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    batch = emu.batches[batch_id]
    out, err = batch["output_file_id"], batch["error_file_id"]
    assert isinstance(out, str | None)
    assert isinstance(err, str | None)
    return (
        jsonl(emu.file_content(out)) if out else [],
        jsonl(emu.file_content(err)) if err else [],
    )


async def drain(resp: aiohttp.ClientResponse, sink: bytearray) -> None:
    async for chunk in resp.content.iter_any():
        sink += chunk


class Clock:
    def __init__(self, start: float = 1_750_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------- official SDK


async def test_sdk_files_roundtrip(client: openai.AsyncOpenAI) -> None:
    created = await client.files.create(
        file=("input.jsonl", b'{"a": 1}\n'),
        purpose="batch",
        expires_after={"anchor": "created_at", "seconds": 7200},
    )
    assert created.id.startswith("file-")
    assert created.bytes == 9
    assert created.expires_at == created.created_at + 7200
    assert (await client.files.retrieve(created.id)).filename == "input.jsonl"
    assert [f.id async for f in client.files.list(purpose="batch")] == [created.id]
    assert (await client.files.content(created.id)).content == b'{"a": 1}\n'
    deleted = await client.files.delete(created.id)
    assert deleted.deleted
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve(created.id)


async def test_files_dict_is_the_source_of_truth(emu: Emulator, client: openai.AsyncOpenAI) -> None:
    file_id = await upload(client, chat_lines(1))
    emu.files[file_id] = b"rewritten\n"
    emu.files["file-handmade"] = b"{}\n"
    assert (await client.files.retrieve(file_id)).bytes == 10
    handmade = await client.files.retrieve("file-handmade")
    assert (handmade.bytes, handmade.purpose) == (3, "batch_output")
    assert (await client.files.content(file_id)).content == b"rewritten\n"
    assert [f.id async for f in client.files.list()] == ["file-handmade", file_id]


async def test_sdk_full_lifecycle(emu: Emulator, client: openai.AsyncOpenAI) -> None:
    lines = chat_lines(20)
    file_id = await upload(client, lines)
    batch = await client.batches.create(
        input_file_id=file_id,
        endpoint=CHAT,
        completion_window="24h",
        metadata={"job": "lifecycle"},
    )
    assert batch.status == "validating"
    assert batch.expires_at == batch.created_at + 24 * 3600
    assert [b.id async for b in client.batches.list()] == [batch.id]

    await emu.finish(batch.id)
    done = await client.batches.retrieve(batch.id)
    assert done.status == "completed"
    assert done.model == "gpt-4o-mini"
    assert done.metadata == {"job": "lifecycle"}
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (20, 20)
    assert done.error_file_id is None
    assert done.output_file_id is not None
    for stamp in (done.in_progress_at, done.finalizing_at, done.completed_at):
        assert stamp is not None

    output = jsonl((await client.files.content(done.output_file_id)).content)
    ids = [entry["custom_id"] for entry in output]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(20))
    assert ids != [f"req-{i}" for i in range(20)]
    for entry in output:
        assert entry["id"].startswith("batch_req_")
        assert entry["error"] is None
        assert entry["response"]["status_code"] == 200
        assert entry["response"]["request_id"].startswith("req_")
        openai.types.chat.ChatCompletion.model_validate(entry["response"]["body"])

    assert done.usage is not None
    usages = [entry["response"]["body"]["usage"] for entry in output]
    assert done.usage.input_tokens == sum(u["prompt_tokens"] for u in usages)
    assert done.usage.output_tokens == sum(u["completion_tokens"] for u in usages)
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens


async def test_sdk_live_endpoints(emu: Emulator, client: openai.AsyncOpenAI) -> None:
    chat = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "what is up"}]
    )
    assert chat.choices[0].message.content == "Echo: what is up"
    assert chat.choices[0].finish_reason == "stop"

    tool = {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    called = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "weather?"}],
        tools=[tool],  # type: ignore[list-item]
    )
    call = called.choices[0]
    assert call.finish_reason == "tool_calls"
    assert call.message.content is None
    assert call.message.tool_calls is not None
    fn = call.message.tool_calls[0]
    assert isinstance(fn, openai.types.chat.ChatCompletionMessageFunctionToolCall)
    assert fn.id.startswith("call_")
    assert (fn.function.name, orjson.loads(fn.function.arguments)) == ("lookup", {"city": "echo"})

    resp = await client.responses.create(model="gpt-4o", input="hi there")
    assert resp.output_text == "Echo: hi there"
    assert resp.usage is not None
    assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens

    resp_tool = await client.responses.create(
        model="gpt-4o",
        input=[{"role": "user", "content": "weather?"}],
        tools=[{"type": "function", "name": "lookup", "parameters": None, "strict": False}],
    )
    assert resp_tool.output[0].type == "function_call"

    floats = await client.embeddings.create(
        model="text-embedding-3-small", input=["a", "b"], encoding_format="float", dimensions=4
    )
    assert [len(d.embedding) for d in floats.data] == [4, 4]
    # The SDK asks for base64 by default, which its own strict validation cannot parse, so the
    # default path is checked with a lenient client: it must decode to the very same floats.
    async with openai.AsyncOpenAI(api_key=emu.api_key, base_url=emu.base_url) as lenient:
        default = await lenient.embeddings.create(
            model="text-embedding-3-small", input=["a", "b"], dimensions=4
        )
    assert [d.embedding for d in default.data] == [d.embedding for d in floats.data]


async def test_sdk_cancel_completed_is_409_without_retry(emu: Emulator) -> None:
    async with openai.AsyncOpenAI(
        api_key=emu.api_key, base_url=emu.base_url, _strict_response_validation=True
    ) as retrying:
        batch_id = await start_batch(emu, retrying, chat_lines(2))
        await emu.finish(batch_id)
        with pytest.raises(openai.ConflictError) as info:
            await retrying.batches.cancel(batch_id)
    assert info.value.body == {
        "message": "Cannot cancel a batch with status 'completed'.",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    assert info.value.response.headers["x-should-retry"] == "false"
    assert emu.requests.count(("POST", f"/v1/batches/{batch_id}/cancel")) == 1


async def test_sdk_batch_list_pages_newest_first(emu: Emulator, client: openai.AsyncOpenAI) -> None:
    file_id = await upload(client, chat_lines(1))
    ids = [
        (
            await client.batches.create(
                input_file_id=file_id, endpoint=CHAT, completion_window="24h"
            )
        ).id
        for _ in range(5)
    ]
    first = await client.batches.list(limit=2)
    assert [b.id for b in first.data] == ids[::-1][:2]
    assert first.has_more
    assert [b.id async for b in client.batches.list(limit=2)] == ids[::-1]


# ---------------------------------------------------------------- scripted request outcomes


async def test_fail_request_goes_to_error_file(emu: Emulator, client: openai.AsyncOpenAI) -> None:
    emu.fail_request("req-1", status=429, message="slow down", code="rate_limit_exceeded")
    batch_id = await start_batch(emu, client, chat_lines(3))
    await emu.finish(batch_id)
    output, errors = results(emu, batch_id)
    assert sorted(e["custom_id"] for e in output) == ["req-0", "req-2"]
    [entry] = errors
    assert entry["id"].startswith("batch_req_")
    assert entry["custom_id"] == "req-1"
    assert entry["error"] is None
    assert entry["response"]["status_code"] == 429
    assert entry["response"]["request_id"].startswith("req_")
    assert entry["response"]["body"] == {
        "error": {
            "message": "slow down",
            "type": "invalid_request_error",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    assert counts(emu, batch_id) == {"total": 3, "completed": 2, "failed": 1}


async def test_drop_request_is_in_neither_file(emu: Emulator, client: openai.AsyncOpenAI) -> None:
    emu.drop_request("req-0")
    batch_id = await start_batch(emu, client, chat_lines(3))
    await emu.finish(batch_id)
    output, errors = results(emu, batch_id)
    assert sorted(e["custom_id"] for e in output) == ["req-1", "req-2"]
    assert errors == []
    assert emu.batches[batch_id]["error_file_id"] is None


async def test_all_failed_completes_without_output_file(
    emu: Emulator, client: openai.AsyncOpenAI
) -> None:
    for i in range(3):
        emu.fail_request(f"req-{i}", status=500, type="server_error")
    batch_id = await start_batch(emu, client, chat_lines(3))
    await emu.finish(batch_id)
    batch = await client.batches.retrieve(batch_id)
    assert batch.status == "completed"
    assert batch.output_file_id is None
    assert batch.error_file_id is not None
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (0, 3)


async def test_process_builds_partial_results(emu: Emulator, client: openai.AsyncOpenAI) -> None:
    batch_id = await start_batch(emu, client, chat_lines(5))
    assert await emu.advance(batch_id) == "in_progress"
    await emu.process(batch_id, 2)
    assert counts(emu, batch_id) == {"total": 5, "completed": 2, "failed": 0}
    assert await emu.advance(batch_id) == "finalizing"
    assert counts(emu, batch_id)["completed"] == 5
    assert await emu.advance(batch_id) == "completed"
    assert await emu.advance(batch_id) == "completed"


async def test_expire_keeps_processed_results(emu: Emulator, client: openai.AsyncOpenAI) -> None:
    batch_id = await start_batch(emu, client, chat_lines(5))
    await emu.advance(batch_id)
    await emu.process(batch_id, 2)
    await emu.expire(batch_id)
    batch = emu.batches[batch_id]
    assert batch["status"] == "expired"
    assert batch["expired_at"] is not None
    output, errors = results(emu, batch_id)
    assert sorted(e["custom_id"] for e in output) == ["req-0", "req-1"]
    assert sorted(e["custom_id"] for e in errors) == ["req-2", "req-3", "req-4"]
    for entry in errors:
        assert entry["response"] is None
        assert entry["error"] == {
            "code": "batch_expired",
            "message": "This request could not be executed before the completion window expired.",
        }
    assert counts(emu, batch_id) == {"total": 5, "completed": 2, "failed": 3}


async def test_cancel_then_cancelled_with_partial_results(
    emu: Emulator, client: openai.AsyncOpenAI
) -> None:
    batch_id = await start_batch(emu, client, chat_lines(4))
    await emu.advance(batch_id)
    await emu.process(batch_id, 1)
    cancelling = await client.batches.cancel(batch_id)
    assert cancelling.status == "cancelling"
    assert cancelling.cancelling_at is not None
    again = await client.batches.cancel(batch_id)
    assert again.status == "cancelling"
    assert again.cancelling_at == cancelling.cancelling_at

    assert await emu.advance(batch_id) == "cancelled"
    batch = await client.batches.retrieve(batch_id)
    assert batch.cancelled_at is not None
    assert (await client.batches.cancel(batch_id)).status == "cancelled"
    output, errors = results(emu, batch_id)
    assert [e["custom_id"] for e in output] == ["req-0"]
    assert sorted(e["custom_id"] for e in errors) == ["req-1", "req-2", "req-3"]
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    assert all(e["response"] is None for e in errors)


async def test_cancel_while_validating_reports_nothing(
    emu: Emulator, client: openai.AsyncOpenAI
) -> None:
    batch_id = await start_batch(emu, client, chat_lines(3))
    assert (await client.batches.cancel(batch_id)).status == "cancelling"
    assert await emu.advance(batch_id) == "cancelled"
    batch = emu.batches[batch_id]
    assert (batch["output_file_id"], batch["error_file_id"]) == (None, None)
    assert counts(emu, batch_id) == {"total": 0, "completed": 0, "failed": 0}


async def test_driving_misuse_raises(emu: Emulator, client: openai.AsyncOpenAI) -> None:
    batch_id = await start_batch(emu, client, chat_lines(1))
    with pytest.raises(ValueError, match="validating"):
        await emu.process(batch_id)
    await emu.finish(batch_id)
    with pytest.raises(ValueError, match="completed"):
        await emu.expire(batch_id)
    with pytest.raises(KeyError):
        await emu.advance("batch_unknown")


# ---------------------------------------------------------------- input validation


async def test_fail_validation_script(emu: Emulator, client: openai.AsyncOpenAI) -> None:
    emu.fail_validation([{"code": "token_limit_exceeded", "message": "Enqueued token limit."}])
    failing = await start_batch(emu, client, chat_lines(2))
    healthy = await start_batch(emu, client, chat_lines(2))
    assert await emu.advance(failing) == "failed"
    assert await emu.advance(healthy) == "in_progress"
    batch = await client.batches.retrieve(failing)
    assert batch.failed_at is not None
    assert batch.output_file_id is None
    assert batch.error_file_id is None
    assert batch.errors is not None
    assert batch.errors.object == "list"
    assert batch.errors.data is not None
    [error] = batch.errors.data
    assert (error.code, error.message, error.param, error.line) == (
        "token_limit_exceeded",
        "Enqueued token limit.",
        None,
        None,
    )


def _invalid_inputs() -> Iterator[Any]:
    good = line("a", chat_body(0))
    yield pytest.param([good, b"{not json"], "invalid_json_line", None, 2, id="json")
    for field in ("custom_id", "method", "url", "body"):
        entry = {"custom_id": "b", "method": "POST", "url": CHAT, "body": chat_body(1)}
        del entry[field]
        yield pytest.param(
            [good, orjson.dumps(entry)], "missing_required_parameter", field, 2, id=field
        )
    yield pytest.param([line("b", chat_body(1), url=RESPONSES)], "invalid_url", "url", 1, id="url")
    yield pytest.param(
        [good, line("b", chat_body(1, stream=True))],
        "streaming_unsupported",
        "body.stream",
        2,
        id="stream",
    )
    yield pytest.param(
        [good, good, line("c", chat_body(2))], "duplicate_custom_id", "custom_id", 2, id="dup"
    )
    yield pytest.param(
        [good, b"", line("b", {**chat_body(1), "model": "gpt-4o"})],
        "model_mismatch",
        "body.model",
        3,
        id="model",
    )
    yield pytest.param([b"", b"  "], "empty_file", None, None, id="empty")
    yield pytest.param(
        [line("b", {"messages": []})], "invalid_request", "body.model", 1, id="no-model"
    )


@pytest.mark.parametrize(("lines", "code", "param", "line_no"), list(_invalid_inputs()))
async def test_input_validation_codes(
    emu: Emulator,
    client: openai.AsyncOpenAI,
    lines: list[bytes],
    code: str,
    param: str | None,
    line_no: int | None,
) -> None:
    batch_id = await start_batch(emu, client, lines)
    assert await emu.advance(batch_id) == "failed"
    batch = await client.batches.retrieve(batch_id)
    assert batch.errors is not None
    assert batch.errors.data is not None
    [error] = batch.errors.data
    assert (error.code, error.param, error.line) == (code, param, line_no)
    assert error.message


async def test_too_many_tasks(emu: Emulator, client: openai.AsyncOpenAI) -> None:
    lines = [line(str(i), {"model": "m", "input": "x"}, url=EMBEDDINGS) for i in range(50_001)]
    batch_id = await start_batch(emu, client, lines, endpoint=EMBEDDINGS)
    assert await emu.advance(batch_id) == "failed"
    errors = emu.batches[batch_id]["errors"]
    assert isinstance(errors, dict)
    assert [e["code"] for e in errors["data"]] == ["too_many_tasks"]


async def test_missing_input_file_fails_validation(
    emu: Emulator, client: openai.AsyncOpenAI
) -> None:
    batch = await client.batches.create(
        input_file_id="file-missing", endpoint=CHAT, completion_window="24h"
    )
    assert batch.status == "validating"
    assert await emu.advance(batch.id) == "failed"
    errors = emu.batches[batch.id]["errors"]
    assert isinstance(errors, dict)
    [error] = errors["data"]
    assert (error["code"], error["param"], error["line"]) == ("invalid_request", "file_id", None)


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"endpoint": "/v1/chat"}, "endpoint"),
        ({"completion_window": "48h"}, "completion_window"),
        ({"metadata": {"tags": ["x"]}}, "metadata.tags"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k" * 65: "v"}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "metadata.k"),
    ],
)
async def test_create_batch_rejects_bad_parameters(
    http: aiohttp.ClientSession, emu: Emulator, overrides: dict[str, Any], param: str
) -> None:
    payload = {"input_file_id": "file-x", "endpoint": CHAT, "completion_window": "24h"}
    async with http.post(f"{emu.base_url}/batches", json=payload | overrides) as resp:
        assert resp.status == 400
        assert resp.content_type == "application/json"
        error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert emu.batches == {}


# ---------------------------------------------------------------- HTTP-level faults


async def test_requires_api_key(emu: Emulator) -> None:
    async with aiohttp.ClientSession() as anonymous, anonymous.get(f"{emu.base_url}/batches") as r:
        assert r.status == 401
        assert r.content_type == "application/json"
        body = await r.json()
    assert body == {
        "error": {
            "message": "Incorrect API key provided.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    async with openai.AsyncOpenAI(api_key="sk-wrong", base_url=emu.base_url, max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            await bad.files.list()


async def test_fail_http_with_retry_after(
    emu: Emulator, client: openai.AsyncOpenAI, http: aiohttp.ClientSession
) -> None:
    emu.fail_http("POST", "/files", 429, times=2, headers={"Retry-After": "7"})
    for _ in range(2):
        with pytest.raises(openai.RateLimitError) as info:
            await client.files.create(file=("a.jsonl", b"{}\n"), purpose="batch")
        assert info.value.response.headers["retry-after"] == "7"
        assert info.value.code == "rate_limit_exceeded"
    assert (await client.files.create(file=("a.jsonl", b"{}\n"), purpose="batch")).bytes == 3

    emu.fail_http("GET", "/v1/batches", 503, body={"error": {"message": "down"}})
    async with http.get(f"{emu.base_url}/batches/batch_x") as resp:
        assert resp.status == 503
        assert await resp.json() == {"error": {"message": "down"}}


async def test_drop_connection_mid_download(emu: Emulator, http: aiohttp.ClientSession) -> None:
    content = b"x" * (3 * 1024 * 1024)
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", io.BytesIO(content), filename="big.jsonl")
    async with http.post(f"{emu.base_url}/files", data=form) as resp:
        file_id = (await resp.json())["id"]
    url = f"{emu.base_url}/files/{file_id}/content"

    emu.drop_connection("GET", f"/files/{file_id}/content", after_bytes=1000)
    received = bytearray()
    async with http.get(url) as resp:
        assert resp.status == 200
        assert resp.content_length == len(content)
        with pytest.raises(aiohttp.ClientPayloadError):
            await drain(resp, received)
    assert len(received) == 1000

    async with http.get(url) as resp:
        assert resp.headers["Content-Type"] == "application/octet-stream"
        assert await resp.read() == content


async def test_drop_connection_before_response(emu: Emulator, http: aiohttp.ClientSession) -> None:
    emu.drop_connection("POST", "/batches")
    payload = {"input_file_id": "file-x", "endpoint": CHAT, "completion_window": "24h"}
    with pytest.raises(aiohttp.ClientConnectionError):
        await http.post(f"{emu.base_url}/batches", json=payload)
    async with http.post(f"{emu.base_url}/batches", json=payload) as resp:
        assert resp.status == 200
    assert emu.requests[-2:] == [("POST", "/v1/batches")] * 2


async def test_unknown_ids_and_routes_are_json_404(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    for path in ("/files/file-nope", "/files/file-nope/content", "/batches/batch_nope", "/nope"):
        async with http.get(f"{emu.base_url}{path}") as resp:
            assert resp.status == 404, path
            assert resp.content_type == "application/json"
            assert "message" in (await resp.json())["error"]


async def test_batch_upload_size_cap(
    emu: Emulator, client: openai.AsyncOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_http, "MAX_BATCH_INPUT_BYTES", 10)
    with pytest.raises(openai.BadRequestError):
        await client.files.create(file=("a.jsonl", b"x" * 11), purpose="batch")
    assert (await client.files.create(file=("a.jsonl", b"x" * 11), purpose="user_data")).bytes == 11


# ---------------------------------------------------------------- time-driven batches


async def test_step_seconds_drives_batches_by_clock() -> None:
    clock = Clock()
    emulator = Emulator(step_seconds=10, clock=clock)
    async with (
        emulator as emu,
        openai.AsyncOpenAI(
            api_key=emu.api_key, base_url=emu.base_url, _strict_response_validation=True
        ) as client,
    ):
        batch_id = await start_batch(emu, client, chat_lines(10))
        created = emu.batches[batch_id]["created_at"]
        assert isinstance(created, int)
        assert (await client.batches.retrieve(batch_id)).status == "validating"
        clock.now += 10
        assert (await client.batches.retrieve(batch_id)).status == "in_progress"
        clock.now += 5
        halfway = await client.batches.retrieve(batch_id)
        assert halfway.request_counts is not None
        assert halfway.request_counts.completed == 5
        clock.now += 1000
        [listed] = [b async for b in client.batches.list()]
        assert listed.status == "completed"
        assert listed.in_progress_at == created + 10
        assert listed.finalizing_at == created + 20
        assert listed.completed_at == created + 30
        assert listed.request_counts is not None
        assert listed.request_counts.completed == 10


async def test_without_step_seconds_batches_stay_put() -> None:
    clock = Clock()
    emulator = Emulator(clock=clock)
    async with (
        emulator as emu,
        openai.AsyncOpenAI(api_key=emu.api_key, base_url=emu.base_url) as client,
    ):
        batch_id = await start_batch(emu, client, chat_lines(1))
        clock.now += 10**6
        assert (await client.batches.retrieve(batch_id)).status == "validating"


# ---------------------------------------------------------------- the fake model


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        (CHAT, chat_body(7, max_tokens=50)),
        (
            CHAT,
            {
                "model": "gpt-5-mini",
                "messages": [{"role": "user", "content": [{"type": "text", "text": "parts"}]}],
                "tools": [{"type": "function", "function": {"name": "f"}}],
            },
        ),
        (RESPONSES, {"model": "o3", "input": "respond", "instructions": "be brief"}),
        (EMBEDDINGS, {"model": "text-embedding-3-small", "input": ["x", "y"]}),
        (
            EMBEDDINGS,
            {"model": "text-embedding-3-small", "input": "z", "encoding_format": "base64"},
        ),
    ],
)
async def test_live_body_equals_batch_body(
    emu: Emulator,
    client: openai.AsyncOpenAI,
    http: aiohttp.ClientSession,
    endpoint: Endpoint,
    body: dict[str, Any],
) -> None:
    async with http.post(f"{emu.base_url}{endpoint.removeprefix('/v1')}", json=body) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        live = await resp.json()
    batch_id = await start_batch(emu, client, [line("only", body, url=endpoint)], endpoint)
    await emu.finish(batch_id)
    [entry], _ = results(emu, batch_id)
    batched = entry["response"]["body"]
    for stamp in ("created", "created_at", "completed_at"):
        live.pop(stamp, None)
        batched.pop(stamp, None)
    assert batched == live


async def test_chat_usage_truncation_and_reasoning(client: openai.AsyncOpenAI) -> None:
    long_prompt = "token " * 1000
    cut = await client.chat.completions.create(
        model="gpt-5",
        messages=[{"role": "system", "content": long_prompt}, {"role": "user", "content": "a b c"}],
        max_completion_tokens=2,
    )
    choice = cut.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.content == "Echo: a"
    usage = cut.usage
    assert usage is not None
    assert usage.prompt_tokens >= 1024
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == (usage.prompt_tokens // 128) * 128
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 4
    assert usage.completion_tokens == 6

    plain = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "same"}],
        tools=[{"type": "function", "function": {"name": "f"}}],
        tool_choice="none",
    )
    assert plain.choices[0].message.content == "Echo: same"
    assert plain.usage is not None
    assert plain.usage.completion_tokens_details is not None
    assert plain.usage.completion_tokens_details.reasoning_tokens == 0
    again = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "same"}],
        tools=[{"type": "function", "function": {"name": "f"}}],
        tool_choice="none",
    )
    assert again.id == plain.id


async def test_live_rejects_streaming(emu: Emulator, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{emu.base_url}/chat/completions", json=chat_body(1, stream=True)) as r:
        assert r.status == 400
        assert (await r.json())["error"]["param"] == "stream"


def test_embedding_vectors_are_float32_exact() -> None:
    from batchinfer.testing.fake_model import embeddings

    floats = embeddings({"model": "m", "input": "v", "dimensions": 5})["data"][0]["embedding"]
    packed = embeddings({"model": "m", "input": "v", "dimensions": 5, "encoding_format": "base64"})
    decoded = struct.unpack("<5f", base64.b64decode(packed["data"][0]["embedding"]))
    assert list(decoded) == floats


# ---------------------------------------------------------------- scale


async def test_fifty_thousand_requests_streamed_upload(
    emu: Emulator, http: aiohttp.ClientSession
) -> None:
    padding = "lorem ipsum dolor sit amet " * 34
    data = b"\n".join(line(f"r{i}", chat_body(i, user=padding)) for i in range(50_000)) + b"\n"
    assert len(data) > 50_000 * 1000

    async def stream() -> AsyncIterator[bytes]:
        # An async generator has no length, so aiohttp sends the upload chunked.
        for start in range(0, len(data), 1 << 20):
            yield data[start : start + (1 << 20)]

    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", stream(), filename="big.jsonl")
    async with http.post(f"{emu.base_url}/files", data=form) as resp:
        assert resp.request_info.headers.get("Transfer-Encoding") == "chunked"
        uploaded = await resp.json()
    assert uploaded["bytes"] == len(data)
    payload = {"input_file_id": uploaded["id"], "endpoint": CHAT, "completion_window": "24h"}
    async with http.post(f"{emu.base_url}/batches", json=payload) as resp:
        batch_id = (await resp.json())["id"]
    await emu.finish(batch_id)
    batch = emu.batches[batch_id]
    assert counts(emu, batch_id) == {"total": 50_000, "completed": 50_000, "failed": 0}
    async with http.get(f"{emu.base_url}/files/{batch['output_file_id']}/content") as resp:
        output = await resp.read()
    assert output.count(b"\n") == 50_000
