"""aiohttp plumbing shared by providers: error mapping, retries, streamed bodies.

Every aiohttp error is translated here into ``batchinfer.errors`` with the cause chained, so the
rest of the package never sees a transport exception. Retries come from stamina: transient errors
are retried with capped, jittered backoff, and a 429's ``Retry-After`` is honoured.
"""

from __future__ import annotations

import email.utils
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp
import orjson
import stamina

from batchinfer.errors import (
    AuthenticationError,
    ClosedError,
    PermanentProviderError,
    ProviderError,
    ProviderRejectedError,
    ProviderUnavailableError,
    RateLimitedError,
    TransientProviderError,
)

logger = logging.getLogger(__name__)

_CHUNK = 256 * 1024
_MAX_RETRY_AFTER = 120.0


def retry_hook(exc: BaseException) -> bool | float:
    """stamina's backoff hook: how long to wait before retrying ``exc``, or whether to retry."""
    if isinstance(exc, RateLimitedError) and exc.retry_after is not None:
        return min(exc.retry_after, _MAX_RETRY_AFTER)
    return isinstance(exc, TransientProviderError)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from retry-after-ms or Retry-After (seconds or an HTTP date), if sane."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        seconds = _finite(ms)
        if seconds is not None:
            return max(seconds / 1000, 0.0)
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = _finite(value)
    if seconds is not None:
        return max(seconds, 0.0)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _finite(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _openai_error(parsed: Any) -> tuple[str | None, str | None]:
    """``{"error": {"message", "code" or "type"}}``, as OpenAI (and Anthropic) nest it."""
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        error = parsed["error"]
        code = error.get("code") or error.get("type")
        return _text_or_none(error.get("message")), _text_or_none(code)
    return None, None


def _openai_404_hint(url: str) -> str | None:
    # Most often a base_url without its /v1.
    return None if "/v1/" in url else "check the provider's base_url: OpenAI's ends in /v1"


def _text_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorDialect:
    """How one provider's error answers read: where the message and code are in the body,
    which header carries its request id, which codes no retry can fix, what a 404 hints."""

    read: Callable[[Any], tuple[str | None, str | None]] = _openai_error
    request_id_headers: tuple[str, ...] = ("x-request-id",)
    permanent_codes: frozenset[str] = frozenset({"insufficient_quota"})
    not_found_hint: Callable[[str], str | None] | None = _openai_404_hint
    #: Words of a 4xx answer that mean "not now" rather than "never" (a quota of queued
    #: work that frees as other batches finish): such an answer is retried as a 429 is.
    transient_words: tuple[str, ...] = ()


OPENAI_ERRORS = ErrorDialect()


def error_from_response(
    status: int,
    body: bytes,
    headers: Mapping[str, str],
    *,
    what: str,
    url: str | None = None,
    dialect: ErrorDialect = OPENAI_ERRORS,
) -> ProviderError:
    """Turn an HTTP error answer into the matching batchinfer error."""
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        parsed = None
    message, code = dialect.read(parsed)
    if not message:
        message = body[:200].decode("utf-8", "replace").strip() or "no message"
    request_id = next((headers[h] for h in dialect.request_id_headers if h in headers), None)
    text = f"{what} failed with HTTP {status}: {message}"
    if request_id:
        text += f" (request id {request_id})"
    if status == 404 and url is not None:
        text += f"; the URL called was {url}"
        hint = dialect.not_found_hint(url) if dialect.not_found_hint else None
        if hint:
            text += f" ({hint})"
    kwargs: dict[str, Any] = {"status": status, "code": code, "request_id": request_id}
    # A quota that is used up answers 429 too, but waiting will not refill it; the server may
    # also say outright that a retry is pointless.
    if code in dialect.permanent_codes or headers.get("x-should-retry") == "false":
        if status in (401, 403):
            return AuthenticationError(text + " (check the API key and its access)", **kwargs)
        return ProviderRejectedError(text, **kwargs)
    if status == 429 or any(w in text or w == code for w in dialect.transient_words):
        return RateLimitedError(text, retry_after=_retry_after(headers), **kwargs)
    if status in (401, 403):
        return AuthenticationError(text + " (check the API key and its access)", **kwargs)
    if status == 408 or status >= 500:
        return ProviderUnavailableError(text, **kwargs)
    return ProviderRejectedError(text, **kwargs)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


class HttpClient:
    """A base URL, auth headers and an aiohttp session (owned, or borrowed and left open)."""

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str],
        *,
        session: aiohttp.ClientSession | None = None,
        timeout: aiohttp.ClientTimeout | None = None,
        attempts: int = 5,
        retry_timeout: float = 120.0,
        verify_tls: bool = True,
        dialect: ErrorDialect = OPENAI_ERRORS,
        trusted_origins: tuple[str, ...] = (),
        query: Mapping[str, str] | None = None,
        auth: Callable[[], Awaitable[Mapping[str, str]]] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        #: Added to every URL built from a path (Azure's api-version).
        self._query = urlencode(dict(query or {}))
        #: Headers made afresh for each request (a bearer token that expires).
        self._auth = auth
        self.dialect = dialect
        #: Hosts an absolute URL from the provider (a results URL) may point at: the base
        #: URL's own, and these. Credentials are sent to no other.
        self._origins = {_origin(base_url), *map(_origin, trusted_origins)}
        #: Passed to every request, so it holds for a borrowed session too.
        self.ssl = verify_tls
        self._headers = dict(headers)
        self._session = session
        self._owns_session = session is None
        self._closed = False
        self._timeout = timeout or aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=300)
        self.attempts = attempts
        self.retry_timeout = retry_timeout

    def _session_or_new(self) -> aiohttp.ClientSession:
        if self._closed:
            raise ClosedError(
                "this provider was closed (aclose(), or the end of its BatchInfer); make a new one"
            )
        if self._session is None or (self._session.closed and self._owns_session):
            self._session = aiohttp.ClientSession(timeout=self._timeout)
            self._owns_session = True
        elif self._session.closed:
            raise ProviderUnavailableError(
                "the aiohttp.ClientSession given to the provider is closed; keep it open while "
                "BatchInfer is in use"
            )
        return self._session

    async def aclose(self) -> None:
        self._closed = True
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def headers(self, **extra: str) -> dict[str, str]:
        """The headers of one request: the fixed ones, fresh auth ones, then ``extra``."""
        made = dict(await self._auth()) if self._auth is not None else {}
        return {**self._headers, **made, **extra}

    def url(self, path: str) -> str:
        """A path under the base URL, or an absolute URL the provider gave (checked)."""
        if not path.startswith(("https://", "http://")):
            url = f"{self.base_url}/{path.lstrip('/')}"
            if self._query:
                url += ("&" if "?" in url else "?") + self._query
            return url
        if _origin(path) not in self._origins:
            raise PermanentProviderError(
                f"the provider pointed at {_origin(path)}, which is neither its base URL's "
                f"host ({_origin(self.base_url)}) nor a trusted one; its credentials are not "
                "sent there (add the host to the provider's trusted origins if it is right)"
            )
        return path

    async def request_json(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: Any = None,
        what: str,
        retry_on: Callable[[BaseException], bool | float] = retry_hook,
    ) -> dict[str, Any]:
        """One call returning a JSON object, retried while ``retry_on`` says so.

        ``data`` may be a factory, called once per attempt, for bodies that can be read once.
        """
        async for attempt in stamina.retry_context(
            on=retry_on, attempts=self.attempts, timeout=self.retry_timeout
        ):
            with attempt:
                payload = data() if callable(data) else data
                return await self._request_json_once(
                    method, path, json=json, data=payload, what=what
                )
        raise AssertionError("unreachable: stamina re-raises the last error")  # pragma: no cover

    async def exchange(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
        what: str,
    ) -> tuple[int, Mapping[str, str], bytes]:
        """One call, unretried: its status, headers and body; an error answer raised as ours.
        For protocols that answer in headers (a resumable upload's session URL)."""
        sent = await self.headers(**dict(headers or {}))
        body: Any = data
        if json is not None:
            body = orjson.dumps(json)
            sent["Content-Type"] = "application/json"
        try:
            async with self._session_or_new().request(
                method, self.url(path), data=body, headers=sent, ssl=self.ssl
            ) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise error_from_response(
                        resp.status,
                        raw,
                        resp.headers,
                        what=what,
                        url=str(resp.url),
                        dialect=self.dialect,
                    )
                return resp.status, resp.headers.copy(), raw
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise ProviderUnavailableError(f"{what} failed: {_describe(exc)}") from exc

    async def _request_json_once(
        self, method: str, path: str, *, json: Any, data: Any, what: str
    ) -> dict[str, Any]:
        status, _, raw = await self.exchange(method, path, json=json, data=data, what=what)
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise PermanentProviderError(
                f"{what} returned a body that is not JSON (HTTP {status})", status=status
            ) from exc
        if not isinstance(parsed, dict):
            raise PermanentProviderError(f"{what} returned JSON that is not an object")
        return parsed

    @asynccontextmanager
    async def stream(self, path: str, *, what: str) -> AsyncIterator[AsyncIterator[bytes]]:
        """Open a GET whose body is read chunk by chunk, resumed where it stopped if it drops.

        An error answer to the GET itself is raised here, unretried: no byte has been read, so
        trying again later loses nothing. Everything after is ``_mapped_chunks``'s.
        """
        url = self.url(path)
        # Offsets must mean the same bytes in every answer for a Range to resume the body, and a
        # compressed body's do not.
        headers = await self.headers(
            **{"Accept": "application/octet-stream", "Accept-Encoding": "identity"}
        )
        try:
            resp = await self._session_or_new().get(url, headers=headers, ssl=self.ssl)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise ProviderUnavailableError(f"{what} failed: {_describe(exc)}") from exc
        chunks = _mapped_chunks(self, url, headers, resp, what)
        try:
            if resp.status >= 400:
                try:
                    raw = await resp.read()
                except (TimeoutError, aiohttp.ClientError) as exc:
                    raise ProviderUnavailableError(f"{what} failed: {_describe(exc)}") from exc
                raise error_from_response(
                    resp.status, raw, resp.headers, what=what, dialect=self.dialect
                )
            yield chunks
        finally:
            # Also when the caller stops early: the generator releases what it re-requested.
            await chunks.aclose()
            resp.release()


async def _mapped_chunks(
    client: HttpClient,
    url: str,
    headers: Mapping[str, str],
    first: aiohttp.ClientResponse,
    what: str,
) -> AsyncGenerator[bytes, None]:
    """The body of ``first``, continued from where it stopped should it stop early.

    A drop mid-body, or a body shorter than its Content-Length, is resumed with ``Range:
    bytes=<bytes yielded>-``. A 206 must start at that byte; a 200 (the server ignores Range) is
    read from the start with the bytes already yielded skipped. Either way the consumer sees one
    continuous stream with no byte twice. Up to ``client.attempts`` re-requests, with stamina's
    backoff and any Retry-After honoured; one chunk is held at a time.
    """
    encoded = first.headers.get("Content-Encoding", "identity").lower() not in ("", "identity")
    # A decoded body's length and offsets are not the wire's: then no check, and no Range.
    total = None if encoded else first.content_length
    use_range = not encoded
    received = 0
    wait: float | None = None

    def progress() -> str:
        return f"{received} bytes" if total is None else f"{received} of {total} bytes"

    async def body(resp: aiohttp.ClientResponse, skip: int) -> AsyncGenerator[bytes, None]:
        nonlocal received
        try:
            async for chunk in resp.content.iter_chunked(_CHUNK):
                if skip >= len(chunk):
                    skip -= len(chunk)
                    continue
                piece = chunk[skip:] if skip else chunk
                skip = 0
                received += len(piece)
                yield piece
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise ProviderUnavailableError(
                f"{what}: the connection dropped mid-download after {progress()} ({_describe(exc)})"
            ) from exc
        if skip or (total is not None and received < total):
            raise ProviderUnavailableError(
                f"{what}: the body ended early, after {progress()} (the connection dropped "
                "mid-download)"
            )

    async def reopen() -> tuple[aiohttp.ClientResponse, int]:
        """A request for the rest: the response, and how many of its bytes were yielded."""
        nonlocal use_range, wait
        wait = None
        again = dict(headers)
        if use_range and received:
            again["Range"] = f"bytes={received}-"
        doing = f"{what} (resuming after {progress()})"
        logger.info(
            "batchinfer.download_resuming %s",
            doing,
            extra={"batchinfer.event": "download_resuming", "batchinfer.received": received},
        )
        try:
            resp = await client._session_or_new().get(url, headers=again, ssl=client.ssl)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise ProviderUnavailableError(f"{doing} failed: {_describe(exc)}") from exc
        try:
            if resp.status >= 400:
                wait = _retry_after(resp.headers)
                raw = await resp.read()
                raise error_from_response(
                    resp.status, raw, resp.headers, what=doing, dialect=client.dialect
                )
            if resp.status != 206:
                if total is not None and resp.content_length not in (None, total):
                    raise PermanentProviderError(
                        f"{doing}: the file is now {resp.content_length} bytes; it changed"
                    )
                return resp, received
            stated = resp.headers.get("Content-Range", "")
            unit, _, span = stated.partition(" ")
            start, _, size = span.partition("/")
            if unit != "bytes" or start.partition("-")[0] != str(received):
                use_range = False
                raise ProviderUnavailableError(
                    f"{doing}: the server sent Content-Range {stated!r}; restarting without Range"
                )
            if total is not None and size not in ("*", str(total)):
                raise PermanentProviderError(f"{doing}: the file is now {size} bytes; it changed")
            return resp, 0
        except (TimeoutError, aiohttp.ClientError) as exc:
            resp.release()
            raise ProviderUnavailableError(f"{doing} failed: {_describe(exc)}") from exc
        except BaseException:
            resp.release()
            raise

    def retry_on(exc: BaseException) -> bool | float:
        # retry_hook reads Retry-After on a 429 only; a 503 may carry one too.
        if wait is not None and isinstance(exc, TransientProviderError):
            return min(wait, _MAX_RETRY_AFTER)
        return retry_hook(exc)

    chunks = body(first, 0)
    try:
        async for chunk in chunks:
            yield chunk
        return
    except ProviderUnavailableError:
        pass  # resumed below
    finally:
        await chunks.aclose()
        first.release()
    tries = 0
    try:
        # No timeout: the time the consumer spends on the chunks must not count against it.
        async for attempt in stamina.retry_context(
            on=retry_on, attempts=client.attempts, timeout=None
        ):
            with attempt:
                tries = attempt.num
                resp, skip = await reopen()
                chunks = body(resp, skip)
                try:
                    async for chunk in chunks:
                        yield chunk
                finally:
                    await chunks.aclose()
                    resp.release()
                return
    except TransientProviderError as exc:
        raise ProviderUnavailableError(
            f"{what}: the connection dropped mid-download and {tries} attempts to resume failed; "
            f"gave up after {progress()} (last: {exc})",
            status=exc.status,
            request_id=exc.request_id,
        ) from exc


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
