"""Anthropic's Message Batches and Messages API, over the emulator's shared clock and scripts.

A batch takes its requests inline in the create call, runs ``in_progress`` (or ``canceling``)
and then ``ended``, with one result line per request at ``results_url`` (absolute, as the real
service gives it): ``succeeded``, ``errored``, ``canceled`` or ``expired``. Its request counts
stay at zero but for ``processing`` until it ends, as Anthropic's do. The same scripts as for
OpenAI apply: ``fail_request`` makes a line ``errored``, ``drop_request`` leaves it out.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from . import fake_model
from ._state import Store
from ._wire import json_response

__all__ = ["PREFIX", "AnthropicBatches", "AnthropicRoutes", "anthropic_error"]

PREFIX = "/v1/messages"
#: Anthropic's limits per batch (configurable on the provider; the emulator enforces these).
MAX_REQUESTS = 100_000
MAX_BYTES = 256 * 1024 * 1024
EXPIRY_SECONDS = 24 * 3600

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_error(
    status: int, message: str, *, type: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    """Anthropic's error envelope: ``{"type": "error", "error": {"type", "message"}}``."""
    kind = (
        type
        or _ERROR_TYPES.get(status)
        or ("api_error" if status >= 500 else "invalid_request_error")
    )
    body = {
        "type": "error",
        "error": {"type": kind, "message": message},
        "request_id": f"req_{random.getrandbits(96):024x}",
    }
    return json_response(body, status=status, headers=headers)


def _rfc3339(at: float | None) -> str | None:
    if at is None:
        return None
    return datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")


@dataclass(eq=False, slots=True)
class AnthropicBatch:
    id: str
    created: float
    requests: list[tuple[str, dict[str, Any]]]
    last_step_at: float
    status: str = "in_progress"
    cursor: int = 0
    lines: list[bytes] = field(default_factory=list)
    counts: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("succeeded", "errored", "canceled", "expired"), 0)
    )
    cancel_initiated_at: float | None = None
    ended_at: float | None = None


class AnthropicBatches:
    """The Message Batches state: created ``in_progress``, run, then ``ended``."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.batches: dict[str, AnthropicBatch] = {}
        #: Prompt-cache prefixes seen, so a repeated system prompt reads from the cache.
        self.cache: set[str] = set()

    def create(self, requests: list[tuple[str, dict[str, Any]]]) -> AnthropicBatch:
        now = self.store.clock()
        batch = AnthropicBatch(
            id=f"msgbatch_{self.store.new_id('')}", created=now, requests=requests, last_step_at=now
        )
        self.batches[batch.id] = batch
        self.store.born[batch.id] = now
        return batch

    def get(self, batch_id: str) -> AnthropicBatch:
        try:
            batch = self.batches[batch_id]
        except KeyError:
            raise KeyError(f"no Anthropic batch {batch_id!r}") from None
        self.tick(batch)
        return batch

    def tick(self, batch: AnthropicBatch) -> None:
        """With ``step_seconds``, a batch ends one step after it began (or was cancelled)."""
        step = self.store.step_seconds
        due = step is not None and self.store.clock() - batch.last_step_at >= step
        if due and batch.status != "ended":
            self.finish(batch.id)

    def process(self, batch_id: str, n: int | None = None) -> None:
        batch = self.batches[batch_id]
        if batch.status == "ended":
            raise ValueError(f"batch {batch_id} has ended")
        target = len(batch.requests) if n is None else min(len(batch.requests), batch.cursor + n)
        while batch.cursor < target:
            custom_id, params = batch.requests[batch.cursor]
            batch.cursor += 1
            self._run(batch, custom_id, params)

    def advance(self, batch_id: str) -> str:
        """One step: a batch here ends in one (see ``finish``)."""
        self.finish(batch_id)
        return self.batches[batch_id].status

    def finish(self, batch_id: str) -> None:
        """Finish the batch: a cancelled one cancels what had not run, others run it all."""
        batch = self.batches[batch_id]
        if batch.status == "ended":
            return
        if batch.status == "canceling":
            self._abandon(batch, "canceled")
        else:
            self.process(batch_id)
        self._close(batch)

    def expire(self, batch_id: str) -> None:
        """Its 24 hours are up: what had not run is ``expired``."""
        batch = self.batches[batch_id]
        if batch.status == "ended":
            raise ValueError(f"batch {batch_id} has already ended")
        self._abandon(batch, "expired")
        self._close(batch)

    def cancel(self, batch_id: str) -> AnthropicBatch:
        batch = self.get(batch_id)
        if batch.status == "in_progress":
            batch.status = "canceling"
            batch.cancel_initiated_at = self.store.clock()
            batch.last_step_at = self.store.clock()
        return batch

    def obj(self, batch: AnthropicBatch, base: str) -> dict[str, Any]:
        ended = batch.status == "ended"
        processing = 0 if ended else len(batch.requests)
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": batch.status,
            "request_counts": {"processing": processing}
            | (batch.counts if ended else dict.fromkeys(batch.counts, 0)),
            "created_at": _rfc3339(batch.created),
            "expires_at": _rfc3339(batch.created + EXPIRY_SECONDS),
            "ended_at": _rfc3339(batch.ended_at),
            "cancel_initiated_at": _rfc3339(batch.cancel_initiated_at),
            "archived_at": None,
            "results_url": f"{base}{PREFIX}/batches/{batch.id}/results" if ended else None,
        }

    def _run(self, batch: AnthropicBatch, custom_id: str, params: dict[str, Any]) -> None:
        if custom_id in self.store.dropped:
            return
        failure = self.store.failures.get(custom_id)
        try:
            if failure is not None:
                raise fake_model.ModelError(failure.message, status=failure.status, type="")
            message = fake_model.message(params, self.cache)
        except fake_model.ModelError as exc:
            error = {
                "type": "error",
                "error": {
                    "type": _ERROR_TYPES.get(exc.status, "invalid_request_error"),
                    "message": exc.message,
                },
                "request_id": self.store.new_id("req_"),
            }
            self._line(batch, custom_id, {"type": "errored", "error": error})
            return
        self._line(batch, custom_id, {"type": "succeeded", "message": message})

    def _abandon(self, batch: AnthropicBatch, kind: str) -> None:
        for custom_id, _ in batch.requests[batch.cursor :]:
            if custom_id not in self.store.dropped:
                self._line(batch, custom_id, {"type": kind})
        batch.cursor = len(batch.requests)

    def _line(self, batch: AnthropicBatch, custom_id: str, result: dict[str, Any]) -> None:
        batch.counts[result["type"]] += 1
        batch.lines.append(orjson.dumps({"custom_id": custom_id, "result": result}))

    def _close(self, batch: AnthropicBatch) -> None:
        # Results come in no particular order, as Anthropic's do.
        random.Random(f"{self.store.seed}:{batch.id}").shuffle(batch.lines)
        batch.status = "ended"
        batch.ended_at = self.store.clock()

    def results(self, batch_id: str) -> bytes | None:
        batch = self.batches.get(batch_id)
        if batch is None or batch.status != "ended":
            return None
        return b"".join(line + b"\n" for line in batch.lines)


class AnthropicRoutes:
    """The HTTP side: ``/v1/messages`` (live) and ``/v1/messages/batches``."""

    def __init__(self, batches: AnthropicBatches) -> None:
        self.batches = batches

    def add_to(self, app: web.Application) -> None:
        app.router.add_post(PREFIX, self.live)
        app.router.add_post(f"{PREFIX}/batches", self.create)
        app.router.add_get(f"{PREFIX}/batches", self.list)
        app.router.add_get(f"{PREFIX}/batches/{{batch_id}}", self.retrieve)
        app.router.add_delete(f"{PREFIX}/batches/{{batch_id}}", self.delete)
        app.router.add_post(f"{PREFIX}/batches/{{batch_id}}/cancel", self.cancel)

    @staticmethod
    def _base(request: web.Request) -> str:
        return f"{request.scheme}://{request.host}"

    async def json_response(self, request: web.Request) -> dict[str, Any] | web.Response:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError as exc:
            return anthropic_error(400, f"The request body is not valid JSON: {exc}")
        if not isinstance(body, dict):
            return anthropic_error(400, "The request body must be a JSON object.")
        return body

    def _found(self, batch_id: str) -> Any:
        if batch_id not in self.batches.batches:
            return anthropic_error(404, f"No batch found with id {batch_id!r}.")
        return self.batches.get(batch_id)

    async def live(self, request: web.Request) -> web.StreamResponse:
        body = await self.json_response(request)
        if isinstance(body, web.Response):
            return body
        try:
            message = fake_model.message(body, self.batches.cache)
        except fake_model.ModelError as exc:
            return anthropic_error(exc.status, exc.message)
        return json_response(message)

    async def create(self, request: web.Request) -> web.StreamResponse:
        if (request.content_length or 0) > MAX_BYTES:
            return anthropic_error(413, "Request exceeds the maximum size of 256 MB.")
        body = await self.json_response(request)
        if isinstance(body, web.Response):
            return body
        items = body.get("requests")
        if not isinstance(items, list) or not items:
            return anthropic_error(400, "requests: Field required (a non-empty list)")
        if len(items) > MAX_REQUESTS:
            return anthropic_error(400, f"requests: at most {MAX_REQUESTS} requests per batch")
        requests: list[tuple[str, dict[str, Any]]] = []
        seen: set[str] = set()
        for i, item in enumerate(items):
            custom_id = item.get("custom_id") if isinstance(item, dict) else None
            params = item.get("params") if isinstance(item, dict) else None
            if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= 64:
                return anthropic_error(400, f"requests.{i}.custom_id: 1 to 64 characters")
            if custom_id in seen:
                return anthropic_error(400, f"requests.{i}.custom_id: {custom_id!r} is repeated")
            if not isinstance(params, dict):
                return anthropic_error(400, f"requests.{i}.params: Field required")
            if params.get("stream"):
                return anthropic_error(400, f"requests.{i}.params.stream: not allowed in a batch")
            seen.add(custom_id)
            requests.append((custom_id, params))
        batch = self.batches.create(requests)
        return json_response(self.batches.obj(batch, self._base(request)))

    async def retrieve(self, request: web.Request) -> web.StreamResponse:
        found = self._found(request.match_info["batch_id"])
        if isinstance(found, web.Response):
            return found
        return json_response(self.batches.obj(found, self._base(request)))

    async def list(self, request: web.Request) -> web.StreamResponse:
        try:
            limit = int(request.query.get("limit", "20"))
        except ValueError:
            return anthropic_error(400, "limit: an integer from 1 to 1000")
        if not 1 <= limit <= 1000:
            return anthropic_error(400, "limit: an integer from 1 to 1000")
        newest_first = sorted(
            self.batches.batches.values(), key=lambda b: (b.created, b.id), reverse=True
        )
        ids = [b.id for b in newest_first]
        start = 0
        after = request.query.get("after_id")
        if after is not None:
            if after not in ids:
                return anthropic_error(400, f"after_id: no batch {after!r}")
            start = ids.index(after) + 1
        chunk = newest_first[start : start + limit]
        for batch in chunk:
            self.batches.tick(batch)
        data = [self.batches.obj(b, self._base(request)) for b in chunk]
        return json_response(
            {
                "data": data,
                "has_more": start + limit < len(ids),
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
        )

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        found = self._found(request.match_info["batch_id"])
        if isinstance(found, web.Response):
            return found
        if found.status == "ended":
            return anthropic_error(409, f"Batch {found.id} has ended and cannot be canceled.")
        return json_response(self.batches.obj(self.batches.cancel(found.id), self._base(request)))

    async def delete(self, request: web.Request) -> web.StreamResponse:
        found = self._found(request.match_info["batch_id"])
        if isinstance(found, web.Response):
            return found
        if found.status != "ended":
            return anthropic_error(400, "A batch can be deleted only once it has ended.")
        del self.batches.batches[found.id]
        return json_response({"id": found.id, "type": "message_batch_deleted"})
