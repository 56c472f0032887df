"""The throughput benchmark: ``python -m benchmarks.run --help`` (see benchmarks/run.py)."""

from __future__ import annotations
