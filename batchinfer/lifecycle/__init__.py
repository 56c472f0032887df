"""The flows of a batch's life, one module each, as provider calls and store writes.

Every step records its outcome in the database before the next starts, and every write is
conditional on the current state, so any step can crash and simply be run again.
"""

from __future__ import annotations

from batchinfer.lifecycle.claims import ClaimLostError, Leases, holding
from batchinfer.lifecycle.common import Providers
from batchinfer.lifecycle.live import LiveCaller
from batchinfer.lifecycle.results import ResultsPass
from batchinfer.lifecycle.status import StatusKeeper
from batchinfer.lifecycle.submit import Submitter

__all__ = [
    "ClaimLostError",
    "Leases",
    "LiveCaller",
    "Providers",
    "ResultsPass",
    "StatusKeeper",
    "Submitter",
    "holding",
]
