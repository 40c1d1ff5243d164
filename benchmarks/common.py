"""Timing helpers shared by the benchmarks: median wall time, and a plain-text table."""

import statistics
import time

import torch


def timeit(fn, *, repeat=5, warmup=1, min_time=0.0):
    """Median wall time of fn() in seconds over `repeat` runs (after `warmup` runs)."""
    for _ in range(warmup):
        fn()
    times = []
    while len(times) < repeat or sum(times) < min_time:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def print_table(header, rows):
    """Print rows (lists of already formatted cells) under header, as a Markdown table."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


def ms(seconds):
    return f"{seconds * 1e3:.2f} ms"
