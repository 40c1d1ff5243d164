"""Timing helpers shared by the benchmarks (those of :mod:`chanaxis_fast.bench`): median time
(CUDA events on a CUDA device), and a plain-text table."""

import os
import sys

# the benchmarks measure this checkout's package (built in place), whatever is installed
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from chanaxis_fast.bench import format_table, ms, timeit  # noqa: E402,F401


def print_table(header, rows):
    """Print rows (lists of already formatted cells) under header, as a Markdown table."""
    print(format_table(header, rows))
