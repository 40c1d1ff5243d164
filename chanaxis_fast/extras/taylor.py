"""Taylor's input: the gradient of the summed cross-entropy with respect to every calibrated
layer's weight, summed over the calibration batches (a sum over images, so it does not depend on
the batching). Cost: the forward keeps its autograd graph and one backward per batch (about 3x a
plain forward), float64 memory of the calibrated weights."""

from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor


def taylor_grads(model, hooks, weights: Dict[str, Tensor], logits: Tensor, images: Tensor,
                 labels: Tensor, skip_nonfinite: bool) -> Dict[str, Tensor]:
    """Gradients of the summed cross-entropy w.r.t. the calibrated weights (float64).

    Images with a non-finite loss raise, or with ``skip_nonfinite`` are left out by a second,
    gradient-only forward on the other images (their NaN would otherwise reach every gradient),
    during which ``hooks.active`` is False so that the calibration hooks stash nothing."""
    per_image = F.cross_entropy(logits, labels, reduction="none")
    ok = torch.isfinite(per_image.detach())
    params = list(weights.values())
    if bool(ok.all()):
        g = torch.autograd.grad(per_image.sum(), params, allow_unused=True)
    elif not skip_nonfinite:
        raise ValueError(f"calibrate: non-finite cross-entropy for {int((~ok).sum())} images (Taylor "
                         f"gradients); pass skip_nonfinite=True to leave them out")
    elif not bool(ok.any()):
        g = [None] * len(params)
    else:
        hooks.active = False
        try:
            loss = F.cross_entropy(model(images[ok]), labels[ok], reduction="sum")
        finally:
            hooks.active = True
        g = torch.autograd.grad(loss, params, allow_unused=True)
    return {l: (gi if gi is not None else torch.zeros_like(w)).detach().double()
            for (l, w), gi in zip(weights.items(), g)}
