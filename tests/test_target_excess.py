"""Gaussian MI ops (gaussian_mi_pairs, peer_overlap_mean, pair/triplet_target_excess, target_excess):
kernels vs float64 reference vs independent numpy/scipy computations, hand-worked examples, order
symmetry, degenerate covariances, bad input, opcheck, CUDA vs CPU."""

import itertools
import math

import numpy as np
import pytest
import scipy.stats
import torch

from chanaxis_fast import ops, reference
from utils import DEVICES, assert_close

E = 1e-10  # the default jitter
MAX_R = -0.5 * math.log(1 - 0.999 ** 2)  # MI of a correlation clipped at 0.999


# ----------------------------------------------------------------------------- numpy, independently
def np_rho(S, i, j):
    if S[i, i] == 0 or S[j, j] == 0:
        return 0.0
    return float(np.clip(S[i, j] / math.sqrt(S[i, i] * S[j, j]), -0.999, 0.999))


def np_pair_mi(S, i, j):
    return -0.5 * math.log(1 - np_rho(S, i, j) ** 2)


def np_joint_mi(S, channels, jitter=E):
    """METHOD.md §3 as written: 1/2 log(Var(T) det S_AA / det S_TA,TA), jitter on every diagonal."""
    t = S.shape[0] - 1
    idx = list(channels) + [t]
    M = S[np.ix_(idx, idx)] + jitter * np.eye(len(idx))
    n = len(channels)
    return 0.5 * math.log(M[n, n] * np.linalg.det(M[:n, :n]) / np.linalg.det(M))


def np_s2(S, i, j, jitter=E):
    t = S.shape[0] - 1
    return max(0.0, np_joint_mi(S, (i, j), jitter) - max(np_pair_mi(S, i, t), np_pair_mi(S, j, t)))


def np_s3(S, i, j, k, jitter=E):
    best_pair = max(np_joint_mi(S, p, jitter) for p in ((i, j), (i, k), (j, k)))
    return np_joint_mi(S, (i, j, k), jitter) - best_pair


def np_target_excess(S, partners, top, jitter=E):
    C = S.shape[0] - 1
    te, chosen = np.zeros(C), -np.ones((C, min(partners, max(1, C - 1))), dtype=np.int64)  # clamped to the peers
    for i in range(C):
        peers = np.array([j for j in range(C) if j != i], dtype=np.int64)
        r = np.array([np_pair_mi(S, i, j) for j in peers])
        best = peers[np.argsort(-r, kind="stable")][:partners]  # stable: ties keep index order
        chosen[i, :len(best)] = best
        s2 = np.sort([np_s2(S, i, j, jitter) for j in best])[::-1]
        te[i] = s2[:top].mean() if len(s2) else 0.0
    return te, chosen


def random_cov_t(C, seed, n=400):
    """Covariance of correlated channels of mixed scales and a target that depends on them."""
    g = np.random.default_rng(seed)
    A = g.standard_normal((n, C)) @ (np.eye(C) + 0.4 * g.standard_normal((C, C)))
    A *= 10.0 ** g.uniform(-1, 1, C)
    T = A @ (0.3 * g.standard_normal(C) / A.std(0)) + g.standard_normal(n)
    return np.cov(np.column_stack([A, T]), rowvar=False)


def t64(a):
    return torch.as_tensor(np.asarray(a), dtype=torch.float64)


def all_pairs(C):
    return torch.tensor(list(itertools.combinations(range(C), 2)), dtype=torch.long).reshape(-1, 2)


def all_triplets(C):
    return torch.tensor(list(itertools.combinations(range(C), 3)), dtype=torch.long).reshape(-1, 3)


# ----------------------------------------------------------------------------- vs numpy and reference
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [2, 3, 7, 24])
def test_pair_ops_match_numpy_and_reference(device, C):
    S = random_cov_t(C, seed=C)
    St = t64(S).to(device)
    pairs = all_pairs(C)
    pairs = torch.cat([pairs, pairs.flip(1)]).to(device)  # both orders
    P = pairs.cpu().numpy()

    r = ops.gaussian_mi_pairs(St[:C, :C], pairs)
    assert r.dtype == torch.float64 and r.shape == (len(P),) and r.device == St.device
    assert_close(r, [np_pair_mi(S, i, j) for i, j in P], rtol=1e-12, atol=1e-14)
    assert_close(r, reference.gaussian_mi_pairs(St[:C, :C], pairs), rtol=1e-12, atol=1e-14)

    s2 = ops.pair_target_excess(St, pairs)
    assert_close(s2, [np_s2(S, i, j) for i, j in P], rtol=1e-9, atol=1e-12)
    assert_close(s2, reference.pair_target_excess(St, pairs), rtol=1e-10, atol=1e-13)
    assert (s2 > 0).any()  # the data have real excess, so the comparison is not 0 == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [3, 5, 12])
def test_triplet_target_excess_matches_numpy_and_reference(device, C):
    S = random_cov_t(C, seed=100 + C)
    St = t64(S).to(device)
    trip = all_triplets(C).to(device)
    s3 = ops.triplet_target_excess(St, trip)
    assert s3.dtype == torch.float64 and s3.shape == (trip.shape[0],)
    assert_close(s3, [np_s3(S, *t) for t in trip.cpu().numpy()], rtol=1e-9, atol=1e-12)
    assert_close(s3, reference.triplet_target_excess(St, trip), rtol=1e-10, atol=1e-13)
    assert s3.abs().max() > 1e-3


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C", [1, 2, 6, 33])
def test_peer_overlap_mean_matches_numpy_mean_of_full_matrix(device, C):
    S = random_cov_t(C, seed=200 + C)[:C, :C]
    R = np.array([[np_pair_mi(S, i, j) for j in range(C)] for i in range(C)])
    expected = (R.sum(1) - np.diag(R)) / (C - 1) if C > 1 else np.zeros(1)
    out = ops.peer_overlap_mean(t64(S).to(device))
    assert out.shape == (C,) and out.dtype == torch.float64
    assert_close(out, expected, rtol=1e-12, atol=1e-14)
    assert_close(out, reference.peer_overlap_mean(t64(S)), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("C, partners, top", [(2, 50, 10), (5, 3, 2), (12, 4, 10), (30, 8, 3),
                                              (30, 50, 10), (9, 8, 8)])
def test_target_excess_matches_brute_force(device, C, partners, top):
    S = random_cov_t(C, seed=300 + C)
    te, chosen = ops.target_excess(t64(S).to(device), partners=partners, top=top)
    exp_te, exp_chosen = np_target_excess(S, partners, top)
    assert te.shape == (C,) and te.dtype == torch.float64
    assert chosen.shape == (C, min(partners, max(1, C - 1))) and chosen.dtype == torch.int64
    assert np.array_equal(chosen.cpu().numpy(), exp_chosen)
    assert_close(te, exp_te, rtol=1e-9, atol=1e-12)
    ref = reference.target_excess(t64(S), partners=partners, top=top)
    assert torch.equal(chosen.cpu(), ref.partners)
    assert_close(te, ref.te, rtol=1e-10, atol=1e-13)
    assert (te > 0).any()


def test_entropy_identities_with_scipy():
    # MI = H(A) + H(B) - H(A, B) of Gaussians: an independent route to R_X and the joint MI.
    S = random_cov_t(4, seed=7)

    def H(idx, jitter=0.0):
        M = S[np.ix_(idx, idx)] + jitter * np.eye(len(idx))
        return scipy.stats.multivariate_normal(mean=np.zeros(len(idx)), cov=M).entropy()

    for i, j in itertools.combinations(range(4), 2):
        assert abs(np_rho(S, i, j)) < 0.999  # unclipped, so the entropies give the same number
        expected = H([i]) + H([j]) - H([i, j])
        assert_close(ops.gaussian_mi_pairs(t64(S[:4, :4]), torch.tensor([[i, j]])), [expected])
        t = 4
        single = [H([c]) + H([t]) - H([c, t]) for c in (i, j)]
        joint = H([i, j], E) + H([t], E) - H([i, j, t], E)
        assert_close(ops.pair_target_excess(t64(S), torch.tensor([[i, j]])),
                     [max(0.0, joint - max(single))], rtol=1e-8, atol=1e-12)


# ----------------------------------------------------------------------------- worked by hand
def test_hand_worked_pair_example():
    # Y1, Y2 independent with unit variance, T = Y1 + Y2 + N with an independent unit noise N:
    #   Var(T) = 3, Cov(T, Y_i) = 1, rho_Ti^2 = 1/3  ->  I(T; Y_i) = -1/2 log(2/3) = 1/2 log 1.5
    #   Var(T | Y1, Y2) = Var(N) = 1               ->  I(T; Y1, Y2) = 1/2 log(3 / 1) = 1/2 log 3
    #   S2 = 1/2 log 3 - 1/2 log 1.5 = 1/2 log 2 = 0.34657...; R_X(1, 2) = 0.
    S = t64([[1, 0, 1], [0, 1, 1], [1, 1, 3]])
    pair = torch.tensor([[0, 1]])
    assert_close(ops.pair_target_excess(S, pair), [0.5 * math.log(2)], rtol=1e-9, atol=0)
    assert_close(ops.pair_target_excess(S, pair), [0.3465735902799726], rtol=1e-9, atol=0)
    assert_close(ops.gaussian_mi_pairs(S[:2, :2], pair), [0.0], atol=0, rtol=0)
    te, chosen = ops.target_excess(S, partners=5, top=3)
    assert_close(te, [0.5 * math.log(2)] * 2, rtol=1e-9, atol=0)
    assert chosen.tolist() == [[1], [0]]  # partners=5 clamped to the one peer there is


def test_hand_worked_triplet_example():
    # Y1, Y2, Y3 independent unit, T = Y1 + Y2 + Y3 + N:  Var(T) = 4.
    #   I(T; Y1, Y2, Y3) = 1/2 log(4 / 1) = log 2;  I(T; any pair) = 1/2 log(4 / 2) = 1/2 log 2
    #   S3 = 1/2 log 2 = 0.34657...;  I(T; Y_i) = -1/2 log(3/4), so S2 = 1/2 log 2 - 1/2 log(4/3)
    #   = 1/2 log 1.5 = 0.20273...
    S = np.eye(4)
    S[3, :3] = S[:3, 3] = 1
    S[3, 3] = 4
    S = t64(S)
    assert_close(ops.triplet_target_excess(S, torch.tensor([[0, 1, 2]])), [0.5 * math.log(2)],
                 rtol=1e-9, atol=0)
    assert_close(ops.pair_target_excess(S, all_pairs(3)), [0.5 * math.log(1.5)] * 3, rtol=1e-9,
                 atol=0)


def test_hand_worked_deterministic_target():
    # T = Y1 + Y2 exactly. With jitter e on every diagonal entry:
    #   det [[1+e, 0], [0, 1+e]] = (1+e)^2,  det of the 3x3 with T = (1+e)(3e + e^2),
    #   so I(T; Y1, Y2) = 1/2 log((2+e)(1+e) / (3e + e^2)) ~ 1/2 log(2 / 3e) = 11.31 (finite because
    #   of the jitter), and I(T; Y_i) = -1/2 log(1/2): S2 = 1/2 log((2+e)(1+e) / (2 (3e + e^2))).
    S = t64([[1, 0, 1], [0, 1, 1], [1, 1, 2]])
    e = E
    expected = 0.5 * math.log((2 + e) * (1 + e) / (2 * (3 * e + e * e)))
    assert abs(expected - 10.96) < 0.01
    out = ops.pair_target_excess(S, torch.tensor([[0, 1]]))
    assert_close(out, [expected], rtol=1e-6, atol=0)  # det of a nearly singular 3x3: ~1e-7 relative
    out = ops.pair_target_excess(S, torch.tensor([[0, 1]]), jitter=1e-6)
    e = 1e-6
    assert_close(out, [0.5 * math.log((2 + e) * (1 + e) / (2 * (3 * e + e * e)))], rtol=1e-9, atol=0)


def test_hand_worked_peer_overlap():
    # rho = 0.6: R_X = -1/2 log(1 - 0.36) = log(1.25); rho = -1 is clipped to -0.999.
    S = t64([[4, 2.4, -2], [2.4, 4, 0], [-2, 0, 1]])  # rho_01 = 0.6, rho_02 = -1, rho_12 = 0
    out = ops.gaussian_mi_pairs(S, torch.tensor([[0, 1], [0, 2], [1, 2]]))
    assert_close(out, [math.log(1.25), MAX_R, 0.0], rtol=1e-12, atol=0)
    assert_close(ops.peer_overlap_mean(S),
                 [(math.log(1.25) + MAX_R) / 2, math.log(1.25) / 2, MAX_R / 2], rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- symmetry and ties
def test_every_order_of_a_pair_or_triplet_gives_the_same_bits():
    S = t64(random_cov_t(6, seed=11))
    for row in itertools.combinations(range(6), 3):
        perms = torch.tensor(list(itertools.permutations(row)))
        s3 = ops.triplet_target_excess(S, perms)
        assert torch.equal(s3, s3[:1].expand_as(s3)), row
        pairs = torch.tensor([row[:2], row[1::-1]])
        for op in (ops.pair_target_excess, lambda c, p: ops.gaussian_mi_pairs(c[:6, :6], p)):
            v = op(S, pairs)
            assert v[0] == v[1]


def test_partner_ties_go_to_the_lower_index():
    # Channels 1, 2, 4 duplicate channel 0 (rho = 1, clipped: equal R_X); 3 has rho = 0.5 with 0.
    C = 5
    S = np.ones((C + 1, C + 1))
    S[3, :] = S[:, 3] = 0.5
    S[3, 3] = 1
    S[C, :] = S[:, C] = 0.2
    S[C, C] = 1
    _, chosen = ops.target_excess(t64(S), partners=2, top=1)
    assert chosen.tolist() == [[1, 2], [0, 2], [0, 1], [0, 1], [0, 1]]
    _, chosen = ops.target_excess(t64(S), partners=4, top=1)
    assert chosen[0].tolist() == [1, 2, 4, 3]
    # identity: every R_X is 0, partners are the lowest indices
    _, chosen = ops.target_excess(torch.eye(8, dtype=torch.float64), partners=3, top=2)
    assert chosen[0].tolist() == [1, 2, 3] and chosen[2].tolist() == [0, 1, 3]
    assert chosen[6].tolist() == [0, 1, 2]


# ----------------------------------------------------------------------------- degenerate inputs
def _finite(*tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _run_all(S, partners=3):
    C = S.shape[0] - 1
    pairs, trip = all_pairs(C), all_triplets(C)
    out = (ops.gaussian_mi_pairs(S[:C, :C], pairs), ops.peer_overlap_mean(S[:C, :C]),
           ops.pair_target_excess(S, pairs), ops.triplet_target_excess(S, trip),
           ops.target_excess(S, partners=partners, top=2).te)
    assert _finite(*out)
    return out


def test_constant_target_gives_zero_information():
    S = random_cov_t(5, seed=3)
    S[5, :] = S[:, 5] = 0
    _, _, s2, s3, te = _run_all(t64(S))
    assert s2.abs().max() == 0 and te.abs().max() == 0
    assert s3.abs().max() < 1e-12


def test_constant_channel_has_no_overlap_and_no_excess():
    S = random_cov_t(5, seed=4)
    S[2, :] = S[:, 2] = 0
    r, mean_r, s2, s3, te = _run_all(t64(S))
    pairs = all_pairs(5)
    with_2 = (pairs == 2).any(1)
    assert r[with_2].abs().max() == 0
    assert mean_r[2] == 0
    # S2(2, j) = I(T; Y_j) with jitter - I(T; Y_j) clipped: rounding-level, floored at 0
    assert s2[with_2].max() < 1e-9
    # and S3 with the constant channel equals the pair's own S2 terms: I(T; j, k) - I(T; j, k)
    trip = all_triplets(5)
    assert s3[(trip == 2).any(1)].abs().max() < 1e-9


@pytest.mark.parametrize("scale", [1.0, 1e4, 1e8])
def test_collinear_channels_stay_finite(scale):
    g = np.random.default_rng(5)
    Y = g.standard_normal((300, 3))
    X = np.column_stack([Y[:, 0], Y[:, 0], -2 * Y[:, 0], Y[:, 1], Y[:, 1] + Y[:, 2],
                         Y[:, 0] + Y[:, 1]]) * scale
    T = X[:, 0] + 0.5 * X[:, 3] + scale * g.standard_normal(300)
    S = t64(np.cov(np.column_stack([X, T]), rowvar=False))
    r, _, s2, s3, te = _run_all(S)
    assert_close(r[0], MAX_R, rtol=1e-12, atol=0)  # duplicate channels: |rho| = 1, clipped
    if scale == 1.0:
        # a duplicated channel adds nothing: S2(0, 1) ~ 0, S3(0, 1, 3) = S3 of nothing new ~ 0
        assert s2[0] < 1e-6
        assert_close(ops.triplet_target_excess(S, torch.tensor([[0, 1, 3]])), [0.0], atol=1e-6,
                     rtol=0)
    assert (s2 >= 0).all()


def test_target_equal_to_a_channel():
    # |rho_T0| = 1: I(T; Y_0) is clipped at 3.107 while the joint MI is capped only by the jitter,
    # 1/2 log((Var T + e) / e); documented behaviour, checked here so that it cannot change silently.
    S = random_cov_t(4, seed=6)
    S[4, :] = S[:, 4] = S[0, :]
    S[4, 4] = S[0, 0]
    S[4, 0] = S[0, 4] = S[0, 0]
    r, _, s2, s3, te = _run_all(t64(S))
    cap = 0.5 * math.log((S[0, 0] + E) / E)
    pairs = all_pairs(4)
    with_0 = (pairs == 0).any(1)
    assert (s2[with_0] > 5).all() and (s2[with_0] <= cap - MAX_R + 1e-9).all()


def test_not_positive_semidefinite_input_stays_finite():
    # symmetric, non-negative diagonal, but indefinite (|rho| > 1 everywhere)
    S = t64([[1, 2, 2, 1], [2, 1, 2, 1], [2, 2, 1, 1], [1, 1, 1, 1]])
    _, _, s2, s3, te = _run_all(S)
    assert (s2 >= 0).all()


def test_peer_overlap_mean_of_many_duplicates_does_not_underflow():
    # 300 copies of one channel: every R_X is the clipped maximum; a product of 299 factors
    # (1 - 0.999^2) = 0.002 would underflow to 0 (log -> -inf) if it were taken in one go.
    S = torch.full((300, 300), 2.0, dtype=torch.float64)
    assert_close(ops.peer_overlap_mean(S), [MAX_R] * 300, rtol=1e-12, atol=0)
    te, chosen = ops.target_excess(torch.ones(301, 301, dtype=torch.float64), partners=3, top=2)
    assert chosen[5].tolist() == [0, 1, 2] and torch.isfinite(te).all()


def test_single_channel_and_empty_pairs():
    S = t64([[2.0, 0.5], [0.5, 1.0]])
    te, chosen = ops.target_excess(S, partners=4, top=2)
    assert te.tolist() == [0.0] and chosen.tolist() == [[-1]]  # no peer: one padding column
    assert ops.peer_overlap_mean(S[:1, :1]).tolist() == [0.0]
    empty2, empty3 = torch.empty(0, 2, dtype=torch.long), torch.empty(0, 3, dtype=torch.long)
    assert ops.pair_target_excess(S, empty2).shape == (0,)
    assert ops.gaussian_mi_pairs(S, empty2).shape == (0,)
    assert ops.triplet_target_excess(S, empty3).shape == (0,)


# ----------------------------------------------------------------------------- input forms
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_are_computed_in_float64(dtype):
    S = t64(random_cov_t(6, seed=8)).to(dtype)
    S64 = S.double()
    pairs, trip = all_pairs(6), all_triplets(6)
    assert torch.equal(ops.pair_target_excess(S, pairs), ops.pair_target_excess(S64, pairs))
    assert torch.equal(ops.triplet_target_excess(S, trip), ops.triplet_target_excess(S64, trip))
    assert torch.equal(ops.gaussian_mi_pairs(S, pairs), ops.gaussian_mi_pairs(S64, pairs))
    assert torch.equal(ops.target_excess(S).te, ops.target_excess(S64).te)


def test_strided_views_and_upper_triangle():
    S = t64(random_cov_t(7, seed=9))
    big = torch.zeros(16, 16, dtype=torch.float64)
    big[::2, 1::2] = S.T  # strided, transposed storage of the same (symmetric) values
    view = big[::2, 1::2].T
    assert not view.is_contiguous() and torch.equal(view, S)
    pairs, trip = all_pairs(7), all_triplets(7)
    assert torch.equal(ops.pair_target_excess(view, pairs), ops.pair_target_excess(S, pairs))
    assert torch.equal(ops.triplet_target_excess(view, trip), ops.triplet_target_excess(S, trip))
    assert torch.equal(ops.peer_overlap_mean(view[:7, :7]), ops.peer_overlap_mean(S[:7, :7]))
    assert torch.equal(ops.target_excess(view, partners=3).te, ops.target_excess(S, partners=3).te)
    # asymmetry within the tolerance: the upper triangle is what counts
    lower_noise = S + torch.tril(torch.full_like(S, 1e-9), -1)
    assert torch.equal(ops.pair_target_excess(lower_noise, pairs), ops.pair_target_excess(S, pairs))


def test_non_contiguous_index_rows():
    S = t64(random_cov_t(6, seed=10))
    pairs = all_pairs(6)
    wide = torch.stack([pairs[:, 0], pairs[:, 0], pairs[:, 1]], dim=1)[:, ::2]
    assert not wide.is_contiguous()
    assert torch.equal(ops.pair_target_excess(S, wide), ops.pair_target_excess(S, pairs))


# ----------------------------------------------------------------------------- bad input
_S = t64(random_cov_t(4, seed=12))  # cov_t of C = 4 channels
_P = torch.tensor([[0, 1], [2, 3]])
_T = torch.tensor([[0, 1, 2]])
_asym = _S.clone()
_asym[0, 1] += 0.5
_nan = _S.clone()
_nan[1, 2] = _nan[2, 1] = float("nan")
_negvar = _S.clone()
_negvar[1, 1] = -0.5

BAD = [
    (ops.gaussian_mi_pairs, (torch.randn(2, 3, 3), _P), {}, r"gaussian_mi_pairs: cov must be a 2-D matrix \[C, C\].* got 3-D"),
    (ops.gaussian_mi_pairs, (torch.randn(4, 5), _P), {}, r"cov must be square .* got shape \[4, 5\]"),
    (ops.gaussian_mi_pairs, (_asym, _P), {}, r"cov must be symmetric, got \|cov - cov\^T\| up to 0.5"),
    (ops.gaussian_mi_pairs, (torch.eye(4, dtype=torch.long), _P), {}, "cov must be a floating tensor"),
    (ops.gaussian_mi_pairs, (_nan, _P), {}, "gaussian_mi_pairs: cov has NaN/Inf values"),
    (ops.gaussian_mi_pairs, (_S[:4, :4], _P.int()), {}, "pairs must be Long, got Int"),
    (ops.gaussian_mi_pairs, (_S[:4, :4], torch.tensor([0, 1])), {}, r"pairs must be \[P, 2\], got shape \[2\]"),
    (ops.gaussian_mi_pairs, (_S[:4, :4], torch.tensor([[0, 4]])), {}, r"pairs must index channels 0..3 \(C = 4\), got values in \[0, 4\]"),
    (ops.gaussian_mi_pairs, (_S[:4, :4], torch.tensor([[0, 1], [3, 3]])), {}, r"pairs\[1\] = \(3, 3\) repeats a channel"),
    (ops.peer_overlap_mean, (torch.empty(0, 0, dtype=torch.float64),), {}, r"peer_overlap_mean: cov must be \[C, C\] \(C >= 1 channels\), got shape \[0, 0\]"),
    (ops.peer_overlap_mean, (_negvar,), {}, r"cov has a negative variance on its diagonal \(index 1: -0.5\)"),
    (ops.peer_overlap_mean, (torch.randn(3),), {}, "cov must be a 2-D matrix"),
    (ops.pair_target_excess, (t64([[1.0]]), torch.empty(0, 2, dtype=torch.long)), {}, r"pair_target_excess: cov_t must be \[C \+ 1, C \+ 1\] \(C >= 1 channels, then the target\), got shape \[1, 1\]"),
    (ops.pair_target_excess, (_S, torch.tensor([[0, 4]])), {}, r"pairs must index channels 0..3 \(C = 4\); index C is the target"),
    (ops.pair_target_excess, (_S, torch.tensor([[-1, 2]])), {}, r"got values in \[-1, 2\]"),
    (ops.pair_target_excess, (_S, torch.tensor([[0, 1, 2]])), {}, r"pairs must be \[P, 2\], got shape \[1, 3\]"),
    (ops.pair_target_excess, (_S, torch.tensor([[1, 1]])), {}, r"pairs\[0\] = \(1, 1\) repeats a channel"),
    (ops.pair_target_excess, (_S, _P.double()), {}, "pairs must be Long, got Double"),
    (ops.pair_target_excess, (_S, _P), {"jitter": 0.0}, "pair_target_excess: jitter must be a finite value > 0"),
    (ops.pair_target_excess, (_S, _P), {"jitter": float("nan")}, "jitter must be a finite value > 0"),
    (ops.pair_target_excess, (_S.int(), _P), {}, "cov_t must be a floating tensor"),
    (ops.pair_target_excess, (_nan, _P), {}, "cov_t has NaN/Inf values"),
    (ops.triplet_target_excess, (_S, _P), {}, r"triplet_target_excess: triplets must be \[P, 3\], got shape \[2, 2\]"),
    (ops.triplet_target_excess, (_S, torch.tensor([[0, 1, 2], [0, 3, 0]])), {}, r"triplets\[1\] = \(0, 3, 0\) repeats a channel"),
    (ops.triplet_target_excess, (_S, torch.tensor([[1, 2, 2]])), {}, r"triplets\[0\] = \(1, 2, 2\) repeats"),
    (ops.triplet_target_excess, (_S, torch.tensor([[0, 1, 4]])), {}, "index C is the target"),
    (ops.triplet_target_excess, (_S, _T), {"jitter": -1e-10}, "jitter must be a finite value > 0"),
    (ops.triplet_target_excess, (_asym, _T), {}, "cov_t must be symmetric"),
    (ops.target_excess, (_S,), {"partners": 0}, "target_excess: partners must be >= 1, got 0"),
    (ops.target_excess, (_S,), {"top": -2}, "top must be >= 1, got -2"),
    (ops.target_excess, (_S,), {"jitter": 0.0}, "jitter must be a finite value > 0"),
    (ops.target_excess, (torch.randn(3, 4),), {}, "cov_t must be square"),
    (ops.target_excess, (_nan,), {}, "target_excess: cov_t has NaN/Inf values"),
]


@pytest.mark.parametrize("fn, args, kwargs, match", BAD, ids=[b[3][:40] for b in BAD])
def test_bad_input_raises_clear_errors(fn, args, kwargs, match):
    with pytest.raises(RuntimeError, match=match):
        fn(*args, **kwargs)


# ----------------------------------------------------------------------------- dispatcher
def test_opcheck():
    S = t64(random_cov_t(5, seed=13))
    o = torch.ops.chanaxis_fast
    torch.library.opcheck(o.gaussian_mi_pairs.default, (S[:5, :5], all_pairs(5)))
    torch.library.opcheck(o.peer_overlap_mean.default, (S[:5, :5],))
    torch.library.opcheck(o.pair_target_excess.default, (S, all_pairs(5), 1e-10))
    torch.library.opcheck(o.triplet_target_excess.default, (S, all_triplets(5), 1e-10))
    torch.library.opcheck(o.target_excess.default, (S, 3, 2, 1e-10))
    torch.library.opcheck(o.target_excess.default, (S.float(), 7, 9, 1e-8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_cpu():
    for C in (3, 40, 300):
        S = t64(random_cov_t(C, seed=14 + C))
        g = torch.Generator().manual_seed(C)
        pairs = all_pairs(C)
        trip = torch.stack([torch.randperm(C, generator=g)[:3] for _ in range(2000)])
        Sc = S.cuda()
        assert_close(ops.gaussian_mi_pairs(Sc[:C, :C], pairs.cuda()), ops.gaussian_mi_pairs(S[:C, :C], pairs))
        assert_close(ops.peer_overlap_mean(Sc[:C, :C]), ops.peer_overlap_mean(S[:C, :C]))
        assert_close(ops.pair_target_excess(Sc, pairs.cuda()), ops.pair_target_excess(S, pairs))
        assert_close(ops.triplet_target_excess(Sc, trip.cuda()), ops.triplet_target_excess(S, trip))
        for partners, top in ((50, 10), (2, 5)):
            gpu = ops.target_excess(Sc, partners=partners, top=top)
            cpu = ops.target_excess(S, partners=partners, top=top)
            assert torch.equal(gpu.partners.cpu(), cpu.partners)
            assert_close(gpu.te, cpu.te)
    with pytest.raises(RuntimeError, match="repeats a channel"):
        ops.pair_target_excess(Sc, torch.tensor([[1, 1]], device="cuda"))
    with pytest.raises(RuntimeError, match="pairs is on cpu but cov_t is on cuda"):
        ops.pair_target_excess(Sc, torch.tensor([[0, 1]]))
    with pytest.raises(RuntimeError, match="triplets is on cuda:0 but cov_t is on cpu"):
        ops.triplet_target_excess(S, torch.tensor([[0, 1, 2]], device="cuda"))


# ----------------------------------------------------------------------------- no FMA contraction
# The determinants of near-collinear covariances cancel heavily, so the promise that CPU and CUDA
# run the same float64 operations (common/fp.h, -ffp-contract=off, --fmad=false) is checked by
# transcribing the kernels' operation order into Python (IEEE float64, never fused) and asking for
# the same bits; a compiler that fused a * b - c * d into an FMA would fail it.
_CLIP2 = 0.999 * 0.999


def _py_det2(a00, a01, a11):
    return a00 * a11 - a01 * a01


def _py_det3(a00, a01, a02, a11, a12, a22):
    return (a00 * (a11 * a22 - a12 * a12) - a01 * (a01 * a22 - a12 * a02)) + a02 * (a01 * a12 - a11 * a02)


def _py_det4(a00, a01, a02, a03, a11, a12, a13, a22, a23, a33):
    s0, s1, s2 = a00 * a11 - a01 * a01, a00 * a12 - a01 * a02, a00 * a13 - a01 * a03
    s3, s4, s5 = a01 * a12 - a11 * a02, a01 * a13 - a11 * a03, a02 * a13 - a12 * a03
    c5, c4, c3 = a22 * a33 - a23 * a23, a12 * a33 - a13 * a23, a12 * a23 - a13 * a22
    c2, c1, c0 = a02 * a33 - a03 * a23, a02 * a23 - a03 * a22, a02 * a13 - a03 * a12
    return ((((s0 * c5 - s1 * c4) + s2 * c3) + s3 * c2) - s4 * c1) + s5 * c0


def _py_cond_var(var_t, det_a, det_ta, jitter):
    if not det_a > 0.0:
        return var_t
    v = det_ta / det_a
    if not v >= jitter:
        v = jitter
    return v if v < var_t else var_t


def _py_excess(S, idx, jitter):
    """S2 (two indices) or S3 (three) in the kernels' operation order; S a float64 numpy array."""
    n = S.shape[0]
    idx = sorted(idx)
    var_t = S[n - 1, n - 1] + jitter
    a = [S[i, i] + jitter for i in idx]
    t = [S[i, n - 1] for i in idx]

    def cv2(p, q):
        i, j = idx[p], idx[q]
        return _py_cond_var(var_t, _py_det2(a[p], S[i, j], a[q]),
                            _py_det3(a[p], S[i, j], t[p], a[q], t[q], var_t), jitter)

    if len(idx) == 2:
        inv = [1.0 / S[i, i] if S[i, i] > 0 else 0.0 for i in idx]
        inv_t = 1.0 / S[n - 1, n - 1]
        r = [min((t[p] * inv[p]) * (t[p] * inv_t), _CLIP2) for p in range(2)]
        ratio = var_t * (1.0 - max(r)) / cv2(0, 1)
        return 0.5 * math.log(max(ratio, 1.0))
    i, j, k = idx
    best = min(cv2(0, 1), cv2(0, 2), cv2(1, 2))
    v = _py_cond_var(var_t, _py_det3(a[0], S[i, j], S[i, k], a[1], S[j, k], a[2]),
                     _py_det4(a[0], S[i, j], S[i, k], t[0], a[1], S[j, k], t[1], a[2], t[2], var_t),
                     jitter)
    return 0.5 * math.log(best / v)


def near_collinear_cov_t(seed=3):
    """Channels that are copies of each other up to 1e-6..1e-4 noise, and a target close to one:
    the 3x3 and 4x4 jittered determinants cancel to a few digits."""
    g = np.random.default_rng(seed)
    y = g.standard_normal((500, 2))
    X = np.column_stack([y[:, 0], y[:, 0] + 1e-6 * g.standard_normal(500),
                         y[:, 0] - 1e-5 * g.standard_normal(500), y[:, 1],
                         y[:, 1] + 1e-4 * g.standard_normal(500)])
    T = X[:, 0] + 1e-5 * g.standard_normal(500)
    return np.cov(np.column_stack([X, T]), rowvar=False)


def test_near_collinear_determinants_are_not_fused():
    S = near_collinear_cov_t()
    St = t64(S)
    pairs, trip = all_pairs(5), all_triplets(5)
    s2 = ops.pair_target_excess(St, pairs, jitter=1e-10)
    s3 = ops.triplet_target_excess(St, trip, jitter=1e-10)
    assert s2.tolist() == [_py_excess(S, p, 1e-10) for p in pairs.tolist()]
    assert s3.tolist() == [_py_excess(S, p, 1e-10) for p in trip.tolist()]
    # and the cancellation is real: a 3x3 determinant of these matrices is off its exact value
    # (fractions) by far more than its ulp, so rounding each product differently (an FMA) shows
    from fractions import Fraction
    a00, a01, a02, a11, a12, a22 = (S[0, 0] + 1e-10, S[0, 1], S[0, 5], S[1, 1] + 1e-10, S[1, 5],
                                    S[5, 5] + 1e-10)
    exact = (Fraction(a00) * (Fraction(a11) * Fraction(a22) - Fraction(a12) ** 2)
             - Fraction(a01) * (Fraction(a01) * Fraction(a22) - Fraction(a12) * Fraction(a02))
             + Fraction(a02) * (Fraction(a01) * Fraction(a12) - Fraction(a11) * Fraction(a02)))
    computed = _py_det3(a00, a01, a02, a11, a12, a22)
    assert abs(computed - float(exact)) > 1e3 * math.ulp(abs(float(exact)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_cpu_on_near_collinear_covariances():
    S = t64(near_collinear_cov_t())
    pairs, trip = all_pairs(5), all_triplets(5)
    for jitter in (1e-10, 1e-8):
        cpu2 = ops.pair_target_excess(S, pairs, jitter=jitter)
        cpu3 = ops.triplet_target_excess(S, trip, jitter=jitter)
        gpu2 = ops.pair_target_excess(S.cuda(), pairs.cuda(), jitter=jitter).cpu()
        gpu3 = ops.triplet_target_excess(S.cuda(), trip.cuda(), jitter=jitter).cpu()
        # same operations on both devices: only the last bits of log may differ
        assert_close(gpu2, cpu2, rtol=1e-13, atol=1e-15)
        assert_close(gpu3, cpu3, rtol=1e-13, atol=1e-15)
        assert torch.equal(torch.sign(gpu3), torch.sign(cpu3))
        te_cpu, te_gpu = ops.target_excess(S, partners=4, top=2, jitter=jitter), \
            ops.target_excess(S.cuda(), partners=4, top=2, jitter=jitter)
        assert torch.equal(te_gpu.partners.cpu(), te_cpu.partners)
        assert_close(te_gpu.te, te_cpu.te, rtol=1e-13, atol=1e-15)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_per_channel_kernels_match_cpu_on_wide_layers():
    # one warp per channel: partner selection by ballots, strands combined by shuffles
    for C, partners, top in ((33, 50, 10), (700, 50, 10), (700, 3, 7), (2100, 64, 5)):
        S = t64(random_cov_t(C, seed=C, n=3 * C))
        # ties: a duplicated channel gives equal keys, which must go to the lower index
        S[:, 7] = S[:, 3]
        S[7, :] = S[3, :]
        S[7, 7] = S[3, 3]
        cpu = ops.target_excess(S, partners=partners, top=top)
        gpu = ops.target_excess(S.cuda(), partners=partners, top=top)
        assert torch.equal(gpu.partners.cpu(), cpu.partners)
        assert_close(gpu.te, cpu.te, rtol=1e-13, atol=1e-15)
        assert_close(ops.peer_overlap_mean(S[:C, :C].cuda()), ops.peer_overlap_mean(S[:C, :C]),
                     rtol=1e-13, atol=1e-15)
