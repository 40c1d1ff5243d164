"""Small networks for the calibration and activation-metric tests, with a hand-written forward.

``stages(x)`` recomputes every intermediate tensor step by step (no hooks), so tests can compare
what :func:`chanaxis_fast.calibrate` collected with activations obtained independently.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from chanaxis_fast import calibrate


class SmallNet(nn.Module):
    """conv-BN-ReLU x3 sharing one inplace ReLU (a, grouped strided b, strided e), a 1x1 side branch
    d without BN or activation, a Linear after flatten (fc) and one after pooling (fc2)."""

    def __init__(self, seed=0, eps=1e-5):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self._build(eps)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for bn in (self.bn_a, self.bn_b, self.bn_e):
                C = bn.num_features
                bn.running_mean.copy_(torch.rand(C, generator=g) * 2 - 1)
                bn.running_var.copy_(torch.rand(C, generator=g) * 1.5 + 0.5)
                bn.weight.copy_(torch.rand(C, generator=g) * 1.5 + 0.5)
                bn.bias.copy_(torch.rand(C, generator=g) * 1.6 - 1.0)
        self.double().eval()

    def _build(self, eps):
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(6, eps=eps)
        self.b = nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2)
        self.bn_b = nn.BatchNorm2d(8, eps=eps)
        self.e = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.bn_e = nn.BatchNorm2d(8, eps=eps)
        self.d = nn.Conv2d(6, 4, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8 * 2 * 2, 5)
        self.fc2 = nn.Linear(4, 5)

    def forward(self, x):
        x = self.relu(self.bn_a(self.a(x)))
        y = self.relu(self.bn_b(self.b(x)))
        y = self.relu(self.bn_e(self.e(y)))
        return self.fc(torch.flatten(y, 1)) + self.fc2(self.d(x).mean((2, 3)))

    @torch.no_grad()
    def stages(self, x):
        """Every intermediate tensor, computed step by step: '<layer>.pre' / '.bn' / '.act' read-outs,
        '<consumer>.in' inputs, 'logits'."""
        s = {}
        s["a.in"] = x
        s["a.pre"] = self.a(x)
        s["a.bn"] = self.bn_a(s["a.pre"])
        s["a.act"] = torch.relu(s["a.bn"])
        s["b.in"] = s["d.in"] = s["a.act"]
        s["b.pre"] = self.b(s["b.in"])
        s["b.bn"] = self.bn_b(s["b.pre"])
        s["b.act"] = torch.relu(s["b.bn"])
        s["e.in"] = s["b.act"]
        s["e.pre"] = self.e(s["e.in"])
        s["e.bn"] = self.bn_e(s["e.pre"])
        s["e.act"] = torch.relu(s["e.bn"])
        s["d.pre"] = self.d(s["d.in"])
        s["fc.in"] = torch.flatten(s["e.act"], 1)
        s["fc.pre"] = self.fc(s["fc.in"])
        s["fc2.in"] = s["d.pre"].mean((2, 3))
        s["fc2.pre"] = self.fc2(s["fc2.in"])
        s["logits"] = s["fc.pre"] + s["fc2.pre"]
        return s


# consumers of each layer of SmallNet, written out by hand: (consumer, offset of the channels)
SMALL_CONSUMERS = {"a": [("b", 0), ("d", 0)], "b": [("e", 0)], "e": [("fc", 0)], "d": [("fc2", 0)]}


class ChannelsLastNet(nn.Module):
    """A ConvNeXt-like block: Linear layers acting on [N, H, W, C] tensors."""

    def __init__(self, seed=0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.pw1 = nn.Linear(8, 12)
            self.act = nn.GELU()
            self.pw2 = nn.Linear(12, 8)
            self.head = nn.Linear(8, 4)
        self.double().eval()

    def forward(self, x):
        y = self.stem(x).permute(0, 2, 3, 1)
        y = self.pw2(self.act(self.pw1(y)))
        return self.head(y.mean((1, 2)))

    @torch.no_grad()
    def stages(self, x):
        s = {"pw1.in": self.stem(x).permute(0, 2, 3, 1)}
        s["pw1.pre"] = self.pw1(s["pw1.in"])
        s["pw1.act"] = self.act(s["pw1.pre"])
        s["pw2.in"] = s["pw1.act"]
        s["pw2.pre"] = self.pw2(s["pw2.in"])
        s["logits"] = self.head(s["pw2.pre"].mean((1, 2)))
        return s


def dataset(n=40, size=8, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return torch.utils.data.TensorDataset(x, y)


def margin_np(logits, labels):
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    zy = z[np.arange(len(y)), y]
    other = z.copy()
    other[np.arange(len(y)), y] = -np.inf
    return zy - other.max(1)


def hand_uniforms(n_images, P, seed):
    """All the calibration's uniforms drawn in one call (the stream does not depend on batching)."""
    return torch.rand(n_images, P, generator=torch.Generator().manual_seed(seed))


def rows_np(act, mode, u=None, channel_dim=1):
    """[rows, C] numpy of a read-out [N, C, H, W] (or channels-last) in a calibration mode."""
    a = torch.as_tensor(act).double()
    if channel_dim != 1:
        a = a.movedim(channel_dim, 1)
    N, C = a.shape[:2]
    flat = a.reshape(N, C, -1).numpy()
    S = flat.shape[2]
    if mode == "gap":
        return flat.mean(2), 1
    if mode == "all" or S == 1:
        return flat.transpose(0, 2, 1).reshape(-1, C), S
    pos = np.floor(u.double().numpy() * S).astype(np.int64)
    out = np.stack([flat[n][:, pos[n]].T for n in range(N)])  # [N, P, C]
    return out.reshape(-1, C), pos.shape[1]


def moments_np(rows):
    mean = rows.mean(0)
    z = rows - mean
    return mean, z.T @ z


LAYERS = ["a", "b", "e", "d"]  # SmallNet's default layers, in execution order


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: thread synchronisation would dominate on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(model, ds, batch_size=7, **kw):
    """calibrate() over a plain DataLoader of ds, without progress bar."""
    kw.setdefault("progress", False)
    return calibrate(model, DataLoader(ds, batch_size=batch_size), **kw)
