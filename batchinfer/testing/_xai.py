"""xAI's Batch API (REST), over the emulator's shared clock, scripts and fake model.

A batch is a named container: requests are added to it (pending), run (succeeded or failed)
and can be read as results at any time, sorted by ``batch_request_id`` and paged. There is no
status word; the counters say it. Served under ``/xai/v1`` (``Emulator.xai_base_url``), with
xAI's error body ``{"code": "<gRPC status>", "error": "<message>"}``. Each success's usage
carries ``cost_in_usd_ticks`` (1e-10 USD): 1,000 ticks a prompt token, 5,000 a completion or
reasoning token. A model whose name says ``reasoning`` (not ``non-reasoning``) reasons for
twice its visible tokens, counted apart from ``completion_tokens``, as xAI counts them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from . import fake_model
from ._state import Store
from ._wire import json_response

__all__ = ["PREFIX", "XAIBatches", "XAIRoutes", "xai_error"]

PREFIX = "/xai/v1"
PROMPT_TICKS = 1_000
OUTPUT_TICKS = 5_000
_INVALID = "Client specified an invalid argument"
_DENIED = "The caller does not have permission to execute the specified operation"


def xai_error(status: int, message: str, *, code: str = _INVALID) -> web.Response:
    return json_response({"code": code, "error": message}, status=status)


def _date(at: float | None) -> str | None:
    # REST gives dates only ("2025-11-11").
    return None if at is None else datetime.fromtimestamp(at, UTC).date().isoformat()


@dataclass(eq=False, slots=True)
class XAIBatch:
    id: str
    name: str
    created: float
    last_step_at: float
    requests: dict[str, bytes] = field(default_factory=dict)
    pending: list[str] = field(default_factory=list)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("success", "error", "cancelled"), 0)
    )
    cancel_time: float | None = None


class XAIBatches:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.batches: dict[str, XAIBatch] = {}

    def create(self, name: str) -> XAIBatch:
        now = self.store.clock()
        batch = XAIBatch(
            id=f"batch_{self.store.new_id('')}", name=name, created=now, last_step_at=now
        )
        self.batches[batch.id] = batch
        self.store.born[batch.id] = now
        return batch

    def get(self, batch_id: str) -> XAIBatch:
        batch = self.batches[batch_id]
        step = self.store.step_seconds
        if step is not None and batch.pending and self.store.clock() - batch.last_step_at >= step:
            self.process(batch_id)
        return batch

    def add(self, batch: XAIBatch, items: list[tuple[str, dict[str, Any]]]) -> str | None:
        """Admit the requests, or say why none is (one bad request rejects the call)."""
        for custom_id, body in items:
            known = batch.requests.get(custom_id)
            if known is not None and known != orjson.dumps(body):
                return f"batch_request_id '{custom_id}' content differs from originally submitted"
        for custom_id, body in items:
            if custom_id not in batch.requests:
                batch.requests[custom_id] = orjson.dumps(body)
                batch.pending.append(custom_id)
        batch.last_step_at = self.store.clock()
        return None

    def process(self, batch_id: str, n: int | None = None) -> None:
        batch = self.batches[batch_id]
        count = len(batch.pending) if n is None else min(n, len(batch.pending))
        for custom_id in batch.pending[:count]:
            self._run(batch, custom_id)
        del batch.pending[:count]
        batch.last_step_at = self.store.clock()

    def advance(self, batch_id: str) -> str:
        """One step: a batch here runs all it holds (see ``finish``); it has no status word."""
        self.finish(batch_id)
        return "done"

    def finish(self, batch_id: str) -> None:
        self.process(batch_id)

    def expire(self, batch_id: str) -> None:
        """Its time ran out: what was pending is cancelled (by nobody's request)."""
        self._abandon(self.batches[batch_id], "Batch expired")

    def cancel(self, batch: XAIBatch) -> None:
        if batch.cancel_time is None:
            batch.cancel_time = self.store.clock()
            self._abandon(batch, "Batch cancelled")

    def _abandon(self, batch: XAIBatch, message: str) -> None:
        for custom_id in batch.pending:
            if custom_id not in self.store.dropped:
                batch.results[custom_id] = {"error": message}
            batch.counts["cancelled"] += 1
        batch.pending.clear()

    def _run(self, batch: XAIBatch, custom_id: str) -> None:
        if custom_id in self.store.dropped:
            batch.counts["success"] += 1  # ran, but its row never shows
            return
        failure = self.store.failures.get(custom_id)
        body = orjson.loads(batch.requests[custom_id])
        try:
            if failure is not None:
                raise fake_model.ModelError(failure.message, status=failure.status)
            completion = self.store.answer("/v1/chat/completions", body, self.store.now())
        except fake_model.ModelError as exc:
            batch.results[custom_id] = {"error": exc.message}
            batch.counts["error"] += 1
            return
        usage = completion["usage"]
        model = str(completion.get("model", ""))
        reasoning = 0
        if "reasoning" in model and "non-reasoning" not in model:
            reasoning = 2 * usage["completion_tokens"]
        usage["completion_tokens_details"]["reasoning_tokens"] = reasoning
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"] + reasoning
        usage["num_sources_used"] = 0
        usage["cost_in_usd_ticks"] = (
            usage["prompt_tokens"] * PROMPT_TICKS
            + (usage["completion_tokens"] + reasoning) * OUTPUT_TICKS
        )
        batch.results[custom_id] = {"response": {"chat_get_completion": completion}}
        batch.counts["success"] += 1

    def obj(self, batch: XAIBatch) -> dict[str, Any]:
        return {
            "batch_id": batch.id,
            "name": batch.name,
            "create_time": _date(batch.created),
            "expire_time": _date(batch.created + 24 * 3600),
            "create_api_key_id": "emulator",
            "cancel_time": _date(batch.cancel_time),
            "cancel_by_xai_message": None,
            "state": {
                "num_requests": len(batch.requests),
                "num_pending": len(batch.pending),
                "num_success": batch.counts["success"],
                "num_error": batch.counts["error"],
                "num_cancelled": batch.counts["cancelled"],
            },
        }


def _page(request: web.Request) -> tuple[int, int] | web.Response:
    """(offset, limit) from ``pagination_token`` and ``limit`` (or ``page_size``)."""
    try:
        limit = int(request.query.get("limit") or request.query.get("page_size") or 100)
        start = int(request.query.get("pagination_token") or 0)
    except ValueError:
        return xai_error(400, "limit and pagination_token must be numbers")
    if not 1 <= limit <= 1000:
        return xai_error(400, "limit must be from 1 to 1000")
    return start, limit


class XAIRoutes:
    def __init__(self, batches: XAIBatches) -> None:
        self.batches = batches

    def add_to(self, app: web.Application) -> None:
        app.router.add_post(f"{PREFIX}/batches", self.create)
        app.router.add_get(f"{PREFIX}/batches", self.list)
        app.router.add_get(f"{PREFIX}/batches/{{batch_id:[^/:]+}}", self.retrieve)
        app.router.add_post(f"{PREFIX}/batches/{{batch_id:[^/:]+}}:cancel", self.cancel)
        app.router.add_post(f"{PREFIX}/batches/{{batch_id}}/requests", self.add)
        app.router.add_get(f"{PREFIX}/batches/{{batch_id}}/results", self.results)
        app.router.add_post(f"{PREFIX}/chat/completions", self.live)

    async def json_response(self, request: web.Request) -> dict[str, Any] | web.Response:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            return xai_error(400, f"invalid JSON: {exc}")
        return body if isinstance(body, dict) else xai_error(400, "expected a JSON object")

    def _found(self, request: web.Request) -> XAIBatch | web.Response:
        batch_id = request.match_info["batch_id"]
        if batch_id not in self.batches.batches:
            return xai_error(
                404, f"batch {batch_id} not found", code="Some requested entity was not found"
            )
        return self.batches.get(batch_id)

    async def create(self, request: web.Request) -> web.StreamResponse:
        body = await self.json_response(request)
        if isinstance(body, web.Response):
            return body
        name = body.get("name")
        if not isinstance(name, str) or not name:
            return xai_error(400, "name is required")
        return json_response(self.batches.obj(self.batches.create(name)))

    async def list(self, request: web.Request) -> web.StreamResponse:
        paged = _page(request)
        if isinstance(paged, web.Response):
            return paged
        start, limit = paged
        newest = sorted(self.batches.batches.values(), key=lambda b: b.created, reverse=True)
        chunk = newest[start : start + limit]
        more = start + limit < len(newest)
        return json_response(
            {
                "batches": [self.batches.obj(self.batches.get(b.id)) for b in chunk],
                "pagination_token": str(start + limit) if more else None,
            }
        )

    async def retrieve(self, request: web.Request) -> web.StreamResponse:
        found = self._found(request)
        return found if isinstance(found, web.Response) else json_response(self.batches.obj(found))

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        found = self._found(request)
        if isinstance(found, web.Response):
            return found
        self.batches.cancel(found)
        return json_response(self.batches.obj(found))

    async def add(self, request: web.Request) -> web.StreamResponse:
        found = self._found(request)
        if isinstance(found, web.Response):
            return found
        if found.cancel_time is not None:
            return xai_error(
                403, "the batch was cancelled; no more requests can be added", code=_DENIED
            )
        body = await self.json_response(request)
        if isinstance(body, web.Response):
            return body
        items: list[tuple[str, dict[str, Any]]] = []
        for i, item in enumerate(body.get("batch_requests") or []):
            request_id = item.get("batch_request_id") if isinstance(item, dict) else None
            chat = (
                (item.get("batch_request") or {}).get("chat_get_completion")
                if isinstance(item, dict)
                else None
            )
            if not isinstance(request_id, str) or not isinstance(chat, dict):
                return xai_error(
                    400,
                    f"batch_requests[{i}]: batch_request_id and chat_get_completion are required",
                )
            if chat.get("stream"):
                return xai_error(400, f"batch_requests[{i}]: streaming is not supported in a batch")
            items.append((request_id, chat))
        problem = self.batches.add(found, items)
        if problem is not None:
            return xai_error(412, problem, code="Precondition check failed")
        return json_response({})

    async def results(self, request: web.Request) -> web.StreamResponse:
        found = self._found(request)
        if isinstance(found, web.Response):
            return found
        paged = _page(request)
        if isinstance(paged, web.Response):
            return paged
        start, limit = paged
        ids = sorted(found.results)
        rows = [
            {"batch_request_id": i, "batch_result": found.results[i]}
            for i in ids[start : start + limit]
        ]
        more = start + limit < len(ids)
        return json_response(
            {"results": rows, "pagination_token": str(start + limit) if more else None}
        )

    async def live(self, request: web.Request) -> web.StreamResponse:
        body = await self.json_response(request)
        if isinstance(body, web.Response):
            return body
        try:
            return json_response(
                self.batches.store.answer("/v1/chat/completions", body, self.batches.store.now())
            )
        except fake_model.ModelError as exc:
            return xai_error(exc.status, exc.message)
