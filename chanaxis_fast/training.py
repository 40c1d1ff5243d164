"""Train, fine-tune and evaluate classifiers: what the pruning protocol, the demo network and the
axis tracker share. Plain loops over a DataLoader; every one restores the model's mode."""

import itertools
from typing import Callable, Dict, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .errors import UserInputError


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader: Iterable, device=None, *,
                        max_batches: Optional[int] = None, progress: bool = False) -> Dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` (eval mode) over ``loader``'s (images, labels).

    Returns ``{"accuracy": float in [0, 1], "loss": mean cross-entropy in nats, "images": int}``.
    ``device``: where the images go (default: the model's device). The model's mode is restored.
    """
    device = _device_of(model, device)
    was = model.training
    model.eval()
    correct, loss, n = 0, 0.0, 0
    try:
        batches = loader if max_batches is None else itertools.islice(loader, max_batches)
        for images, labels in tqdm(batches, disable=not progress, desc="evaluate", unit="batch",
                                   leave=False):
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            loss += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
            correct += int((logits.argmax(1) == labels).sum())
            n += len(labels)
    finally:
        model.train(was)
    if n == 0:
        raise UserInputError("evaluate_classifier: the loader yielded no images")
    return {"accuracy": correct / n, "loss": loss / n, "images": n}


def train_classifier(model: nn.Module, loader: Iterable, *, epochs: int = 1, lr: float = 1e-3,
                     weight_decay: float = 0.0, optimizer: str = "adam", momentum: float = 0.9,
                     max_batches: Optional[int] = None, schedule: Optional[str] = None,
                     device=None, after_step: Optional[Callable] = None, progress: bool = False,
                     seed: Optional[int] = None) -> Dict[str, float]:
    """Minimise the cross-entropy over ``loader`` for ``epochs`` epochs of at most ``max_batches``
    batches, in train mode (the mode is restored afterwards).

    ``optimizer``: "adam" (Adam with ``lr``, L2 ``weight_decay``) or "sgd" (``momentum``,
    Nesterov, ``weight_decay``); ``schedule``: None or "cosine" (one cosine decay over all steps).
    ``after_step(optimizer)`` runs after every step (e.g. to re-apply pruning masks; see also
    :func:`chanaxis_fast.keep_masked`). ``seed`` seeds the global RNG first (data order of a
    shuffling loader, dropout). Returns ``{"loss": mean loss of the last epoch, "steps": int}``.
    """
    for name, v in (("epochs", epochs),) + ((("max_batches", max_batches),) if max_batches is not None else ()):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserInputError(f"train_classifier: {name} must be an int >= 1, got {v!r}")
    if optimizer not in ("adam", "sgd"):
        raise UserInputError(f"train_classifier: optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    if seed is not None:
        torch.manual_seed(seed)
    device = _device_of(model, device)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    try:
        per_epoch = len(loader) if max_batches is None else min(len(loader), max_batches)
    except TypeError:
        per_epoch = max_batches
    sched = None
    if schedule == "cosine" and per_epoch:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * per_epoch)
    elif schedule not in (None, "cosine"):
        raise UserInputError(f"train_classifier: schedule must be None or 'cosine', got {schedule!r}")
    was = model.training
    model.train()
    steps, last = 0, 0.0
    try:
        for _ in range(epochs):
            total, n = 0.0, 0
            batches = loader if max_batches is None else itertools.islice(loader, max_batches)
            for images, labels in tqdm(batches, total=per_epoch, disable=not progress, desc="train",
                                       unit="batch", leave=False):
                images, labels = images.to(device), labels.to(device)
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(images), labels)
                loss.backward()
                opt.step()
                if after_step is not None:
                    after_step(opt)
                if sched is not None:
                    sched.step()
                total += float(loss.detach()) * len(labels)
                n += len(labels)
                steps += 1
            last = total / max(1, n)
    finally:
        model.train(was)
    return {"loss": last, "steps": steps}


def finetune_classifier(model: nn.Module, loader: Iterable, *, epochs: int = 5,
                        max_batches: Optional[int] = 200, lr: float = 1e-4, device=None,
                        after_step: Optional[Callable] = None, progress: bool = False,
                        seed: Optional[int] = 0) -> Dict[str, float]:
    """The protocol's fine-tuning (METHOD §6 defaults): Adam, lr 1e-4, ``epochs`` epochs of at most
    ``max_batches`` batches; ``after_step`` re-applies the masks (the sweep passes it)."""
    return train_classifier(model, loader, epochs=epochs, lr=lr, max_batches=max_batches,
                            device=device, after_step=after_step, progress=progress, seed=seed)


def _device_of(model: nn.Module, device):
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
