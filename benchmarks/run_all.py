"""Every op against its pure-PyTorch reference and the end-to-end calibration against a plain
forward, in one process and one table: the same as ``chanaxis-fast bench`` (see
:mod:`chanaxis_fast.bench` for the cases, sizes and the JSON schema).

Run: python benchmarks/run_all.py [--quick | --size tiny|quick|full] [--only REGEX]
                                  [--device auto|cpu|cuda] [--threads N] [--out FILE.json]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout
from chanaxis_fast.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
