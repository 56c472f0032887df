"""Transport faults the emulator can be scripted with, and the per-request decisions they lead to.

:class:`Faults` holds the rules; the aiohttp middleware in ``_http`` asks it what to do with each
request. :class:`FaultScripting` is the public face, mixed into ``Emulator``. Every random choice
comes from one generator seeded by the emulator's ``seed``, so a scripted run repeats.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from ._state import TERMINAL

__all__ = [
    "API_PREFIX",
    "CONTENT_PATH",
    "MAX_DELAY_SECONDS",
    "ConnectionDrop",
    "Delay",
    "FaultScripting",
    "Faults",
    "HttpFault",
    "LostAnswer",
    "Rates",
    "RolledFault",
    "api_path",
]

API_PREFIX = "/v1"
#: Downloads: a file's content (OpenAI, Azure), a batch's results (Anthropic), a generated
#: file (Gemini).
CONTENT_PATH = re.compile(
    r"^(/openai(/v1)?)?/files/[^/]+/content$|^/messages/batches/[^/]+/results$"
    r"|^(/download)?/v1beta/files/[^/]+:download$"
)
# Long enough for any client timeout a test would script; short enough that a typo cannot hang CI.
MAX_DELAY_SECONDS = 60.0
SERVER_ERRORS = (500, 502, 503)
_OBJECT_PATH = re.compile(r"^/(files|batches)/([^/]+)(?:/content)?$")
_KINDS = {"files": "File", "batches": "Batch"}


def api_path(path: str) -> str:
    # Accept "/v1/files" as well as "/files": both spellings appear in tests and SDK docs.
    if path == API_PREFIX or path.startswith(API_PREFIX + "/"):
        return path[len(API_PREFIX) :]
    return path


@dataclass(slots=True)
class HttpFault:
    method: str
    path: str
    times: int | None
    status: int
    body: dict[str, object] | None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class ConnectionDrop:
    method: str
    path: str
    times: int | None
    after_bytes: int


@dataclass(slots=True)
class Delay:
    method: str
    path: str
    times: int | None
    seconds: float


@dataclass(slots=True)
class LostAnswer:
    method: str
    path: str
    times: int | None


@dataclass(frozen=True, slots=True)
class Rates:
    rate_limited: float
    server_errors: float
    retry_after: float
    paths: tuple[str, ...] | None

    def covers(self, path: str) -> bool:
        return self.paths is None or any(path.startswith(p) for p in self.paths)


@dataclass(frozen=True, slots=True)
class RolledFault:
    status: int
    headers: dict[str, str]


class _Rule(Protocol):
    method: str
    path: str
    times: int | None


_R = TypeVar("_R", bound=_Rule)


def _take(rules: list[_R], method: str, path: str) -> _R | None:
    """The first rule matching this request, used once (and dropped when used up)."""
    for rule in rules:
        if rule.method in ("*", method) and path.startswith(rule.path):
            if rule.times is not None:
                rule.times -= 1
                if rule.times <= 0:
                    rules.remove(rule)
            return rule
    return None


def _times(times: int | None) -> int | None:
    if times is not None and times < 1:
        raise ValueError("times must be at least 1 (or None for every matching request)")
    return times


class Faults:
    """The scripted faults of one emulator and the server behaviours tests may switch off."""

    def __init__(self, *, seed: int = 0, ranges: bool = True) -> None:
        self.http: list[HttpFault] = []
        self.drops: list[ConnectionDrop] = []
        self.delays: list[Delay] = []
        self.lost: list[LostAnswer] = []
        self.rates: Rates | None = None
        self.unseen_seconds = 0.0
        self.output_delay = 0
        self.output_delays: dict[str, int] = {}
        self.ranges = ranges
        # Apart from the store's generator, so faults never shift ids or result order.
        self._rng = random.Random(f"{seed}:faults")

    def clear(self) -> None:
        self.http.clear()
        self.drops.clear()
        self.delays.clear()
        self.lost.clear()
        self.rates = None
        self.unseen_seconds = 0.0
        self.output_delay = 0
        self.output_delays.clear()

    def take_http(self, method: str, path: str) -> HttpFault | None:
        return _take(self.http, method, path)

    def take_drop(self, method: str, path: str) -> ConnectionDrop | None:
        return _take(self.drops, method, path)

    def take_delay(self, method: str, path: str) -> float:
        rule = _take(self.delays, method, path)
        return 0.0 if rule is None else rule.seconds

    def take_lost(self, method: str, path: str) -> bool:
        return _take(self.lost, method, path) is not None

    def roll(self, path: str) -> RolledFault | None:
        """A random 429 or 5xx for this request, as often as :meth:`FaultScripting.fault_rates`
        says."""
        rates = self.rates
        if rates is None or not rates.covers(path):
            return None
        draw = self._rng.random()
        # Both spellings, as OpenAI sends them; clients read whichever they know.
        wait = {
            "Retry-After": str(math.ceil(rates.retry_after)),
            "retry-after-ms": str(round(rates.retry_after * 1000)),
        }
        if draw < rates.rate_limited:
            return RolledFault(429, wait)
        if draw < rates.rate_limited + rates.server_errors:
            status = self._rng.choice(SERVER_ERRORS)
            headers = {"x-should-retry": "true"}
            if status == 503:
                headers |= wait
            return RolledFault(status, headers)
        return None

    def unseen(
        self, method: str, path: str, born: Callable[[str], float | None], now: float
    ) -> tuple[str, str] | None:
        """(kind, id) when this GET is for a file or batch created too recently to be seen."""
        if self.unseen_seconds <= 0 or method not in ("GET", "HEAD"):
            return None
        match = _OBJECT_PATH.match(path)
        if match is None:
            return None
        object_id = match.group(2)
        created = born(object_id)
        if created is None or now - created >= self.unseen_seconds:
            return None
        return _KINDS[match.group(1)], object_id

    def batch_view(self, batch_id: str, obj: dict[str, Any]) -> dict[str, Any]:
        """The batch object one retrieve returns: result file ids withheld while a
        :meth:`FaultScripting.delay_output_file` countdown runs."""
        if obj["status"] not in TERMINAL:
            return obj
        if obj.get("output_file_id") is None and obj.get("error_file_id") is None:
            return obj
        left = self.output_delays.get(batch_id, self.output_delay)
        if left <= 0:
            return obj
        self.output_delays[batch_id] = left - 1
        return {**obj, "output_file_id": None, "error_file_id": None}


class FaultScripting:
    """The transport fault scripting methods of ``Emulator``.

    ``path`` arguments are prefixes of the path after ``/v1`` (``"/v1/..."`` is accepted too) and
    ``method`` may be ``"*"``. ``times=None`` means every matching request until
    :meth:`clear_faults`.
    """

    _faults: Faults

    def fail_http(
        self,
        method: str,
        path: str,
        status: int,
        *,
        times: int | None = 1,
        body: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """The next ``times`` matching requests get ``status`` instead of being served."""
        self._faults.http.append(
            HttpFault(
                method.upper(), api_path(path), _times(times), status, body, dict(headers or {})
            )
        )

    def drop_connection(
        self, method: str, path: str, *, times: int | None = 1, after_bytes: int = 0
    ) -> None:
        """The next ``times`` matching requests have their connection closed unanswered.

        For ``GET /files/{id}/content`` the status line, headers (with the full Content-Length)
        and ``after_bytes`` bytes of the body go out first, so clients see a truncated payload.
        ``after_bytes`` counts from the start of the body sent: for a ``Range`` request, from the
        range's first byte, so ``times=3`` drops a download resumed each time three times.
        """
        if after_bytes < 0:
            raise ValueError("after_bytes must not be negative")
        self._faults.drops.append(
            ConnectionDrop(method.upper(), api_path(path), _times(times), after_bytes)
        )

    def fault_rates(
        self,
        *,
        rate_limited: float = 0.0,
        server_errors: float = 0.0,
        retry_after: float = 1.0,
        paths: Iterable[str] | None = None,
    ) -> None:
        """Answer a random fraction of requests with errors instead of serving them.

        ``rate_limited`` of them get 429 with ``Retry-After`` (whole seconds) and
        ``retry-after-ms`` headers; ``server_errors`` get 500, 502 or 503 with
        ``x-should-retry: true`` (a 503 also with the Retry-After headers). Only requests whose
        path starts with one of ``paths`` are affected (all when None). Draws come from a
        generator seeded by the emulator's ``seed``: the same requests in the same order meet
        the same faults. Call again to change the rates; all zero turns them off.
        """
        if not (0 <= rate_limited <= 1 and 0 <= server_errors <= 1):
            raise ValueError("rates are fractions between 0 and 1")
        if rate_limited + server_errors > 1:
            raise ValueError("rate_limited + server_errors must be at most 1")
        if not 0 <= retry_after <= MAX_DELAY_SECONDS:
            raise ValueError(f"retry_after must be between 0 and {MAX_DELAY_SECONDS:g} seconds")
        chosen = None if paths is None else tuple(api_path(p) for p in paths)
        active = rate_limited > 0 or server_errors > 0
        self._faults.rates = (
            Rates(rate_limited, server_errors, retry_after, chosen) if active else None
        )

    def slow(self, method: str, path: str, seconds: float, *, times: int | None = 1) -> None:
        """The next ``times`` matching requests are answered ``seconds`` late (whatever the answer).

        The request is served at once and its answer held back, so a client that times out
        meanwhile has still had the work done; a download's headers and body start late. At most
        a minute, so a mistake cannot hang a test run.
        """
        if not 0 <= seconds <= MAX_DELAY_SECONDS:
            raise ValueError(f"seconds must be between 0 and {MAX_DELAY_SECONDS:g}")
        self._faults.delays.append(Delay(method.upper(), api_path(path), _times(times), seconds))

    def lose_answer(self, method: str, path: str, *, times: int | None = 1) -> None:
        """The next ``times`` matching requests are served, then their connection is closed
        before the answer goes out.

        The work is done (a file stored, a batch created, a cancel applied): this is the
        timeout that hides a success, the case a client must not answer by doing it twice.
        """
        self._faults.lost.append(LostAnswer(method.upper(), api_path(path), _times(times)))

    def early_not_found(self, seconds: float) -> None:
        """For ``seconds`` of the emulator's clock after a file or batch is created, GETs of it
        (``/files/{id}``, ``/files/{id}/content``, ``/batches/{id}``) answer 404.

        OpenAI's storage is eventually consistent: an id just returned may not be readable yet.
        Applies to result files too, counted from when the batch ended. 0 turns it off.
        """
        if seconds < 0:
            raise ValueError("seconds must not be negative")
        self._faults.unseen_seconds = seconds

    def delay_output_file(self, batch_id: str | None = None, *, polls: int = 1) -> None:
        """A batch that has ended reports ``output_file_id`` and ``error_file_id`` as null for
        its next ``polls`` retrieves (``GET /batches/{id}``), then the ids.

        The status and request counts are already final, as when OpenAI marks a batch completed
        before its files are attached. With ``batch_id`` None every batch gets its own countdown,
        starting at the first retrieve that sees it ended. ``polls=0`` turns it off.
        """
        if polls < 0:
            raise ValueError("polls must not be negative")
        if batch_id is None:
            self._faults.output_delay = polls
        else:
            self._faults.output_delays[batch_id] = polls

    @property
    def ranges(self) -> bool:
        """Whether ``GET /files/{id}/content`` honours ``Range: bytes=...`` (206, or 416).

        Settable, and ``ranges=`` in the constructor: off, every download is a whole 200 with no
        ``Accept-Ranges``, so clients that resume with ``Range`` must restart instead.
        """
        return self._faults.ranges

    @ranges.setter
    def ranges(self, enabled: bool) -> None:
        self._faults.ranges = enabled

    def clear_faults(self) -> None:
        """Forget every scripted transport fault (what this class sets); ``ranges`` is kept."""
        self._faults.clear()
