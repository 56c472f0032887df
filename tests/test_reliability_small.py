"""Small reliability fixes: cancelled live calls, values JSON cannot hold, oversized metadata,
unknown batch ids, a busy emulator port, and the request shapes create_batch must refuse."""

from __future__ import annotations

import asyncio
import gc
import math
import random
import socket
import statistics
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from batchinfer import (
    BatchInfer,
    BatchNotFoundError,
    InvalidRequestError,
    OpenAIProvider,
)
from batchinfer import validation as validation_module
from batchinfer.cli import main
from batchinfer.domain import BatchLimits
from batchinfer.providers.openai import BATCH_ENDPOINTS
from batchinfer.testing import Emulator

CHAT = "/v1/chat/completions"
MODEL = "gpt-4o-mini"
NAN = float("nan")
INF = float("inf")


def ok(custom_id: Any, **extra: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "body": {"messages": [{"role": "user", "content": f"hi {custom_id}"}]},
        **extra,
    }


async def row_counts(engine: AsyncEngine, schema: str) -> tuple[int, int]:
    async with engine.connect() as conn:
        counts = (
            await conn.execute(
                sa.text(
                    f'SELECT (SELECT count(*) FROM "{schema}".batches), '
                    f'(SELECT count(*) FROM "{schema}".completions)'
                )
            )
        ).one()
    return int(counts[0]), int(counts[1])


async def create(bi: BatchInfer, requests: Any, **kwargs: Any) -> Any:
    params: dict[str, Any] = {"provider": "openai", "endpoint": CHAT, "model": MODEL}
    params.update(kwargs)
    return await bi.create_batch(requests=requests, **params)


async def live(bi: BatchInfer, body: Any, **kwargs: Any) -> Any:
    return await bi.complete(provider="openai", endpoint=CHAT, model=MODEL, body=body, **kwargs)


def limited(emulator: Emulator, schema: str, engine: AsyncEngine, **limits: Any) -> BatchInfer:
    provider = OpenAIProvider(
        api_key=emulator.api_key,
        base_url=emulator.base_url,
        limits=BatchLimits(endpoints=BATCH_ENDPOINTS, **limits),
    )
    return BatchInfer(engine, providers=[provider], schema=schema, poll_interval=0)


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What asyncio reports through the loop's exception handler (such as "Future exception
    was never retrieved"), which no warning filter turns into a test failure."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    seen: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    try:
        yield seen
    finally:
        loop.set_exception_handler(previous)


# -- 1. a cancelled live call --------------------------------------------------------------------


async def test_cancelled_live_calls_leave_every_row_terminal_and_warn_nothing(
    bi: BatchInfer,
    engine: AsyncEngine,
    schema: str,
    loop_errors: list[dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    loop = asyncio.get_running_loop()
    durations = []
    for _ in range(12):
        started = loop.time()
        await live(bi, body)
        durations.append(loop.time() - started)
    typical = statistics.median(durations)
    # Deadlines spread over the whole call, so some land in the insert, some in its commit,
    # some in the provider call and some in the writes after it.
    rnd = random.Random(20240611)
    timed_out = 0
    for _ in range(200):
        try:
            async with asyncio.timeout(rnd.uniform(0, 1.2 * typical)):
                await live(bi, body)
        except TimeoutError:
            timed_out += 1
    gc.collect()
    await asyncio.sleep(0.05)

    assert loop_errors == []
    assert [r for r in caplog.records if r.name == "asyncio"] == []
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                sa.text(f'SELECT status, failure_error, failure_reason FROM "{schema}".completions')
            )
        ).all()
    assert timed_out > 0
    assert {r.status for r in rows} <= {"completed", "failed"}
    failed = [r for r in rows if r.status == "failed"]
    assert failed, "no deadline landed after the insert; the test did not exercise the fix"
    for row in failed:
        assert row.failure_error == "openai live request cancelled"
        assert "cancelled" in row.failure_reason


# -- 2. NaN and Infinity -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "fragments"),
    [
        pytest.param(
            {"custom_id": "b", "body": {"messages": [], "temperature": NAN}},
            ["body.temperature is NaN"],
            id="nan-in-body",
        ),
        pytest.param(
            {"custom_id": "b", "body": {"messages": [{"role": "user", "weights": [1.0, INF]}]}},
            ["body.messages[0].weights[1] is Infinity"],
            id="infinity-deep-in-body",
        ),
        pytest.param(
            {"custom_id": "b", "body": {"messages": []}, "metadata": {"score": -INF}},
            ["metadata.score is -Infinity"],
            id="minus-infinity-in-metadata",
        ),
        pytest.param(
            {"custom_id": "b", "body": {"messages": []}, "metadata": {"a b": {"c": NAN}}},
            ["metadata['a b'].c is NaN"],
            id="nan-under-an-odd-key",
        ),
        pytest.param(
            {"custom_id": "b", "body": {"messages": [], "tags": {"x"}}},
            ["body.tags (set) is not JSON-serialisable"],
            id="set-named-by-path",
        ),
        pytest.param(
            {"custom_id": "b", "body": {"messages": [], "logit_bias": {1: 5}}},
            ["body.logit_bias has the key 1 (int)", "keys must be strings"],
            id="int-key",
        ),
    ],
)
async def test_values_json_cannot_hold_are_refused_with_their_path(
    bi: BatchInfer,
    engine: AsyncEngine,
    schema: str,
    request_: dict[str, Any],
    fragments: list[str],
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        await create(bi, [ok("a"), request_])
    message = str(info.value)
    for fragment in ["requests[1]", "custom_id 'b'", *fragments]:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert await row_counts(engine, schema) == (0, 0)


async def test_nan_in_a_live_body_is_refused_before_any_call(
    bi: BatchInfer, emulator: Emulator, engine: AsyncEngine, schema: str
) -> None:
    with pytest.raises(InvalidRequestError, match=r"body\.temperature is NaN"):
        await live(bi, {"messages": [], "temperature": NAN})
    with pytest.raises(InvalidRequestError, match=r"metadata\.x is Infinity"):
        await live(bi, {"messages": []}, metadata={"x": INF})
    assert emulator.requests == []
    assert await row_counts(engine, schema) == (0, 0)


@pytest.mark.parametrize(
    ("metadata", "fragment"),
    [({"score": NAN}, "metadata.score is NaN"), ({"k": [INF]}, "metadata.k[0] is Infinity")],
)
async def test_nan_in_batch_metadata_is_refused(
    bi: BatchInfer, engine: AsyncEngine, schema: str, metadata: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        await create(bi, [ok("a")], metadata=metadata)
    assert fragment in str(info.value)
    assert await row_counts(engine, schema) == (0, 0)


async def test_real_nulls_and_the_word_null_are_kept(bi: BatchInfer) -> None:
    body = {"messages": [{"role": "user", "content": "null"}], "stop": None, "temperature": 0.5}
    batch = await create(bi, [{"custom_id": "a", "body": body, "metadata": {"m": None}}])
    [completion] = [c async for c in bi.completions(batch)]
    assert completion.request_body == {**body, "model": MODEL}
    assert completion.metadata == {"m": None}
    assert not math.isnan(completion.request_body["temperature"])


# -- 3. custom_id that is not a string ------------------------------------------------------------


@pytest.mark.parametrize(
    ("custom_id", "fragment"),
    [(7, "got int 7"), (uuid.UUID(int=1), "got UUID UUID("), (b"a", "got bytes b'a'")],
)
async def test_a_custom_id_that_is_not_a_string_says_so(
    bi: BatchInfer, engine: AsyncEngine, schema: str, custom_id: Any, fragment: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        await create(bi, [ok("a"), ok(custom_id)])
    message = str(info.value)
    assert "requests[1]" in message
    assert "custom_id must be a string" in message
    assert fragment in message
    assert "missing" not in message
    assert await row_counts(engine, schema) == (0, 0)


# -- 4. sizes ------------------------------------------------------------------------------------


async def test_request_metadata_over_the_limit_names_request_and_field(
    bi: BatchInfer, engine: AsyncEngine, schema: str
) -> None:
    big = {"small": 1, "blob": "x" * (validation_module.MAX_METADATA_BYTES + 1)}
    with pytest.raises(InvalidRequestError) as info:
        await create(bi, [ok("a"), ok("b", metadata=big)])
    message = str(info.value)
    for fragment in ["requests[1]", "custom_id 'b'", "metadata.blob", "MAX_METADATA_BYTES"]:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert await row_counts(engine, schema) == (0, 0)


async def test_metadata_just_under_the_limit_is_stored(bi: BatchInfer) -> None:
    blob = "x" * (validation_module.MAX_METADATA_BYTES - 20)
    batch = await create(bi, [ok("a", metadata={"blob": blob})], metadata={"blob": blob})
    assert batch.metadata == {"blob": blob}
    [completion] = [c async for c in bi.completions(batch)]
    assert completion.metadata == {"blob": blob}


async def test_the_metadata_limit_is_a_setting(
    bi: BatchInfer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(validation_module, "MAX_METADATA_BYTES", 50)
    with pytest.raises(InvalidRequestError, match="over the limit of 50"):
        await create(bi, [ok("a", metadata={"note": "y" * 60})])
    with pytest.raises(InvalidRequestError, match="over the limit of 50"):
        await create(bi, [ok("a")], metadata={"note": "y" * 60})


async def test_a_300_mb_metadata_value_is_refused_before_the_database(
    bi: BatchInfer, engine: AsyncEngine, schema: str
) -> None:
    huge = "x" * 300_000_000
    with pytest.raises(InvalidRequestError) as info:
        await create(bi, [ok("a"), ok("b", metadata={"blob": huge})])
    assert "requests[1], custom_id 'b': metadata is 300,000,011 bytes" in str(info.value)
    with pytest.raises(InvalidRequestError, match=r"metadata\.blob alone"):
        await create(bi, [ok("a")], metadata={"blob": huge})
    assert await row_counts(engine, schema) == (0, 0)


async def test_one_body_bigger_than_a_whole_batch_names_its_request(
    bi: BatchInfer, emulator: Emulator, engine: AsyncEngine, schema: str
) -> None:
    big = {"messages": [{"role": "user", "content": "z" * 20_000}]}
    async with limited(emulator, schema, engine, max_bytes=10_000) as small:
        with pytest.raises(InvalidRequestError) as info:
            await create(small, [ok("a"), {"custom_id": "b", "body": big}])
        message = str(info.value)
        assert message.startswith("requests[1], custom_id 'b': body is ")
        assert "more than the 10,000 bytes" in message
        assert await row_counts(engine, schema) == (0, 0)
        with pytest.raises(InvalidRequestError, match=r"body is .* more than the 10,000 bytes"):
            await live(small, big)
    assert emulator.requests == []
    assert await row_counts(engine, schema) == (0, 0)


# -- 5. unknown batch ids ------------------------------------------------------------------------


async def test_summary_and_completions_of_an_unknown_batch_raise(bi: BatchInfer) -> None:
    missing = uuid.uuid4()
    with pytest.raises(BatchNotFoundError, match=str(missing)):
        await bi.summary(missing)
    with pytest.raises(BatchNotFoundError, match=str(missing)):
        [c async for c in bi.completions(missing)]
    with pytest.raises(BatchNotFoundError):
        [c async for c in bi.completions(str(missing), status="failed")]


async def test_a_known_batch_with_nothing_matching_is_just_empty(bi: BatchInfer) -> None:
    batch = await create(bi, [ok("a")])
    assert [c async for c in bi.completions(batch, status="failed")] == []
    assert (await bi.summary(batch))["by_status"] == {"pending": 1}
    with pytest.raises(InvalidRequestError, match="unknown completion status 'done'"):
        [c async for c in bi.completions(batch, status="done")]


# -- 6. the emulator on a busy port --------------------------------------------------------------


def test_emulator_on_a_busy_port_says_so_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["emulator", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"127.0.0.1:{port}" in err
    assert "in use" in err
    assert "--port" in err
    assert "Traceback" not in err


# -- the request shapes create_batch refuses, not already covered in test_create ------------------


@pytest.mark.parametrize(
    ("requests", "kwargs", "fragments"),
    [
        pytest.param(None, {}, ["requests must be a list", "got NoneType"], id="requests-none"),
        pytest.param(
            ok("a"), {}, ["requests must be a list", "got dict"], id="requests-a-single-dict"
        ),
        pytest.param("abc", {}, ["requests must be a list", "got str"], id="requests-a-string"),
        pytest.param(
            [ok("a"), 7], {}, ["requests[1]", "expected a dict", "got int"], id="request-an-int"
        ),
        pytest.param(
            [ok("a"), ok("b\nc")],
            {},
            ["requests[1]", "custom_id 'b\\nc'", "control character '\\n'"],
            id="newline-in-custom-id",
        ),
        pytest.param(
            [ok("a"), {"custom_id": "b", "body": ["messages"]}],
            {},
            ["requests[1]", "custom_id 'b'", "body must be a dict"],
            id="body-a-list",
        ),
        pytest.param(
            [ok("a"), {"custom_id": "b"}],
            {},
            ["requests[1]", "custom_id 'b'", "body must be a dict"],
            id="body-missing",
        ),
        pytest.param([ok("a")], {"model": ""}, ["model must be a non-empty string"], id="model-''"),
        pytest.param(
            [ok("a")], {"model": None}, ["model must be a non-empty string"], id="model-none"
        ),
        pytest.param(
            [ok("a")],
            {"endpoint": "/v1/audio/speech"},
            ["'/v1/audio/speech'", "not accepted by the batch API", CHAT],
            id="endpoint-not-supported",
        ),
    ],
)
async def test_more_bad_shapes_are_refused_and_nothing_is_written(
    bi: BatchInfer,
    engine: AsyncEngine,
    schema: str,
    requests: Any,
    kwargs: dict[str, Any],
    fragments: list[str],
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        await create(bi, requests, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert await row_counts(engine, schema) == (0, 0)


async def test_a_live_body_that_is_not_a_dict_is_refused(
    bi: BatchInfer, emulator: Emulator, engine: AsyncEngine, schema: str
) -> None:
    with pytest.raises(InvalidRequestError, match="body must be a dict"):
        await live(bi, "hello")
    assert emulator.requests == []
    assert await row_counts(engine, schema) == (0, 0)
