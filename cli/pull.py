"""``mlxrunner pull NAME[:TAG] | hf.co/ORG/REPO[:REVISION]``: download a model into the store.

Progress goes to stderr: a bar per blob on a terminal, a line at each quarter otherwise
(``runtime.progress.ProgressBar``), and Ollama's status lines. Exit codes: 0 on success, 1
with ``Error: ...`` for anything the user can fix (an unknown model, an unreachable registry,
a blob that does not match its digest), 130 when interrupted: the blobs downloaded so far are
kept, the next pull resumes them, and no manifest is written.
"""

from __future__ import annotations

import argparse
import sys

from cli.store import _guarded
from runtime.progress import Progress, ProgressBar
from runtime.store.layout import Store
from runtime.store.pull import pull_model


def main(args: argparse.Namespace) -> int:
    store = Store.at(args.models_dir)
    bars: dict[str, ProgressBar] = {}

    def run() -> int:
        pulling = pull_model(
            args.name, store=store, registry_url=args.registry, insecure=args.insecure
        )
        try:
            for line in pulling:
                if not line.digest:
                    print(line.status, file=sys.stderr)
                    continue
                bar = bars.get(line.digest)
                if bar is None:
                    for other in bars.values():
                        other.close()
                    bar = bars[line.digest] = ProgressBar(line.status)
                bar(Progress(phase="", done_bytes=line.completed, total_bytes=line.total))
        finally:
            pulling.close()  # an interrupted download keeps its part for the next pull
            for bar in bars.values():
                bar.close()
        return 0

    try:
        return _guarded(run)
    except KeyboardInterrupt:
        print(
            f"\npull of {args.name} interrupted; run it again to resume (no manifest was written)",
            file=sys.stderr,
        )
        return 130
