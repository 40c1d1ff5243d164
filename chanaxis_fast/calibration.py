"""Calibration: one forward pass per batch that streams every statistic the metrics need.

:func:`calibrate` runs the model over a calibration loader with forward hooks and keeps, per
calibrated layer, the :class:`~chanaxis_fast.stats.ChannelStats` of the rows ``[Y_1..Y_C, T]``
(METHOD §1-2), plus the inputs of the data-based baselines (METHOD §4), all in the same pass:

- ``"sfvr"``: for every conv/linear *consumer* of a calibrated layer, the per-input-channel
  covariance of its input patches (:class:`PatchStats`, ``C_in x k^2 x k^2``) and the variance of
  each of its (pre-BN) output channels, at the consumer's own sampled output positions ("sample")
  or at every output position ("all" and "gap"). Cost per image: a gather of
  ``P * C_in * k^2`` input values and ``C_in`` small ``k^2 x k^2`` products per consumer (``P`` =
  16 positions; every output position in "all"/"gap" mode).
- ``"taylor"``: the gradient of the cross-entropy with ``reduction="sum"`` with respect to every
  calibrated layer's weight, summed over the calibration batches (a sum over images, so it does
  not depend on the batching). Cost: the forward keeps its autograd graph and one backward per
  batch (about 3x a plain forward), float64 memory of the calibrated weights.
- ``"hrank"``: the mean over the first ``rank_images`` images of the matrix rank of each channel's
  H x W feature map at the read-out point (HRank). Cost: ``rank_images * C`` small SVDs per layer.
- ``"chip"``: the mean over the same images of ``||A||_* - ||A with row c zeroed||_*``, ``A`` the
  C x HW feature matrix of one image at the read-out (CHIP). Cost per image and layer: one
  eigendecomposition of an ``m x m`` Gram matrix, ``m = min(C, HW)``, and ``C`` secular
  equations of ``O(m^2)`` each (see :func:`chip_drops`), instead of ``C`` SVDs of ``m x m``:
  15x faster over the 20 convs of a CIFAR ResNet-18, 55x on one 256 x 784 map
  (benchmarks/bench_chip.py, one thread), yet still about 7 forward passes per image there.

Everything is float64 and merged with the exact pairwise (Chan et al.) update, so results do not
depend on the batch size. Long runs can be checkpointed and resumed (``checkpoint=``).
"""

import hashlib
import itertools
import os
import re
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from . import ops
from .graph import ModelGraph, trace_model
from .stats import ChannelStats, StatsFileError, atomic_save, check_header, read_state

_FORMAT = "chanaxis_fast.Calibration"
_PATCH_FORMAT = "chanaxis_fast.PatchStats"
_VERSION = 1

EXTRAS = ("sfvr", "taylor", "hrank", "chip")
MODES = ("sample", "all", "gap")
READOUTS = ("pre_bn", "post_bn", "post_act")
# Configuration entries that define the result: a checkpoint resumes only when they all agree.
_RESUME_KEYS = ("layers", "mode", "positions_per_image", "target", "readout", "seed", "max_images",
                "extras", "rank_images", "skip_nonfinite", "dataset_size", "dataset_indices",
                "model_digest")
_CHUNK = 1 << 23  # float64 elements per working block of the patch gather and of CHIP (64 MiB)


# ====================================================================== hashing helpers
def _update_digest(h, obj):
    if isinstance(obj, Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            _update_digest(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _update_digest(h, v)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


def _digest(obj) -> str:
    h = hashlib.sha256()
    _update_digest(h, obj)
    return h.hexdigest()


def model_digest(model: nn.Module) -> str:
    """sha256 of a model's state_dict (names, dtypes, shapes and values)."""
    return _digest(dict(model.state_dict()))


# ====================================================================== PatchStats
class PatchStats:
    """``G`` independent streamed covariances of ``F``-dimensional rows, float64, merged exactly.

    Used for SFVR: group ``i`` is input channel ``i`` of a consumer and its rows are that channel's
    ``k x k`` input patches (``F = k^2``); with ``F = 1`` it holds per-channel variances.

    count: int64 [G]; mean: float64 [G, F]; comoment: float64 [G, F, F] (centred sums of products).
    Batches fold in with the pairwise update of :class:`~chanaxis_fast.stats.ChannelStats`, one
    group at a time in a batched form, so the result does not depend on the batching.
    """

    def __init__(self, groups: Optional[int] = None, features: Optional[int] = None, *, device=None):
        self.groups, self.features = groups, features
        self.count: Optional[Tensor] = None
        self.mean: Optional[Tensor] = None
        self.comoment: Optional[Tensor] = None
        self.device = None if device is None else torch.device(device)
        if groups is not None and features is not None:
            self._allocate(self.device or torch.device("cpu"))

    def _allocate(self, device):
        G, Fd = self.groups, self.features
        self.device = device
        self.count = torch.zeros(G, dtype=torch.int64, device=device)
        self.mean = torch.zeros(G, Fd, dtype=torch.float64, device=device)
        self.comoment = torch.zeros(G, Fd, Fd, dtype=torch.float64, device=device)

    def update(self, rows: Tensor, *, skip_nonfinite: bool = False, who: str = "PatchStats.update"
               ) -> "PatchStats":
        """Fold in ``rows``: Tensor[G, n, F] (any float dtype). NaN/Inf raise ``ValueError`` unless
        ``skip_nonfinite``, which drops the rows holding one (per group)."""
        if rows.dim() != 3:
            raise ValueError(f"{who}: rows must be 3-D [G, n, F], got {rows.dim()}-D")
        G, n, Fd = rows.shape
        rows = rows.to(torch.float64)
        finite = torch.isfinite(rows).all(-1)
        if skip_nonfinite:
            n_b = finite.sum(1)
            rows = torch.where(finite[..., None], rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
            mean_b = rows.sum(1) / n_b.clamp_min(1)[:, None]
            z = (rows - mean_b[:, None]) * finite[..., None]
        else:
            if not bool(finite.all()):
                raise ValueError(f"{who}: NaN/Inf values in the data (pass skip_nonfinite=True to drop them)")
            n_b = torch.full((G,), n, dtype=torch.int64, device=rows.device)
            mean_b = rows.mean(1) if n else rows.new_zeros(G, Fd)
            z = rows - mean_b[:, None]
        self._fold(n_b, mean_b, z.transpose(1, 2) @ z, who)
        return self

    def merge(self, other: "PatchStats") -> "PatchStats":
        """Fold in the statistics of another PatchStats of the same shape."""
        if other.mean is not None:
            self._fold(other.count, other.mean, other.comoment, "PatchStats.merge")
        return self

    def _fold(self, n_b: Tensor, mean_b: Tensor, M_b: Tensor, who: str):
        G, Fd = mean_b.shape
        if self.groups is not None and (self.groups, self.features) != (G, Fd):
            raise ValueError(f"{who}: these statistics hold {self.groups} groups of {self.features} "
                             f"features, the new data {G} of {Fd}")
        self.groups, self.features = G, Fd
        if self.mean is None:
            self._allocate(self.device or mean_b.device)
        n_b = n_b.to(self.device)
        mean_b = mean_b.to(self.device, torch.float64)
        M_b = M_b.to(self.device, torch.float64)
        n_a = self.count
        n = n_a + n_b
        nd = n.double().clamp_min(1)  # groups that saw no row stay at zero
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b.double() / nd)[:, None]
        self.comoment = (self.comoment + M_b + delta[:, :, None] * delta[:, None, :]
                         * (n_a.double() * n_b.double() / nd)[:, None, None])
        self.count = n

    def covariance(self) -> Tensor:
        """Unbiased covariances ``M / (n - 1)``, float64 [G, F, F]."""
        if self.count is None or bool((self.count < 2).any()):
            raise ValueError("PatchStats.covariance: needs at least 2 rows in every group")
        return self.comoment / (self.count.double() - 1)[:, None, None]

    def variance(self) -> Tensor:
        """Unbiased variances, float64 [G, F]."""
        return self.covariance().diagonal(dim1=1, dim2=2)

    def state_dict(self) -> dict:
        if self.mean is None:
            raise ValueError("PatchStats.state_dict: no statistics yet")
        state = {"format": _PATCH_FORMAT, "version": _VERSION, "count": self.count.cpu(),
                 "mean": self.mean.cpu(), "comoment": self.comoment.cpu()}
        state["checksum"] = _digest(state)
        return state

    def load_state_dict(self, state: dict, who: str = "PatchStats.load_state_dict") -> "PatchStats":
        check_header(state, _PATCH_FORMAT, _VERSION, who, "PatchStats", "recalibrate")
        body = {k: v for k, v in state.items() if k != "checksum"}
        try:
            count, mean, M = state["count"], state["mean"], state["comoment"]
            G, Fd = mean.shape
            ok = (count.shape == (G,) and M.shape == (G, Fd, Fd) and count.dtype == torch.int64
                  and mean.dtype == torch.float64 and M.dtype == torch.float64)
        except (KeyError, AttributeError, TypeError, ValueError) as e:
            raise StatsFileError(f"{who}: incomplete state ({type(e).__name__}: {e})") from None
        if not ok:
            raise StatsFileError(f"{who}: inconsistent shapes or dtypes")
        if state.get("checksum") != _digest(body):
            raise StatsFileError(f"{who}: checksum mismatch, the statistics are corrupt")
        self.groups, self.features = G, Fd
        self._allocate(self.device or torch.device("cpu"))
        self.count, self.mean, self.comoment = (count.to(self.device), mean.to(self.device),
                                                M.to(self.device))
        return self

    def __repr__(self):
        return f"PatchStats(groups={self.groups}, features={self.features}, device={self.device})"


# ====================================================================== targets, positions, CHIP
def logit_margin(logits: Tensor, labels: Tensor) -> Tensor:
    """``z_y - max_{k != y} z_k`` per image, float64 [N] (METHOD §1's default target)."""
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logit_margin: logits must be [N, K] with K >= 2, got {tuple(logits.shape)}")
    z = logits.detach().double()
    y = labels.to(z.device, torch.int64)[:, None]
    other = z.scatter(1, y, float("-inf"))
    return z.gather(1, y)[:, 0] - other.max(1).values


def sample_positions(u: Tensor, size: int) -> Tensor:
    """Flat positions ``floor(u * size)`` (int64, clamped to ``size - 1``) for uniforms ``u``.

    The same uniforms serve every layer, each with its own ``size = H * W``."""
    return (u.double() * size).floor().long().clamp_(max=size - 1)


def chip_drops(A: Tensor) -> Tensor:
    """CHIP's per-channel drop ``||A||_* - ||A with row c zeroed||_*`` for a batch of matrices.

    A: Tensor[k, C, S] (one C x S feature matrix per image), computed in float64 -> [k, C], by
    :func:`chanaxis_fast.ops.chip_drops` (one Gram eigendecomposition per image, then each
    channel's secular equation; :func:`chanaxis_fast.reference.chip_drops` is the one-SVD-per-channel
    reference).
    """
    return ops.chip_drops(A)


# ====================================================================== small helpers
def _channels_first(x: Tensor, channel_dim: int) -> Tensor:
    """[N, C, S] view/copy of a read-out with channels at ``channel_dim`` (S = 1 without spatial dims)."""
    if channel_dim % x.dim() != 1:
        x = x.movedim(channel_dim, 1)
    return x.reshape(x.shape[0], x.shape[1], -1)


def _maps(x: Tensor, channel_dim: int) -> Tensor:
    """[N, C, H, W] feature maps of a read-out (no spatial dims: 1 x 1; one: L x 1)."""
    if channel_dim % x.dim() != 1:
        x = x.movedim(channel_dim, 1)
    if x.dim() == 4:
        return x
    return x.reshape(x.shape[0], x.shape[1], -1, 1) if x.dim() != 2 else x[:, :, None, None]


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _conv_pad(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """The input as the conv sees it after padding (so that patches can be cut with padding 0)."""
    if conv.padding_mode != "zeros":
        return F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
    if isinstance(conv.padding, str):
        return F.pad(x, conv._reversed_padding_repeated_twice)
    ph, pw = conv.padding
    return F.pad(x, (pw, pw, ph, ph)) if ph or pw else x


def _parse_extras(extras) -> List[str]:
    if extras is None or extras == "none":
        return []
    if extras == "all":
        return list(EXTRAS)
    if isinstance(extras, str):
        extras = [extras]
    extras = list(extras)
    for e in extras:
        if e not in EXTRAS:
            raise ValueError(f"calibrate: unknown extra {e!r}; choose from {', '.join(EXTRAS)} "
                             f"(or 'all' / None)")
    return [e for e in EXTRAS if e in extras]


def _select_layers(model: nn.Module, graph: ModelGraph, layers, readout: str) -> List[str]:
    modules = dict(model.named_modules())
    if layers is None:
        names = graph.default_layers()
        if not names:
            raise ValueError("calibrate: the model has no default layer (Conv2d with >= 4 outputs, "
                             "classifier excluded); pass layers=")
    elif isinstance(layers, str):
        pattern = re.compile(layers)
        names = [n for n in modules if n and pattern.fullmatch(n)]
        if not names:
            raise ValueError(f"calibrate: layers={layers!r} matches no module name (the regex must "
                             f"match the whole name); layers: {', '.join(graph.layers)}")
    elif callable(layers):
        names = [n for n, m in modules.items() if n and layers(n, m)]
        if not names:
            raise ValueError("calibrate: the layers= callable selected no module")
    else:
        names = list(layers)
        if not names:
            raise ValueError("calibrate: layers= is an empty list")
        if len(set(names)) != len(names):
            raise ValueError(f"calibrate: layers= names a layer twice: {names}")
    for n in names:
        if not isinstance(n, str) or n not in modules:
            raise ValueError(f"calibrate: the model has no module named {n!r}")
        m = modules[n]
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            raise ValueError(f"calibrate: layer {n!r} is a {type(m).__name__}, not an nn.Conv2d or "
                             f"nn.Linear")
        if n not in graph.layers:
            raise ValueError(f"calibrate: layer {n!r} is not called in the model's forward pass")
        node = graph.layers[n]
        if readout == "post_bn" and node.bn is None:
            raise ValueError(f"calibrate: layer {n!r} has no BatchNorm after it, so readout='post_bn' "
                             f"cannot be taken; use 'pre_bn' or leave the layer out")
        if readout == "post_act" and node.act is None:
            raise ValueError(f"calibrate: layer {n!r} has no activation module after it (functional "
                             f"activations such as F.relu cannot be hooked), so readout='post_act' "
                             f"cannot be taken; use 'pre_bn' or leave the layer out")
    return sorted(names, key=lambda n: graph.layers[n].order)


def _dataset_indices(dataset) -> Optional[Tensor]:
    """Indices into the base dataset when ``dataset`` is a (nested) Subset."""
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


def _same(a, b) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape
                and bool(torch.equal(a.cpu(), b.cpu())))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _short(v) -> str:
    if isinstance(v, Tensor):
        return f"tensor of {v.numel()} values"
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


# ====================================================================== Calibration
class Calibration:
    """Everything one calibration pass gathered.

    Attributes:
        layers: calibrated layer names, in execution order.
        graph: the traced :class:`~chanaxis_fast.graph.ModelGraph` (saved without modules).
        stats: {layer: ChannelStats} of the rows ``[Y_1..Y_C, T]`` at the read-out point.
        config: every argument that defines the result (layers, mode, positions_per_image, target,
            readout, seed, max_images, extras, rank_images, skip_nonfinite, dataset_size,
            dataset_indices (int64 tensor when the loader's dataset is a Subset, else None),
            model_digest), plus ``num_images`` / ``num_batches`` and the ``device``.
        patches: {consumer: PatchStats [C_in, F, F]} input patch statistics of every consumer of a
            calibrated layer (extra "sfvr"; F = k^2 for a conv, features per channel for a linear).
        outputs: {consumer: PatchStats [C_out, 1, 1]} variance of each consumer output channel
            (pre-BN; extra "sfvr").
        grads: {layer: float64 Tensor like the weight} summed cross-entropy gradients (extra "taylor").
        hrank, chip: {layer: float64 Tensor[C]} means over the first ``rank_images`` images
            (extras "hrank", "chip"); ``rank_counts`` {layer: images used}.
        num_images, num_batches: how much data went in; ``complete``: False for a checkpoint of an
            unfinished run; ``generator_state``: the position generator's state after the last batch.
    """

    def __init__(self, graph: ModelGraph, layers: Sequence[str], config: dict):
        self.graph = graph
        self.layers = list(layers)
        self.config = dict(config)
        self.stats: Dict[str, ChannelStats] = {}
        self.patches: Dict[str, PatchStats] = {}
        self.outputs: Dict[str, PatchStats] = {}
        self.grads: Dict[str, Tensor] = {}
        self.rank_sums: Dict[str, Tensor] = {}
        self.chip_sums: Dict[str, Tensor] = {}
        self.rank_counts: Dict[str, int] = {}
        self.num_images = 0
        self.num_batches = 0
        self.complete = False
        self.generator_state: Optional[Tensor] = None

    @property
    def extras(self) -> List[str]:
        return list(self.config.get("extras", []))

    @property
    def hrank(self) -> Dict[str, Tensor]:
        return {l: s / max(1, self.rank_counts[l]) for l, s in self.rank_sums.items()}

    @property
    def chip(self) -> Dict[str, Tensor]:
        return {l: s / max(1, self.rank_counts[l]) for l, s in self.chip_sums.items()}

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        state = {
            "format": _FORMAT,
            "version": _VERSION,
            "config": self.config,
            "layers": list(self.layers),
            "graph": self.graph.state_dict(),
            "stats": {l: s.state_dict() for l, s in self.stats.items()},
            "patches": {c: p.state_dict() for c, p in self.patches.items()},
            "outputs": {c: p.state_dict() for c, p in self.outputs.items()},
            "grads": {l: g.cpu() for l, g in self.grads.items()},
            "rank_sums": {l: s.cpu() for l, s in self.rank_sums.items()},
            "chip_sums": {l: s.cpu() for l, s in self.chip_sums.items()},
            "rank_counts": dict(self.rank_counts),
            "progress": {"images": self.num_images, "batches": self.num_batches,
                         "complete": self.complete, "generator": self.generator_state},
        }
        state["checksum"] = _digest(state)
        return state

    @classmethod
    def from_state_dict(cls, state: dict, device=None, who: str = "Calibration.from_state_dict"
                        ) -> "Calibration":
        check_header(state, _FORMAT, _VERSION, who, "Calibration", "recalibrate")
        if state.get("checksum") != _digest({k: v for k, v in state.items() if k != "checksum"}):
            raise StatsFileError(f"{who}: checksum mismatch, the calibration is corrupt")
        dev = torch.device(device) if device is not None else torch.device("cpu")
        try:
            cal = cls(ModelGraph.from_state_dict(state["graph"]), state["layers"], state["config"])
            cal.stats = {l: ChannelStats(device=dev).load_state_dict(s)
                         for l, s in state["stats"].items()}
            cal.patches = {c: PatchStats(device=dev).load_state_dict(p, who)
                           for c, p in state["patches"].items()}
            cal.outputs = {c: PatchStats(device=dev).load_state_dict(p, who)
                           for c, p in state["outputs"].items()}
            cal.grads = {l: g.to(dev) for l, g in state["grads"].items()}
            cal.rank_sums = {l: s.to(dev) for l, s in state["rank_sums"].items()}
            cal.chip_sums = {l: s.to(dev) for l, s in state["chip_sums"].items()}
            cal.rank_counts = {l: int(n) for l, n in state["rank_counts"].items()}
            p = state["progress"]
            cal.num_images, cal.num_batches = int(p["images"]), int(p["batches"])
            cal.complete, cal.generator_state = bool(p["complete"]), p["generator"]
        except StatsFileError:
            raise
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise StatsFileError(f"{who}: incomplete calibration state ({type(e).__name__}: {e})") from None
        if sorted(cal.stats) != sorted(cal.layers):
            raise StatsFileError(f"{who}: statistics and layer list disagree")
        return cal

    def save(self, path) -> None:
        """Write atomically (see :func:`~chanaxis_fast.stats.atomic_save`)."""
        atomic_save(self.state_dict(), path)

    @classmethod
    def load(cls, path, device=None) -> "Calibration":
        """Read a file written by :meth:`save` (or a checkpoint of :func:`calibrate`); a truncated,
        corrupt or foreign file raises :class:`~chanaxis_fast.stats.StatsFileError`."""
        who = f"Calibration.load({os.fspath(path)!r})"
        return cls.from_state_dict(read_state(path, who, "calibration"), device, who)

    def __repr__(self):
        return (f"Calibration({len(self.layers)} layers, {self.num_images} images, "
                f"mode={self.config.get('mode')!r}, readout={self.config.get('readout')!r}, "
                f"extras={self.extras}{'' if self.complete else ', incomplete'})")


# ====================================================================== the pass
class _Pass:
    """The forward hooks of one calibration pass and what they stash for the current batch.

    Hooks only stash (already reduced where possible: sampled positions, patch moments, ranks);
    nothing is folded into the calibration before the whole batch succeeded.
    """

    def __init__(self, model, graph, cal: Calibration, readout, mode, P, extras, rank_images,
                 skip_nonfinite):
        self.graph, self.cal, self.mode, self.P = graph, cal, mode, P
        self.rank = "hrank" in extras or "chip" in extras
        self.extras, self.rank_images, self.skip = extras, rank_images, skip_nonfinite
        self.modules = dict(model.named_modules())
        self.handles = []
        self.u: Optional[Tensor] = None
        self.rank_todo = 0
        self.active = True  # off during a gradient-only forward
        self.reset()
        points: Dict[str, Dict[int, List[str]]] = {}
        for l in cal.layers:
            node = graph.layers[l]
            mod, call = {"pre_bn": (l, 0), "post_bn": (node.bn, node.bn_call),
                         "post_act": (node.act, node.act_call)}[readout]
            points.setdefault(mod, {}).setdefault(call, []).append(l)
        try:
            for mod, calls in points.items():
                self.handles.append(self.modules[mod].register_forward_hook(self._readout_hook(mod, calls)))
            if "sfvr" in extras:
                for c in cal.patches:
                    self.handles.append(self.modules[c].register_forward_pre_hook(self._patch_hook(c)))
                    self.handles.append(self.modules[c].register_forward_hook(self._output_hook(c)))
        except BaseException:
            self.remove()
            raise

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def reset(self, u: Optional[Tensor] = None, rank_todo: int = 0):
        self.u, self.rank_todo = u, rank_todo
        self.calls: Dict[str, int] = {}
        self.positions: Dict[int, Tensor] = {}
        self.rows: Dict[str, Tensor] = {}
        self.ranks: Dict[str, tuple] = {}
        self.patch: Dict[str, PatchStats] = {}
        self.out: Dict[str, PatchStats] = {}

    def _index(self, N: int, S: int, device) -> Tensor:
        """[N, n] flat positions of each image's rows for a map of S positions."""
        if self.mode == "sample":
            if S == 1:  # sampling one position with replacement only repeats it: one row per image
                return torch.zeros(N, 1, dtype=torch.int64, device=device)
            if S not in self.positions:
                self.positions[S] = sample_positions(self.u, S).to(device)
            return self.positions[S]
        return torch.arange(S, device=device).expand(N, S)

    # -------------------------------------------------------------- read-outs
    def _readout_hook(self, name, calls):
        def hook(mod, args, out):
            if not self.active:
                return
            k = self.calls.get(name, 0)
            self.calls[name] = k + 1
            for layer in calls.get(k, ()):
                self._capture(layer, out)
        return hook

    def _capture(self, layer: str, out: Tensor):
        node = self.graph.layers[layer]
        x = out.detach()
        flat = _channels_first(x, node.channel_dim)
        N, C, S = flat.shape
        if self.mode == "sample":
            idx = self._index(N, S, x.device)
            rows = flat.gather(2, idx[:, None, :].expand(N, C, idx.shape[1]))
        elif self.mode == "all":
            # copy: an inplace op later in the forward (e.g. ReLU(inplace=True)) may overwrite it
            rows = flat.clone() if _shares_memory(flat, x) else flat
        else:
            rows = flat.double().mean(2, keepdim=True)
        self.rows[layer] = rows[..., None]  # [N, C, n, 1]: one row per (image, position)
        if self.rank and self.rank_todo > 0:
            self._ranks(layer, x[: self.rank_todo], node.channel_dim)

    def _ranks(self, layer, x, channel_dim):
        maps = _maps(x, channel_dim)
        ok = torch.isfinite(maps).flatten(1).all(1)
        if not bool(ok.all()):
            if not self.skip:
                raise ValueError(f"calibrate: NaN/Inf in the read-out of layer {layer!r} (pass "
                                 f"skip_nonfinite=True to drop such images)")
            maps = maps[ok]
        k, C = maps.shape[:2]
        hr = ch = None
        if "hrank" in self.extras:
            m = maps if maps.dtype in (torch.float32, torch.float64) else maps.float()
            hr = torch.linalg.matrix_rank(m).sum(0).double() if k else maps.new_zeros(C, dtype=torch.float64)
        if "chip" in self.extras:
            ch = chip_drops(maps.reshape(k, C, -1)).sum(0) if k else maps.new_zeros(C, dtype=torch.float64)
        self.ranks[layer] = (hr, ch, k)

    # -------------------------------------------------------------- SFVR consumers
    def _patch_hook(self, name):
        node = self.graph.layers[name]

        def hook(mod, args):
            if not self.active:
                return
            x = args[0].detach()
            who = f"calibrate: input of consumer {name!r}"
            N = x.shape[0]
            ps = PatchStats()
            if node.kind == "conv":
                xp = _conv_pad(x, mod)
                (kh, kw), (sh, sw), (dh, dw) = mod.kernel_size, mod.stride, mod.dilation
                Ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
                Wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
                idx = self._index(N, Ho * Wo, x.device)
                n = idx.shape[1]
                step = max(1, _CHUNK // max(1, x.shape[1] * n * kh * kw))
                ar_h = torch.arange(kh, device=x.device) * dh
                ar_w = torch.arange(kw, device=x.device) * dw
                for i0 in range(0, N, step):
                    ids = idx[i0:i0 + step]
                    ih = (ids // Wo * sh)[..., None] + ar_h               # [b, n, kh]
                    iw = (ids % Wo * sw)[..., None] + ar_w                # [b, n, kw]
                    img = torch.arange(i0, i0 + ids.shape[0], device=x.device)[:, None, None, None]
                    p = xp[img, :, ih[..., :, None], iw[..., None, :]]    # [b, n, kh, kw, C_in]
                    ps.update(p.permute(4, 0, 1, 2, 3).reshape(p.shape[-1], -1, kh * kw),
                              skip_nonfinite=self.skip, who=who)
            else:
                e = node.input_expand
                if x.dim() == 2:   # after flatten / pooling: each channel's e features are its patch
                    ps.update(x.reshape(N, -1, e).permute(1, 0, 2), skip_nonfinite=self.skip, who=who)
                else:              # channels-last [N, ..., C_in]: one feature per position
                    flat = x.reshape(N, -1, x.shape[-1])
                    idx = self._index(N, flat.shape[1], x.device)
                    g = flat.gather(1, idx[..., None].expand(N, idx.shape[1], flat.shape[2]))
                    ps.update(g.reshape(-1, g.shape[-1]).T[..., None], skip_nonfinite=self.skip, who=who)
            self.patch[name] = ps
        return hook

    def _output_hook(self, name):
        node = self.graph.layers[name]

        def hook(mod, args, out):
            if not self.active:
                return
            flat = _channels_first(out.detach(), node.channel_dim)
            N, C, S = flat.shape
            idx = self._index(N, S, flat.device)
            rows = flat.gather(2, idx[:, None, :].expand(N, C, idx.shape[1]))
            self.out[name] = PatchStats().update(rows.permute(1, 0, 2).reshape(C, -1, 1),
                                                 skip_nonfinite=self.skip,
                                                 who=f"calibrate: output of consumer {name!r}")
        return hook


def calibrate(
    model: nn.Module,
    loader,
    *,
    layers: Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]] = None,
    positions_per_image: int = 16,
    mode: str = "sample",
    target: Union[str, Callable[[Tensor, Tensor], Tensor]] = "logit_margin",
    readout: str = "pre_bn",
    device=None,
    seed: int = 0,
    max_images: Optional[int] = None,
    progress: bool = True,
    extras: Union[None, str, Sequence[str]] = "all",
    rank_images: int = 64,
    checkpoint=None,
    checkpoint_every: int = 50,
    skip_nonfinite: bool = False,
) -> Calibration:
    """Stream the channel statistics (and baseline inputs) of ``model`` over ``loader``.

    Args:
        model: the network; it runs in eval mode during the pass (every module's mode is restored
            afterwards, also on error). It must already be on ``device``.
        loader: yields ``(images, labels)`` batches. For ``checkpoint`` resumption it must yield the
            same images in the same order on every run (``shuffle=False`` or a seeded sampler).
        layers: None (``graph.default_layers()``), a list of module names, a regex that must match
            whole module names, or ``callable(name, module) -> bool``. Every selected module must be
            an nn.Conv2d / nn.Linear called in the forward; otherwise ``ValueError`` names it.
            Calibrated layers are kept in execution order.
        positions_per_image: P, the spatial samples per image in mode "sample".
        mode: "sample" (P positions per image, uniform with replacement), "all" (every position)
            or "gap" (one global-average-pooled row per image). A read-out without spatial
            positions (Linear on [N, C], 1 x 1 maps) gives one row per image in every mode.
        target: "logit_margin" (``z_y - max_{k != y} z_k`` of the model's own logits) or
            ``callable(logits, labels) -> Tensor[N]``; one value per image, repeated at its rows.
        readout: "pre_bn" (the layer's output), "post_bn" (the output of its BatchNorm) or
            "post_act" (the output of the activation module after it).
        device: where the images go and the statistics live (default: the model's device).
        seed: seeds the one CPU ``torch.Generator`` of the positions. Per batch,
            ``u = torch.rand(batch, P, generator=g)`` and layer ``l`` uses positions
            ``floor(u * H_l * W_l)``: the stream is consumed image by image in loader order, so the
            positions of an image do not depend on the batch size.
        max_images: stop after this many images (the last batch is truncated).
        progress: show a tqdm progress bar.
        extras: which baseline inputs to gather: "all" (default), None, or a subset of
            ("sfvr", "taylor", "hrank", "chip"); see the module docstring for what each costs.
        rank_images: images (the first ones, in loader order) used by HRank and CHIP.
        checkpoint: a path. The partial calibration (with batches done and the generator state) is
            written atomically every ``checkpoint_every`` batches, when the pass fails or is
            interrupted, and at the end. A later call with the same path and configuration skips the
            batches already done and continues; a finished checkpoint is returned as is; another
            configuration raises ``ValueError``.
        skip_nonfinite: drop rows holding NaN/Inf instead of raising.

    Returns:
        a :class:`Calibration`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"calibrate: model must be an nn.Module, got {type(model).__name__}")
    if mode not in MODES:
        raise ValueError(f"calibrate: mode must be one of {', '.join(MODES)}, got {mode!r}")
    if readout not in READOUTS:
        raise ValueError(f"calibrate: readout must be one of {', '.join(READOUTS)}, got {readout!r}")
    if not isinstance(positions_per_image, int) or positions_per_image < 1:
        raise ValueError(f"calibrate: positions_per_image must be a positive int, got {positions_per_image!r}")
    if max_images is not None and (not isinstance(max_images, int) or max_images < 1):
        raise ValueError(f"calibrate: max_images must be a positive int or None, got {max_images!r}")
    if not isinstance(rank_images, int) or rank_images < 1:
        raise ValueError(f"calibrate: rank_images must be a positive int, got {rank_images!r}")
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"calibrate: checkpoint_every must be a positive int, got {checkpoint_every!r}")
    if isinstance(target, str):
        if target != "logit_margin":
            raise ValueError(f"calibrate: target must be 'logit_margin' or a callable, got {target!r}")
        target_fn, target_name = logit_margin, "logit_margin"
    elif callable(target):
        target_fn = target
        target_name = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', repr(target))}"
    else:
        raise TypeError(f"calibrate: target must be 'logit_margin' or a callable, got {type(target).__name__}")
    extras = _parse_extras(extras)
    params = list(model.parameters())
    if device is None:
        device = params[0].device if params else torch.device("cpu")
    device = torch.device(device)
    for name, p in itertools.chain(model.named_parameters(), model.named_buffers()):
        if p.device.type != device.type or (device.index is not None and p.device != device):
            raise ValueError(f"calibrate: the model's {name!r} is on {p.device}, not on device={device}; "
                             f"move the model first")

    it = iter(loader)
    try:
        first = next(it)
    except StopIteration:
        raise ValueError("calibrate: the loader yielded no batch") from None
    images0, _ = _unpack(first)
    modes = {m: m.training for m in model.modules()}
    try:
        graph = trace_model(model, images0[:2].to(device))
    finally:
        for m, t in modes.items():
            m.training = t
    names = _select_layers(model, graph, layers, readout)

    dataset = getattr(loader, "dataset", None)
    try:
        dataset_size = len(dataset) if dataset is not None else None
    except TypeError:
        dataset_size = None
    config = dict(layers=names, mode=mode, positions_per_image=positions_per_image,
                  target=target_name, readout=readout, seed=seed, max_images=max_images,
                  extras=extras, rank_images=rank_images, skip_nonfinite=skip_nonfinite,
                  dataset_size=dataset_size, dataset_indices=_dataset_indices(dataset),
                  model_digest=model_digest(model), device=str(device))

    cal = None
    if checkpoint is not None and os.path.exists(checkpoint):
        cal = Calibration.load(checkpoint, device)
        diff = [k for k in _RESUME_KEYS if not _same(cal.config.get(k), config[k])]
        if diff:
            raise ValueError(
                f"calibrate: checkpoint {os.fspath(checkpoint)!r} was made with another configuration ("
                + "; ".join(f"{k}: {_short(cal.config.get(k))} there, {_short(config[k])} now" for k in diff)
                + "); delete it or pass another checkpoint path")
        cal.graph = graph  # the traced graph, with its modules
        if cal.complete:
            return cal
    if cal is None:
        cal = _new_calibration(model, graph, names, config, extras, device)
    gen = torch.Generator()
    gen.manual_seed(seed)
    if cal.generator_state is not None:
        gen.set_state(cal.generator_state)

    taylor = "taylor" in extras
    weights = {l: graph.module(l).weight for l in names} if taylor else {}
    grad_flags = {l: w.requires_grad for l, w in weights.items()}
    hooks = None
    saved_batches = cal.num_batches
    try:
        model.eval()
        for w in weights.values():
            w.requires_grad_(True)
        hooks = _Pass(model, graph, cal, readout, mode, positions_per_image, extras, rank_images,
                      skip_nonfinite)
        try:
            total = len(loader)
        except TypeError:
            total = None
        resume_batches, resume_images = cal.num_batches, cal.num_images
        with tqdm(total=total, disable=not progress, unit="batch", desc="calibrate") as bar:
            pulled, skip_images = 0, 0
            for batch in itertools.chain([first], it):
                pulled += 1
                images, labels = _unpack(batch)
                if pulled <= resume_batches:  # resuming: these batches are in the checkpoint
                    skip_images += len(images)
                    bar.update(1)
                    continue
                if pulled == resume_batches + 1:
                    _check_skipped(skip_images, resume_batches, resume_images)
                if max_images is not None:
                    keep = max_images - cal.num_images
                    images, labels = images[:keep], labels[:keep]
                _run_batch(model, cal, hooks, gen, images.to(device), labels.to(device), target_fn,
                           weights, mode, positions_per_image, rank_images)
                bar.update(1)
                if checkpoint is not None and cal.num_batches - saved_batches >= checkpoint_every:
                    cal.save(checkpoint)
                    saved_batches = cal.num_batches
                if max_images is not None and cal.num_images >= max_images:
                    break
        if pulled < resume_batches:
            raise ValueError(f"calibrate: the loader yielded {pulled} batches, the checkpoint holds "
                             f"{resume_batches}; it must yield the same batches to resume")
        if pulled == resume_batches:
            _check_skipped(skip_images, resume_batches, resume_images)
        if cal.num_images == 0:
            raise ValueError("calibrate: the loader yielded no images")
        cal.complete = True
        cal.config.update(num_images=cal.num_images, num_batches=cal.num_batches)
        if checkpoint is not None:
            cal.save(checkpoint)
    except BaseException:
        if checkpoint is not None and cal.num_batches > saved_batches:
            cal.save(checkpoint)  # never lose the batches done since the last checkpoint
        raise
    finally:
        if hooks is not None:
            hooks.remove()
        for l, w in weights.items():
            w.requires_grad_(grad_flags[l])
        for m, t in modes.items():
            m.training = t
    return cal


def _check_skipped(skip_images, batches, images):
    if skip_images != images:
        raise ValueError(f"calibrate: the checkpoint's {batches} batches held {images} images, the "
                         f"loader's first {batches} hold {skip_images}; it must yield the same batches "
                         f"in the same order to resume (shuffle=False or a seeded sampler)")


def _unpack(batch):
    if not isinstance(batch, (list, tuple)) or len(batch) < 2 or not isinstance(batch[0], Tensor):
        raise ValueError("calibrate: the loader must yield (images, labels) batches, got "
                         f"{type(batch).__name__}")
    labels = batch[1] if isinstance(batch[1], Tensor) else torch.as_tensor(batch[1])
    return batch[0], labels


def _new_calibration(model, graph, names, config, extras, device) -> Calibration:
    cal = Calibration(graph, names, config)
    for l in names:
        C = graph.layers[l].out_channels
        cal.stats[l] = ChannelStats(C, has_target=True, device=device)
        if "taylor" in extras:
            cal.grads[l] = torch.zeros_like(graph.module(l).weight, dtype=torch.float64, device=device)
        if "hrank" in extras or "chip" in extras:
            cal.rank_counts[l] = 0
        if "hrank" in extras:
            cal.rank_sums[l] = torch.zeros(C, dtype=torch.float64, device=device)
        if "chip" in extras:
            cal.chip_sums[l] = torch.zeros(C, dtype=torch.float64, device=device)
    if "sfvr" in extras:
        for l in names:
            for c, _, e in graph.consumers(l):
                if c in cal.patches:
                    continue
                node = graph.layers[c]
                k2 = node.kernel_size[0] * node.kernel_size[1] if node.kind == "conv" else e
                cal.patches[c] = PatchStats(node.in_channels // (1 if node.kind == "conv" else e), k2,
                                            device=device)
                cal.outputs[c] = PatchStats(node.out_channels, 1, device=device)
    return cal


def _taylor_grads(model, hooks: _Pass, weights, logits, images, labels, skip_nonfinite):
    """Gradients of the summed cross-entropy w.r.t. the calibrated weights (float64).

    Images with a non-finite loss raise, or with ``skip_nonfinite`` are left out by a second,
    gradient-only forward on the other images (their NaN would otherwise reach every gradient)."""
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


def _run_batch(model, cal, hooks: _Pass, gen, images, labels, target_fn, weights, mode, P,
               rank_images):
    """One forward (with grad for Taylor), then fold everything in; nothing is folded on error."""
    N = images.shape[0]
    u = torch.rand(N, P, generator=gen) if mode == "sample" else None
    hooks.reset(u, max(0, min(N, rank_images - cal.num_images)))
    with torch.enable_grad() if weights else torch.no_grad():
        logits = model(images)
        if not isinstance(logits, Tensor):
            raise ValueError(f"calibrate: the model must return a logits tensor, got {type(logits).__name__}")
        t = target_fn(logits.detach(), labels)
        if not isinstance(t, Tensor) or t.shape != (N,):
            raise ValueError(f"calibrate: the target must be a Tensor[{N}] (one value per image), got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        t = t.detach().to(images.device, torch.float64)
        grads = _taylor_grads(model, hooks, weights, logits, images, labels.long(),
                              cal.config["skip_nonfinite"]) if weights else {}
    missing = [l for l in cal.layers if l not in hooks.rows]
    if missing:
        raise RuntimeError(f"calibrate: no read-out was captured for {', '.join(missing)} "
                           f"(the forward pass took another path than the traced one)")
    batch_stats = {l: ChannelStats().update(hooks.rows[l], t, mode="all",
                                            skip_nonfinite=cal.config["skip_nonfinite"])
                   for l in cal.layers}
    for c in cal.patches:
        if c not in hooks.patch or c not in hooks.out:
            raise RuntimeError(f"calibrate: consumer {c!r} was not called in this forward pass")
    # everything computed: fold in (cannot fail half-way)
    for l, s in batch_stats.items():
        cal.stats[l].merge(s)
    for c in cal.patches:
        cal.patches[c].merge(hooks.patch[c])
        cal.outputs[c].merge(hooks.out[c])
    for l, g in grads.items():
        cal.grads[l] += g
    for l, (hr, ch, k) in hooks.ranks.items():
        if hr is not None:
            cal.rank_sums[l] += hr
        if ch is not None:
            cal.chip_sums[l] += ch
        cal.rank_counts[l] += k
    cal.num_images += N
    cal.num_batches += 1
    cal.generator_state = gen.get_state()
