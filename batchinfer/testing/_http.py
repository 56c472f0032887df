"""The aiohttp application: OpenAI's Files, Batches and live inference routes over a Store."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from aiohttp import BodyPartReader, web

from . import fake_model
from ._anthropic import PREFIX as ANTHROPIC_PREFIX
from ._anthropic import AnthropicBatches, AnthropicRoutes, anthropic_error
from ._faults import API_PREFIX, CONTENT_PATH, Faults
from ._gemini import GeminiBatches, GeminiRoutes, google_error, is_gemini
from ._state import CancelConflict, Store, page
from ._wire import (
    Unsatisfiable,
    byte_range,
    close_connection,
    error_response,
    int_query,
    json_body,
    json_response,
    list_envelope,
    metadata_error,
    not_found,
    ttl_seconds,
)
from ._xai import PREFIX as XAI_PREFIX
from ._xai import XAIBatches, XAIRoutes, xai_error

__all__ = ["API_PREFIX", "Faults", "ReceivedRequest", "build_app"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CHUNK = 1 << 20
MIB = 1024 * 1024
# OpenAI's caps: 512 MB for any upload, 200 MB for batch input. Counted in MiB to stay lenient.
MAX_UPLOAD_BYTES = 512 * MIB
MAX_BATCH_INPUT_BYTES = 200 * MIB
UPLOAD_PURPOSES = frozenset({"assistants", "batch", "fine-tune", "vision", "user_data", "evals"})
DROP_GRACE_SECONDS = 0.02
_DROP_KEY = web.RequestKey("drop_after_bytes", int)
_LIVE_ROUTES = ("/chat/completions", "/responses", "/embeddings")
#: Azure OpenAI's paths: the v1 API, and the classic one (which needs ?api-version=).
AZURE_CLASSIC = "/openai"
AZURE_PREFIXES = ("/openai/v1", AZURE_CLASSIC)


def _is_azure(request: web.Request) -> bool:
    return request.path.startswith(AZURE_CLASSIC + "/")


def model_endpoint(request: web.Request) -> str:
    """The OpenAI endpoint a live call is for, whichever API's path it came by."""
    path = request.path
    for prefix in AZURE_PREFIXES:
        if path.startswith(prefix + "/"):
            path = path[len(prefix) :]
            break
    if path.startswith("/deployments/"):
        path = "/" + path.split("/", 3)[3]
    return path if path.startswith(API_PREFIX + "/") else API_PREFIX + path


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """One request as the emulator saw it, before any fault or check."""

    method: str
    path: str
    headers: Mapping[str, str]


_AZURE_DENIED = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide "
    "a valid key for an active subscription and use a correct regional API endpoint for your "
    "resource."
)


def _is_anthropic(request: web.Request) -> bool:
    """A request to Anthropic's API: by its path, or, on a path neither API has, its headers."""
    path = request.path
    return (
        path == ANTHROPIC_PREFIX
        or path.startswith(ANTHROPIC_PREFIX + "/")
        or "anthropic-version" in request.headers
    )


def wire_error(
    request: web.Request, status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    """An error in the envelope of the API the request was made to."""
    if request.path.startswith(XAI_PREFIX + "/"):
        return xai_error(status, message)
    if is_gemini(request):
        return google_error(status, message, headers)
    if _is_anthropic(request):
        return anthropic_error(status, message, headers=headers)
    return error_response(status, message, headers=headers)


def _subpath(request: web.Request) -> str:
    path = request.path
    return path[len(API_PREFIX) :] if path.startswith(API_PREFIX + "/") else path


class Api:
    def __init__(
        self,
        store: Store,
        faults: Faults,
        api_key: str,
        log: list[tuple[str, str]],
        received: list[ReceivedRequest],
        anthropic: AnthropicBatches,
        xai: XAIBatches,
        gemini: GeminiBatches,
    ) -> None:
        self.store = store
        self.gemini = GeminiRoutes(gemini, api_key)
        self.anthropic = anthropic
        self.xai = xai
        self.faults = faults
        self.api_key = api_key
        self.log = log
        self.received = received
        # Separate from the store's generator so polling does not shift batch and file ids.
        self._request_ids = random.Random(f"{store.seed}:request-ids")

    def app(self) -> web.Application:
        # Caps request.read() for JSON bodies; uploads stream through multipart and bypass it.
        app = web.Application(
            client_max_size=64 * MIB,
            middlewares=[self._record, self._envelope, self._faults, self._auth],
        )
        # OpenAI's paths, and Azure's (its v1 API, and the classic one with api-version).
        for v1 in (API_PREFIX, *AZURE_PREFIXES):
            app.router.add_post(f"{v1}/files", self.create_file)
            app.router.add_get(f"{v1}/files", self.list_files)
            app.router.add_get(f"{v1}/files/{{file_id}}", self.get_file)
            app.router.add_delete(f"{v1}/files/{{file_id}}", self.delete_file)
            app.router.add_get(f"{v1}/files/{{file_id}}/content", self.file_content)
            app.router.add_post(f"{v1}/batches", self.create_batch)
            app.router.add_get(f"{v1}/batches", self.list_batches)
            app.router.add_get(f"{v1}/batches/{{batch_id}}", self.get_batch)
            app.router.add_post(f"{v1}/batches/{{batch_id}}/cancel", self.cancel_batch)
            for route in _LIVE_ROUTES:
                app.router.add_post(f"{v1}{route}", self.live)
        for route in _LIVE_ROUTES:
            app.router.add_post(f"{AZURE_CLASSIC}/deployments/{{deployment}}{route}", self.live)
        AnthropicRoutes(self.anthropic).add_to(app)
        XAIRoutes(self.xai).add_to(app)
        self.gemini.add_to(app)
        for prefix in ("", "/download"):
            app.router.add_get(
                f"{prefix}/v1beta/files/{{file_id:[^/:]+}}:download", self.gemini_download
            )
        app.router.add_get(
            f"{ANTHROPIC_PREFIX}/batches/{{batch_id}}/results", self.anthropic_results
        )
        app.on_response_prepare.append(self._stamp_request_id)
        return app

    async def _stamp_request_id(self, request: web.Request, response: web.StreamResponse) -> None:
        # The SDKs surface the request id on errors and in logs, as with the real APIs.
        header = "request-id" if _is_anthropic(request) else "x-request-id"
        if _is_azure(request):
            header = "apim-request-id"
        response.headers.setdefault(header, f"req_{self._request_ids.getrandbits(96):024x}")

    # ---- middlewares

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.log.append((request.method, request.path))
        self.received.append(ReceivedRequest(request.method, request.path, request.headers))
        return await handler(request)

    @web.middleware
    async def _envelope(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # aiohttp's own 404/405/413 are text/plain; OpenAI clients expect the JSON error envelope.
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400 or exc.content_type == "application/json":
                raise
            return wire_error(request, exc.status, exc.reason)

    @web.middleware
    async def _faults(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        method, path = request.method, _subpath(request)
        delay = self.faults.take_delay(method, path)
        if not delay:
            return await self._faulted(request, handler, method, path)
        if method == "GET" and CONTENT_PATH.match(path):
            # A download is slow to start; its body cannot be held back once streamed.
            await asyncio.sleep(delay)
            return await self._faulted(request, handler, method, path)
        # Served first, answered late: a client that gives up meanwhile still had it done.
        response = await self._faulted(request, handler, method, path)
        await asyncio.sleep(delay)
        return response

    async def _faulted(
        self, request: web.Request, handler: Handler, method: str, path: str
    ) -> web.StreamResponse:
        faults = self.faults
        drop = faults.take_drop(method, path)
        if drop is not None:
            if method == "GET" and CONTENT_PATH.match(path):
                request[_DROP_KEY] = drop.after_bytes
                return await handler(request)
            close_connection(request)
            # The transport is closed, so aiohttp discards this response quietly.
            return web.Response(status=500)
        fault = faults.take_http(method, path)
        if fault is not None:
            if fault.body is not None:
                return json_response(fault.body, status=fault.status, headers=fault.headers)
            return wire_error(
                request, fault.status, f"Emulated HTTP {fault.status} error.", fault.headers
            )
        rolled = faults.roll(path)
        if rolled is not None:
            message = (
                "Rate limit reached (emulated)."
                if rolled.status == 429
                else f"Emulated HTTP {rolled.status} error."
            )
            return wire_error(request, rolled.status, message, rolled.headers)
        unseen = faults.unseen(method, path, self.store.born.get, self.store.clock())
        if unseen is not None:
            if _is_anthropic(request):
                return anthropic_error(404, f"No {unseen[0].lower()} found with id {unseen[1]!r}.")
            return not_found(*unseen)
        if faults.take_lost(method, path):
            # A download has no work to lose; anything else is served, then goes unanswered.
            response = (
                web.Response(status=500)
                if method == "GET" and CONTENT_PATH.match(path)
                else await handler(request)
            )
            close_connection(request)
            return response
        return await handler(request)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if is_gemini(request):
            if not self.gemini.authorised(request):
                return google_error(400, "API key not valid. Please pass a valid API key.")
            return await handler(request)
        if request.path.startswith(XAI_PREFIX + "/"):
            if request.headers.get("Authorization") != f"Bearer {self.api_key}":
                # xAI answers a wrong key with 400, not 401.
                return xai_error(400, "Incorrect API key provided. You can obtain an API key.")
            return await handler(request)
        if _is_anthropic(request):
            if (
                request.headers.get("x-api-key") != self.api_key
                and request.headers.get("Authorization") != f"Bearer {self.api_key}"
            ):
                return anthropic_error(401, "invalid x-api-key")
            if not request.headers.get("anthropic-version"):
                return anthropic_error(400, "anthropic-version: header is required")
            return await handler(request)
        if _is_azure(request):
            bearer = request.headers.get("Authorization") == f"Bearer {self.api_key}"
            if request.headers.get("api-key") != self.api_key and not bearer:
                return json_response(
                    {"error": {"code": "401", "message": _AZURE_DENIED}}, status=401
                )
            classic = not request.path.startswith(AZURE_PREFIXES[0] + "/")
            if classic and not request.query.get("api-version"):
                return error_response(
                    404, "Resource not found: the classic API needs ?api-version=", code="404"
                )
            return await handler(request)
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return error_response(
                401,
                "Incorrect API key provided.",
                type="invalid_request_error",
                code="invalid_api_key",
            )
        return await handler(request)

    # ---- files

    async def create_file(self, request: web.Request) -> web.StreamResponse:
        if not request.content_type.startswith("multipart/"):
            return error_response(400, "Uploads must be multipart/form-data.")
        reader = await request.multipart()
        fields: dict[str, str] = {}
        content: bytes | None = None
        filename = "file"
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                await part.release()
                continue
            if part.name == "file":
                filename = part.filename or filename
                chunks: list[bytes] = []
                size = 0
                while chunk := await part.read_chunk(CHUNK):
                    size += len(chunk)
                    if size > MAX_UPLOAD_BYTES:
                        return error_response(
                            413,
                            "File is larger than 512 MB.",
                            param="file",
                            code="file_too_large",
                        )
                    chunks.append(chunk)
                content = b"".join(chunks)
            elif part.name:
                fields[part.name] = await part.text()
        if content is None:
            return error_response(
                400,
                "Missing required parameter: 'file'.",
                param="file",
                code="missing_required_parameter",
            )
        purpose = fields.get("purpose")
        if purpose not in UPLOAD_PURPOSES:
            return error_response(
                400, f"Invalid purpose: {purpose!r}.", param="purpose", code="invalid_value"
            )
        if purpose == "batch" and len(content) > MAX_BATCH_INPUT_BYTES:
            return error_response(
                400,
                "Batch input files must be at most 200 MB.",
                param="file",
                code="file_too_large",
            )
        ttl: int | None = None
        if "expires_after[anchor]" in fields or "expires_after[seconds]" in fields:
            checked = ttl_seconds(
                fields.get("expires_after[anchor]"),
                fields.get("expires_after[seconds]"),
                "expires_after",
            )
            if isinstance(checked, web.Response):
                return checked
            ttl = checked
        record = self.store.add_file(content, filename=filename, purpose=purpose, ttl=ttl)
        return json_response(record.to_object(len(content)))

    async def list_files(self, request: web.Request) -> web.StreamResponse:
        limit = int_query(request, "limit", 10_000, 1, 10_000)
        purpose = request.query.get("purpose")
        objects = [self.store.file_object(file_id) for file_id in self.store.files]
        by_id = {
            str(obj["id"]): obj
            for obj in objects
            if obj is not None and (purpose is None or obj["purpose"] == purpose)
        }
        ids = list(by_id)
        if request.query.get("order", "desc") == "desc":
            ids.reverse()
        chunk, has_more = page(ids, request.query.get("after"), limit)
        return json_response(list_envelope([by_id[f] for f in chunk], has_more))

    async def get_file(self, request: web.Request) -> web.StreamResponse:
        file_id = request.match_info["file_id"]
        obj = self.store.file_object(file_id)
        if obj is None:
            return not_found("File", file_id)
        return json_response(obj)

    async def delete_file(self, request: web.Request) -> web.StreamResponse:
        file_id = request.match_info["file_id"]
        if not self.store.delete_file(file_id):
            return not_found("File", file_id)
        return json_response({"id": file_id, "object": "file", "deleted": True})

    async def file_content(self, request: web.Request) -> web.StreamResponse:
        file_id = request.match_info["file_id"]
        return await self._serve(request, self.store.files.get(file_id), ("File", file_id))

    async def anthropic_results(self, request: web.Request) -> web.StreamResponse:
        batch_id = request.match_info["batch_id"]
        content = self.anthropic.results(batch_id)
        if content is None and batch_id in self.anthropic.batches:
            return anthropic_error(400, f"Batch {batch_id} has not ended; results come after.")
        return await self._serve(request, content, ("Batch", batch_id))

    async def gemini_download(self, request: web.Request) -> web.StreamResponse:
        file_id = request.match_info["file_id"]
        content = self.gemini.downloadable(file_id)
        return await self._serve(request, content, ("File", f"files/{file_id}"))

    async def _serve(
        self, request: web.Request, content: bytes | None, what: tuple[str, str]
    ) -> web.StreamResponse:
        """A stored body, honouring Range and any scripted drop mid-body."""
        drop_after = request.get(_DROP_KEY)
        if content is None:
            if drop_after is not None:
                close_connection(request)
            if _is_anthropic(request):
                return anthropic_error(404, f"No {what[0].lower()} found with id {what[1]!r}.")
            if is_gemini(request):
                return google_error(404, f"{what[0]} {what[1]} not found or not downloadable.")
            return not_found(*what)
        size = len(content)
        start, end, status = 0, size, 200
        headers = {"Content-Type": "application/octet-stream"}
        if self.faults.ranges:
            headers["Accept-Ranges"] = "bytes"
            try:
                span = byte_range(request.headers.get("Range"), size)
            except Unsatisfiable:
                if drop_after is not None:
                    close_connection(request)
                return wire_error(
                    request,
                    416,
                    f"Range not satisfiable: the file has {size} bytes.",
                    {"Content-Range": f"bytes */{size}"},
                )
            if span is not None:
                start, end = span
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = end - start
        await response.prepare(request)
        # A drop counts bytes of this body, so a resumed download can be dropped again.
        stop = end if drop_after is None else min(start + drop_after, end)
        view = memoryview(content)
        for offset in range(start, stop, CHUNK):
            await response.write(view[offset : min(offset + CHUNK, stop)])
        if drop_after is not None:
            # aiohttp's client raises on a lost connection before handing over what it still
            # buffers; a moment's grace lets a prompt reader see exactly ``after_bytes``.
            await asyncio.sleep(DROP_GRACE_SECONDS)
            close_connection(request)
            return response
        await response.write_eof()
        return response

    # ---- batches

    async def create_batch(self, request: web.Request) -> web.StreamResponse:
        body = await json_body(request)
        if isinstance(body, web.Response):
            return body
        for name in ("input_file_id", "endpoint", "completion_window"):
            if not isinstance(body.get(name), str):
                return error_response(
                    400,
                    f"Missing required parameter: '{name}'.",
                    param=name,
                    code="missing_required_parameter",
                )
        endpoint = body["endpoint"]
        if _is_azure(request) and not endpoint.startswith(API_PREFIX + "/"):
            endpoint = API_PREFIX + endpoint  # Azure names it "/chat/completions"
        if endpoint not in fake_model.BATCH_ENDPOINTS:
            allowed = ", ".join(fake_model.BATCH_ENDPOINTS)
            return error_response(
                400,
                f"Invalid endpoint {endpoint!r}; expected one of {allowed}.",
                param="endpoint",
                code="invalid_value",
            )
        if body["completion_window"] != "24h":
            return error_response(
                400,
                "completion_window must be '24h'.",
                param="completion_window",
                code="invalid_value",
            )
        metadata = body.get("metadata")
        if metadata is not None and (problem := metadata_error(metadata)) is not None:
            return problem
        output_ttl: int | None = None
        expires_after = body.get("output_expires_after")
        if expires_after is not None:
            if not isinstance(expires_after, dict):
                return error_response(
                    400,
                    "output_expires_after must be an object.",
                    param="output_expires_after",
                    code="invalid_type",
                )
            checked = ttl_seconds(
                expires_after.get("anchor"), expires_after.get("seconds"), "output_expires_after"
            )
            if isinstance(checked, web.Response):
                return checked
            output_ttl = checked
        record = self.store.create_batch(
            input_file_id=body["input_file_id"],
            endpoint=endpoint,
            metadata=metadata,
            output_ttl=output_ttl,
        )
        return json_response(record.obj)

    async def list_batches(self, request: web.Request) -> web.StreamResponse:
        limit = int_query(request, "limit", 20, 1, 100)
        self.store.tick_all()
        ids = list(reversed(self.store.batches))
        chunk, has_more = page(ids, request.query.get("after"), limit)
        return json_response(list_envelope([self.store.batches[b] for b in chunk], has_more))

    async def get_batch(self, request: web.Request) -> web.StreamResponse:
        batch_id = request.match_info["batch_id"]
        record = self.store.records.get(batch_id)
        if record is None:
            return not_found("Batch", batch_id)
        self.store.tick(record)
        return json_response(self.faults.batch_view(batch_id, record.obj))

    async def cancel_batch(self, request: web.Request) -> web.StreamResponse:
        batch_id = request.match_info["batch_id"]
        if batch_id not in self.store.records:
            return not_found("Batch", batch_id)
        try:
            record = self.store.cancel(batch_id)
        except CancelConflict as exc:
            # Without this header the SDK retries a 409 twice before giving up.
            return error_response(409, str(exc), headers={"x-should-retry": "false"})
        return json_response(record.obj)

    # ---- live inference

    async def live(self, request: web.Request) -> web.StreamResponse:
        body = await json_body(request)
        if isinstance(body, web.Response):
            return body
        try:
            result = self.store.answer(model_endpoint(request), body, self.store.now())
        except fake_model.ModelError as exc:
            return json_response(exc.envelope(), status=exc.status)
        return json_response(result)


def build_app(
    store: Store,
    faults: Faults,
    api_key: str,
    log: list[tuple[str, str]],
    received: list[ReceivedRequest],
    anthropic: AnthropicBatches,
    xai: XAIBatches,
    gemini: GeminiBatches,
) -> web.Application:
    return Api(store, faults, api_key, log, received, anthropic, xai, gemini).app()
