"""sha256 digests that identify what a result was computed from: tensors and nested containers,
a model's weights, and the samples of a dataset."""

import hashlib
import os
from typing import Optional

import torch
from torch import Tensor, nn


def update_digest(h, obj) -> None:
    """Feed ``obj`` (tensors, dicts, lists, tuples, scalars, nested) into the hash ``h``: dtype,
    shape and bytes of tensors, keys in sorted order, ``repr`` of anything else."""
    if isinstance(obj, Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's own buffer, no copy
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            update_digest(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            update_digest(h, v)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


def digest(obj) -> str:
    """Hex sha256 of ``obj`` as :func:`update_digest` reads it."""
    h = hashlib.sha256()
    update_digest(h, obj)
    return h.hexdigest()


def model_digest(model: nn.Module) -> str:
    """sha256 of a model's state_dict (names, dtypes, shapes and values)."""
    return digest(dict(model.state_dict()))


def dataset_indices(dataset) -> Optional[Tensor]:
    """Indices into the base dataset when ``dataset`` is a (nested) Subset, else None."""
    from torch.utils.data import Subset

    if not isinstance(dataset, Subset):
        return None
    idx = torch.as_tensor(list(dataset.indices), dtype=torch.int64)
    while isinstance(dataset, Subset):
        parent = dataset.dataset
        if isinstance(parent, Subset):
            idx = torch.as_tensor(list(parent.indices), dtype=torch.int64)[idx]
        dataset = parent
    return idx


def data_digest(dataset) -> Optional[str]:
    """sha256 naming the samples a dataset holds, where that is cheap to know, else None.

    - a folder dataset (torchvision ``ImageFolder`` / ``DatasetFolder``: a ``samples`` list of
      (path, label)): the absolute path, size in bytes and label of each selected file;
    - a ``TensorDataset``: the selected rows of its tensors;
    through any nesting of ``Subset`` (only the selected samples count). The prefix ("files:",
    "tensors:") says which.
    """
    from torch.utils.data import Subset, TensorDataset

    indices = dataset_indices(dataset)
    base = dataset
    while isinstance(base, Subset):
        base = base.dataset
    samples = getattr(base, "samples", None)
    if isinstance(samples, list) and all(isinstance(s, tuple) and len(s) == 2 for s in samples[:1]):
        h = hashlib.sha256()
        chosen = samples if indices is None else [samples[i] for i in indices.tolist()]
        for path, label in chosen:
            try:
                size = os.stat(path).st_size
            except OSError:
                size = -1
            h.update(f"{os.path.abspath(path)}\0{size}\0{label}\n".encode())
        return "files:" + h.hexdigest()
    if isinstance(base, TensorDataset):
        tensors = base.tensors if indices is None else [t[indices] for t in base.tensors]
        return "tensors:" + digest(list(tensors))
    return None
