"""ChannelStats: exact streaming (split and merge-order invariance), all_reduce, persistence."""

import itertools
import os
import pickle
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import chanaxis_fast
from chanaxis_fast import ChannelStats, StatsFileError
from utils import assert_close


def _data(seed=0, N=24, C=6, H=5, W=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64) * torch.linspace(0.5, 3, C)[:, None, None] + 2
    t = torch.randn(N, generator=g, dtype=torch.float64)
    return x, t


def _rows(x, t):
    N, C, H, W = x.shape
    r = x.permute(0, 2, 3, 1).reshape(-1, C)
    return torch.cat([r, t.repeat_interleave(H * W)[:, None]], 1).numpy()


def assert_same_stats(a, b, rtol=1e-10):
    assert a.count == b.count
    assert_close(a.mean, b.mean, rtol=rtol, atol=1e-12)
    assert_close(a.comoment, b.comoment, rtol=rtol, atol=1e-10)


def test_one_update_matches_numpy():
    x, t = _data()
    s = ChannelStats().update(x, t)
    rows = _rows(x, t)
    assert s.count == rows.shape[0]
    assert_close(s.covariance(), np.cov(rows, rowvar=False))
    assert_close(s.correlation(), np.corrcoef(rows, rowvar=False))
    assert s.num_channels == 6 and s.has_target and s.dim == 7


@pytest.mark.parametrize("splits", [[1, 23], [5, 5, 14], [3] * 8, [7, 1, 1, 15]])
def test_any_split_into_batches_gives_the_same_statistics(splits):
    x, t = _data()
    whole = ChannelStats().update(x, t)
    parts = ChannelStats()
    i = 0
    for k in splits:
        parts.update(x[i:i + k], t[i:i + k])
        i += k
    assert_same_stats(parts, whole)


def test_any_merge_order_gives_the_same_statistics():
    x, t = _data(seed=1, N=20)
    whole = ChannelStats().update(x, t)
    chunks = [(x[i:i + 4], t[i:i + 4]) for i in range(0, 20, 4)]
    for order in itertools.islice(itertools.permutations(range(5)), 0, 120, 17):
        shards = [ChannelStats().update(*chunks[k]) for k in order]
        # pairwise tree merge in this order
        while len(shards) > 1:
            shards = [shards[i].merge(shards[i + 1]) if i + 1 < len(shards) else shards[i]
                      for i in range(0, len(shards), 2)]
        assert_same_stats(shards[0], whole)


def test_merge_of_empty_and_mismatched():
    x, t = _data()
    s = ChannelStats().update(x, t)
    before = s.comoment.clone()
    s.merge(ChannelStats())
    assert torch.equal(s.comoment, before)
    with pytest.raises(ValueError, match="have 6 channels, the new data has 3"):
        s.update(x[:, :3], t)
    with pytest.raises(ValueError, match="have a target column"):
        s.update(x)
    with pytest.raises(TypeError, match="other must be a ChannelStats"):
        s.merge(5)


def test_merge_is_exact_where_naive_sums_are_not():
    # two shards with very different means: the Chan update keeps float64 accuracy.
    g = torch.Generator().manual_seed(2)
    a = torch.randn(4000, 3, generator=g, dtype=torch.float64) + 1e6
    b = torch.randn(4000, 3, generator=g, dtype=torch.float64) - 1e6
    s = ChannelStats().update(a).merge(ChannelStats().update(b))
    rows = torch.cat([a, b]).numpy()
    assert_close(s.covariance(), np.cov(rows, rowvar=False), rtol=1e-9)


# ----------------------------------------------------------------------------- all_reduce
def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world, port, path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x, t = _data(seed=4, N=21)
        # uneven shards: rank 0 gets 5 images, rank 1 gets 16
        sl = slice(0, 5) if rank == 0 else slice(5, 21)
        s = ChannelStats().update(x[sl], t[sl]).all_reduce()
        torch.save({"count": s.count, "mean": s.mean, "comoment": s.comoment}, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_all_reduce_with_two_gloo_processes_equals_one_process(tmp_path):
    path = str(tmp_path / "stats")
    mp.start_processes(_worker, args=(2, _free_port(), path), nprocs=2, join=True, start_method="spawn")
    x, t = _data(seed=4, N=21)
    one = ChannelStats().update(x, t)
    for rank in range(2):
        got = torch.load(f"{path}.{rank}")
        assert got["count"] == one.count
        assert_close(got["mean"], one.mean)
        assert_close(got["comoment"], one.comoment)


def test_all_reduce_needs_distributed():
    with pytest.raises(RuntimeError, match="not initialised"):
        ChannelStats().update(torch.randn(4, 3)).all_reduce()


# ----------------------------------------------------------------------------- persistence
def test_save_load_round_trip(tmp_path):
    x, t = _data()
    s = ChannelStats().update(x, t)
    s.save(tmp_path / "s.pt")
    r = ChannelStats.load(tmp_path / "s.pt")
    assert_same_stats(r, s, rtol=0)
    assert r.num_channels == 6 and r.has_target
    # resuming: loaded statistics keep accumulating like the originals
    x2, t2 = _data(seed=9)
    assert_same_stats(r.update(x2, t2), s.update(x2, t2), rtol=0)
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    r2 = ChannelStats().load_state_dict(s.state_dict())
    assert_same_stats(r2, s, rtol=0)


def test_truncated_file_is_a_clear_error(tmp_path):
    ChannelStats().update(*_data()).save(tmp_path / "s.pt")
    data = (tmp_path / "s.pt").read_bytes()
    for cut in (10, len(data) // 2, len(data) - 30):
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        with pytest.raises(StatsFileError, match="truncated or corrupt"):
            ChannelStats.load(tmp_path / "cut.pt")


def test_foreign_version_and_tampered_files_are_clear_errors(tmp_path):
    s = ChannelStats().update(*_data())
    state = s.state_dict()
    torch.save(dict(state, version=99), tmp_path / "v.pt")
    with pytest.raises(StatsFileError, match="format version 99"):
        ChannelStats.load(tmp_path / "v.pt")
    bad = dict(state, comoment=state["comoment"] * 1.0001)
    torch.save(bad, tmp_path / "c.pt")
    with pytest.raises(StatsFileError, match="checksum mismatch"):
        ChannelStats.load(tmp_path / "c.pt")
    torch.save(dict(state, mean=state["mean"][:3]), tmp_path / "m.pt")
    with pytest.raises(StatsFileError, match="inconsistent shapes"):
        ChannelStats.load(tmp_path / "m.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "o.pt")
    with pytest.raises(StatsFileError, match="not a chanaxis_fast ChannelStats"):
        ChannelStats.load(tmp_path / "o.pt")
    with open(tmp_path / "p.pt", "wb") as f:
        pickle.dump(object(), f)
    with pytest.raises(StatsFileError, match="truncated or corrupt"):
        ChannelStats.load(tmp_path / "p.pt")
    with pytest.raises(FileNotFoundError):
        ChannelStats.load(tmp_path / "missing.pt")


def test_build_info():
    info = chanaxis_fast.build_info()
    for key in ("cuda_kernels", "cuda_arch_list", "torch", "torch_cuda", "cpu_capability"):
        assert key in info
    assert info["torch"] == torch.__version__
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(
        "chanaxis_fast::channel_moments", "CUDA")
    assert info["cuda_kernels"] == has_cuda_kernel
    if info["cuda_kernels"]:
        assert info["cuda_arch_list"]
    if os.environ.get("CHANAXIS_REQUIRE_CUDA_KERNELS") == "1":  # set by .ci/run
        assert info["cuda_kernels"], "the CUDA kernels were not compiled"


# ----------------------------------------------------------------------------- precision, device count
def test_float32_precision_statistics():
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(40, 48, 6, 6, generator=g) + 1e4).float()
    t = torch.randn(40, generator=g)
    s64, s32 = ChannelStats(), ChannelStats(precision="float32")
    for k in range(0, 40, 8):
        s64.update(x[k:k + 8], t[k:k + 8])
        s32.update(x[k:k + 8], t[k:k + 8])
    rows = _rows(x.double(), t.double())
    assert s32.count == s64.count == rows.shape[0]
    assert torch.equal(s32.mean, s64.mean)  # the means come from the float64 pass
    rel = float((s32.covariance() - s64.covariance()).norm() / s64.covariance().norm())
    assert rel < 1e-6
    cov = torch.as_tensor(np.cov(rows, rowvar=False))
    assert float((s32.covariance() - cov).norm() / cov.norm()) < 1e-6
    assert "precision='float32'" in repr(s32)
    with pytest.raises(ValueError, match="precision must be 'float64' or 'float32', got 'fp16'"):
        ChannelStats(precision="fp16")


def test_count_is_a_plain_int_that_can_be_assigned():
    x, t = _data()
    s = ChannelStats().update(x, t)
    assert type(s.count) is int and s.count == 24 * 5 * 4
    s.count = 7
    assert s.count == 7


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_updates_keep_the_count_on_the_device():
    x, t = _data(N=30)
    cpu, gpu = ChannelStats(), ChannelStats()
    for k in range(0, 30, 7):
        cpu.update(x[k:k + 7], t[k:k + 7])
        gpu.update(x[k:k + 7].cuda(), t[k:k + 7].cuda())
        assert gpu._device_count is not None and gpu._device_count.device.type == "cuda"
    assert gpu.count == cpu.count  # read once, at the end
    assert_close(gpu.mean, cpu.mean, rtol=1e-12)
    assert_close(gpu.comoment, cpu.comoment, rtol=1e-10)
    # mixing: a CPU-held accumulator fed CUDA batches, and an empty batch on the device
    mixed = ChannelStats(device="cpu").update(x.cuda(), t.cuda())
    assert_same_stats(mixed, ChannelStats().update(x, t))
    empty = ChannelStats().update(torch.randn(2, 6, 0, 3, device="cuda"), torch.randn(2, device="cuda"))
    assert empty.count == 0
    empty.update(x.cuda(), t.cuda())
    assert_same_stats(empty, ChannelStats().update(x, t))
