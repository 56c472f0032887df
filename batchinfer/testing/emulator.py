"""The public face of the emulator: server lifecycle, failure scripting and batch driving.

Transport faults (HTTP errors, dropped connections, latency, lost answers, eventual
consistency) are scripted with the methods of :class:`~._faults.FaultScripting`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import Protocol

import orjson
from aiohttp import web

from ._anthropic import AnthropicBatches
from ._faults import Faults, FaultScripting
from ._gemini import GeminiBatches
from ._http import API_PREFIX, ReceivedRequest, build_app
from ._state import ScriptedFailure, Store
from ._xai import PREFIX as XAI_PREFIX
from ._xai import XAIBatches

__all__ = ["Emulator", "ReceivedRequest"]


class _Engine(Protocol):
    """What every provider's batch state machine answers, for the driving methods."""

    def advance(self, batch_id: str) -> str: ...

    def process(self, batch_id: str, n: int | None) -> None: ...

    def finish(self, batch_id: str) -> None: ...

    def expire(self, batch_id: str) -> None: ...


_ERROR_KEYS = ("code", "message", "param", "line")


class Emulator(FaultScripting):
    """A local OpenAI Files + Batches + live inference server backed by a deterministic model,
    which also speaks Anthropic's Message Batches and Messages API on the same port
    (``anthropic_base_url``); the driving methods take either provider's batch ids.

    Batches stay put until driven with :meth:`advance`, :meth:`process`, :meth:`finish` or
    :meth:`expire`, unless ``step_seconds`` is set: then each read of a batch applies one step
    per ``step_seconds`` of ``clock()`` time elapsed since the previous step.

    ``requests`` lists every request's method and path; ``received`` the same with headers.
    ``seed`` fixes the order of result lines and every random fault; ``ranges=False`` makes
    file downloads ignore ``Range`` headers.
    """

    def __init__(
        self,
        *,
        api_key: str = "sk-emulator",
        host: str = "127.0.0.1",
        port: int = 0,
        step_seconds: float | None = None,
        clock: Callable[[], float] = time.time,
        seed: int = 0,
        ranges: bool = True,
    ) -> None:
        if step_seconds is not None and step_seconds <= 0:
            raise ValueError("step_seconds must be positive")
        self.api_key = api_key
        self.host = host
        self.port = port
        self._store = Store(clock=clock, seed=seed, step_seconds=step_seconds)
        self._faults = Faults(seed=seed, ranges=ranges)
        self._anthropic = AnthropicBatches(self._store)
        self._xai = XAIBatches(self._store)
        self._gemini = GeminiBatches(self._store)
        self.files: dict[str, bytes] = self._store.files
        self.batches: dict[str, dict[str, object]] = self._store.batches
        self.requests: list[tuple[str, str]] = []
        self.received: list[ReceivedRequest] = []
        self._runner: web.AppRunner | None = None
        self._base_url: str | None = None

    # ---- lifecycle

    @property
    def base_url(self) -> str:
        if self._base_url is None:
            raise RuntimeError("Emulator.start() has not been awaited")
        return self._base_url

    def base_url_for(self, provider: str) -> str:
        """Where the named provider's API is served ("openai", "azure" (its endpoint),
        "anthropic", "xai", "gemini")."""
        urls = {
            "openai": self.base_url,
            "azure": self.azure_endpoint,
            "anthropic": self.anthropic_base_url,
            "xai": self.xai_base_url,
            "gemini": self.gemini_base_url,
        }
        try:
            return urls[provider]
        except KeyError:
            raise KeyError(f"the emulator serves no provider {provider!r}") from None

    @property
    def azure_endpoint(self) -> str:
        """The emulator as an Azure OpenAI resource (``https://<resource>.openai.azure.com``):
        ``/openai/v1/...``, and the classic ``/openai/...?api-version=``, with ``api-key``."""
        return self.base_url.removesuffix(API_PREFIX)

    @property
    def gemini_base_url(self) -> str:
        """Where Gemini's Developer API is served (its paths carry ``/v1beta``), as
        ``https://generativelanguage.googleapis.com`` is."""
        return self.base_url.removesuffix(API_PREFIX)

    @property
    def xai_base_url(self) -> str:
        """Where xAI's Batch API is served (``https://api.x.ai/v1`` on the real one)."""
        return self.base_url.removesuffix(API_PREFIX) + XAI_PREFIX

    @property
    def anthropic_base_url(self) -> str:
        """Where Anthropic's API is served (paths carry their ``/v1``, as on the real one)."""
        return self.base_url.removesuffix(API_PREFIX)

    async def start(self) -> None:
        if self._runner is not None:
            return
        app = build_app(
            self._store,
            self._faults,
            self.api_key,
            self.requests,
            self.received,
            self._anthropic,
            self._xai,
            self._gemini,
        )
        # A short shutdown grace: clients keep connections alive and tests should not wait on them.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        _, self.port = runner.addresses[0][:2]
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._base_url = f"http://{host}:{self.port}{API_PREFIX}"

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Emulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ---- scripting

    def fail_request(
        self,
        custom_id: str,
        *,
        status: int = 400,
        message: str = "The request was invalid.",
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        """Every batch line with this custom_id lands in the error file with this HTTP error."""
        self._store.dropped.discard(custom_id)
        self._store.failures[custom_id] = ScriptedFailure(status, message, code, type)

    def azure_deployment(self, name: str, model: str) -> None:
        """A deployment named ``name`` runs ``model``: requests give the name as their model,
        answers name the model (as Azure's do, so prices follow the model)."""
        self._store.deployments[name] = model

    def drop_request(self, custom_id: str) -> None:
        """Every batch line with this custom_id silently vanishes from both result files."""
        self._store.failures.pop(custom_id, None)
        self._store.dropped.add(custom_id)

    def fail_validation(self, errors: list[dict[str, object]]) -> None:
        """The next batch created fails validation with these errors (queued one per batch)."""
        normalised = [{key: error.get(key) for key in _ERROR_KEYS} | error for error in errors]
        self._store.validation_failures.append(normalised)

    # ---- driving batches

    def _engine(self, batch_id: str) -> _Engine:
        """The state machine that holds this batch: each provider's, or OpenAI's (Azure's)."""
        for engine in (self._anthropic, self._xai, self._gemini):
            if batch_id in engine.batches:
                return engine
        return self._store

    async def advance(self, batch_id: str) -> str:
        """One step of the batch's state machine; returns the new status."""
        return self._engine(batch_id).advance(batch_id)

    async def process(self, batch_id: str, n: int | None = None) -> None:
        """Run the next ``n`` unprocessed requests (all when None) of a running batch."""
        self._engine(batch_id).process(batch_id, n)

    async def finish(self, batch_id: str) -> None:
        """End the batch: run what is left (a cancelled one cancels it instead)."""
        self._engine(batch_id).finish(batch_id)

    async def expire(self, batch_id: str) -> None:
        """Expire the batch now; requests not yet run become `batch_expired` error lines
        (Anthropic's: ``expired`` results; xAI's: errors; Gemini's: no result at all)."""
        self._engine(batch_id).expire(batch_id)

    def anthropic_results(self, batch_id: str) -> list[dict[str, object]]:
        """An ended Anthropic batch's result lines, as its results URL serves them."""
        content = self._anthropic.results(batch_id) or b""
        return [orjson.loads(line) for line in content.splitlines()]

    # ---- inspection

    def file_content(self, file_id: str) -> bytes:
        try:
            return self.files[file_id]
        except KeyError:
            raise KeyError(f"no file {file_id!r}") from None
