"""The kill-anywhere harness: real processes, real SIGKILL at named points, then recovery.

A child process (:mod:`tests.kill.child`) runs one flow (a worker, ``submit_batch`` or
``fetch_batch_results``) against a Postgres schema and an emulator that both belong to the
parent (:mod:`tests.kill.harness`). The child wraps one method of its real objects so that the
N-th time that point is reached it SIGKILLs itself. The parent then runs the flow again without
a kill and checks every batch against the emulator's own files and batches.

Long run: ``python -m tests.kill --runs 300 --seed 1`` (or ``nox -s kill -- --runs 300``);
a small one is ``tests/kill/test_kill_anywhere.py``.
"""

from __future__ import annotations
