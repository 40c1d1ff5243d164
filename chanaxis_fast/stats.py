"""Streaming channel statistics: exact pairwise (Chan et al.) merging of per-batch moments."""

import hashlib
import os
from typing import Optional

import torch
from torch import Tensor

from . import ops

_FORMAT = "chanaxis_fast.ChannelStats"
_VERSION = 1


class StatsFileError(ValueError):
    """A statistics file that is truncated, corrupt, or written by another format version."""


def _checksum(count: int, mean: Tensor, comoment: Tensor) -> str:
    h = hashlib.sha256(str(count).encode())
    for t in (mean, comoment):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class ChannelStats:
    """Running count, float64 means and centred co-moments of the rows ``[Y_1..Y_C, T]`` of a layer.

    Batches are folded in with the pairwise update of Chan et al.::

        n = n_a + n_b,  d = mean_b - mean_a,  mean = mean_a + d * n_b / n
        M = M_a + M_b + d d^T * n_a n_b / n

    so the result does not depend on how the data were split into batches or in which order
    statistics were merged (to float64 rounding). Nothing but ``(n, mean, M)`` is kept: memory is
    O(D^2) whatever the number of samples.

    Args:
        num_channels: C, if known in advance (needed only by :meth:`all_reduce` on a process that
            may see no data); otherwise taken from the first update.
        has_target: whether the rows carry a target column (the last one).
        device: where the statistics live; by default the device of the first update.
        precision: ``"float64"`` (default) or ``"float32"``, the precision of the co-moment
            product of each batch (see :func:`chanaxis_fast.ops.channel_moments`); the running
            statistics are float64 either way.

    :meth:`update` folds each batch in place (:func:`chanaxis_fast.ops.channel_moments_fold_`): the
    batch's centred product goes straight into the upper triangle of the running co-moment, the
    lower triangle is mirrored once when :attr:`comoment` is read, so a batch costs no D x D
    temporary. On a GPU the count stays on the device too (no host-device synchronisation per batch
    beyond the one inside the op); reading :attr:`count` synchronises once.
    """

    def __init__(self, num_channels: Optional[int] = None, *, has_target: Optional[bool] = None,
                 device=None, precision: str = "float64"):
        if precision not in ("float64", "float32"):
            raise ValueError(f"ChannelStats: precision must be 'float64' or 'float32', got {precision!r}")
        self.precision = precision
        self._host_count = 0
        self._device_count: Optional[Tensor] = None  # int64 [] on self.device, when pending
        self.num_channels = num_channels
        self.has_target = has_target
        self.device = None if device is None else torch.device(device)
        self.mean: Optional[Tensor] = None
        self._comoment: Optional[Tensor] = None
        self._stale_lower = False  # the folds keep only the upper triangle up to date
        if num_channels is not None and has_target is not None:
            self._allocate(num_channels + int(has_target), self.device or torch.device("cpu"))

    # ------------------------------------------------------------------ accumulation
    @property
    def count(self) -> int:
        """Number of rows folded in (an int; on a GPU reading it synchronises once)."""
        if self._device_count is not None:
            self._host_count = int(self._device_count)
            self._device_count = None
        return self._host_count

    @count.setter
    def count(self, n) -> None:
        """Set the number of rows (an int; drops a pending device count)."""
        self._host_count = int(n)
        self._device_count = None

    @property
    def dim(self) -> Optional[int]:
        """D = C (+1 with a target): the size of the mean and co-moment."""
        return None if self.num_channels is None or self.has_target is None else (
            self.num_channels + int(self.has_target))

    @property
    def comoment(self) -> Optional[Tensor]:
        """Centred co-moment matrix, float64 [D, D], symmetric (target last, when present)."""
        if self._stale_lower:  # mirror the upper triangle once, when read
            c = self._comoment
            c.copy_(c.triu() + c.triu(1).T)
            self._stale_lower = False
        return self._comoment

    @comoment.setter
    def comoment(self, value: Optional[Tensor]) -> None:
        """Replace the co-moment matrix (a full symmetric float64 [D, D])."""
        self._comoment, self._stale_lower = value, False

    def _allocate(self, D, device):
        self.device = device
        self.mean = torch.zeros(D, dtype=torch.float64, device=device)
        self.comoment = torch.zeros(D, D, dtype=torch.float64, device=device)

    def update(self, x: Tensor, target: Optional[Tensor] = None, positions: Optional[Tensor] = None,
               *, mode: Optional[str] = None, channel_dim: int = 1,
               skip_nonfinite: bool = False) -> "ChannelStats":
        """Fold in one batch; the arguments are those of :func:`chanaxis_fast.ops.channel_moments`.

        Once the statistics exist on x's device, the batch is folded in place by
        :func:`chanaxis_fast.ops.channel_moments_fold_` (no D x D temporary); a batch that raises
        (NaN/Inf, bad positions, another channel count) leaves the statistics unchanged."""
        if self._foldable(x, channel_dim):
            self._check_shape(x.shape[channel_dim], target is not None, "update")
            count = self._device_count
            if count is None:
                count = torch.full((), self._host_count, dtype=torch.int64, device=self.device)
            ops.channel_moments_fold_(count, self.mean, self._comoment, x, target, positions,
                                      mode=mode, channel_dim=channel_dim,
                                      skip_nonfinite=skip_nonfinite, precision=self.precision)
            self._device_count, self._stale_lower = count, True
            return self
        m = ops.channel_moments(x, target, positions, mode=mode, channel_dim=channel_dim,
                                skip_nonfinite=skip_nonfinite, precision=self.precision)
        C = m.mean.shape[0] - (target is not None)
        d = m.count.device
        on_device = d.type != "cpu" and (self.device is None or (
            self.device.type == d.type and self.device.index in (None, d.index)))
        if on_device:  # keep the count on the GPU: no synchronisation here
            self._check_shape(C, target is not None, "update")
            if self.mean is None:
                self._allocate(C + int(target is not None), m.count.device)
            self._fold_on_device(m.count, m.mean, m.comoment)
        else:
            self._fold(int(m.count), m.mean, m.comoment, C, target is not None, "update")
        return self

    def _foldable(self, x, channel_dim) -> bool:
        """Whether update can fold x in place: statistics already on x's device, contiguous, and a
        layout the op reads (anything else goes through channel_moments, which names the error)."""
        return (self.mean is not None and isinstance(x, Tensor) and x.dim() in (2, 4)
                and -x.dim() <= channel_dim < x.dim() and x.device == self.mean.device
                and self.mean.is_contiguous() and self._comoment.is_contiguous())

    def merge(self, other: "ChannelStats") -> "ChannelStats":
        """Fold in the statistics of another ChannelStats (e.g. from another data shard)."""
        if not isinstance(other, ChannelStats):
            raise TypeError(f"ChannelStats.merge: other must be a ChannelStats, got {type(other).__name__}")
        if other.count:
            self._fold(other.count, other.mean, other.comoment, other.num_channels,
                       other.has_target, "merge")
        return self

    def _check_shape(self, C: int, has_target: bool, op: str):
        if self.num_channels is not None and self.num_channels != C:
            raise ValueError(f"ChannelStats.{op}: these statistics have {self.num_channels} channels, "
                             f"the new data has {C}")
        if self.has_target is not None and self.has_target != has_target:
            have = "have" if self.has_target else "do not have"
            raise ValueError(f"ChannelStats.{op}: these statistics {have} a target column; every batch "
                             f"must {'pass' if self.has_target else 'omit'} target")
        self.num_channels, self.has_target = C, has_target

    def _fold_on_device(self, n_b: Tensor, mean_b: Tensor, M_b: Tensor):
        """The update of :meth:`_fold` with the counts as int64 tensors on the device (float64
        weights; n = 0 leaves everything unchanged without a branch)."""
        n_a = self._device_count
        if n_a is None:
            n_a = torch.full((), self._host_count, dtype=torch.int64, device=self.device)
        n = n_a + n_b
        nf = n.double().clamp_min(1.0)
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b.double() / nf)
        self.comoment = self.comoment + M_b + torch.outer(delta, delta) * (n_a.double() * n_b.double() / nf)
        self._device_count = n

    def _fold(self, n_b: int, mean_b: Tensor, M_b: Tensor, C: int, has_target: bool, op: str):
        self._check_shape(C, has_target, op)
        if n_b == 0:
            return
        if self.mean is None:
            self._allocate(C + int(has_target), self.device or mean_b.device)
        mean_b = mean_b.to(self.device, torch.float64)
        M_b = M_b.to(self.device, torch.float64)
        n_a = self.count
        n = n_a + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.comoment = self.comoment + M_b + torch.outer(delta, delta) * (n_a * n_b / n)
        self.count = n

    def all_reduce(self, group=None) -> "ChannelStats":
        """Combine the statistics of every process of ``group`` (torch.distributed), in place.

        Exact: all-reduces n and n * mean, then every process adds n_k (mean_k - m)(mean_k - m)^T
        to its co-moment about the common mean m and all-reduces that.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ChannelStats.all_reduce: torch.distributed is not initialised "
                               "(call torch.distributed.init_process_group first)")
        if self.mean is None:
            raise RuntimeError("ChannelStats.all_reduce: this process has no statistics and does not "
                               "know their shape; construct ChannelStats(num_channels=C, "
                               "has_target=...) on every process")
        n_k = torch.tensor([float(self.count)], dtype=torch.float64, device=self.device)
        sums = torch.cat([n_k, self.mean * self.count])
        dist.all_reduce(sums, group=group)
        n = int(round(sums[0].item()))
        if n == 0:
            return self
        mean = sums[1:] / n
        d = self.mean - mean
        M = self.comoment + torch.outer(d, d) * self.count
        dist.all_reduce(M, group=group)
        self.count, self.mean, self.comoment = n, mean, M
        return self

    # ------------------------------------------------------------------ results
    def _need(self, k: int, what: str):
        if self.count < k:
            raise ValueError(f"ChannelStats.{what}: needs at least {k} samples, has {self.count}")

    def covariance(self) -> Tensor:
        """Unbiased covariance ``M / (n - 1)``, float64 [D, D] (target last, when present)."""
        self._need(2, "covariance")
        return self.comoment / (self.count - 1)

    def correlation(self) -> Tensor:
        """Pearson correlation, float64 [D, D].

        A constant column (variance 0) has correlation 0 with every other column and 1 with itself,
        so the result is always a valid correlation matrix without NaN. Values are clipped to
        [-1, 1] (rounding can put exact duplicates an ulp outside).
        """
        return correlation_from_covariance(self.covariance())

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """format, version, count, num_channels, has_target, mean, comoment (CPU) and a checksum."""
        if self.mean is None:
            raise ValueError("ChannelStats.state_dict: no statistics yet (no update and no shape)")
        mean, comoment = self.mean.cpu(), self.comoment.cpu()
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "count": self.count,
            "num_channels": self.num_channels,
            "has_target": self.has_target,
            "mean": mean,
            "comoment": comoment,
            "checksum": _checksum(self.count, mean, comoment),
        }

    def load_state_dict(self, state: dict) -> "ChannelStats":
        """Replace these statistics by those of :meth:`state_dict`'s output, after checking it
        (:class:`StatsFileError` for a foreign, corrupt or inconsistent state)."""
        _validate(state, "ChannelStats.load_state_dict")
        self.count = int(state["count"])
        self.num_channels = int(state["num_channels"])
        self.has_target = bool(state["has_target"])
        device = self.device or torch.device("cpu")
        self._allocate(self.num_channels + int(self.has_target), device)
        self.mean = state["mean"].to(device, torch.float64)
        self.comoment = state["comoment"].to(device, torch.float64)
        return self

    def save(self, path) -> None:
        """Write atomically (see :func:`atomic_save`)."""
        atomic_save(self.state_dict(), path)

    @classmethod
    def load(cls, path, device=None) -> "ChannelStats":
        """Read a file written by :meth:`save`; a truncated, corrupt or foreign file raises
        :class:`StatsFileError`."""
        return cls(device=device).load_state_dict(load_checked(path, "ChannelStats.load"))

    def __repr__(self):
        return (f"ChannelStats(count={self.count}, num_channels={self.num_channels}, "
                f"has_target={self.has_target}, device={self.device}, precision={self.precision!r})")


def correlation_from_covariance(cov: Tensor) -> Tensor:
    """Correlation of a covariance matrix; constant columns get 0 off the diagonal and 1 on it."""
    var = cov.diagonal()
    std = torch.where(var > 0, var.clamp_min(0).sqrt(), torch.zeros_like(var))
    inv = torch.where(std > 0, 1.0 / std, torch.zeros_like(std))
    corr = (cov * inv[:, None] * inv[None, :]).clamp(-1.0, 1.0)
    corr.diagonal().fill_(1.0)
    return corr


def atomic_save(state, path) -> None:
    """torch.save to a temporary file renamed into place: an interrupted save never leaves a
    truncated file behind nor destroys the previous one."""
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def read_state(path, who: str, what: str = "statistics"):
    """torch.load (weights only) a file of ours, turning every way it can be unreadable into
    StatsFileError; a missing file stays a FileNotFoundError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated zip, not a torch file, pickle of foreign objects, ...
        raise StatsFileError(f"{who}: {os.fspath(path)!r} is not a readable chanaxis_fast {what} "
                             f"file (truncated or corrupt?): {type(e).__name__}: {e}") from None


def load_checked(path, who: str) -> dict:
    """Read and validate a ChannelStats file."""
    state = read_state(path, who)
    _validate(state, f"{who}({os.fspath(path)!r})")
    return state


def check_header(state, fmt: str, version: int, who: str, what: str, remedy: str):
    """StatsFileError unless ``state`` is a dict of format ``fmt`` written by format ``version``."""
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise StatsFileError(f"{who}: not a chanaxis_fast {what} state (format "
                             f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r})")
    if state.get("version") != version:
        raise StatsFileError(f"{who}: written by format version {state.get('version')}, this is "
                             f"chanaxis_fast with version {version}; {remedy}")


def _validate(state, who: str):
    check_header(state, _FORMAT, _VERSION, who, "ChannelStats", "recompute the statistics")
    try:
        C, has_t, count = int(state["num_channels"]), bool(state["has_target"]), int(state["count"])
        mean, comoment = state["mean"], state["comoment"]
        D = C + int(has_t)
        ok = (mean.shape == (D,) and comoment.shape == (D, D) and mean.dtype == torch.float64
              and comoment.dtype == torch.float64 and count >= 0)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise StatsFileError(f"{who}: incomplete state ({type(e).__name__}: {e})") from None
    if not ok:
        raise StatsFileError(f"{who}: inconsistent shapes or dtypes for {C} channels")
    if state.get("checksum") != _checksum(count, mean, comoment):
        raise StatsFileError(f"{who}: checksum mismatch, the statistics are corrupt")
