"""PatchStats: many small streamed covariances (SFVR's input patches and output variances), float64,
merged exactly with the pairwise (Chan et al.) update; saved with a format tag and a checksum."""

from typing import Optional

import torch
from torch import Tensor

from .digest import digest as _digest
from .stats import StatsFileError, check_header

_PATCH_FORMAT = "chanaxis_fast.PatchStats"
_VERSION = 1


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
        return self.update_columns(rows.transpose(1, 2), skip_nonfinite=skip_nonfinite, who=who)

    def update_columns(self, cols: Tensor, *, skip_nonfinite: bool = False,
                       who: str = "PatchStats.update_columns") -> "PatchStats":
        """:meth:`update` with the rows given feature-major: ``cols`` Tensor[G, F, n] (any float
        dtype, any strides; ``cols[g, :, r]`` is row r of group g).

        The rows go to float64 in one [G, F, n] copy, so that the products are one batched
        ``F x n`` by ``n x F`` matmul over contiguous memory; the finiteness check rides on the
        means (a NaN/Inf value makes its group's mean non-finite) and the exact one runs only then.
        """
        if cols.dim() != 3:
            raise ValueError(f"{who}: cols must be 3-D [G, F, n], got {cols.dim()}-D")
        G, Fd, n = cols.shape
        cols = cols.to(torch.float64, memory_format=torch.contiguous_format)
        mean_b = cols.mean(2) if n else cols.new_zeros(G, Fd)
        if skip_nonfinite or not bool(torch.isfinite(mean_b).all()):
            finite = torch.isfinite(cols).all(1)  # [G, n]
            if skip_nonfinite:
                n_b = finite.sum(1)
                cols = torch.where(finite[:, None], cols, torch.zeros((), dtype=cols.dtype, device=cols.device))
                mean_b = cols.sum(2) / n_b.clamp_min(1)[:, None]
                z = (cols - mean_b[..., None]) * finite[:, None]
                self._fold(n_b, mean_b, z @ z.transpose(1, 2), who)
                return self
            if not bool(finite.all()):
                raise ValueError(f"{who}: NaN/Inf values in the data (pass skip_nonfinite=True to drop them)")
            mean_b = cols.mean(2)  # finite values whose float64 sum overflowed
        n_b = torch.full((G,), n, dtype=torch.int64, device=cols.device)
        z = cols - mean_b[..., None]
        self._fold(n_b, mean_b, z @ z.transpose(1, 2), who)
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

    def all_reduce(self, group=None) -> "PatchStats":
        """Combine the statistics of every process (torch.distributed), in place, exactly: as
        :meth:`ChannelStats.all_reduce <chanaxis_fast.ChannelStats.all_reduce>`, group by group."""
        import torch.distributed as dist

        if self.mean is None:
            raise RuntimeError("PatchStats.all_reduce: this process holds no statistics; construct "
                               "PatchStats(groups, features) on every process")
        n_k = self.count.double()
        sums = torch.cat([n_k[:, None], self.mean * n_k[:, None]], 1)
        dist.all_reduce(sums, group=group)
        n = sums[:, 0]
        mean = sums[:, 1:] / n.clamp_min(1)[:, None]
        d = self.mean - mean
        M = self.comoment + d[:, :, None] * d[:, None, :] * n_k[:, None, None]
        dist.all_reduce(M, group=group)
        self.count, self.mean, self.comoment = n.round().long(), mean, M
        return self

    def covariance(self) -> Tensor:
        """Unbiased covariances ``M / (n - 1)``, float64 [G, F, F]."""
        if self.count is None or bool((self.count < 2).any()):
            raise ValueError("PatchStats.covariance: needs at least 2 rows in every group")
        return self.comoment / (self.count.double() - 1)[:, None, None]

    def variance(self) -> Tensor:
        """Unbiased variances, float64 [G, F]."""
        return self.covariance().diagonal(dim1=1, dim2=2)

    def state_dict(self) -> dict:
        """format, version, count, mean, comoment (on the CPU) and a checksum of them."""
        if self.mean is None:
            raise ValueError("PatchStats.state_dict: no statistics yet")
        state = {"format": _PATCH_FORMAT, "version": _VERSION, "count": self.count.cpu(),
                 "mean": self.mean.cpu(), "comoment": self.comoment.cpu()}
        state["checksum"] = _digest(state)
        return state

    def load_state_dict(self, state: dict, who: str = "PatchStats.load_state_dict") -> "PatchStats":
        """Replace these statistics by those of :meth:`state_dict`'s output, after checking its
        format, version, shapes, dtypes and checksum (:class:`StatsFileError` otherwise)."""
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
