"""A process that submits one batch, for tests/test_processes.py:
``python submit_proc.py --database URL --schema S --base-url U --api-key K --batch ID --log F``
(``--provider anthropic``, with that API's ``--base-url``, for an Anthropic batch).

It runs ``await bi.submit_batch(ID)`` with ``BatchInfer(..., claim_seconds=--claim-seconds)``
and logs to ``--log``; the test kills it part-way.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from batchinfer import AnthropicProvider, BatchInfer, OpenAIProvider, Provider

logger = logging.getLogger("submit_proc")


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--database", required=True)
    parser.add_argument("--schema", required=True)
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--batch", required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--claim-seconds", type=float, default=2.0)
    parser.add_argument("--provider", choices=["openai", "anthropic"], default="openai")
    return parser.parse_args()


async def main(args: argparse.Namespace) -> None:
    provider: Provider = OpenAIProvider(api_key=args.api_key, base_url=args.base_url)
    if args.provider == "anthropic":
        provider = AnthropicProvider(api_key=args.api_key, base_url=args.base_url)
    async with BatchInfer(
        args.database,
        providers=[provider],
        schema=args.schema,
        claim_seconds=args.claim_seconds,
    ) as bi:
        logger.info("ready: submitting batch %s", args.batch)
        batch = await bi.submit_batch(args.batch)
        logger.info("submitted batch %s as %s", batch.id, batch.provider_batch_id)


if __name__ == "__main__":
    arguments = _args()
    logging.basicConfig(
        filename=arguments.log,
        level=logging.INFO,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
    asyncio.run(main(arguments))
