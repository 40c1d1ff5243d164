"""Typed wrappers of the ``torch.ops.chanaxis_fast`` ops.

Each wrapper only normalises its arguments (views, defaults) and calls the op; the op checks them
and raises ``RuntimeError`` naming the argument. Results are float64 whatever the input dtype.
"""

from typing import List, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

_ops = torch.ops.chanaxis_fast


class Moments(NamedTuple):
    """Sufficient statistics of one batch of rows ``[Y_1..Y_C, T]``.

    count: int64 []            number of rows (samples) used
    mean: float64 [D]          per-column means, D = C (+1 with a target, as the last column)
    comoment: float64 [D, D]   centred co-moment sum_r (z_r - mean)(z_r - mean)^T
    """

    count: Tensor
    mean: Tensor
    comoment: Tensor


def default_mode(mode: Optional[str], positions: Optional[Tensor]) -> str:
    """``mode``, or by default "positions" when positions are given and "all" otherwise."""
    if mode is None:
        return "positions" if positions is not None else "all"
    return mode


def channel_moments(
    x: Tensor,
    target: Optional[Tensor] = None,
    positions: Optional[Tensor] = None,
    *,
    mode: Optional[str] = None,
    channel_dim: int = 1,
    skip_nonfinite: bool = False,
    precision: str = "float64",
) -> Moments:
    """Count, means and centred co-moment matrix of a batch of channel activations.

    Args:
        x: Tensor[N, C, H, W] (any strides, channels_last included), Tensor[N, H, W, C] with
            ``channel_dim=-1``, or Tensor[N, C]. float16, bfloat16, float32 or float64.
        target: optional Tensor[N], one scalar per image (e.g. the logit margin); it is repeated
            at each of the image's rows and appended as the last column.
        positions: optional int64 Tensor[N, P] of flat positions ``h * W + w`` into each image.
        mode: ``"all"`` (every position is a row; the default without ``positions``),
            ``"positions"`` (the given positions; the default with them) or ``"gap"`` (one
            global-average-pooled row per image).
        channel_dim: 1 for [N, C, ...], -1 (or 3) for channels-last [N, H, W, C].
        skip_nonfinite: by default NaN/Inf values raise an error; with True, every row holding a
            NaN/Inf (in any channel or its target) is dropped and ``count`` says how many remain.
        precision: the arithmetic of the co-moment product, the only step whose cost grows with
            C^2. ``"float64"`` (the default; results unchanged): every step in float64.
            ``"float32"``: the sums, means and centring stay in float64 (so huge means still cost
            nothing), each centred value is rounded once to float32, each chunk of rows (up to
            about 4M / C of them) is multiplied by a float32 GEMM (MKL / cuBLAS, at full float32
            precision even when ``torch.set_float32_matmul_precision`` allows TF32 or bfloat16)
            and the chunks are summed in float64. The co-moment is then within about 1e-7 to
            2e-7 relative (Frobenius norm) of the float64 result on data with mean 1e4 and
            std 1 (float32 ``torch.cov`` is off by about 6e-6 there, a one-pass float32 formula
            by 100 times the result; benchmarks/bench_channel_moments.py); count and mean are
            the same bits as with ``"float64"``.
            Which to use: the default is ``"float64"`` on every device, the reproducible choice.
            On a CPU float64 GEMM runs at half the float32 rate, so ``"float32"`` saves up to
            half of the product's time on wide layers. On a GPU the saving is much larger on
            consumer and workstation cards, which run float64 at 1/32 to 1/64 of their float32
            rate (data-centre GPUs such as the A100 / H100 at 1/2): there ``"float32"`` is the
            practical choice for wide layers.

    Returns:
        :class:`Moments` ``(count, mean, comoment)``, float64 on x's device. Each batch is centred
        on its own means before the product (two passes), so huge means cost no accuracy; a
        channel that is constant over the batch has exactly zero co-moments. On a GPU the call
        synchronises with the host once (to check for NaN/Inf and out-of-range positions); count,
        mean and comoment stay on the device.
    """
    return Moments(*_ops.channel_moments(x, target, positions, default_mode(mode, positions),
                                         channel_dim, skip_nonfinite, precision))


def channel_moments_fold_(
    count: Tensor,
    mean: Tensor,
    comoment: Tensor,
    x: Tensor,
    target: Optional[Tensor] = None,
    positions: Optional[Tensor] = None,
    *,
    mode: Optional[str] = None,
    channel_dim: int = 1,
    skip_nonfinite: bool = False,
    precision: str = "float64",
) -> None:
    """Fold one batch into running statistics, in place: what
    :meth:`ChannelStats.update <chanaxis_fast.ChannelStats.update>` runs.

    ``count`` (int64 []), ``mean`` (float64 [D]) and ``comoment`` (float64 [D, D], contiguous) on
    x's device become the statistics of the old rows and the batch's, by the pairwise update of
    Chan et al. (see :class:`~chanaxis_fast.ChannelStats`). The other arguments are those of
    :func:`channel_moments`, which gives the same result to float64 rounding; here the batch's
    centred product is accumulated straight into ``comoment``, so no D x D temporary is made per
    batch. Only the upper triangle of ``comoment`` (diagonal included) is read and updated: the
    lower triangle is left stale, and ``comoment.triu() + comoment.triu(1).T`` is the result
    (ChannelStats mirrors it when read). Every check (arguments, NaN/Inf, positions) runs before
    anything is changed; a batch whose rows are all skipped changes nothing.
    """
    _ops.channel_moments_fold_(x, target, positions, default_mode(mode, positions), channel_dim,
                               skip_nonfinite, precision, count, mean, comoment)


class Hulls(NamedTuple):
    """Replaceability hulls of the C channels of one layer (METHOD.md §3, local axis).

    e_full: float64 [C]                  E_full(i) = E_i(all other channels), in [0, 1]
    hull_size: int64 [C]                 |H_i|, 0 .. max_size
    hull_members: int64 [C, W]           the peers of H_i in the order they were selected, then -1
    hull_ev: float64 [C, W]              E_i after each step (non-decreasing), then NaN
    (W = max(1, min(max_size, C_max - 1)), C_max the largest layer of the call)
    saturated: bool [C]                  |H_i| = max_size and E_i(H_i) < (1 - eps) * E_full(i)
    """

    e_full: Tensor
    hull_size: Tensor
    hull_members: Tensor
    hull_ev: Tensor
    saturated: Tensor

    @property
    def compact_score(self) -> Tensor:
        """Compact-hull score ``h_i = E_full(i) / max(1, |H_i|)``, float64 [C]."""
        return self.e_full / self.hull_size.clamp_min(1)


def peer_hulls(
    corr: Union[Tensor, Sequence[Tensor]],
    *,
    max_size: int = 10,
    eps: float = 0.05,
    ridge: float = 1e-3,
) -> Union[Hulls, List[Hulls]]:
    """Greedy replaceability hulls of every channel of one layer, or of a list of layers.

    With ``A = corr + ridge * I`` and ``E_i(S) = A[i, S] A[S, S]^-1 A[S, i]`` (clipped to [0, 1]),
    the hull of channel i starts empty and repeatedly adds the peer j that most increases
    ``E_i(S + {j})``, until ``E_i(S) >= (1 - eps) * E_full(i)`` or ``|S| = max_size``.

    Args:
        corr: Tensor[C, C] correlation matrix (float32 or float64; symmetric within 1e-5, unit
            diagonal, no NaN), e.g. ``ChannelStats.correlation()`` (a constant channel is a row
            and column of 0 with 1 on the diagonal); or a list of them, one per layer, of any
            sizes, on one device: the whole list is processed in one call of the op.
        max_size: the largest hull (>= 1). Larger than the largest layer's ``C - 1`` is clamped to
            it (``max(1, C_max - 1)`` columns in ``hull_members`` / ``hull_ev``): no hull can be
            larger, so the results are the same.
        eps: tolerance in [0, 1): a hull is complete at ``(1 - eps) * E_full``.
        ridge: lambda >= 0 added to the diagonal. ``ridge = 0`` needs ``corr`` positive definite.

    Returns:
        :class:`Hulls` (float64 / int64 / bool, on corr's device), or a list of them for a list.

    Conventions:
        * Ties: gains within a relative 1e-12 of the largest go to the lowest channel index, so
          CPU, CUDA and :func:`chanaxis_fast.reference.peer_hulls` select the same peers.
        * ``E_full`` below 1e-12 is reported as 0 and such channels (constant channels, a
          one-channel layer, channels uncorrelated with all others) have an empty hull.
        * A hull stops early, not saturated, when no peer is left (``C - 1 < max_size``) or no
          peer adds anything (every remaining peer is collinear with the selected ones).
        * A peer whose residual variance given the selected ones is <= 1e-12 is never selected.
        * The greedy steps are computed operation for operation alike on CPU and CUDA (no FMA
          contraction), so both give the same bits from the same E_full; E_full itself comes from
          LAPACK / cuSOLVER and may differ in the last bits between devices.
    """
    if isinstance(corr, Tensor):
        return Hulls(*_ops.peer_hulls([corr], max_size, eps, ridge))
    corr = list(corr)
    if not corr:
        raise ValueError("peer_hulls: corr must be a matrix or a non-empty list of matrices, got an "
                         "empty list")
    flat = _ops.peer_hulls(corr, max_size, eps, ridge)
    sizes = [c.shape[0] for c in corr]
    return [Hulls(*parts) for parts in zip(*(t.split(sizes) for t in flat))]


def explained_variance(corr: Tensor, targets: Tensor, peers: Tensor, *, ridge: float = 1e-3) -> Tensor:
    """``E_t(S)`` for arbitrary peer sets: one target and one set of peers per row.

    Args:
        corr: Tensor[C, C] correlation matrix (float32 or float64, as for :func:`peer_hulls`).
        targets: int64 Tensor[B], the target channel of each row.
        peers: int64 Tensor[B, K], the peers of each row; -1 entries are padding (a row of -1
            gives 0). A row may not contain its target or repeat a peer.
        ridge: lambda >= 0 added to the diagonal of ``corr[S, S]``.

    Returns:
        float64 Tensor[B]: ``corr[t, S] (corr[S, S] + ridge I)^-1 corr[S, t]`` clipped to [0, 1],
        by one small Cholesky factorisation per row (meant for hull-sized K). A peer that is
        (numerically) a linear combination of the earlier peers of its row adds nothing, which is
        the limit of the ridge formula as ridge -> 0. ``explained_variance`` of the first k
        members of a hull equals its ``hull_ev[:, k - 1]``.
    """
    return _ops.explained_variance(corr, targets, peers, ridge)
# ----------------------------------------------------------------------------- Gaussian MI
# METHOD.md §3. Covariances: float16/bfloat16/float32/float64, symmetric (to 1e-6 of the largest
# variance; only the upper triangle is read), finite, non-negative diagonal; computed in float64.
# rho_ij = S_ij / sqrt(S_ii S_jj), 0 when a variance is 0 (constant channel), clipped to
# [-0.999, 0.999]. Joint MI with the target uses `jitter` on the diagonal of every submatrix, S_TT
# included, which makes it the exact MI of the Gaussian with covariance S + jitter * I: finite,
# >= 0, at most 1/2 log((Var(T) + jitter) / jitter). See csrc/common/gaussian.h.


class TargetExcess(NamedTuple):
    """Per-channel target-excess and the partners it was computed over.

    te: float64 [C]           TE(i), the mean of the `top` largest S2(i, j) over the partners j
    partners: int64 [C, K]    the K = `partners` channels j != i of highest R_X(i, j), in
                              decreasing R_X (ties: lower j first), -1 padded when C - 1 < K
    """

    te: Tensor
    partners: Tensor


def gaussian_mi_pairs(cov: Tensor, pairs: Tensor) -> Tensor:
    """Peer overlap ``R_X(i, j) = -1/2 log(1 - rho_ij^2)`` of each pair (pairwise Gaussian MI, nats).

    Args:
        cov: Tensor[C, C], covariance of the channels (floating; computed in float64).
        pairs: int64 Tensor[P, 2] of distinct channel indices in [0, C), on cov's device.

    Returns:
        float64 Tensor[P]. A pair with a constant channel has rho = 0, hence R_X = 0; |rho| >= 0.999
        gives the maximum, -1/2 log(1 - 0.999^2) = 3.107.
    """
    return _ops.gaussian_mi_pairs(cov, pairs)


def peer_overlap_mean(cov: Tensor) -> Tensor:
    """Mean peer overlap ``mean_{j != i} R_X(i, j)`` of every channel, without a [C, C] matrix.

    Args:
        cov: Tensor[C, C], covariance of the channels (floating; computed in float64).

    Returns:
        float64 Tensor[C]; 0 when C = 1.
    """
    return _ops.peer_overlap_mean(cov)


def pair_target_excess(cov_t: Tensor, pairs: Tensor, *, jitter: float = 1e-10) -> Tensor:
    """Pair target-excess ``S2(i, j) = max(0, I(T; Y_i, Y_j) - max(I(T; Y_i), I(T; Y_j)))``.

    ``I(T; Y_i, Y_j) = 1/2 log((S_TT + e) det(S_ij + e I) / det(S_Tij + e I))`` with closed-form 2x2
    and 3x3 determinants, ``e = jitter``; ``I(T; Y_i) = -1/2 log(1 - rho_Ti^2)`` (clipped rho).

    Args:
        cov_t: Tensor[C + 1, C + 1], covariance of ``[Y_1..Y_C, T]`` with the target last.
        pairs: int64 Tensor[P, 2] of distinct channel indices in [0, C) (index C is the target).
        jitter: > 0, added to every diagonal entry of the submatrices.

    Returns:
        float64 Tensor[P], >= 0, the same for (i, j) and (j, i). Constant T gives 0. The single-channel
        terms are clipped (at most 3.107 nats) while the joint term is not, so a channel with
        |rho_Ti| > 0.999 gives every partner an excess of up to 1/2 log((S_TT + e) / e) - 3.107.
    """
    return _ops.pair_target_excess(cov_t, pairs, jitter)


def triplet_target_excess(cov_t: Tensor, triplets: Tensor, *, jitter: float = 1e-10) -> Tensor:
    """Triplet target-excess ``S3(i, j, k) = I(T; Y_i, Y_j, Y_k) - max over its pairs of I(T; pair)``.

    Joint MIs as in :func:`pair_target_excess` (closed-form 3x3 and 4x4 determinants).

    Args:
        cov_t: Tensor[C + 1, C + 1], covariance of ``[Y_1..Y_C, T]`` with the target last.
        triplets: int64 Tensor[P, 3] of distinct channel indices in [0, C).
        jitter: > 0, added to every diagonal entry of the submatrices.

    Returns:
        float64 Tensor[P], the same for every order of a triplet. Not floored (METHOD.md does not
        floor S3): all its terms come from one jittered matrix, so it is >= 0 up to rounding, and
        tiny negative values are kept so that means stay unbiased.
    """
    return _ops.triplet_target_excess(cov_t, triplets, jitter)


def target_excess(cov_t: Tensor, *, partners: int = 50, top: int = 10,
                  jitter: float = 1e-10) -> TargetExcess:
    """Per-channel target-excess ``TE(i)`` (METHOD.md §3), fused: no [C, C] matrix is formed.

    For each channel i: the `partners` channels j != i of highest ``R_X(i, j)`` (from cov_t's channel
    block; ties go to the lower index; all C - 1 peers when there are fewer), ``S2(i, j)`` of each
    (as :func:`pair_target_excess`), and the mean of the `top` largest (of all of them when fewer).

    Args:
        cov_t: Tensor[C + 1, C + 1], covariance of ``[Y_1..Y_C, T]`` with the target last.
        partners: >= 1, number of partners per channel; more than ``C - 1`` is clamped to
            ``max(1, C - 1)`` (every peer is a partner then; the output has that many columns).
        top: >= 1, number of largest S2 values averaged.
        jitter: > 0, as in :func:`pair_target_excess`.

    Returns:
        :class:`TargetExcess` ``(te float64 [C], partners int64 [C, partners])``; te = 0 when C = 1.
    """
    return TargetExcess(*_ops.target_excess(cov_t, partners, top, jitter))


# ----------------------------------------------------------------------------- CHIP
def chip_drops(A: Tensor) -> Tensor:
    """CHIP's drop ``||A||_* - ||A with row c zeroed||_*`` (nuclear norms) of every row of every matrix.

    One eigendecomposition of the ``m x m`` Gram matrix per image (``m = min(C, S)``; ``A A^T`` when
    C <= S, ``A^T A`` otherwise) gives every channel's drop: the squared singular values left after
    removing row c are the roots of a secular equation in that spectrum, one per interlacing
    interval, found by a safeguarded rational iteration in O(m) per step (O(C m^2) per image
    instead of one O(m^3) SVD per channel). See csrc/common/secular.h.

    Args:
        A: Tensor[N, C, S] (one C x S feature matrix per image, e.g. the maps of one layer
            flattened over H x W) or Tensor[C, S]; float16, bfloat16, float32 or float64, finite.

    Returns:
        float64 Tensor[N, C] (Tensor[C] for a 2-D A) on A's device, each drop in
        ``[0, ||row c||]``: a zero row drops exactly 0, a single channel drops its row's norm.
        Computed in float64 (low-precision inputs are upcast exactly). Every shortcut (deflation
        of negligible components, merging of repeated singular values) moves a drop by at most
        ``eps * sigma_max`` (sigma_max: the image's largest singular value), the accuracy of an
        SVD of A itself; small singular values are resolved at their own scale, so zero rows,
        duplicated rows, rank-deficient float32 maps and graded spectra agree with one SVD per
        channel to about 1e-12 relative (tests/test_chip.py).
    """
    if A.dim() == 2:
        return _ops.chip_drops(A[None])[0]
    return _ops.chip_drops(A)


def default_rank_rtol(x: Tensor) -> float:
    """``torch.linalg.matrix_rank``'s default relative tolerance for the H x W maps of ``x``:
    ``max(H, W) * eps``, eps of float64 for float64 maps and of float32 otherwise (HRank ranks
    float16/bfloat16 maps as float32, as it always has)."""
    eps = torch.finfo(torch.float64 if x.dtype == torch.float64 else torch.float32).eps
    return max(x.shape[-2], x.shape[-1], 1) * eps


def map_ranks(x: Tensor, *, rtol: Optional[float] = None) -> Tensor:
    """HRank's matrix rank of every H x W feature map: ``#{sigma_i > rtol * sigma_max}``.

    ``torch.linalg.matrix_rank(x, rtol=rtol)`` (atol 0) without a library call per map: each map
    is copied to float64, reduced to bidiagonal form by Householder reflections and its rank read
    from two Sturm counts (csrc/common/rank.h). The singular values are those of the exact map
    (to about ``eps_float64 * sigma_max``), so a float32 map's rank does not depend on a float32
    SVD's rounding, which at the default tolerance of a 4 x 4 map is within a factor of a few of
    it; results can differ from ``matrix_rank`` of the float32 map only where a singular value is
    that close to the tolerance.

    Args:
        x: Tensor[N, C, H, W] (one map per image and channel; any strides, channels-last
            included) or Tensor[H, W]; float16, bfloat16, float32 or float64, finite.
        rtol: relative tolerance, > 0; default :func:`default_rank_rtol` (``matrix_rank``'s).

    Returns:
        int64 Tensor[N, C] (a 0-D tensor for a 2-D x) on x's device; an all-zero map has rank 0.
    """
    if rtol is None:
        rtol = default_rank_rtol(x)
    if x.dim() == 2:
        return _ops.map_ranks(x[None, None], float(rtol))[0, 0]
    return _ops.map_ranks(x, float(rtol))


_POOL_BLOCK = 1 << 19  # float64 values per block of pooled_means without a kernel (4 MiB: no fresh pages)


def pooled_means(x: Tensor) -> Tensor:
    """float64 mean of every row of ``x`` [N, C, S] (mode "gap": each read-out's global average).

    The kernels (CPU, CUDA) read each row once, widening to float64 as they sum: one pass at
    memory speed, about 4x ``x.double().mean(2)`` on activations on the CPU. Other devices run
    ``x.double().mean(2)`` a few images at a time, so that no float64 copy of the whole map is
    made. The same values to rounding (the kernels sum in vector lanes or threads); the mean of an
    empty row is NaN, as torch's.

    Args:
        x: Tensor[N, C, S], float16, bfloat16, float32 or float64, any strides.

    Returns:
        float64 Tensor[N, C] on x's device.
    """
    if x.device.type in ("cpu", "cuda"):
        return _ops.pooled_means(x)
    if x.dim() != 3:
        raise ValueError(f"pooled_means: x must be 3-D [N, C, S], got {x.dim()}-D with shape {tuple(x.shape)}")
    return _pooled_means_blocks(x)


def _pooled_means_blocks(x: Tensor) -> Tensor:
    """pooled_means without a kernel: ``x.double().mean(2)``, a few images at a time."""
    N, C, S = x.shape
    if x.dtype == torch.float64:
        return x.mean(2)
    out = torch.empty(N, C, dtype=torch.float64, device=x.device)
    step = max(1, _POOL_BLOCK // max(1, C * S))
    for i in range(0, N, step):
        out[i:i + step] = x[i:i + step].double().mean(2)
    return out


class PatchMoments(NamedTuple):
    """Per-channel statistics of a conv input's k x k patches (SFVR's input, METHOD.md §4).

    count: int64 [C]              patches used per input channel
    mean: float64 [C, k2]         mean patch (k2 = kh * kw, taps in row-major order)
    comoment: float64 [C, k2, k2] centred co-moment sum_r (p_r - mean)(p_r - mean)^T
    """

    count: Tensor
    mean: Tensor
    comoment: Tensor


def _pair(v) -> List[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(u) for u in v]


def patch_moments(x: Tensor, positions: Tensor, kernel, *, stride=1, padding=0, dilation=1,
                  out_width: int, skip_nonfinite: bool = False) -> PatchMoments:
    """Count, mean and centred co-moment of every input channel's patches at a conv's sampled
    output positions: what SFVR needs of a consumer's input, in one pass over x per channel.

    Args:
        x: Tensor[N, C, H, W] (any strides; float16, bfloat16, float32 or float64), the conv's
            input before padding.
        positions: int64 Tensor[N, P], flat output positions ``h * out_width + w`` of each image.
        kernel, stride, padding, dilation: the conv's (an int or an (h, w) pair); padding is
            zero padding (taps outside the image read 0).
        out_width: the conv's output width (checked against the other arguments).
        skip_nonfinite: by default NaN/Inf raise; with True a patch holding one is left out of
            its channel's statistics (``count`` says how many remain).

    Returns:
        :class:`PatchMoments`, float64 on the CPU (the op has a CPU kernel only; on a GPU
        :mod:`chanaxis_fast.extras.sfvr` gathers the patches with PyTorch instead).
        :func:`chanaxis_fast.reference.patch_moments` is the float64 reference (``F.unfold``).
    """
    return PatchMoments(*_ops.patch_moments(x, positions, _pair(kernel), _pair(stride), _pair(padding),
                                            _pair(dilation), out_width, skip_nonfinite))
