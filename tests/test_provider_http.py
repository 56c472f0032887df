"""The HTTP layer every provider shares: error dialects and absolute URLs from a provider."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from batchinfer import (
    PermanentProviderError,
    ProviderRejectedError,
    ProviderUnavailableError,
    RateLimitedError,
)
from batchinfer.providers.http import ErrorDialect, HttpClient, error_from_response
from batchinfer.testing import Emulator


def _anthropic_style(parsed: object) -> tuple[str | None, str | None]:
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return parsed["error"].get("message"), parsed["error"].get("type")
    return None, None


ANTHROPIC_LIKE = ErrorDialect(
    read=_anthropic_style, request_id_headers=("request-id",), not_found_hint=None
)


def test_a_dialect_reads_its_own_envelope_and_request_id() -> None:
    body = b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
    headers = CIMultiDict({"Request-Id": "req_011"})
    error = error_from_response(
        529, body, headers, what="creating the batch", dialect=ANTHROPIC_LIKE
    )
    assert isinstance(error, ProviderUnavailableError)
    assert error.code == "overloaded_error"
    assert error.request_id == "req_011"
    assert str(error) == "creating the batch failed with HTTP 529: Overloaded (request id req_011)"


def test_the_default_dialect_is_openais() -> None:
    body = b'{"error":{"message":"You exceeded your current quota","code":"insufficient_quota"}}'
    headers = CIMultiDict({"x-request-id": "req_9", "retry-after": "3"})
    quota = error_from_response(429, body, headers, what="creating the batch")
    assert isinstance(quota, ProviderRejectedError)  # waiting will not refill it
    assert quota.request_id == "req_9"
    limited = error_from_response(429, b'{"error":{"message":"slow down"}}', headers, what="x")
    assert isinstance(limited, RateLimitedError)
    assert limited.retry_after == 3
    missing = error_from_response(
        404, b"not json", CIMultiDict(), what="reading", url="http://h/batches/b"
    )
    assert "check the provider's base_url" in str(missing)
    quiet = error_from_response(
        404, b"", CIMultiDict(), what="reading", url="http://h/b", dialect=ANTHROPIC_LIKE
    )
    assert str(quiet) == "reading failed with HTTP 404: no message; the URL called was http://h/b"


async def test_absolute_urls_go_only_to_the_providers_own_hosts(emulator: Emulator) -> None:
    headers = {"Authorization": f"Bearer {emulator.api_key}"}
    client = HttpClient(emulator.base_url, headers, trusted_origins=("https://files.example",))
    try:
        assert client.url("/batches") == f"{emulator.base_url}/batches"
        assert client.url("https://FILES.example/r/1") == "https://FILES.example/r/1"
        listed = await client.request_json(
            "GET", f"{emulator.base_url}/batches?limit=1", what="listing batches"
        )
        assert listed["object"] == "list"
        with pytest.raises(PermanentProviderError, match="credentials are not sent there"):
            await client.request_json("GET", "https://elsewhere.example/steal", what="reading")
        with pytest.raises(PermanentProviderError, match="neither its base URL's host"):
            client.url("http://127.0.0.2:1/x")
    finally:
        await client.aclose()
    assert [p for _, p in emulator.requests] == ["/v1/batches"]
