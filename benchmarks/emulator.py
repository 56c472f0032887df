"""The emulator in a process of its own, as the provider would be on another machine.

``python -m benchmarks.emulator`` serves ``batchinfer.testing.Emulator`` and, on a second port,
a small control API the benchmark uses to script the data (run in this process, where the
emulator's state lives). It prints one JSON line with both URLs, then serves until its
stdin closes (the benchmark holds it open, so it never outlives the run).

- ``POST /fail {"tag", "n"}``: ``fail_request`` for every failing line of that batch.
- ``POST /rewrite {"batch"}``: lengthen the answers of a completed batch's output file.
- ``POST /craft {"batch", "tag", "n"}``: complete a batch with result files written directly
  (``data.craft``): for batches larger than the emulator takes, and for quick set-up.
- ``POST /forget {"batch"}``: drop a batch's files, to keep this process's memory bounded.
- ``GET /stats``: this process's RSS and peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from batchinfer.testing import Emulator
from benchmarks import data

API_KEY = "sk-emulator"


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Control:
    def __init__(self, emulator: Emulator) -> None:
        self.emu = emulator
        self._files = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/fail", self.fail)
        app.router.add_post("/rewrite", self.rewrite)
        app.router.add_post("/craft", self.craft)
        app.router.add_post("/forget", self.forget)
        app.router.add_get("/stats", self.stats)
        return app

    def _batch(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.emu.batches[str(args["batch"])]

    def _new_file(self, content: bytes) -> str:
        self._files += 1
        file_id = f"file-bench{self._files:016d}"
        self.emu.files[file_id] = content
        return file_id

    async def fail(self, request: web.Request) -> web.Response:
        args = await request.json(loads=orjson.loads)
        ids = data.failing_ids(args["tag"], int(args["n"]))
        for cid in ids:
            self.emu.fail_request(cid, **data.FAILURE)
        return _json({"failing": len(ids)})

    async def rewrite(self, request: web.Request) -> web.Response:
        batch = self._batch(await request.json(loads=orjson.loads))
        file_id = batch["output_file_id"]
        if file_id is not None:
            self.emu.files[file_id] = data.rewrite(self.emu.files[file_id], batch["endpoint"])
        return _json(self._sizes(batch))

    async def craft(self, request: web.Request) -> web.Response:
        args = await request.json(loads=orjson.loads)
        batch = self._batch(args)
        now = int(time.time())
        output, errors, completed, failed = data.craft(
            args["tag"], int(args["n"]), batch["endpoint"], now
        )
        batch.update(
            status="completed",
            model=data.MODELS[batch["endpoint"]],
            errors=None,
            output_file_id=self._new_file(output) if output else None,
            error_file_id=self._new_file(errors) if errors else None,
            in_progress_at=now,
            finalizing_at=now,
            completed_at=now,
            request_counts={"total": completed + failed, "completed": completed, "failed": failed},
        )
        return _json(self._sizes(batch))

    async def forget(self, request: web.Request) -> web.Response:
        batch = self._batch(await request.json(loads=orjson.loads))
        for key in ("input_file_id", "output_file_id", "error_file_id"):
            if batch.get(key):
                self.emu.files.pop(batch[key], None)
        self.emu.requests.clear()
        self.emu.received.clear()
        return _json({})

    async def stats(self, request: web.Request) -> web.Response:
        return _json({"rss_mb": _status_mb("VmRSS"), "peak_rss_mb": _status_mb("VmHWM")})

    def _sizes(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = self.emu.files.get(batch["output_file_id"] or "", b"")
        err = self.emu.files.get(batch["error_file_id"] or "", b"")
        return {
            "output_bytes": len(out),
            "error_bytes": len(err),
            "output_lines": out.count(b"\n"),
            "error_lines": err.count(b"\n"),
            "longest_line": max((len(line) for line in out.splitlines()), default=0),
        }


def _json(value: object) -> web.Response:
    return web.Response(body=orjson.dumps(value), content_type="application/json")


async def serve(step_seconds: float) -> None:
    emulator = Emulator(api_key=API_KEY, step_seconds=step_seconds)
    async with emulator:
        runner = web.AppRunner(Control(emulator).app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        ready = {"base_url": emulator.base_url, "control": f"http://127.0.0.1:{port}"}
        print(orjson.dumps(ready).decode(), flush=True)
        try:
            # Until stdin closes: the benchmark holds it open, so the server ends with it.
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.buffer.read)
        finally:
            await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step-seconds", type=float, default=0.05)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.step_seconds))


if __name__ == "__main__":
    main()
