"""The seam every provider implements: a handful of async calls, nothing about storage."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
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
    SubmitKey,
)
from batchinfer.validation import RequestRules

#: A factory for the JSONL body, so an upload that failed half-way can be streamed again.
InputStream = Callable[[], AsyncIterator[bytes]]

#: A factory for a batch's requests in line order, in pages of (custom_id, body JSON exactly
#: as stored); called again, it starts again from the first.
RequestPages = Callable[[], AsyncIterator[Sequence[tuple[str, bytes]]]]


class SubmitCheckpoint(Protocol):
    """What a submit has done so far, kept in the database for its own retry. Each record
    has been committed when it returns."""

    @property
    def input_ref(self) -> str | None:
        """The provider's copy of the requests (an uploaded file), once recorded."""
        ...

    @property
    def notes(self) -> Mapping[str, str]:
        """What the provider noted earlier with ``note``."""
        ...

    async def record_input(self, ref: str) -> None:
        """Remember the provider's copy of the requests; deleted once results are applied."""
        ...

    async def note(self, **values: str) -> None: ...


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

    @property
    def rules(self) -> RequestRules:
        """What it asks of each request, checked by create_batch before anything is written."""
        ...

    async def submit(
        self, requests: RequestPages, *, key: SubmitKey, checkpoint: SubmitCheckpoint
    ) -> ProviderBatch:
        """Send the batch's requests and start it at the provider, however its API does that
        (upload a file then create; create with the requests inline; create then add pages).

        It may be called again after a crash or a lost answer at any step: what an earlier try
        made (noted in ``checkpoint``, or found at the provider by ``key``) is adopted, never
        made and paid for twice.
        """
        ...

    async def retrieve_batch(self, provider_batch_id: str) -> ProviderBatch: ...

    async def delete_file(self, ref: str) -> None:
        """Delete the provider's copy of our requests or of a result source (its ``ref``) once
        the results are applied; one already gone is not an error."""
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

    async def aclose(self) -> None: ...


@runtime_checkable
class LiveProvider(Protocol):
    """A provider with a realtime path too (``BatchInfer.complete``), whose answers are
    parsed as its batch results are."""

    @property
    def name(self) -> str: ...

    @property
    def pricing_id(self) -> str: ...

    @property
    def rules(self) -> RequestRules: ...

    async def complete(self, endpoint: str, body: dict[str, Any]) -> ParsedResponse:
        """Send one request to the live endpoint and parse the answer."""
        ...
