"""Google's Gemini Developer API batch mode, over the emulator's clock, scripts and fake model.

Served at the emulator's root (``Emulator.gemini_base_url``) under ``/v1beta``, the version the
reference documents (OpenAI's routes hold ``/v1`` here): the resumable Files upload
(``/upload/v1beta/files``), files and their download, ``models/{model}:batchGenerateContent``
(inline requests or a JSONL file), ``:asyncBatchEmbedContent``, and batches as long-running
operations. Proto3 JSON conventions: camelCase, int64 counts as strings, fields at their
default left out. Auth by ``x-goog-api-key`` (or ``?key=``); an upload's chunks by their
``upload_id``. Errors in Google's envelope ``{"error": {"code", "message", "status"}}``.
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

__all__ = ["GeminiBatches", "GeminiRoutes", "google_error", "is_gemini"]

VERSIONS = ("/v1beta",)
_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
_METADATA_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"
_OUTPUT_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput"


def is_gemini(request: web.Request) -> bool:
    return request.path.startswith(("/v1beta/", "/upload/", "/download/"))


def google_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    code = _STATUS.get(status, "INTERNAL" if status >= 500 else "FAILED_PRECONDITION")
    body = {"error": {"code": status, "message": message, "status": code}}
    return json_response(body, status=status, headers=headers)


def _time(at: float | None) -> str | None:
    if at is None:
        return None
    return datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")


def _pick(body: dict[str, Any], camel: str, snake: str) -> Any:
    """Requests may spell fields in camelCase or snake_case; both are accepted."""
    return body.get(camel, body.get(snake))


@dataclass(eq=False, slots=True)
class GeminiFile:
    name: str
    display_name: str
    content: bytes
    created: float
    source: str = "UPLOADED"

    def obj(self, base: str) -> dict[str, Any]:
        made = {
            "name": self.name,
            "displayName": self.display_name,
            "mimeType": "application/jsonl",
            "sizeBytes": str(len(self.content)),
            "createTime": _time(self.created),
            "updateTime": _time(self.created),
            "expirationTime": _time(self.created + 48 * 3600),
            "uri": f"{base}/v1beta/{self.name}",
            "state": "ACTIVE",
            "source": self.source,
        }
        if self.source == "GENERATED":
            made["downloadUri"] = f"{base}/download/v1beta/{self.name}:download?alt=media"
        return made


@dataclass(eq=False, slots=True)
class GeminiBatch:
    name: str
    model: str
    display_name: str
    kind: str  # "generate" or "embed"
    created: float
    last_step_at: float
    requests: list[tuple[str, dict[str, Any]]]
    input_file: str | None
    state: str = "BATCH_STATE_PENDING"
    cursor: int = 0
    results: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {"successful": 0, "failed": 0})
    ended: float | None = None
    output_file: str | None = None


class GeminiBatches:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.files: dict[str, GeminiFile] = {}
        self.uploads: dict[str, tuple[str, bytearray, int]] = {}
        self.batches: dict[str, GeminiBatch] = {}

    def get(self, name: str) -> GeminiBatch:
        batch = self.batches[name]
        step = self.store.step_seconds
        if (
            step is not None
            and batch.ended is None
            and self.store.clock() - batch.last_step_at >= step
        ):
            self.advance(name)
        return batch

    def advance(self, name: str) -> str:
        batch = self.batches[name]
        if batch.state == "BATCH_STATE_PENDING":
            batch.state = "BATCH_STATE_RUNNING"
        elif batch.state == "BATCH_STATE_RUNNING":
            self.process(name)
            self._close(batch, "BATCH_STATE_SUCCEEDED")
        batch.last_step_at = self.store.clock()
        return batch.state

    def finish(self, name: str) -> None:
        while self.batches[name].ended is None:
            self.advance(name)

    def process(self, name: str, n: int | None = None) -> None:
        batch = self.batches[name]
        if batch.state == "BATCH_STATE_PENDING":
            batch.state = "BATCH_STATE_RUNNING"
        stop = len(batch.requests) if n is None else min(len(batch.requests), batch.cursor + n)
        while batch.cursor < stop:
            key, request = batch.requests[batch.cursor]
            batch.cursor += 1
            self._run(batch, key, request)

    def expire(self, name: str) -> None:
        """Not processed within its 48 h: what ran is kept, the rest never runs."""
        self._close(self.batches[name], "BATCH_STATE_EXPIRED")

    def cancel(self, name: str) -> None:
        batch = self.batches[name]
        if batch.ended is None:
            self._close(batch, "BATCH_STATE_CANCELLED")

    def _run(self, batch: GeminiBatch, key: str, request: dict[str, Any]) -> None:
        if key in self.store.dropped:
            return
        failure = self.store.failures.get(key)
        try:
            if failure is not None:
                raise fake_model.ModelError(failure.message, status=failure.status)
            if batch.kind == "embed":
                answer = fake_model.gemini_embedding(request)
            else:
                answer = fake_model.gemini_content(request, batch.model)
        except fake_model.ModelError as exc:
            batch.results.append((key, {"error": {"code": exc.status, "message": exc.message}}))
            batch.counts["failed"] += 1
            return
        batch.results.append((key, {"response": answer}))
        batch.counts["successful"] += 1

    def _close(self, batch: GeminiBatch, state: str) -> None:
        batch.state = state
        batch.ended = self.store.clock()
        if batch.input_file is not None and batch.results:
            # Lines in input order, but with keys in varying order, as in real output.
            lines = []
            for key, result in batch.results:
                pairs = [("key", key), *result.items()]
                random.Random(f"{self.store.seed}:{key}").shuffle(pairs)
                lines.append(orjson.dumps(dict(pairs)) + b"\n")
            name = f"files/batch-{batch.name.removeprefix('batches/')}"
            self.files[name] = GeminiFile(
                name, name, b"".join(lines), self.store.clock(), source="GENERATED"
            )
            batch.output_file = name

    def operation(self, batch: GeminiBatch) -> dict[str, Any]:
        stats = {"requestCount": str(len(batch.requests))}
        pending = len(batch.requests) - batch.cursor
        if pending and batch.ended is None:
            stats["pendingRequestCount"] = str(pending)
        if batch.counts["successful"]:
            stats["successfulRequestCount"] = str(batch.counts["successful"])
        if batch.counts["failed"]:
            stats["failedRequestCount"] = str(batch.counts["failed"])
        metadata: dict[str, Any] = {
            "@type": _METADATA_TYPE,
            "model": batch.model,
            "displayName": batch.display_name,
            "createTime": _time(batch.created),
            "updateTime": _time(batch.ended or batch.last_step_at),
            "batchStats": stats,
            "state": batch.state,
            "name": batch.name,
        }
        if batch.input_file is not None:
            metadata["inputConfig"] = {"fileName": batch.input_file}
        op: dict[str, Any] = {"name": batch.name, "metadata": metadata}
        if batch.ended is None:
            return op
        metadata["endTime"] = _time(batch.ended)
        op["done"] = True
        output: dict[str, Any] | None = None
        if batch.output_file is not None:
            output = {"responsesFile": batch.output_file}
        elif batch.input_file is None and batch.results:
            inlined = [{**result, "metadata": {"key": key}} for key, result in batch.results]
            output = {"inlinedResponses": {"inlinedResponses": inlined}}
        if output is not None:
            metadata["output"] = output
        if batch.state == "BATCH_STATE_SUCCEEDED":
            op["response"] = {"@type": _OUTPUT_TYPE, **(output or {})}
        elif batch.state == "BATCH_STATE_CANCELLED":
            op["error"] = {"code": 1, "message": "The batch was cancelled."}
        elif batch.state == "BATCH_STATE_EXPIRED":
            op["error"] = {"code": 4, "message": "The batch was not processed within 48 hours."}
        return op


class GeminiRoutes:
    def __init__(self, batches: GeminiBatches, api_key: str) -> None:
        self.batches = batches
        self.api_key = api_key

    def add_to(self, app: web.Application) -> None:
        for v in VERSIONS:
            app.router.add_post(f"/upload{v}/files", self.upload)
            app.router.add_get(f"{v}/files", self.list_files)
            app.router.add_get(f"{v}/files/{{id:[^/:]+}}", self.get_file)
            app.router.add_delete(f"{v}/files/{{id:[^/:]+}}", self.delete_file)
            app.router.add_post(f"{v}/models/{{model:[^/:]+}}:batchGenerateContent", self.create)
            app.router.add_post(f"{v}/models/{{model:[^/:]+}}:asyncBatchEmbedContent", self.create)
            app.router.add_post(f"{v}/models/{{model:[^/:]+}}:generateContent", self.live)
            app.router.add_get(f"{v}/batches", self.list_batches)
            app.router.add_get(f"{v}/batches/{{id:[^/:]+}}", self.get_batch)
            app.router.add_delete(f"{v}/batches/{{id:[^/:]+}}", self.delete_batch)
            app.router.add_post(f"{v}/batches/{{id:[^/:]+}}:cancel", self.cancel)

    def authorised(self, request: web.Request) -> bool:
        if request.path.startswith("/upload/") and request.query.get("upload_id"):
            return request.query["upload_id"] in self.batches.uploads
        key = request.headers.get("x-goog-api-key") or request.query.get("key")
        return key == self.api_key

    @staticmethod
    def _base(request: web.Request) -> str:
        return f"{request.scheme}://{request.host}"

    async def json_response(self, request: web.Request) -> dict[str, Any] | web.Response:
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw else {}
        except orjson.JSONDecodeError as exc:
            return google_error(400, f"Invalid JSON payload received. {exc}")
        return body if isinstance(body, dict) else google_error(400, "Expected a JSON object.")

    # ---- files

    async def upload(self, request: web.Request) -> web.StreamResponse:
        command = request.headers.get("X-Goog-Upload-Command", "").replace(" ", "")
        upload_id = request.query.get("upload_id")
        store = self.batches
        if command == "start":
            body = await self.json_response(request)
            if isinstance(body, web.Response):
                return body
            given = body.get("file")
            meta: dict[str, Any] = given if isinstance(given, dict) else {}
            display = str(_pick(meta, "displayName", "display_name") or "")
            try:
                size = int(request.headers.get("X-Goog-Upload-Header-Content-Length", "-1"))
            except ValueError:
                size = -1
            upload = store.store.new_id("")
            store.uploads[upload] = (display, bytearray(), size)
            url = (
                f"{self._base(request)}{request.path}?upload_id={upload}&upload_protocol=resumable"
            )
            return web.Response(
                status=200,
                headers={
                    "x-goog-upload-url": url,
                    "x-goog-upload-status": "active",
                    "x-goog-upload-chunk-granularity": str(8 * 1024 * 1024),
                },
            )
        if upload_id not in store.uploads or command not in ("upload", "upload,finalize"):
            return google_error(400, "Unknown upload, or a command that is not upload.")
        display, received, size = store.uploads[upload_id]
        offset = int(request.headers.get("X-Goog-Upload-Offset", "-1"))
        if offset != len(received):
            return google_error(
                400, f"Offset {offset} does not match the {len(received)} bytes received."
            )
        received += await request.read()
        if command == "upload":
            return web.Response(status=200, headers={"x-goog-upload-status": "active"})
        del store.uploads[upload_id]
        if size >= 0 and size != len(received):
            return google_error(400, f"Received {len(received)} bytes, {size} were declared.")
        name = f"files/{store.store.new_id('')[:16]}"
        store.files[name] = GeminiFile(name, display, bytes(received), store.store.clock())
        store.store.born[name] = store.store.clock()
        return json_response(
            {"file": store.files[name].obj(self._base(request))},
            headers={"x-goog-upload-status": "final"},
        )

    def _file(self, request: web.Request) -> GeminiFile | web.Response:
        name = f"files/{request.match_info['id']}"
        found = self.batches.files.get(name)
        return found or google_error(404, f"File {name} not found.")

    async def get_file(self, request: web.Request) -> web.StreamResponse:
        found = self._file(request)
        if isinstance(found, web.Response):
            return found
        return json_response(found.obj(self._base(request)))

    async def list_files(self, request: web.Request) -> web.StreamResponse:
        files = sorted(self.batches.files.values(), key=lambda f: f.created, reverse=True)
        return json_response({"files": [f.obj(self._base(request)) for f in files]})

    async def delete_file(self, request: web.Request) -> web.StreamResponse:
        found = self._file(request)
        if isinstance(found, web.Response):
            return found
        del self.batches.files[found.name]
        return json_response({})

    def downloadable(self, file_id: str) -> bytes | None:
        """A generated file's bytes (only those can be downloaded), else None."""
        found = self.batches.files.get(f"files/{file_id}")
        return found.content if found is not None and found.source == "GENERATED" else None

    # ---- batches

    async def create(self, request: web.Request) -> web.StreamResponse:
        body = await self.json_response(request)
        if isinstance(body, web.Response):
            return body
        batch = body.get("batch")
        if not isinstance(batch, dict):
            return google_error(400, "batch: required")
        picked = _pick(batch, "inputConfig", "input_config")
        config: dict[str, Any] = picked if isinstance(picked, dict) else {}
        file_name = _pick(config, "fileName", "file_name")
        requests: list[tuple[str, dict[str, Any]]] = []
        if file_name is not None:
            found = self.batches.files.get(str(file_name))
            if found is None:
                return google_error(404, f"File {file_name} not found.")
            for n, line in enumerate(found.content.splitlines(), 1):
                try:
                    item = orjson.loads(line)
                except orjson.JSONDecodeError:
                    return google_error(400, f"Line {n} of {file_name} is not valid JSON.")
                if not isinstance(item.get("request"), dict):
                    return google_error(400, f"Line {n} of {file_name}: request is required.")
                requests.append((str(item.get("key", n)), item["request"]))
        else:
            inline = (config.get("requests") or {}).get("requests")
            if not isinstance(inline, list) or not inline:
                return google_error(400, "inputConfig: give a fileName or requests.")
            for n, item in enumerate(inline):
                if not isinstance(item, dict) or not isinstance(item.get("request"), dict):
                    return google_error(400, f"requests[{n}].request: required")
                key = (item.get("metadata") or {}).get("key", str(n))
                requests.append((str(key), item["request"]))
        now = self.batches.store.clock()
        name = f"batches/{self.batches.store.new_id('')}"
        kind = "embed" if request.path.endswith(":asyncBatchEmbedContent") else "generate"
        made = GeminiBatch(
            name=name,
            model=f"models/{request.match_info['model']}",
            display_name=str(_pick(batch, "displayName", "display_name") or ""),
            kind=kind,
            created=now,
            last_step_at=now,
            requests=requests,
            input_file=str(file_name) if file_name is not None else None,
        )
        self.batches.batches[name] = made
        self.batches.store.born[name] = now
        return json_response(self.batches.operation(made))

    def _batch(self, request: web.Request) -> GeminiBatch | web.Response:
        name = f"batches/{request.match_info['id']}"
        if name not in self.batches.batches:
            return google_error(404, f"Batch {name} not found.")
        return self.batches.get(name)

    async def get_batch(self, request: web.Request) -> web.StreamResponse:
        found = self._batch(request)
        if isinstance(found, web.Response):
            return found
        return json_response(self.batches.operation(found))

    async def list_batches(self, request: web.Request) -> web.StreamResponse:
        try:
            size = int(request.query.get("pageSize", "50"))
            start = int(request.query.get("pageToken") or 0)
        except ValueError:
            return google_error(400, "pageSize and pageToken must be numbers.")
        newest = sorted(self.batches.batches.values(), key=lambda b: b.created, reverse=True)
        chunk = newest[start : start + size]
        ops = []
        for batch in chunk:
            op = self.batches.operation(self.batches.get(batch.name))
            op["metadata"].pop("output", None)  # list entries carry no inlined responses
            op.pop("response", None)
            ops.append(op)
        page: dict[str, Any] = {"operations": ops}
        if start + size < len(newest):
            page["nextPageToken"] = str(start + size)
        return json_response(page)

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        found = self._batch(request)
        if isinstance(found, web.Response):
            return found
        self.batches.cancel(found.name)
        return json_response({})

    async def delete_batch(self, request: web.Request) -> web.StreamResponse:
        found = self._batch(request)
        if isinstance(found, web.Response):
            return found
        del self.batches.batches[found.name]
        return json_response({})

    async def live(self, request: web.Request) -> web.StreamResponse:
        body = await self.json_response(request)
        if isinstance(body, web.Response):
            return body
        try:
            answer = fake_model.gemini_content(body, f"models/{request.match_info['model']}")
        except fake_model.ModelError as exc:
            return google_error(exc.status, exc.message)
        return json_response(answer)
