"""What the HTTP providers share: their identity and settings, and readers of untrusted JSON."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any, Generic, TypeVar

import stamina

from batchinfer.domain import BatchLimits, JSONObject, ParsedResponse, SubmitKey
from batchinfer.providers.http import HttpClient, retry_hook
from batchinfer.validation import RequestRules

logger = logging.getLogger("batchinfer.providers")

INT4_MAX = 2**31 - 1
#: Failure texts are cut to this many characters where they are stored.
FAILURE_TEXT_LIMIT = 255

R = TypeVar("R", bound=RequestRules)
T = TypeVar("T")


def checked_api_key(api_key: object, *, provider: str, variable: str) -> str:
    """The key, stripped of the newline a file leaves; refused when empty or odd."""
    if not isinstance(api_key, str) or not api_key.strip():
        raise ValueError(f"{provider} needs an api_key (for example from {variable})")
    # Keys read from files often end in a newline; any other control character is a mistake.
    api_key = api_key.strip()
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in api_key):
        raise ValueError("the api_key contains a control character; check how it was read")
    return api_key


def warn_if_unverified(base_url: str, verify_tls: bool) -> None:
    if not verify_tls:
        logger.warning("batchinfer.tls_unverified: certificates of %s are not checked", base_url)


class HttpProvider(Generic[R]):
    """A provider's name, whose prices apply, its batch discount and request rules, and the
    HTTP client it owns (which borrows a session it was given, and never closes that)."""

    def __init__(
        self,
        *,
        http: HttpClient,
        name: str,
        pricing_id: str,
        batch_discount: Decimal | float | str,
        rules: R,
    ) -> None:
        self._http = http
        self._name = name
        self._pricing_id = pricing_id
        self._discount = Decimal(str(batch_discount))
        self._rules = rules

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self._name!r}, base_url={self._http.base_url!r})"

    @property
    def name(self) -> str:
        return self._name

    @property
    def pricing_id(self) -> str:
        return self._pricing_id

    @property
    def batch_discount(self) -> Decimal:
        return self._discount

    @property
    def limits(self) -> BatchLimits:
        return self._rules.limits

    @property
    def rules(self) -> R:
        return self._rules

    async def aclose(self) -> None:
        await self._http.aclose()


async def create_or_adopt(
    http: HttpClient,
    create: Callable[[], Awaitable[T]],
    find: Callable[[], Awaitable[T | None]],
    *,
    adopted: Callable[[T], None] = lambda _: None,
    retry_on: Callable[[BaseException], bool | float] = retry_hook,
) -> T:
    """Make something the provider keeps or bills (a batch, an upload), retried while
    ``retry_on`` says so. Making is not idempotent: an attempt whose answer was lost may have
    made it, so before each retry ``find`` looks for it, and what it finds is adopted (and
    ``adopted`` told) instead of being made twice. ``create`` itself must not retry."""
    async for attempt in stamina.retry_context(
        on=retry_on, attempts=http.attempts, timeout=http.retry_timeout
    ):
        with attempt:
            if attempt.num > 1:
                found = await find()
                if found is not None:
                    adopted(found)
                    return found
            return await create()
    raise AssertionError("unreachable: stamina re-raises the last error")  # pragma: no cover


def read_paid(
    parse: Callable[[JSONObject], ParsedResponse], body: JSONObject, *, what: str
) -> ParsedResponse:
    """``parse(body)``, or the body kept whole when it cannot be read: a 2xx was paid for, so
    an unexpected shape is never turned into a failure a later, fixed version could not
    re-apply. ``what`` names the endpoint in the warning."""
    try:
        return parse(body)
    except Exception as exc:
        logger.warning(
            "batchinfer.response_unreadable %s response kept whole: %s: %s",
            what,
            type(exc).__name__,
            exc,
            exc_info=True,
            extra={"batchinfer.event": "response_unreadable", "batchinfer.endpoint": what},
        )
        return ParsedResponse(body=body)


def never(exc: BaseException) -> bool:
    """A retry hook for calls retried by their caller, after it looked for what they made."""
    return False


def as_int(value: Any) -> int | None:
    """A count as the database can hold it, or None for anything else."""
    if type(value) is float and value.is_integer():
        value = int(value)
    return value if type(value) is int and 0 <= value <= INT4_MAX else None


def as_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def submit_event(log: logging.Logger, event: str, key: SubmitKey, **fields: str) -> None:
    """A step of a submit, logged with the batch's id and its figures."""
    figures = " ".join(f"{k}={v}" for k, v in fields.items())
    log.info(
        "batchinfer.%s batch %s %s",
        event,
        key.batch_id,
        figures,
        extra={
            "batchinfer.event": event,
            "batchinfer.batch_id": str(key.batch_id),
            **{f"batchinfer.{k}": v for k, v in fields.items()},
        },
    )
