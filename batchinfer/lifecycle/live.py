"""The realtime path: one live call, checked, parsed, priced and stored as batch results are."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import orjson

from batchinfer.domain import Completion, CompletionStatus, ResultOutcome
from batchinfer.errors import InvalidRequestError, ProviderError
from batchinfer.lifecycle.common import Providers, finish_even_if_cancelled
from batchinfer.pricing import Pricing
from batchinfer.providers.base import LiveProvider
from batchinfer.storage.store import Store
from batchinfer.validation import validate_requests

#: Live calls are priced at the full rate.
_LIVE_RATE = Decimal(1)


class LiveCaller:
    def __init__(self, store: Store, providers: Providers, pricing: Pricing) -> None:
        self.store = store
        self.providers = providers
        self.pricing = pricing

    async def complete(
        self,
        *,
        provider: str,
        endpoint: str,
        model: str,
        body: Mapping[str, Any],
        custom_id: str,
        metadata: Mapping[str, Any] | None,
    ) -> Completion:
        """One live call, checked, parsed, priced (at the full rate) and stored as batch results
        are; a provider error is recorded on the row before it is raised."""
        adapter = self.providers.get(provider)
        if not isinstance(adapter, LiveProvider):
            raise InvalidRequestError(
                f"provider {provider!r} ({type(adapter).__name__}) has no live path; send the "
                "request in a batch instead"
            )
        request = {"custom_id": custom_id, "body": body, "metadata": metadata or {}}
        [checked] = [
            r
            async for r in validate_requests(
                [request], endpoint=endpoint, model=model, rules=adapter.rules
            )
        ]
        sent = orjson.loads(checked.body_json)
        # The insert runs to its end even if the call is cancelled meanwhile: a cancellation
        # landing between its commit and its answer would leave a "submitted" row nobody knows
        # the id of, and one landing inside a query tears down the pooled connection.
        row = asyncio.ensure_future(
            self.store.completions.create_live(
                custom_id=custom_id, body=sent, metadata=checked.metadata
            )
        )
        try:
            completion_id = await asyncio.shield(row)
            parsed = await adapter.complete(endpoint, sent)
            named = parsed.body.get("model")
            outcome = ResultOutcome(
                custom_id=custom_id,
                status=CompletionStatus.COMPLETED,
                response=parsed,
                status_code=200,
                costs=self.pricing.pricer(adapter.pricing_id, model, _LIVE_RATE)(
                    named if isinstance(named, str) else None, parsed.usage
                ),
            )
            # The answer is paid for: store it even if the caller gives up now.
            await finish_even_if_cancelled(
                self.store.results.apply_outcomes(None, [outcome], completion_id=completion_id)
            )
            return await finish_even_if_cancelled(self.store.completions.get(completion_id))
        except BaseException as exc:
            # Whatever stopped it (provider error, unreadable answer, cancellation), the row
            # says so instead of staying "submitted" for ever.
            await finish_even_if_cancelled(self._fail(row, adapter.name, custom_id, exc))
            raise

    async def _fail(
        self, row: asyncio.Future[int], provider: str, custom_id: str, exc: BaseException
    ) -> None:
        """Fail the row ``row`` inserts once it is in; a row already completed is kept."""
        try:
            completion_id = await row
        except Exception:
            return  # nothing was written, so there is nothing to fail
        if isinstance(exc, asyncio.CancelledError):
            status = None
            error = f"{provider} live request cancelled"
            reason = (
                "the call was cancelled (a timeout or a cancelled task) before its answer "
                "was stored"
            )
        else:
            status = exc.status if isinstance(exc, ProviderError) else None
            error = f"{provider} live request failed (status: {status})"
            reason = f"{type(exc).__name__}: {exc}"
        failed = ResultOutcome(
            custom_id=custom_id,
            status=CompletionStatus.FAILED,
            status_code=status,
            failure_error=error,
            failure_reason=reason[:255],
        )
        await self.store.results.apply_outcomes(None, [failed], completion_id=completion_id)
