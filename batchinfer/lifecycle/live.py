"""The realtime path: one live call, checked, parsed, priced and stored as batch results are."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

import orjson

from batchinfer.domain import Completion, CompletionStatus, ResultOutcome
from batchinfer.errors import ProviderError
from batchinfer.lifecycle.common import Providers, finish_even_if_cancelled
from batchinfer.pricing import Pricing
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
        request = {"custom_id": custom_id, "body": body, "metadata": metadata or {}}
        [checked] = [
            r
            async for r in validate_requests(
                [request], endpoint=endpoint, model=model, limits=adapter.limits
            )
        ]
        sent = orjson.loads(checked.body_json)
        completion_id = await self.store.completions.create_live(
            custom_id=custom_id, body=sent, metadata=checked.metadata
        )
        try:
            parsed = await adapter.complete(endpoint, sent)
            named = parsed.body.get("model")
            outcome = ResultOutcome(
                custom_id=custom_id,
                status=CompletionStatus.COMPLETED,
                response=parsed,
                status_code=200,
                costs=self.pricing.pricer(provider, model, _LIVE_RATE)(
                    named if isinstance(named, str) else None, parsed.usage
                ),
            )
            await self.store.results.apply_outcomes(None, [outcome], completion_id=completion_id)
        except BaseException as exc:
            # Whatever stopped it (provider error, unreadable answer, cancellation), the row
            # says so instead of staying "submitted" for ever.
            status = exc.status if isinstance(exc, ProviderError) else None
            failed = ResultOutcome(
                custom_id=custom_id,
                status=CompletionStatus.FAILED,
                status_code=status,
                failure_error=f"{adapter.name} live request failed (status: {status})",
                failure_reason=f"{type(exc).__name__}: {exc}"[:255],
            )
            await finish_even_if_cancelled(
                self.store.results.apply_outcomes(None, [failed], completion_id=completion_id)
            )
            raise
        return await self.store.completions.get(completion_id)
