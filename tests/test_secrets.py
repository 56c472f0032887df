"""API keys never appear in logs, exceptions, stored rows or reprs, along every error path;
TLS certificates are checked unless the caller turns that off."""

from __future__ import annotations

import asyncio
import logging
import ssl
import subprocess
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from batchinfer import BatchInfer, BatchInferError, OpenAIProvider, ProviderUnavailableError
from batchinfer.testing import Emulator, FakeClock
from tests.helpers import chat_requests

SECRET = "sk-proj-TOPSECRET-91c2e7a4b3d5"
CHAT = "/v1/chat/completions"


@pytest.fixture
async def emu() -> AsyncIterator[Emulator]:
    async with Emulator(api_key=SECRET) as emulator:
        yield emulator


@pytest.fixture
async def sbi(engine: AsyncEngine, schema: str, emu: Emulator) -> AsyncIterator[BatchInfer]:
    provider = OpenAIProvider(api_key=SECRET, base_url=emu.base_url)
    async with BatchInfer(engine, providers=[provider], schema=schema, poll_interval=0) as bi:
        await bi.migrate()
        yield bi


def texts_of(exc: BaseException) -> list[str]:
    texts = ["".join(traceback.format_exception(exc)), repr(exc), str(exc.args)]
    chained: BaseException | None = exc
    while chained is not None:
        texts += [str(chained), repr(chained), repr(vars(chained))]
        chained = chained.__cause__ or chained.__context__
    return texts


def assert_clean(texts: list[str]) -> None:
    for text in texts:
        assert SECRET not in text
        assert SECRET[8:] not in text  # nor its tail


async def submitted(bi: BatchInfer, emu: Emulator) -> tuple[str, str]:
    batch = await bi.create_batch(
        provider="openai", endpoint=CHAT, model="gpt-4o-mini", requests=chat_requests(3)
    )
    batch = await bi.submit_batch(batch)
    return str(batch.id), batch.provider_batch_id or ""


async def fail_submit(bi: BatchInfer, emu: Emulator) -> None:
    emu.fail_http("POST", "/files", 500, times=10)
    batch = await bi.create_batch(
        provider="openai", endpoint=CHAT, model="gpt-4o-mini", requests=chat_requests(1)
    )
    await bi.submit_batch(batch)


async def fail_create(bi: BatchInfer, emu: Emulator) -> None:
    emu.drop_connection("POST", "/batches", times=10)
    batch = await bi.create_batch(
        provider="openai", endpoint=CHAT, model="gpt-4o-mini", requests=chat_requests(1)
    )
    await bi.submit_batch(batch)


async def fail_status(bi: BatchInfer, emu: Emulator) -> None:
    batch_id, pbid = await submitted(bi, emu)
    emu.fail_http("GET", f"/batches/{pbid}", 503, times=10)
    await bi.fetch_batch_status(batch_id)


async def fail_cancel(bi: BatchInfer, emu: Emulator) -> None:
    batch_id, pbid = await submitted(bi, emu)
    await emu.finish(pbid)
    await bi.cancel_batch(batch_id)


async def fail_download(bi: BatchInfer, emu: Emulator) -> None:
    batch_id, pbid = await submitted(bi, emu)
    await emu.finish(pbid)
    await bi.fetch_batch_status(batch_id)
    emu.drop_connection("GET", "/files", times=50, after_bytes=10)
    await bi.fetch_batch_results(batch_id)


async def fail_live(bi: BatchInfer, emu: Emulator) -> None:
    emu.fail_http("POST", "/chat/completions", 401, times=1)
    await bi.complete(
        provider="openai",
        endpoint=CHAT,
        model="gpt-4o-mini",
        body={"messages": [{"role": "user", "content": "hi"}]},
    )


async def fail_worker(bi: BatchInfer, emu: Emulator) -> None:
    clock = FakeClock()
    batch = await bi.create_batch(
        provider="openai",
        endpoint=CHAT,
        model="gpt-4o-mini",
        requests=chat_requests(2),
        submit=True,
    )
    emu.fail_http("POST", "/batches", 500, times=10)
    await bi.worker(clock=clock).run_once()  # logs the failure and carries on
    raise BatchInferError(f"worker step of {batch.id} logged")


@pytest.mark.parametrize(
    "path",
    [fail_submit, fail_create, fail_status, fail_cancel, fail_download, fail_live, fail_worker],
)
async def test_the_key_is_in_no_error_log_row_or_repr(
    sbi: BatchInfer,
    emu: Emulator,
    engine: AsyncEngine,
    schema: str,
    caplog: pytest.LogCaptureFixture,
    path: Callable[[BatchInfer, Emulator], Awaitable[None]],
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(BatchInferError) as info:
        await path(sbi, emu)
    texts = texts_of(info.value)
    formatter = logging.Formatter("%(message)s %(exc_info)s")
    for record in caplog.records:
        texts += [formatter.format(record), repr(vars(record))]
    texts += [repr(sbi), repr(sbi.worker()), *(repr(p) for p in sbi._providers.by_name.values())]
    async with engine.connect() as conn:
        for table in ("batches", "completions", "workers"):
            rows = await conn.execute(sa.text(f'SELECT t::text FROM "{schema}".{table} AS t'))
            texts += [r[0] for r in rows]
    assert_clean(texts)


# -- TLS --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture
async def https_url(certificate: tuple[Path, Path]) -> AsyncIterator[str]:
    """A server with a certificate nobody vouches for, answering one batch object."""

    async def batch(request: web.Request) -> web.Response:
        return web.json_response(
            {"id": "batch_tls", "object": "batch", "status": "in_progress", "metadata": {}}
        )

    app = web.Application()
    app.router.add_get("/v1/batches/batch_tls", batch)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"https://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


async def test_tls_certificates_are_checked(https_url: str) -> None:
    provider = OpenAIProvider(api_key=SECRET, base_url=https_url, attempts=1)
    try:
        with pytest.raises(ProviderUnavailableError, match=r"(?i)certificate") as info:
            await provider.retrieve_batch("batch_tls")
        assert_clean(texts_of(info.value))
    finally:
        await provider.aclose()


async def test_tls_checks_can_be_turned_off(
    https_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    provider = OpenAIProvider(api_key=SECRET, base_url=https_url, verify_tls=False)
    try:
        batch = await asyncio.wait_for(provider.retrieve_batch("batch_tls"), 10)
    finally:
        await provider.aclose()
    assert batch.id == "batch_tls"
    assert any("tls_unverified" in r.getMessage() for r in caplog.records)
