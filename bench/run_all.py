"""Run every benchmark in turn: `make bench`. docs/benchmarks.md records the results."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SCRIPTS = ("bench_paho.py", "bench_buffer.py", "bench_backlog.py", "bench_gateway.py",
           "bench_token_server.py")


def main() -> int:
    for script in SCRIPTS:
        print(f"== {script}", flush=True)
        command = [sys.executable, str(BENCH / script)]
        result = subprocess.run(command, cwd=BENCH.parent, check=False)
        if result.returncode != 0:
            return result.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main())
