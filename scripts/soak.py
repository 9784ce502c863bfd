"""Run the suite's soak variants against a tiny real model and print their figures.

    python scripts/soak.py [--fuzz-examples 200] [--storm-requests 1000] [--burst 300]
                           [--seed 1] [--only fuzz,storm,overload]

- fuzz: every route of /openapi.json, ``--fuzz-examples`` cases per route that follow the
  document and as many that break it (tests/fuzzing.py); cases per route, statuses, server
  errors (must be 0) and the server's health afterwards.
- storm: ``--storm-requests`` real-socket requests of mixed kinds, left at random moments
  (tests/storm.py); what the server holds afterwards against the baseline.
- overload: ``--burst`` requests at once against ``--parallel 2 --max-queue 2``: every
  answer a success or a 429 with Retry-After, none hangs.

The same checks as ``pytest -m soak`` (which runs these with the sizes in the test files, or
MLXRUNNER_SOAK_EXAMPLES / _REQUESTS / _BURST / _SEED). Exit status 0 when every check held.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402

import runtime  # noqa: E402, F401  (the optimized BLAS before MLX)
from tests.fuzzing import fuzz_and_check  # noqa: E402
from tests.live_server import ServerThread, make_model, open_live_server  # noqa: E402
from tests.storm import storm  # noqa: E402
from tests.traffic import burst, every_kind  # noqa: E402


def soak_fuzz(folder: Path, args: argparse.Namespace) -> None:
    with ServerThread(lambda: open_live_server(folder, context_length=64)) as live:
        report = fuzz_and_check(live, examples=args.fuzz_examples, seed=args.seed)
        stats = live.statistics()
    print(f"fuzz (seed {args.seed}): {report.summary()}")
    print(
        f"  healthy after: /health ok, {stats.active_sequences} active, "
        f"{stats.queued_requests} queued"
    )


def soak_storm(folder: Path, args: argparse.Namespace) -> None:
    async def run() -> None:
        async with open_live_server(folder, parallel=8) as live:
            figures = await storm(live, requests=args.storm_requests, seed=args.seed)
        print(f"storm (seed {args.seed}): {figures.summary()}")
        for kind, n in sorted(figures.by_kind.items()):
            print(f"  {n:6d}  {kind}")

    trio.run(run)


def soak_overload(folder: Path, args: argparse.Namespace) -> None:
    async def run() -> None:
        async with open_live_server(folder, parallel=2, max_queue=2) as live:
            statuses, problems = await burst(live.host, live.port, every_kind(args.burst, 8))
            stats = live.statistics()
        print(
            f"overload: {args.burst} at once against --parallel 2 --max-queue 2: statuses "
            f"{dict(sorted(statuses.items()))}, {len(problems)} problems, afterwards "
            f"{stats.active_sequences} active, {stats.queued_requests} queued"
        )
        assert problems == [], problems[:5]
        assert set(statuses) <= {200, 429}, statuses

    trio.run(run)


SOAKS: dict[str, Callable[[Path, argparse.Namespace], None]] = {
    "fuzz": soak_fuzz,
    "storm": soak_storm,
    "overload": soak_overload,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fuzz-examples", type=int, default=200)
    parser.add_argument("--storm-requests", type=int, default=1000)
    parser.add_argument("--burst", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", default=",".join(SOAKS))
    args = parser.parse_args()
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_model(Path(tmp) / "tiny")
        for name in args.only.split(","):
            started = time.monotonic()
            try:
                SOAKS[name](folder, args)
            except Exception:
                failed.append(name)
                print(f"{name}: FAILED\n{traceback.format_exc()}")
            print(f"  ({name}: {time.monotonic() - started:.0f} s)", flush=True)
    print("all checks held" if not failed else f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
