"""peer_hulls and explained_variance: kernel vs brute-force numpy greedy, scikit-learn, reference,
degenerate layers, bad input, opcheck, CUDA vs CPU."""

import numpy as np
import pytest
import torch
from sklearn.linear_model import LinearRegression

import chanaxis_fast
from chanaxis_fast import ops, reference
from utils import assert_close


# ----------------------------------------------------------------------------- data
def data(N, C, rank=0, seed=0, blocks=None):
    """Samples [N, C]: independent noise plus `rank` shared factors (or one factor per block)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, C))
    if rank:
        X += rng.standard_normal((N, rank)) @ rng.standard_normal((rank, C)) * 1.5
    if blocks:
        start = 0
        for size in blocks:
            X[:, start:start + size] += rng.standard_normal((N, 1)) * rng.uniform(0.5, 2.0, size)
            start += size
    return X


def corr_of(X):
    return torch.from_numpy(np.atleast_2d(np.corrcoef(X, rowvar=False)))


# ----------------------------------------------------------------------------- brute force
def np_explained(A, i, S):
    """E_i(S) by least squares on A = P + ridge I (independent of the kernels)."""
    if not S:
        return 0.0
    r = A[S, i]
    return float(r @ np.linalg.lstsq(A[np.ix_(S, S)], r, rcond=None)[0])


def np_hulls(P, max_size=10, eps=0.05, ridge=1e-3):
    """Greedy forward selection with one least-squares solve per candidate and step.

    Ties (gains within 1e-9 relative) go to the lowest index; a hull stops at (1 - eps) E_full
    (1e-12 slack), at max_size (saturated), or when no peer adds anything.
    """
    P = np.asarray(P, dtype=np.float64)
    C = P.shape[0]
    A = P + ridge * np.eye(C)
    e_full = np.array([np_explained(A, i, [j for j in range(C) if j != i]) for i in range(C)])
    e_full = np.clip(e_full, 0.0, 1.0)
    e_full[e_full < 1e-12] = 0.0
    size = np.zeros(C, dtype=np.int64)
    width = max(1, min(max_size, C - 1))  # no hull holds more than C - 1 peers
    members = -np.ones((C, width), dtype=np.int64)
    path = np.full((C, width), np.nan)
    saturated = np.zeros(C, dtype=bool)
    for i in range(C):
        S, E = [], 0.0
        while E < (1 - eps) * e_full[i] - 1e-12:
            if len(S) == max_size:
                saturated[i] = True
                break
            cands = [j for j in range(C) if j != i and j not in S]
            if not cands:
                break
            values = np.array([np_explained(A, i, S + [j]) for j in cands])
            best = (values - E).max()
            if best <= 1e-14:
                break
            pick = int(np.flatnonzero(values - E >= best * (1 - 1e-9))[0])
            S.append(cands[pick])
            E = values[pick]
            path[i, len(S) - 1] = min(max(E, 0.0), 1.0)
        size[i] = len(S)
        members[i, :len(S)] = S
    return e_full, size, members, path, saturated


def check_against_numpy(h, P, **kw):
    e_full, size, members, path, saturated = np_hulls(P.numpy(), **kw)
    assert_close(h.e_full, e_full, rtol=1e-9, atol=1e-10)
    np.testing.assert_array_equal(h.hull_size.numpy(), size)
    np.testing.assert_array_equal(h.hull_members.numpy(), members)
    np.testing.assert_array_equal(h.saturated.numpy(), saturated)
    np.testing.assert_allclose(h.hull_ev.numpy(), path, rtol=1e-9, atol=1e-10)


def assert_same_hulls(a, b, ev_tol=1e-12):
    for name in ("hull_size", "hull_members", "saturated"):
        assert torch.equal(getattr(a, name).cpu(), getattr(b, name).cpu()), name
    assert_close(a.e_full, b.e_full, rtol=0, atol=ev_tol)
    torch.testing.assert_close(a.hull_ev.cpu(), b.hull_ev.cpu(), rtol=0, atol=ev_tol, equal_nan=True)


# ----------------------------------------------------------------------------- vs brute force
@pytest.mark.parametrize("N, C, rank, kw", [
    (300, 12, 3, {}),
    (80, 25, 2, {}),                                    # N < 3 C: noisy, larger hulls
    (400, 18, 4, {"max_size": 3}),                      # many saturated hulls
    (200, 20, 3, {"eps": 0.0, "ridge": 0.05}),
    (500, 15, 0, {"eps": 0.3, "ridge": 0.0}),           # no structure, ridge 0
])
def test_matches_brute_force_on_random_data(N, C, rank, kw):
    P = corr_of(data(N, C, rank, seed=C))
    h = ops.peer_hulls(P, **kw)
    check_against_numpy(h, P, **kw)
    if "max_size" in kw:
        assert h.saturated.any()  # the case is exercised


def test_matches_brute_force_on_block_structure():
    P = corr_of(data(400, 18, blocks=[6, 5, 7], seed=3))
    h = ops.peer_hulls(P)
    check_against_numpy(h, P)
    block = np.repeat([0, 1, 2], [6, 5, 7])
    first = h.hull_members[:, 0].numpy()
    assert (block[first] == block).mean() > 0.9  # the best first peer is in the channel's block


def test_matches_brute_force_with_duplicated_channels():
    X = data(300, 10, rank=2, seed=4)
    X[:, 6] = X[:, 1]
    X[:, 8] = -X[:, 1]
    X[:, 9] = X[:, 4] * 3.0 + 1.0
    P = corr_of(X)
    h = ops.peer_hulls(P)
    check_against_numpy(h, P)
    # channel 1 is copied by 6 and negated by 8: exact ties of the first step go to the lower index
    assert h.hull_members[1, 0] == 6 and h.hull_members[6, 0] == 1 and h.hull_members[8, 0] == 1
    assert h.hull_members[4, 0] == 9 and h.hull_members[9, 0] == 4
    ridge = 1e-3
    assert_close(h.hull_ev[1, 0], 1 / (1 + ridge))  # r^2 / (1 + ridge) with |r| = 1


def test_exact_ties_go_to_the_lowest_index():
    # Equicorrelated channels: at every step every candidate has the same gain.
    C, rho = 9, 0.4
    P = torch.full((C, C), rho, dtype=torch.float64)
    P.diagonal().fill_(1.0)
    h = ops.peer_hulls(P, max_size=4, eps=0.0)
    for i in range(C):
        expected = [j for j in range(C) if j != i][:4]
        assert h.hull_members[i].tolist() == expected
    assert h.saturated.all()  # the threshold eps = 0 needs all 8 peers
    check_against_numpy(h, P, max_size=4, eps=0.0)


def test_e_full_is_the_linear_regression_r2():
    X = data(3000, 10, rank=3, seed=7)
    P = corr_of(X)
    h = ops.peer_hulls(P, ridge=0.0)
    for i in range(10):
        others = np.delete(X, i, axis=1)
        r2 = LinearRegression().fit(others, X[:, i]).score(others, X[:, i])
        assert_close(h.e_full[i], r2, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- vs reference
@pytest.mark.parametrize("C, kw", [
    (C, kw) for C in (1, 2, 3, 7, 16, 40)
    for kw in ({}, {"max_size": 2, "eps": 0.1}, {"ridge": 0.0}, {"ridge": 0.1, "eps": 0.0})
] + [(130, {}), (130, {"max_size": 3, "ridge": 0.0})])
def test_matches_reference(C, kw):
    P = corr_of(data(max(4 * C, 50), C, rank=min(3, C), seed=C))
    assert_same_hulls(ops.peer_hulls(P, **kw), reference.peer_hulls(P, **kw), ev_tol=1e-10)


def test_batch_of_layers_equals_separate_calls():
    layers = [corr_of(data(100, C, rank=2, seed=C)) for C in (1, 5, 40, 3)]
    layers[0] = torch.ones(1, 1, dtype=torch.float64)
    batch = ops.peer_hulls(layers, max_size=6)
    assert isinstance(batch, list) and len(batch) == 4
    for P, h in zip(layers, batch):
        one = ops.peer_hulls(P, max_size=6)
        # the batch is as wide as its largest layer allows (6 here); a lone layer of C channels
        # max(1, min(6, C - 1)) columns, the rest is padding
        w = one.hull_members.shape[1]
        assert w == max(1, min(6, P.shape[0] - 1))
        assert h.e_full.shape == (P.shape[0],) and h.hull_members.shape == (P.shape[0], 6)
        assert (h.hull_members[:, w:] == -1).all() and torch.isnan(h.hull_ev[:, w:]).all()
        for a, b in zip(h, one):
            if a.dim() == 2:
                a = a[:, :w]
            assert torch.equal(a, b) if a.dtype != torch.float64 else torch.allclose(a, b, equal_nan=True, rtol=0, atol=0)
    with pytest.raises(ValueError, match="peer_hulls: corr must be a matrix or a non-empty list"):
        ops.peer_hulls([])
    with pytest.raises(ValueError, match="peer_hulls: corr must be a matrix or a non-empty list"):
        reference.peer_hulls([])


@pytest.mark.parametrize("impl", ["ops", "reference"])
def test_huge_max_size_is_clamped_to_the_peers_there_are(impl):
    f = ops.peer_hulls if impl == "ops" else reference.peer_hulls
    P = corr_of(data(100, 8, rank=2, seed=3))
    huge = f(P, max_size=10**12)  # would be a 64 TB allocation unclamped
    assert huge.hull_members.shape == (8, 7)
    seven = f(P, max_size=7)
    for name in ("e_full", "hull_size", "hull_members"):
        assert torch.equal(getattr(huge, name), getattr(seven, name)), name
    # a hull that takes every peer stops because none is left: saturated only when max_size says so
    assert not huge.saturated[huge.hull_size < 7].any()
    assert not (huge.saturated & (huge.hull_size == 7)).any()


def test_output_conventions():
    P = corr_of(data(200, 30, rank=3, seed=2))
    h = ops.peer_hulls(P, max_size=5)
    assert h.e_full.dtype == h.hull_ev.dtype == torch.float64
    assert h.hull_size.dtype == h.hull_members.dtype == torch.int64 and h.saturated.dtype == torch.bool
    filled = torch.arange(5)[None, :] < h.hull_size[:, None]
    assert torch.equal(filled, h.hull_members >= 0)
    assert torch.equal(filled, ~torch.isnan(h.hull_ev))
    ev = h.hull_ev.nan_to_num(-1.0)
    assert ((ev[:, 1:] >= ev[:, :-1]) | ~filled[:, 1:]).all()  # E grows along the hull
    last = h.hull_ev.gather(1, (h.hull_size - 1).clamp_min(0)[:, None])[:, 0]
    complete = (h.hull_size > 0) & ~h.saturated
    assert (last[complete] >= 0.95 * h.e_full[complete] - 1e-12).all()
    assert (last[h.saturated] < 0.95 * h.e_full[h.saturated]).all()
    assert_close(h.compact_score, h.e_full / h.hull_size.clamp_min(1).double())


def test_float32_input_equals_float64_of_its_values():
    P = corr_of(data(300, 20, rank=3, seed=5)).float()
    assert_same_hulls(ops.peer_hulls(P), ops.peer_hulls(P.double()), ev_tol=0)


# ----------------------------------------------------------------------------- degenerate layers
def test_fewer_peers_than_max_size():
    P = corr_of(data(200, 4, rank=1, seed=8))
    h = ops.peer_hulls(P, max_size=10, eps=0.0)
    assert (h.hull_size <= 3).all() and not h.saturated.any()
    full = h.hull_size == 3
    assert full.any()
    assert_close(h.hull_ev[full, 2], h.e_full[full], rtol=0, atol=1e-12)
    check_against_numpy(h, P, max_size=10, eps=0.0)


def test_single_channel_layer():
    h = ops.peer_hulls(torch.ones(1, 1), max_size=3)
    assert h.e_full.tolist() == [0.0] and h.hull_size.tolist() == [0]
    assert h.hull_members.tolist() == [[-1]] and torch.isnan(h.hull_ev).all()  # one column: no peer
    assert not h.saturated.any()


def test_constant_channels_from_channel_stats():
    X = torch.from_numpy(data(500, 8, rank=2, seed=9))
    X[:, 2] = 3.0
    X[:, 5] = -1.0
    P = chanaxis_fast.ChannelStats().update(X).correlation()
    h = ops.peer_hulls(P, eps=0.0)
    assert h.e_full[2] == 0 and h.e_full[5] == 0
    assert h.hull_size[2] == 0 and h.hull_size[5] == 0 and not h.saturated[[2, 5]].any()
    assert not ((h.hull_members == 2) | (h.hull_members == 5)).any()  # they explain nothing
    assert (h.hull_size[[0, 1, 3, 4, 6, 7]] == 5).all()  # eps = 0: every non-constant peer
    check_against_numpy(h, P, eps=0.0)


def test_uncorrelated_channels_have_empty_hulls():
    h = ops.peer_hulls(torch.eye(6, dtype=torch.float64))
    assert (h.e_full == 0).all() and (h.hull_size == 0).all() and not h.saturated.any()


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_perfect_correlation(sign):
    ridge = 1e-3
    P = torch.tensor([[1.0, sign], [sign, 1.0]], dtype=torch.float64)
    h = ops.peer_hulls(P, ridge=ridge)
    assert_close(h.e_full, [1 / (1 + ridge)] * 2)
    assert h.hull_members[:, 0].tolist() == [1, 0] and h.hull_size.tolist() == [1, 1]
    assert_close(h.hull_ev[:, 0], [1 / (1 + ridge)] * 2)


def test_collinear_channels_with_ridge_zero_are_an_error_with_a_way_out():
    X = data(200, 5, seed=10)
    X[:, 3] = X[:, 0] - X[:, 1]
    P = corr_of(X)
    with pytest.raises(RuntimeError, match=r"peer_hulls: corr\[0\] \+ ridge \* I is not positive definite.*pass ridge > 0"):
        ops.peer_hulls(P, ridge=0.0)
    h = ops.peer_hulls(P, ridge=1e-6, eps=0.0)
    assert torch.isfinite(h.e_full).all()
    # 3 = 0 - 1 exactly: once two of {0, 1, 3} are in a hull the third adds nothing
    for i in (0, 1, 3):
        assert h.hull_members[i, 0].item() in {0, 1, 3} - {i} and h.hull_ev[i, 0] > 0.3
    check_against_numpy(h, P, ridge=1e-6, eps=0.0)


def test_not_positive_semidefinite_is_an_error():
    P = torch.tensor([[1.0, 0.9, -0.9], [0.9, 1.0, 0.9], [-0.9, 0.9, 1.0]])
    with pytest.raises(RuntimeError, match="not a valid correlation matrix"):
        ops.peer_hulls(P)


# ----------------------------------------------------------------------------- bad input
def _sym(C=4):
    return torch.eye(C, dtype=torch.float64)


@pytest.mark.parametrize("corr, kwargs, match", [
    (torch.eye(3)[None], {}, r"peer_hulls: corr\[0\] must be 2-D \[C, C\], got 3-D"),
    (torch.ones(3), {}, r"corr\[0\] must be 2-D"),
    (torch.zeros(3, 4), {}, r"corr\[0\] must be square \[C, C\], got shape \[3, 4\]"),
    (torch.zeros(0, 0), {}, r"corr\[0\] has no channels"),
    (torch.eye(3, dtype=torch.long), {}, r"corr\[0\] must be float32 or float64, got Long"),
    (torch.eye(3, dtype=torch.float16), {}, "must be float32 or float64, got Half"),
    (torch.tensor([[1.0, 0.5], [0.4, 1.0]]), {}, r"corr\[0\] must be symmetric, but .* reaches 0.1"),
    (torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), {}, r"corr\[0\] has NaN/Inf"),
    (2 * torch.eye(3), {}, "unit diagonal"),
    ([_sym(), torch.eye(3)[None]], {}, r"corr\[1\] must be 2-D"),
    (_sym(), {"max_size": 0}, "max_size must be >= 1, got 0"),
    (_sym(), {"eps": 1.0}, r"eps must be in \[0, 1\), got 1"),
    (_sym(), {"eps": -0.1}, r"eps must be in \[0, 1\), got -0.1"),
    (_sym(), {"ridge": -1e-3}, "ridge must be a finite number >= 0, got -0.001"),
    (_sym(), {"ridge": float("nan")}, "ridge must be a finite number >= 0"),
])
def test_peer_hulls_bad_input(corr, kwargs, match):
    with pytest.raises(RuntimeError, match=match):
        ops.peer_hulls(corr, **kwargs)


def test_tolerated_asymmetry_is_symmetrised():
    P = corr_of(data(200, 6, rank=2, seed=11))
    noisy = P.clone()
    noisy[0, 1] += 4e-6
    h = ops.peer_hulls(noisy)
    sym = P.clone()
    sym[0, 1] += 2e-6
    sym[1, 0] += 2e-6
    assert_same_hulls(h, ops.peer_hulls(sym), ev_tol=0)


# ----------------------------------------------------------------------------- explained_variance
def np_explained_variance(P, targets, peers, ridge):
    A = np.asarray(P) + ridge * np.eye(P.shape[0])
    out = []
    for t, row in zip(targets, peers):
        S = [p for p in row if p >= 0]
        out.append(np.clip(A[S, t] @ np.linalg.solve(A[np.ix_(S, S)], A[S, t]), 0, 1) if S else 0.0)
    return np.array(out)


@pytest.mark.parametrize("ridge", [0.0, 1e-3, 0.2])
@pytest.mark.parametrize("K", [0, 1, 4, 9])
def test_explained_variance_matches_numpy_and_reference(ridge, K):
    C, B = 20, 60
    P = corr_of(data(300, C, rank=3, seed=K))
    g = torch.Generator().manual_seed(K)
    targets = torch.randint(0, C, (B,), generator=g)
    peers = torch.full((B, K), -1, dtype=torch.long)
    for b in range(B):
        others = [j for j in torch.randperm(C, generator=g).tolist() if j != targets[b]]
        k = int(torch.randint(0, K + 1, (1,), generator=g))
        slots = torch.randperm(K, generator=g)[:k]  # padding anywhere in the row
        peers[b, slots] = torch.tensor(others[:k], dtype=torch.long)
    e = ops.explained_variance(P, targets, peers, ridge=ridge)
    assert e.dtype == torch.float64 and e.shape == (B,)
    assert_close(e, np_explained_variance(P.numpy(), targets.tolist(), peers.tolist(), ridge), rtol=1e-9)
    assert_close(e, reference.explained_variance(P, targets, peers, ridge=ridge), rtol=1e-10)
    assert (e[(peers < 0).all(1)] == 0).all()


def test_explained_variance_along_a_hull_equals_hull_ev():
    C, m = 40, 6
    P = corr_of(data(300, C, rank=4, seed=12))
    h = ops.peer_hulls(P, max_size=m, eps=0.0)
    assert (h.hull_size == m).all()
    for k in range(1, m + 1):
        peers = h.hull_members.clone()
        peers[:, k:] = -1
        e = ops.explained_variance(P, torch.arange(C), peers)
        assert_close(e, h.hull_ev[:, k - 1], rtol=1e-13, atol=1e-15)


def test_explained_variance_drops_collinear_peers():
    X = data(300, 6, seed=13)
    X[:, 4] = X[:, 1] + X[:, 2]
    P = corr_of(X)
    t = torch.tensor([0, 0, 3])
    peers = torch.tensor([[1, 2, 4], [4, 1, 2], [1, 4, -1]])
    e = ops.explained_variance(P, t, peers, ridge=0.0)
    expected = np_explained_variance(P.numpy(), [0, 0, 3], [[1, 2], [1, 2], [1, 4]], 0.0)
    assert_close(e, expected, rtol=1e-8)
    assert torch.isfinite(e).all()


def test_explained_variance_empty_batch_and_empty_rows():
    P = corr_of(data(100, 5, rank=1, seed=14))
    assert ops.explained_variance(P, torch.zeros(0, dtype=torch.long), torch.zeros(0, 3, dtype=torch.long)).shape == (0,)
    e = ops.explained_variance(P, torch.tensor([0, 1]), torch.zeros(2, 0, dtype=torch.long))
    assert e.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("targets, peers, match", [
    (torch.tensor([0, 1], dtype=torch.int32), torch.tensor([[1], [2]]), "targets must be Long"),
    (torch.tensor([0, 1]), torch.tensor([[1.0], [2.0]]), "peers must be Long"),
    (torch.tensor([[0, 1]]), torch.tensor([[1], [2]]), r"targets must be 1-D \[B\], got shape \[1, 2\]"),
    (torch.tensor([0, 1]), torch.tensor([1, 2]), r"peers must be \[B, K\] = \[2, K\]"),
    (torch.tensor([0, 1]), torch.tensor([[1], [2], [3]]), r"peers must be \[B, K\] = \[2, K\]"),
    (torch.tensor([0, 5]), torch.tensor([[1], [2]]), r"targets must be channel indices in \[0, 5\), got values in \[0, 5\]"),
    (torch.tensor([0, 1]), torch.tensor([[1], [5]]), r"peers must be channel indices in \[0, 5\) or -1 \(padding\), got values in \[1, 5\]"),
    (torch.tensor([0, 1]), torch.tensor([[1], [-2]]), r"peers must be .* got values in \[-2, 1\]"),
    (torch.tensor([0, 1]), torch.tensor([[1, 2], [3, 1]]), "peers row 1 contains its own target 1"),
    (torch.tensor([0, 1]), torch.tensor([[2, 3, 2], [3, -1, -1]]), "peers row 0 repeats peer 2"),
])
def test_explained_variance_bad_input(targets, peers, match):
    P = torch.eye(5)
    with pytest.raises(RuntimeError, match="explained_variance: " + match):
        ops.explained_variance(P, targets, peers)


def test_explained_variance_bad_corr_and_ridge():
    t, p = torch.tensor([0]), torch.tensor([[1]])
    with pytest.raises(RuntimeError, match=r"explained_variance: corr must be square"):
        ops.explained_variance(torch.zeros(2, 3), t, p)
    with pytest.raises(RuntimeError, match=r"explained_variance: corr must be symmetric"):
        ops.explained_variance(torch.tensor([[1.0, 0.3], [0.0, 1.0]]), t, p)
    with pytest.raises(RuntimeError, match=r"explained_variance: ridge must be a finite number >= 0"):
        ops.explained_variance(torch.eye(2), t, p, ridge=-1.0)


# ----------------------------------------------------------------------------- dispatcher
def test_opcheck():
    layers = [corr_of(data(100, C, rank=2, seed=C)) for C in (6, 3)]
    op = torch.ops.chanaxis_fast.peer_hulls.default
    # eps = 0 and max_size 2 fill every hull: the AOT check compares outputs with
    # assert_close(equal_nan=False), which the NaN padding of hull_ev would fail.
    full = ops.peer_hulls(layers, max_size=2, eps=0.0)
    assert all((h.hull_size == 2).all() for h in full)
    torch.library.opcheck(op, (layers, 2, 0.0, 1e-3))
    torch.library.opcheck(op, ([layers[0].float()], 10, 0.05, 0.0),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(torch.ops.chanaxis_fast.explained_variance.default,
                          (layers[0], torch.tensor([0, 3]), torch.tensor([[1, 2, -1], [-1, -1, -1]]), 1e-3))


# ----------------------------------------------------------------------------- CUDA
needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and chanaxis_fast.build_info()["cuda_kernels"]),
    reason="needs a GPU and the CUDA kernels")


@needs_gpu
@pytest.mark.parametrize("kw", [{}, {"max_size": 3}, {"eps": 0.0, "ridge": 0.05}, {"ridge": 0.0}])
def test_cuda_matches_cpu(kw):
    # 300 and 600 channels cross the 256 threads of a block; 1 and 2 are degenerate.
    layers = [corr_of(data(4 * C, C, rank=5, seed=C)) for C in (1, 2, 37, 300, 600)]
    layers[0] = torch.ones(1, 1, dtype=torch.float64)
    X = data(500, 20, rank=2, seed=3)
    X[:, 5] = X[:, 2]
    X[:, 7] = 1.0
    layers.append(chanaxis_fast.ChannelStats().update(torch.from_numpy(X)).correlation())
    if kw.get("ridge") == 0.0:
        layers.pop()  # duplicates are singular at ridge 0
    cpu = ops.peer_hulls(layers, **kw)
    gpu = ops.peer_hulls([P.cuda() for P in layers], **kw)
    for a, b in zip(gpu, cpu):
        assert a.e_full.device.type == "cuda"
        assert_same_hulls(a, b, ev_tol=1e-12)


@needs_gpu
def test_cuda_explained_variance_matches_cpu():
    C, B, K = 50, 5000, 8
    P = corr_of(data(300, C, rank=3, seed=15))
    targets = torch.arange(B) % C
    peers = torch.stack([torch.randperm(C)[:K + 1] for _ in range(B)])
    peers = torch.where(peers == targets[:, None], torch.full_like(peers, -1), peers)[:, :K]
    e_cpu = ops.explained_variance(P, targets, peers)
    e_gpu = ops.explained_variance(P.cuda(), targets.cuda(), peers.cuda())
    assert_close(e_gpu, e_cpu, rtol=0, atol=1e-14)
    with pytest.raises(RuntimeError, match="repeats peer"):
        ops.explained_variance(P.cuda(), targets[:1].cuda(), torch.tensor([[1, 1]]).cuda())


def test_explained_variance_scratch_is_sized_by_rows():
    # one row of K = 400 peers: one K x K factor, as many slots as rows (CPU and CUDA)
    C = 450
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3 * C, C, generator=g, dtype=torch.float64)
    P = torch.corrcoef(A.T)
    peers = torch.arange(1, 401)[None]
    e = ops.explained_variance(P, torch.tensor([0]), peers)
    r = reference.explained_variance(P, torch.tensor([0]), peers)
    assert_close(e, r, rtol=1e-8, atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_explained_variance_of_one_wide_row_takes_one_slot():
    # K = 1024 used to reserve 128 slots of K^2 + K doubles (1.1 GB; 17 GB at K = 4096); one row
    # needs one (8.4 MB)
    C = 1100
    g = torch.Generator().manual_seed(1)
    P = torch.corrcoef(torch.randn(2 * C, C, generator=g, dtype=torch.float64).T)
    peers = torch.arange(1, 1025)[None]
    cpu = ops.explained_variance(P, torch.tensor([0]), peers)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    gpu = ops.explained_variance(P.cuda(), torch.tensor([0], device="cuda"), peers.cuda())
    peak = torch.cuda.max_memory_allocated() - before
    assert peak < 4 * C * C * 8 + 20e6  # P, its symmetrised copies, one slot
    assert_close(gpu, cpu, rtol=1e-9, atol=1e-12)
