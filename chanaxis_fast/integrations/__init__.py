"""Adapters to other libraries. Each module imports its library when it is imported itself, so the
package imports without any of them; nothing else in chanaxis_fast depends on these modules.

- :mod:`chanaxis_fast.integrations.lightning`: :class:`AxisTrackerCallback`, an
  :class:`~chanaxis_fast.AxisTracker` as a PyTorch Lightning callback.
"""
