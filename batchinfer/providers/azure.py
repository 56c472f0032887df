"""Azure OpenAI's global batch: OpenAI's Files and Batches protocol on an Azure resource.

What differs from OpenAI (and is handled here or in the OpenAI adapter it builds on):

- the URL: ``{endpoint}/openai/v1/...`` (the "v1" API, no ``api-version`` needed), or with
  ``api_version`` the classic ``{endpoint}/openai/...?api-version=...``;
- auth: an ``api-key`` header, or a bearer token from a callable (Microsoft Entra ID), asked
  for afresh before each request, so an expiring token is renewed by whoever issues it;
- ``body.model`` names a *deployment* (of type Global-Batch or Data Zone Batch), the same on
  every line; prices follow the model each response names;
- statuses in any case ("Validating"), ``""`` for a file not there, and a 400 whose message says
  ``token_limit_exceeded`` (the queued-token quota is full: not now rather than never, so it is
  retried like a 429);
- batches are not expired by Azure at 24 h: they run until done, so raise a worker's
  ``max_age_seconds`` if Azure's queue is long.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import aiohttp

from batchinfer.domain import BatchLimits
from batchinfer.errors import AuthenticationError
from batchinfer.providers.common import checked_api_key, warn_if_unverified
from batchinfer.providers.http import ErrorDialect, HttpClient
from batchinfer.providers.openai import OpenAIProvider

#: What Azure's global batch runs (embeddings are not offered in batch there).
AZURE_BATCH_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/responses"})

AZURE_ERRORS = ErrorDialect(
    request_id_headers=("apim-request-id", "x-request-id"),
    not_found_hint=lambda url: (
        None if "/openai/" in url else "check the endpoint: Azure's paths start with /openai/"
    ),
    transient_words=("token_limit_exceeded",),
)

TokenProvider = Callable[[], str | Awaitable[str]]


class AzureOpenAIProvider(OpenAIProvider):
    """Azure OpenAI (``endpoint`` is the resource's URL, ``https://<resource>.openai.azure.com``).

    Give ``api_key``, or ``token_provider``: a callable (sync or async) returning a Microsoft
    Entra ID token for ``https://cognitiveservices.azure.com/.default``, called before each
    request (cache it there, as azure-identity's providers do). ``api_version`` selects the
    classic API (``/openai/...?api-version=``); without it the v1 API is used.
    """

    def __init__(
        self,
        *,
        endpoint: str,
        api_key: str | None = None,
        token_provider: TokenProvider | None = None,
        api_version: str | None = None,
        session: aiohttp.ClientSession | None = None,
        batch_discount: Decimal | float | str = Decimal("0.5"),
        name: str = "azure",
        pricing_id: str = "azure",
        limits: BatchLimits | None = None,
        attempts: int = 5,
        verify_tls: bool = True,
    ) -> None:
        if (api_key is None) == (token_provider is None):
            raise ValueError(
                "AzureOpenAIProvider needs an api_key or a token_provider (one of them, not both)"
            )
        if not endpoint.startswith(("https://", "http://")):
            raise ValueError(
                f"endpoint must be the resource's URL, like https://<resource>.openai.azure.com "
                f"(got {endpoint!r})"
            )
        headers: dict[str, str] = {}
        if api_key is not None:
            headers["api-key"] = checked_api_key(
                api_key, provider="AzureOpenAIProvider", variable="AZURE_OPENAI_API_KEY"
            )
        root = endpoint.rstrip("/") + ("/openai" if api_version else "/openai/v1")
        warn_if_unverified(root, verify_tls)
        self.api_version = api_version
        self._start(
            HttpClient(
                root,
                headers,
                session=session,
                attempts=attempts,
                verify_tls=verify_tls,
                dialect=AZURE_ERRORS,
                query={"api-version": api_version} if api_version else None,
                auth=None if token_provider is None else _bearer(token_provider),
            ),
            name=name,
            pricing_id=pricing_id,
            batch_discount=batch_discount,
            limits=limits or BatchLimits(endpoints=AZURE_BATCH_ENDPOINTS, max_requests=100_000),
        )

    def wire_endpoint(self, endpoint: str) -> str:
        # Azure's create call names the endpoint without its /v1 ("/chat/completions").
        return endpoint.removeprefix("/v1")

    def live_path(self, endpoint: str, body: dict[str, Any]) -> str:
        path = endpoint.removeprefix("/v1")
        if self.api_version and path != "/responses":
            # The classic API routes a live call by its deployment, in the path.
            return f"/deployments/{body.get('model')}{path}"
        return path


def _bearer(token_provider: TokenProvider) -> Callable[[], Awaitable[dict[str, str]]]:
    async def headers() -> dict[str, str]:
        try:
            token = token_provider()
            if inspect.isawaitable(token):
                token = await token
        except Exception as exc:
            raise AuthenticationError(
                f"the token_provider failed: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(token, str) or not token.strip():
            raise AuthenticationError(
                f"the token_provider returned {type(token).__name__}, no token"
            )
        return {"Authorization": f"Bearer {token.strip()}"}

    return headers
