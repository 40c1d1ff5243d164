"""Fake (meta) kernels of every op, for torch.compile and torch.library.opcheck."""

import torch

_lib = "chanaxis_fast::"


@torch.library.register_fake(_lib + "channel_moments")
def _channel_moments_fake(x, target, positions, mode, channel_dim, skip_nonfinite, precision="float64"):
    C = x.shape[channel_dim]
    D = C + (1 if target is not None else 0)
    f64 = dict(dtype=torch.float64, device=x.device)
    return x.new_empty((), dtype=torch.int64), x.new_empty((D,), **f64), x.new_empty((D, D), **f64)


@torch.library.register_fake(_lib + "channel_moments_fold_")
def _channel_moments_fold_fake(x, target, positions, mode, channel_dim, skip_nonfinite, precision,
                               count, mean, comoment):
    return None


@torch.library.register_fake(_lib + "patch_moments")
def _patch_moments_fake(x, positions, kernel, stride, padding, dilation, out_width, skip_nonfinite):
    C, k2 = x.shape[1], kernel[0] * kernel[1]
    f64 = dict(dtype=torch.float64, device=x.device)
    return (x.new_empty((C,), dtype=torch.int64), x.new_empty((C, k2), **f64),
            x.new_empty((C, k2, k2), **f64))


@torch.library.register_fake(_lib + "peer_hulls")
def _peer_hulls_fake(corr, max_size, eps, ridge):
    total = sum(c.shape[0] for c in corr)
    device = corr[0].device
    width = max(1, min(max_size, max(c.shape[0] for c in corr) - 1))
    return (
        torch.empty((total,), dtype=torch.float64, device=device),
        torch.empty((total,), dtype=torch.int64, device=device),
        torch.empty((total, width), dtype=torch.int64, device=device),
        torch.empty((total, width), dtype=torch.float64, device=device),
        torch.empty((total,), dtype=torch.bool, device=device),
    )


@torch.library.register_fake(_lib + "explained_variance")
def _explained_variance_fake(corr, targets, peers, ridge):
    return corr.new_empty((targets.shape[0],), dtype=torch.float64)
@torch.library.register_fake(_lib + "gaussian_mi_pairs")
def _gaussian_mi_pairs_fake(cov, pairs):
    return cov.new_empty((pairs.shape[0],), dtype=torch.float64)


@torch.library.register_fake(_lib + "peer_overlap_mean")
def _peer_overlap_mean_fake(cov):
    return cov.new_empty((cov.shape[0],), dtype=torch.float64)


@torch.library.register_fake(_lib + "pair_target_excess")
def _pair_target_excess_fake(cov_t, pairs, jitter):
    return cov_t.new_empty((pairs.shape[0],), dtype=torch.float64)


@torch.library.register_fake(_lib + "triplet_target_excess")
def _triplet_target_excess_fake(cov_t, triplets, jitter):
    return cov_t.new_empty((triplets.shape[0],), dtype=torch.float64)


@torch.library.register_fake(_lib + "target_excess")
def _target_excess_fake(cov_t, partners, top, jitter):
    C = cov_t.shape[0] - 1
    partners = min(partners, max(1, C - 1))
    return (cov_t.new_empty((C,), dtype=torch.float64),
            cov_t.new_empty((C, partners), dtype=torch.int64))


@torch.library.register_fake(_lib + "chip_drops")
def _chip_drops_fake(A):
    return A.new_empty((A.shape[0], A.shape[1]), dtype=torch.float64)


@torch.library.register_fake(_lib + "map_ranks")
def _map_ranks_fake(x, rtol):
    return x.new_empty((x.shape[0], x.shape[1]), dtype=torch.int64)


@torch.library.register_fake(_lib + "pooled_means")
def _pooled_means_fake(x):
    return x.new_empty((x.shape[0], x.shape[1]), dtype=torch.float64)
