"""An import job that reports reading and then waits, for the test that a request which goes
away stops its import: on SIGINT it leaves ``interrupted`` in the models dir and exits."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from runtime.store.import_job import line, parse_args


def main() -> int:
    args = parse_args(sys.argv[1:])
    try:
        line({"phase": "read", "done_bytes": 0, "total_bytes": 1})
        Path(args.models_dir, "started").write_text("")
        while True:
            time.sleep(60)
    except KeyboardInterrupt:
        Path(args.models_dir, "interrupted").write_text("SIGINT")
        return 130


if __name__ == "__main__":
    sys.exit(main())
