"""Adapters to other libraries. Each module imports its library only when it is imported itself,
so the package imports without any of them; nothing else in chanaxis_fast depends on them.

- :mod:`chanaxis_fast.integrations.torch_pruning`: :class:`Importance`, any chanaxis score as a
  Torch-Pruning importance criterion;
- :mod:`chanaxis_fast.integrations.lightning`: :class:`AxisTrackerCallback`, an
  :class:`~chanaxis_fast.AxisTracker` as a PyTorch Lightning callback.
"""
