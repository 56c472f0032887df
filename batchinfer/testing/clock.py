"""A clock that moves only when told to, for workers and the emulator in tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


class FakeClock:
    """Starts at the real time (so schedules and the database's leases agree at first) and
    moves only by :meth:`advance`. Call it for an aware datetime (a worker's ``clock``);
    :meth:`time` gives seconds since the epoch (the emulator's ``clock``)."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime.now(UTC)

    def __call__(self) -> datetime:
        return self._now

    def time(self) -> float:
        return self._now.timestamp()

    def advance(self, seconds: float) -> datetime:
        self._now += timedelta(seconds=seconds)
        return self._now
