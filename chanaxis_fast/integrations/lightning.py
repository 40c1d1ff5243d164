"""An :class:`~chanaxis_fast.AxisTracker` as a PyTorch Lightning callback (optional: Lightning is
not a dependency of chanaxis_fast).

    import lightning as L
    from torch.utils.data import DataLoader
    from chanaxis_fast import AxisTracker
    from chanaxis_fast.integrations.lightning import AxisTrackerCallback

    tracker = AxisTracker(DataLoader(calibration_subset, batch_size=250), every=1, step_name="epoch")
    trainer = L.Trainer(max_epochs=10, callbacks=[AxisTrackerCallback(tracker, path="tracker.pt")])
    trainer.fit(lit_module, train_loader)
    tracker.plot("tracking.png")

The callback measures at initialisation (``on_train_start``, step 0) and at the end of every
``tracker.every``-th training epoch (``on_train_epoch_end``; step = epochs completed,
``trainer.current_epoch + 1``), on the global-zero process only. Scalar ``trainer.callback_metrics``
(e.g. a logged ``val_acc``) are recorded with each step. Its state (the series) goes into
Lightning's checkpoints, so a run resumed from a checkpoint continues the series.

It subclasses ``lightning.pytorch.Callback`` (or ``pytorch_lightning.Callback`` when only that
package is installed); without either, it is a plain class with the same hooks, which a training
loop of one's own may call.
"""

from typing import Callable, Optional

import torch
from torch import nn

from ..errors import UserInputError
from ..tracking import AxisTracker

try:
    from lightning.pytorch import Callback as _Callback
except ImportError:
    try:
        from pytorch_lightning import Callback as _Callback
    except ImportError:
        _Callback = object


class AxisTrackerCallback(_Callback):
    """Measure ``tracker`` along a Lightning ``fit``.

    Args:
        tracker: the :class:`~chanaxis_fast.AxisTracker` (its ``every`` picks the epochs).
        path: where to save the tracker after every measurement (atomic), or None.
        at_start: measure at initialisation, as step 0 (skipped when step 0 is already
            recorded, e.g. on resuming).
        model: ``callable(pl_module) -> nn.Module``, the network to measure (default: the
            LightningModule itself, whose forward must return the logits).
    """

    def __init__(self, tracker: AxisTracker, *, path=None, at_start: bool = True,
                 model: Optional[Callable[[nn.Module], nn.Module]] = None):
        if not isinstance(tracker, AxisTracker):
            raise UserInputError(f"AxisTrackerCallback: tracker must be a chanaxis_fast.AxisTracker, "
                                 f"got {type(tracker).__name__}")
        if model is not None and not callable(model):
            raise UserInputError("AxisTrackerCallback: model must be a callable(pl_module) -> nn.Module")
        super().__init__()
        self.tracker = tracker
        self.path = path
        self.at_start = at_start
        self.model = model

    def _measure(self, trainer, pl_module, step: int):
        if not getattr(trainer, "is_global_zero", True) or getattr(trainer, "sanity_checking", False):
            return
        net = pl_module if self.model is None else self.model(pl_module)
        info = {}
        for k, v in dict(getattr(trainer, "callback_metrics", None) or {}).items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                v = v.item()
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                info[str(k)] = float(v)
        if step == 0:
            self.tracker.measure(net, 0, info=info)
        elif self.tracker.maybe_measure(net, step, info=info) is None:
            return
        if self.path is not None:
            self.tracker.save(self.path)

    def on_train_start(self, trainer, pl_module):
        """Measure step 0 (at initialisation) unless it is recorded or ``at_start`` is False."""
        if self.at_start and 0 not in self.tracker.records:
            self._measure(trainer, pl_module, 0)

    def on_train_epoch_end(self, trainer, pl_module):
        """Measure after every ``tracker.every``-th epoch (step = epochs completed)."""
        self._measure(trainer, pl_module, int(trainer.current_epoch) + 1)

    def state_dict(self):
        """The tracker's series (:meth:`AxisTracker.state_dict`), for Lightning's checkpoints."""
        return self.tracker.state_dict()

    def load_state_dict(self, state_dict):
        """Restore the series from a Lightning checkpoint."""
        self.tracker.load_state_dict(state_dict, "AxisTrackerCallback.load_state_dict")
