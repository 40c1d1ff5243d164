"""Calibration: one forward pass per batch that streams every statistic the metrics need.

:func:`calibrate` runs the model over a calibration loader with forward hooks and keeps, per
calibrated layer, the :class:`~chanaxis_fast.stats.ChannelStats` of the rows ``[Y_1..Y_C, T]``
(METHOD §1-2), plus the inputs of the data-based baselines (METHOD §4), all in the same pass.
This module holds the pass (its hooks and the batch loop) and the :class:`Calibration`
container; each baseline's input lives in a module of :mod:`chanaxis_fast.extras`
(``"sfvr"``: :mod:`~chanaxis_fast.extras.sfvr`, with :class:`~chanaxis_fast.patch_stats.PatchStats`;
``"taylor"``: :mod:`~chanaxis_fast.extras.taylor`; ``"hrank"`` and ``"chip"``:
:mod:`~chanaxis_fast.extras.ranks`), where its cost is documented.

Everything is float64 and merged with the exact pairwise (Chan et al.) update, so results do not
depend on the batch size. Long runs can be checkpointed and resumed (``checkpoint=``).
"""

import contextlib
import itertools
import os
import re
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .digest import data_digest, dataset_indices, digest as _digest, model_digest
from .errors import UserInputError
from .extras import EXTRAS, channels_first, parse_extras, ranks, sfvr
from .extras.ranks import chip_drops  # noqa: F401  (re-exported: chanaxis_fast.calibration.chip_drops)
from .extras.taylor import taylor_grads
from .finite import all_finite
from .graph import ModelGraph, trace_model
from .patch_stats import PatchStats
from . import ops
from .runtime import SaveSchedule, check_writable, deferred_interrupts, sigterm_as_interrupt
from .stats import ChannelStats, StatsFileError, atomic_save, check_header, read_state

_FORMAT = "chanaxis_fast.Calibration"
_VERSION = 1

MODES = ("sample", "all", "gap")
READOUTS = ("pre_bn", "post_bn", "post_act")
# Configuration entries that define the result: a checkpoint resumes only when they all agree.
_RESUME_KEYS = ("layers", "mode", "positions_per_image", "target", "readout", "seed", "max_images",
                "extras", "rank_images", "skip_nonfinite", "dataset_size", "dataset_indices",
                "model_digest", "data_digest", "first_batch_digest", "amp", "precision")
# What a configuration entry meant in files written before the entry existed.
_CONFIG_DEFAULTS = {"precision": "float64"}
_DATA_DIFF = {
    "data_digest": "data_digest: the dataset holds other samples (other files, sizes, labels or tensors)",
    "first_batch_digest": "first_batch_digest: the loader's first batch differs (other data, order or "
                          "batch size; to resume, the loader must yield the same batches in the same order)",
}

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



# ====================================================================== small helpers
def _shares_memory(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _version(x: Tensor) -> Optional[int]:
    """x's version counter (bumped by every in-place change), or None for an inference tensor."""
    try:
        return x._version
    except RuntimeError:
        return None


def select_layers(model: nn.Module, graph: ModelGraph, layers, readout: str) -> List[str]:
    """The layers :func:`calibrate` would calibrate (``layers`` as there), in execution order;
    UserInputError when a layer is not a called Conv2d / Linear or lacks the ``readout`` point."""
    modules = dict(model.named_modules())
    if layers is None or layers == "conv+linear":
        names = graph.default_layers(linear=layers is not None)
        if not names:
            raise UserInputError("calibrate: the model has no default layer (Conv2d with >= 4 outputs, "
                             "classifier excluded); pass layers=")
    elif isinstance(layers, str):
        pattern = re.compile(layers)
        names = [n for n in modules if n and pattern.fullmatch(n)]
        if not names:
            raise UserInputError(f"calibrate: layers={layers!r} matches no module name (the regex must "
                             f"match the whole name); layers: {', '.join(graph.layers)}")
    elif callable(layers):
        names = [n for n, m in modules.items() if n and layers(n, m)]
        if not names:
            raise UserInputError("calibrate: the layers= callable selected no module")
    else:
        names = list(layers)
        if not names:
            raise UserInputError("calibrate: layers= is an empty list")
        if len(set(names)) != len(names):
            raise UserInputError(f"calibrate: layers= names a layer twice: {names}")
    for n in names:
        if not isinstance(n, str) or n not in modules:
            raise UserInputError(f"calibrate: the model has no module named {n!r}")
        m = modules[n]
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            raise UserInputError(f"calibrate: layer {n!r} is a {type(m).__name__}, not an nn.Conv2d or "
                             f"nn.Linear")
        if n not in graph.layers:
            raise UserInputError(f"calibrate: layer {n!r} is not called in the model's forward pass")
        node = graph.layers[n]
        if readout == "post_bn" and node.bn is None:
            raise UserInputError(f"calibrate: layer {n!r} has no BatchNorm after it, so readout='post_bn' "
                             f"cannot be taken; use 'pre_bn' or leave the layer out")
        if readout == "post_act" and node.act is None:
            raise UserInputError(f"calibrate: layer {n!r} has no activation module after it (functional "
                             f"activations such as F.relu cannot be hooked), so readout='post_act' "
                             f"cannot be taken; use 'pre_bn' or leave the layer out")
    return sorted(names, key=lambda n: graph.layers[n].order)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


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
        self.stream_images = 0  # images the position stream has passed (distributed: all ranks')
        self.complete = False
        self.torn = False  # a batch was folded in only in part (an internal error): never saved
        self.generator_state: Optional[Tensor] = None

    @property
    def extras(self) -> List[str]:
        """The baseline inputs gathered: a subset of ("sfvr", "taylor", "hrank", "chip")."""
        return list(self.config.get("extras", []))

    @property
    def hrank(self) -> Dict[str, Tensor]:
        """{layer: float64 Tensor[C]} mean feature-map rank of each channel (extra "hrank")."""
        return {l: s / max(1, self.rank_counts[l]) for l, s in self.rank_sums.items()}

    @property
    def chip(self) -> Dict[str, Tensor]:
        """{layer: float64 Tensor[C]} mean nuclear-norm drop of each channel (extra "chip")."""
        return {l: s / max(1, self.rank_counts[l]) for l, s in self.chip_sums.items()}

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Everything as plain tensors, dicts and scalars (CPU), with format, version and a
        checksum: what :meth:`save` writes and :meth:`from_state_dict` reads."""
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
                         "complete": self.complete, "generator": self.generator_state,
                         "stream_images": self.stream_images},
        }
        state["checksum"] = _digest(state)
        return state

    @classmethod
    def from_state_dict(cls, state: dict, device=None, who: str = "Calibration.from_state_dict"
                        ) -> "Calibration":
        """Rebuild a calibration from :meth:`state_dict`'s output, its tensors on ``device``
        (default CPU); a foreign, corrupt or incomplete state raises :class:`StatsFileError`."""
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
            cal.stream_images = int(p.get("stream_images", cal.num_images))
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

    Hooks only stash (already reduced where possible: sampled positions, pooled rows, patch
    moments, ranks); mode "all" keeps each read-out itself, checked against its version counter
    after the forward (a read-out the forward changes in place is copied from then on). Nothing is
    folded into the calibration before the whole batch succeeded: NaN/Inf are checked first, and
    the in-place folds then run with Ctrl-C / SIGTERM held back until the batch is whole.
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
        self.copy: set = set()  # layers whose read-out the forward changes in place: copied
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
        self.versions: Dict[str, tuple] = {}

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
        flat = channels_first(x, node.channel_dim)
        N, C, S = flat.shape
        if self.mode == "sample":
            idx = self._index(N, S, x.device)
            rows = flat.gather(2, idx[:, None, :].expand(N, C, idx.shape[1]))
        elif self.mode == "all":
            rows = flat
            if _shares_memory(flat, x):
                # the forward may change the read-out in place after this hook (x += identity,
                # ReLU(inplace=True)): keep it as it is, and check its version counter after the
                # forward; a layer seen changed is copied from then on (_Pass.changed_readouts)
                version = _version(x)
                if layer in self.copy or version is None:
                    rows = flat.clone()
                else:
                    self.versions[layer] = (x, version)
        else:
            rows = ops.pooled_means(flat)[..., None]  # [N, C, 1]
        self.rows[layer] = rows[..., None]  # [N, C, n, 1]: one row per (image, position)
        if self.rank and self.rank_todo > 0:
            self._ranks(layer, x[: self.rank_todo], node.channel_dim)

    def changed_readouts(self) -> List[str]:
        """The layers whose read-out (kept without a copy in mode "all") the forward changed in
        place after its hook."""
        return [l for l, (x, v) in self.versions.items() if _version(x) != v]

    def _ranks(self, layer, x, channel_dim):
        self.ranks[layer] = ranks.rank_sums(layer, x, channel_dim, self.extras, self.skip)

    # -------------------------------------------------------------- SFVR consumers
    def _patch_hook(self, name):
        node = self.graph.layers[name]
        who = f"calibrate: input of consumer {name!r}"

        def hook(mod, args):
            if self.active:
                self.patch[name] = sfvr.input_stats(args[0].detach(), mod, node, self._index,
                                                    skip_nonfinite=self.skip, who=who)
        return hook

    def _output_hook(self, name):
        node = self.graph.layers[name]
        who = f"calibrate: output of consumer {name!r}"

        def hook(mod, args, out):
            if self.active:
                self.out[name] = sfvr.output_stats(out.detach(), node, self._index,
                                                   skip_nonfinite=self.skip, who=who)
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
    checkpoint_seconds: Optional[float] = 60.0,
    skip_nonfinite: bool = False,
    amp: Optional[str] = None,
    precision: str = "float64",
    distributed: Optional[bool] = None,
) -> Calibration:
    """Stream the channel statistics (and baseline inputs) of ``model`` over ``loader``.

    Args:
        model: the network; it runs in eval mode during the pass (every module's mode is restored
            afterwards, also on error). It must already be on ``device``.
        loader: yields ``(images, labels)`` batches. For ``checkpoint`` resumption it must yield the
            same images in the same order on every run (``shuffle=False`` or a seeded sampler).
        layers: None (``graph.default_layers()``: every Conv2d with >= 4 outputs but the
            classifier), ``"conv+linear"`` (those and every nn.Linear on channels-last maps, e.g.
            ConvNeXt's MLPs), a list of module names, a regex that must match
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
            written atomically every ``checkpoint_every`` batches or ``checkpoint_seconds`` seconds
            (whichever comes first), when the pass fails or is interrupted (Ctrl-C, or SIGTERM,
            which raises :class:`~chanaxis_fast.runtime.Terminated` after the save), and at the end.
            Its folder must exist and be writable (checked before the first batch). A later call
            with the same path and configuration skips the batches already done and continues; a
            finished checkpoint is returned as is; another configuration, or other data (the
            config's ``data_digest`` / ``first_batch_digest``), raises ``UserInputError``.
        checkpoint_every, checkpoint_seconds: the save schedule above (``checkpoint_seconds=None``:
            by batches only).
        skip_nonfinite: drop rows holding NaN/Inf instead of raising.
        amp: None, "bf16" or "fp16": run the forward (and Taylor's backward) under
            ``torch.autocast`` in that dtype; the statistics are still accumulated in float64
            from the half-precision read-outs.
        precision: "float64" (default, on every device) or "float32": the arithmetic of each
            batch's co-moment product (:func:`chanaxis_fast.ops.channel_moments`): the sums,
            means, centring and the running statistics stay float64; "float32" multiplies the
            centred rows in float32 (about 1e-7 relative on the co-moments). Worth it on
            consumer GPUs, which run float64 at 1/32-1/64 of their float32 rate.
        distributed: split the batches among the processes of ``torch.distributed`` and merge
            the statistics (see :mod:`chanaxis_fast.distributed`); None (default): when it is
            initialised with more than one process. Every process must pass the same loader
            (``shuffle=False``); the result equals a single-process calibration (to float64
            rounding) on every rank, rank 0 writes ``checkpoint`` (each rank keeps its partial
            checkpoint in ``checkpoint.rank{r}of{w}`` until the end).

    Raises:
        UserInputError (a ValueError) for bad arguments, detected before the first batch is run.

    Returns:
        a :class:`Calibration`.
    """
    if not isinstance(model, nn.Module):
        raise UserInputError(f"calibrate: model must be an nn.Module, got {type(model).__name__}")
    if mode not in MODES:
        raise UserInputError(f"calibrate: mode must be one of {', '.join(MODES)}, got {mode!r}")
    if readout not in READOUTS:
        raise UserInputError(f"calibrate: readout must be one of {', '.join(READOUTS)}, got {readout!r}")
    if not _is_int(positions_per_image) or positions_per_image < 1:
        raise UserInputError(f"calibrate: positions_per_image must be a positive int, got {positions_per_image!r}")
    if max_images is not None and (not _is_int(max_images) or max_images < 1):
        raise UserInputError(f"calibrate: max_images must be a positive int or None, got {max_images!r}")
    if not _is_int(rank_images) or rank_images < 1:
        raise UserInputError(f"calibrate: rank_images must be a positive int, got {rank_images!r}")
    if not _is_int(checkpoint_every) or checkpoint_every < 1:
        raise UserInputError(f"calibrate: checkpoint_every must be a positive int, got {checkpoint_every!r}")
    if checkpoint_seconds is not None and (isinstance(checkpoint_seconds, bool) or not isinstance(
            checkpoint_seconds, (int, float)) or not checkpoint_seconds > 0):
        raise UserInputError(f"calibrate: checkpoint_seconds must be a positive number or None, got "
                             f"{checkpoint_seconds!r}")
    if not _is_int(seed):
        raise UserInputError(f"calibrate: seed must be an int, got {seed!r}")
    if amp not in (None, "bf16", "fp16"):
        raise UserInputError(f"calibrate: amp must be None, 'bf16' or 'fp16', got {amp!r}")
    if precision not in ("float64", "float32"):
        raise UserInputError(f"calibrate: precision must be 'float64' or 'float32', got {precision!r}")
    if checkpoint is not None:
        check_writable(checkpoint, "calibrate")
    if isinstance(target, str):
        if target != "logit_margin":
            raise UserInputError(f"calibrate: target must be 'logit_margin' or a callable, got {target!r}")
        target_fn, target_name = logit_margin, "logit_margin"
    elif callable(target):
        target_fn = target
        target_name = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', repr(target))}"
    else:
        raise UserInputError(f"calibrate: target must be 'logit_margin' or a callable, got {type(target).__name__}")
    extras = parse_extras(extras)
    params = list(model.parameters())
    if device is None:
        device = params[0].device if params else torch.device("cpu")
    device = torch.device(device)
    for name, p in itertools.chain(model.named_parameters(), model.named_buffers()):
        if p.device.type != device.type or (device.index is not None and p.device != device):
            raise UserInputError(f"calibrate: the model's {name!r} is on {p.device}, not on device={device}; "
                             f"move the model first")

    from . import distributed as dist_tools

    dist_on = dist_tools.active(distributed)
    rank, world = dist_tools.rank_and_world() if dist_on else (0, 1)
    if dist_on:
        batches = dist_tools.global_batches(loader, max_images)
        if not batches:
            raise UserInputError("calibrate: the loader yielded no batch")
        first = next(iter(dist_tools.shard_loader(loader, batches[:1])))
        offsets = [0]
        for b in batches[:-1]:
            offsets.append(offsets[-1] + len(b))
        mine = [(offsets[j], batches[j]) for j in range(rank, len(batches), world)]
        it = None
    else:
        it = iter(loader)
        try:
            first = next(it)
        except StopIteration:
            raise UserInputError("calibrate: the loader yielded no batch") from None
    images0, labels0 = _unpack(first)
    if images0.shape[0] == 0:
        raise UserInputError("calibrate: the loader's first batch holds 0 images")
    modes = {m: m.training for m in model.modules()}
    try:
        graph = trace_model(model, images0[:2].to(device))
    finally:
        for m, t in modes.items():
            m.training = t
    names = select_layers(model, graph, layers, readout)

    dataset = getattr(loader, "dataset", None)
    try:
        dataset_size = len(dataset) if dataset is not None else None
    except TypeError:
        dataset_size = None
    config = dict(layers=names, mode=mode, positions_per_image=positions_per_image,
                  target=target_name, readout=readout, seed=seed, max_images=max_images,
                  extras=extras, rank_images=rank_images, skip_nonfinite=skip_nonfinite,
                  dataset_size=dataset_size, dataset_indices=dataset_indices(dataset),
                  model_digest=model_digest(model), device=str(device),
                  data_digest=data_digest(dataset), first_batch_digest=_digest([images0, labels0]),
                  amp=amp, precision=precision)

    final_checkpoint = checkpoint
    if dist_on and checkpoint is not None:
        finished = os.path.exists(checkpoint) and Calibration.load(checkpoint, device).complete
        if not finished:  # each rank keeps its own partial checkpoint until the merge
            checkpoint = f"{os.fspath(checkpoint)}.rank{rank}of{world}"
    cal = None
    if checkpoint is not None and os.path.exists(checkpoint):
        cal = Calibration.load(checkpoint, device)
        diff = [k for k in _RESUME_KEYS if not _same(cal.config.get(k, _CONFIG_DEFAULTS.get(k)), config[k])]
        if diff:
            raise UserInputError(
                f"calibrate: checkpoint {os.fspath(checkpoint)!r} was made with another configuration ("
                + "; ".join(_DATA_DIFF[k] if k in _DATA_DIFF else
                            f"{k}: {_short(cal.config.get(k))} there, {_short(config[k])} now"
                            for k in diff)
                + "); delete it or pass another checkpoint path")
        cal.graph = graph  # the traced graph, with its modules
        if cal.complete:
            return cal
    if cal is None:
        cal = _new_calibration(model, graph, names, config, extras, device)
    for s in cal.stats.values():
        s.precision = precision  # of the product of each batch folded in from here on
    gen = torch.Generator()
    gen.manual_seed(seed)
    if cal.generator_state is not None:
        gen.set_state(cal.generator_state)

    taylor = "taylor" in extras
    weights = {l: graph.module(l).weight for l in names} if taylor else {}
    grad_flags = {l: w.requires_grad for l, w in weights.items()}
    hooks = None
    schedule = SaveSchedule(checkpoint_every, checkpoint_seconds, cal.num_batches)
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
        if dist_on:
            total = len(mine)
            done_images = sum(len(b) for _, b in mine[:resume_batches])
            if done_images != resume_images:
                raise UserInputError(f"calibrate: the checkpoint of rank {rank} holds {resume_images} "
                                     f"images, its first {resume_batches} batches {done_images}")
            todo = mine[resume_batches:]
            stream = zip((off for off, _ in todo),
                         dist_tools.shard_loader(loader, [b for _, b in todo]) if todo else [])
        with sigterm_as_interrupt(), tqdm(total=total, disable=not progress, unit="batch",
                                          desc="calibrate" if not dist_on else f"calibrate [{rank}]") as bar:
            pulled, skip_images = 0, 0
            if dist_on:
                bar.update(resume_batches)
                pulled = resume_batches
                for off, batch in stream:
                    pulled += 1
                    images, labels = _unpack(batch)
                    _advance(gen, cal, off, mode, positions_per_image)
                    _run_batch(model, cal, hooks, gen, images.to(device), labels.to(device), target_fn,
                               weights, mode, positions_per_image, rank_images, image_offset=off)
                    bar.update(1)
                    if checkpoint is not None and schedule.due(cal.num_batches):
                        cal.save(checkpoint)
                        schedule.saved(cal.num_batches)
                skip_images = resume_images
            for batch in (itertools.chain([first], it) if not dist_on else ()):
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
                if checkpoint is not None and schedule.due(cal.num_batches):
                    cal.save(checkpoint)
                    schedule.saved(cal.num_batches)
                if max_images is not None and cal.num_images >= max_images:
                    break
        if pulled < resume_batches:
            raise ValueError(f"calibrate: the loader yielded {pulled} batches, the checkpoint holds "
                             f"{resume_batches}; it must yield the same batches to resume")
        if pulled == resume_batches:
            _check_skipped(skip_images, resume_batches, resume_images)
        if dist_on:
            if checkpoint is not None and schedule.unsaved(cal.num_batches):
                cal.save(checkpoint)  # this rank's part is safe before the collective merge
                schedule.saved(cal.num_batches)
            dist_tools.all_reduce_calibration(cal)
            checkpoint = final_checkpoint if rank == 0 else None
        if cal.num_images == 0:
            raise ValueError("calibrate: the loader yielded no images")
        cal.complete = True
        cal.config.update(num_images=cal.num_images, num_batches=cal.num_batches)
        if checkpoint is not None:
            cal.save(checkpoint)
        if dist_on and final_checkpoint is not None:
            import torch.distributed as dist

            dist.barrier()  # the merged file is written: the partial ones can go
            part = f"{os.fspath(final_checkpoint)}.rank{rank}of{world}"
            if os.path.exists(part):
                os.remove(part)
    except BaseException:
        if (checkpoint is not None and schedule.unsaved(cal.num_batches) and not cal.complete
                and not cal.torn):
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
        raise UserInputError("calibrate: the loader must yield (images, labels) batches, got "
                         f"{type(batch).__name__}")
    labels = batch[1] if isinstance(batch[1], Tensor) else torch.as_tensor(batch[1])
    return batch[0], labels


def _check_labels(labels: Tensor, N: int, K: int):
    """Class labels that the logit margin and the cross-entropy can use: Tensor[N] of ints in [0, K)."""
    if labels.shape != (N,) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"calibrate: labels must be an integer Tensor[{N}] (one class per image), got "
                         f"{labels.dtype} of shape {tuple(labels.shape)}")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= K:
        raise ValueError(f"calibrate: labels must lie in [0, {K}) for the model's {K} logits; a batch "
                         f"holds labels from {lo} to {hi}")


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
        cal.patches, cal.outputs = sfvr.new_consumer_stats(graph, names, device)
    return cal


def _advance(gen, cal, offset: int, mode: str, P: int) -> None:
    """Move the position stream to image ``offset`` (distributed: over other ranks' images)."""
    skip = offset - cal.stream_images
    if skip < 0:
        raise RuntimeError(f"calibrate: the position stream is at image {cal.stream_images}, past {offset}")
    if skip and mode == "sample":
        torch.rand(skip, P, generator=gen)
    cal.stream_images = offset


def _forward(model, cal, hooks: _Pass, images, labels, target_fn, weights):
    """The forward of one batch (with grad for Taylor): ``(target float64 [N], grads)``."""
    N = images.shape[0]
    amp = cal.config.get("amp")
    autocast = (torch.autocast(images.device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
                if amp else contextlib.nullcontext())
    with torch.enable_grad() if weights else torch.no_grad(), autocast:
        logits = model(images)
        if not isinstance(logits, Tensor):
            raise ValueError(f"calibrate: the model must return a logits tensor, got {type(logits).__name__}")
        if cal.config["target"] == "logit_margin" or weights:
            _check_labels(labels, N, logits.shape[-1])
        t = target_fn(logits.detach(), labels)
        if not isinstance(t, Tensor) or t.shape != (N,):
            raise ValueError(f"calibrate: the target must be a Tensor[{N}] (one value per image), got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        t = t.detach().to(images.device, torch.float64)
        grads = taylor_grads(model, hooks, weights, logits, images, labels.long(),
                             cal.config["skip_nonfinite"]) if weights else {}
    return t, grads


def _run_batch(model, cal, hooks: _Pass, gen, images, labels, target_fn, weights, mode, P,
               rank_images, image_offset=None):
    """One forward (with grad for Taylor), then fold everything in; nothing is folded on error."""
    N = images.shape[0]
    u = torch.rand(N, P, generator=gen) if mode == "sample" else None
    offset = cal.num_images if image_offset is None else image_offset  # in loader order
    for _ in range(2):
        hooks.reset(u, max(0, min(N, rank_images - offset)))
        t, grads = _forward(model, cal, hooks, images, labels, target_fn, weights)
        changed = hooks.changed_readouts()
        if not changed:
            break
        hooks.copy.update(changed)  # changed in place after their hooks: run the batch again, copying them
    else:
        raise RuntimeError(f"calibrate: the read-outs of {', '.join(changed)} changed during the forward "
                           f"pass although they were copied")
    missing = [l for l in cal.layers if l not in hooks.rows]
    if missing:
        raise RuntimeError(f"calibrate: no read-out was captured for {', '.join(missing)} "
                           f"(the forward pass took another path than the traced one)")
    skip = cal.config["skip_nonfinite"]
    if not skip:  # a NaN/Inf raises here, before anything is folded
        t_ok = all_finite(t)
        for l in cal.layers:
            if not t_ok or not all_finite(hooks.rows[l]):
                ops.channel_moments(hooks.rows[l], t, mode="all")  # raises, naming what is wrong
    for c in cal.patches:
        if c not in hooks.patch or c not in hooks.out:
            raise RuntimeError(f"calibrate: consumer {c!r} was not called in this forward pass")
    # everything checked: fold in, in place, with Ctrl-C / SIGTERM held back until the batch is
    # whole; should a fold fail anyway, the calibration is marked torn and never saved
    with deferred_interrupts():
        try:
            for l in cal.layers:
                cal.stats[l].update(hooks.rows[l], t, mode="all", skip_nonfinite=skip)
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
        except BaseException:
            cal.torn = True
            raise
    cal.num_images += N
    cal.num_batches += 1
    cal.stream_images = offset + N
    cal.generator_state = gen.get_state()
