"""An import in a child process (``runtime.store.import_job``), read as a stream of events.

``open_import`` starts the child; ``ImportProcess.next_event`` reads its JSON lines one by
one; ``ImportProcess.stop`` ends it. Why a child: MLX belongs to the engine thread of the
server, and an import needs memory of its own for a while.

Cancellation: the caller must ``stop`` it in a ``finally`` (shielded): a child still running
gets SIGINT, on which the importer removes what it wrote, then SIGKILL if it has not ended
within ``STOP_SECONDS``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from typing import Any

import trio

STOP_SECONDS = 10.0
JOB_MODULE = "runtime.store.import_job"  # the tests put a job of their own here
_MAX_LINE = 1 << 20


class ImportProcess:
    def __init__(self, process: trio.Process) -> None:
        self._process = process
        self._buffer = b""

    async def next_event(self) -> dict[str, Any] | None:
        """The child's next JSON line, or ``None`` once its output has ended."""
        stdout = self._process.stdout
        assert stdout is not None
        while b"\n" not in self._buffer:
            chunk = await stdout.receive_some()
            if not chunk:
                return None
            self._buffer += chunk
            if len(self._buffer) > _MAX_LINE:
                raise RuntimeError("import child: an output line is too long")
        raw, _, self._buffer = self._buffer.partition(b"\n")
        event = json.loads(raw)
        if not isinstance(event, dict):
            raise RuntimeError(f"import child: unexpected output {raw[:200]!r}")
        return event

    async def wait(self) -> int:
        return await self._process.wait()

    async def stop(self) -> None:
        """End the child: SIGINT first (the importer cleans up), SIGKILL after a while."""
        process = self._process
        if process.returncode is None:
            process.send_signal(signal.SIGINT)
            with trio.move_on_after(STOP_SECONDS):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
        if process.stdout is not None:
            await process.stdout.aclose()


async def open_import(
    source: str, name: str, *, models_dir: str, quantize: str | None
) -> ImportProcess:
    """Start ``python -m runtime.store.import_job`` for ``source`` -> ``name``."""
    command = [sys.executable, "-m", JOB_MODULE, source, name]
    command += ["--models-dir", models_dir]
    if quantize is not None:
        command += ["--quantize", quantize]
    # stderr is the server's: a crash of the child leaves its traceback in the log.
    process = await trio.lowlevel.open_process(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
    )
    return ImportProcess(process)
