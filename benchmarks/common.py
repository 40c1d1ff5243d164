"""Timing helpers shared by the benchmarks (those of :mod:`chanaxis_fast.bench`): median time
(CUDA events on a CUDA device), and a plain-text table."""

import argparse
import os
import sys

# the benchmarks measure this checkout's package (built in place), whatever is installed
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
from chanaxis_fast.bench import format_table, ms, timeit  # noqa: E402,F401


def print_table(header, rows):
    """Print rows (lists of already formatted cells) under header, as a Markdown table."""
    print(format_table(header, rows))


def op_bench_setup(doc: str, repeat: int):
    """The command line of a one-op benchmark (--threads, --repeat), the thread count applied;
    returns (args, devices): the CPU, and CUDA when a GPU is present."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--repeat", type=int, default=repeat)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args, ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
