from __future__ import annotations

from batchinfer.cli import main

raise SystemExit(main())
