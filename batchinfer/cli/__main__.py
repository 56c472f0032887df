"""``python -m batchinfer.cli``: the same command, for when the entry point is not on PATH."""

from __future__ import annotations

from batchinfer.cli import main

raise SystemExit(main())
