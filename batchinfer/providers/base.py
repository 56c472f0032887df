"""The seam every provider implements: a handful of async calls, nothing about storage."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from decimal import Decimal
from typing import Any, Protocol, runtime_checkable

from batchinfer.domain import (
    BatchLimits,
    ParsedResponse,
    Pricer,
    ProviderBatch,
    ResultOutcome,
    ResultSource,
)

#: A factory for the JSONL body, so an upload that failed half-way can be streamed again.
InputStream = Callable[[], AsyncIterator[bytes]]


@runtime_checkable
class Provider(Protocol):
    """A batch API. Implementations translate their wire format to and from the domain types."""

    @property
    def name(self) -> str:
        """The name batches are stored under, e.g. ``"openai"``."""
        ...

    @property
    def pricing_id(self) -> str:
        """The provider's id in genai-prices (``"openai"``, ``"anthropic"``): prices follow
        the service that bills, whatever name the provider is registered under."""
        ...

    @property
    def batch_discount(self) -> Decimal:
        """The factor applied to live prices for batch results (0.5 is half price)."""
        ...

    @property
    def limits(self) -> BatchLimits:
        """What one batch may hold on this provider."""
        ...

    def encode_line(self, custom_id: str, endpoint: str, body_json: bytes) -> bytes:
        """One request as a line of the input file."""
        ...

    async def upload_input(self, stream: InputStream, *, filename: str) -> str:
        """Upload the input file; return its id. Retried safely: an upload whose answer was
        lost is adopted, not stored twice."""
        ...

    async def find_input_file(self, filename: str) -> str | None:
        """The id of an input file uploaded earlier under ``filename`` (unique per batch)."""
        ...

    async def delete_file(self, file_id: str) -> None:
        """Delete a file at the provider; one already gone is not an error."""
        ...

    async def create_batch(
        self, *, input_file_id: str, endpoint: str, metadata: dict[str, str]
    ) -> ProviderBatch:
        """Start a batch over an uploaded input file, tagged with ``metadata``. Before a retry
        the provider is searched for a batch so tagged: a create is never repeated."""
        ...

    async def retrieve_batch(self, provider_batch_id: str) -> ProviderBatch: ...

    async def find_batch(
        self, *, metadata: dict[str, str], max_batches: int
    ) -> ProviderBatch | None:
        """The newest provider batch carrying all of ``metadata``, among the last few created.

        Lets a submit that crashed after creating its batch re-attach instead of creating a
        second one.
        """
        ...

    async def cancel_batch(self, provider_batch_id: str) -> ProviderBatch: ...

    def open_results(
        self, source: ResultSource
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Stream one of a batch's result sources (``ProviderBatch.results``) as JSONL bytes."""
        ...

    def parse_result(
        self, record: dict[str, Any], *, endpoint: str, price: Pricer | None = None
    ) -> ResultOutcome:
        """Decide what one result envelope means for its completion, priced with ``price``."""
        ...

    def parse_response(self, endpoint: str, body: dict[str, Any]) -> ParsedResponse:
        """Extract text, tool calls, finish reason and usage from a 2xx response body."""
        ...

    async def complete(self, endpoint: str, body: dict[str, Any]) -> ParsedResponse:
        """Send one request to the live endpoint; the result is parsed as batch results are."""
        ...

    async def aclose(self) -> None: ...
