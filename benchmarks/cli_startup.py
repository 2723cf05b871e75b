"""Start-up cost of the command line: wall time (median of `--runs`) and line count of each help screen.

    python benchmarks/cli_startup.py --runs 5

Each command runs in a fresh `flow-trl` process, as a user types it; the first run warms the file cache and is not
counted.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time


COMMANDS = (["--help"], ["nft", "--help"], ["nft", "--help-all"], ["--version"])


def measure(argv: list[str], runs: int) -> tuple[float, int]:
    """Median wall seconds of `flow-trl *argv` over `runs` runs, and the number of lines it prints."""
    executable = shutil.which("flow-trl")
    command = [executable, *argv] if executable else [sys.executable, "-m", "flow_trl.cli", *argv]
    lines = len(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines())
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times), lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="Timed runs per command.")
    args = parser.parse_args()
    print(f"{'command':<28}{'median s':>10}{'lines':>7}")
    for argv in COMMANDS:
        try:
            seconds, lines = measure(argv, args.runs)
        except subprocess.CalledProcessError:
            print(f"{'flow-trl ' + ' '.join(argv):<28}{'(fails)':>10}")
            continue
        print(f"{'flow-trl ' + ' '.join(argv):<28}{seconds:>10.2f}{lines:>7}")


if __name__ == "__main__":
    main()
