"""`make bench`: run every benchmark in scripts/bench/ and print one table of ratios.

    .venv/bin/python -m scripts.bench [--only model data engines mfu memory]

Each module's `run()` returns rows `dict(name, ours, baseline, ratio, how)`, measured side by side in one
run. A module that fails prints its error as a row and the others still run (the exit code says so).
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback

import torch

from scripts.bench import format_table

SUITES = {  # name -> module; the order runs the in-process ones first, the torchrun launch last
    "model": "scripts.bench.bench_model",
    "data": "scripts.bench.bench_data",
    "mfu": "scripts.bench.bench_mfu",
    "memory": "scripts.bench.bench_memory",
    "engines": "scripts.bench.bench_engines",
}
THREADS = 2  # the machine's cores; the engine bench runs 2 ranks x 1 thread


def run_suite(name: str) -> tuple[list[dict], float, str | None]:
    torch.set_num_threads(THREADS)  # a suite may pin its own thread count (e.g. per-core rates)
    t0 = time.perf_counter()
    try:
        rows = importlib.import_module(SUITES[name]).run()
        return rows, time.perf_counter() - t0, None
    except Exception:  # noqa: BLE001 - one broken bench must not hide the others' numbers
        return [], time.perf_counter() - t0, traceback.format_exc(limit=3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(SUITES), default=list(SUITES))
    args = parser.parse_args()
    table, failed, t_start = [], [], time.perf_counter()
    for name in args.only:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        rows, seconds, error = run_suite(name)
        print(f"[bench] {name}: {len(rows)} rows in {seconds:.0f} s", file=sys.stderr, flush=True)
        if error:
            failed.append(name)
            print(f"[bench] {name} FAILED:\n{error}", file=sys.stderr, flush=True)
        table += [(name, r) for r in rows]
    if table:
        print(format_table(table))
    total_s = time.perf_counter() - t_start
    print(f"\n{torch.__version__}, {THREADS} threads per suite (engines: 2 ranks x 1), total {total_s:.0f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
