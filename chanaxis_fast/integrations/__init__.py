"""Adapters to other libraries. Each module imports its library only when it is imported itself,
so the package imports without any of them; nothing else in chanaxis_fast depends on them.

- :mod:`chanaxis_fast.integrations.torch_pruning`: :class:`Importance`, any chanaxis score as a
  Torch-Pruning importance criterion;
- :mod:`chanaxis_fast.integrations.lightning`: :class:`AxisTrackerCallback`, an
  :class:`~chanaxis_fast.AxisTracker` as a PyTorch Lightning callback.
"""

import importlib as _importlib

_MODULES = ("lightning", "torch_pruning")


def __getattr__(name):
    """The adapters load on first use (``chanaxis_fast.integrations.lightning``), not with the package."""
    if name in _MODULES:
        return _importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
