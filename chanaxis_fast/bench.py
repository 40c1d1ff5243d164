"""One benchmark of everything: every op against its pure-PyTorch reference and the end-to-end
calibration against a plain forward pass, measured side by side in one process.

:func:`run` returns a dict (the JSON that ``chanaxis-fast bench --out FILE`` writes)::

    {"schema": "chanaxis_fast.bench/1",
     "meta": {"torch", "threads", "cpu_capability", "cuda_kernels", "gpu", "size", ...},
     "cases": [{"group", "case", "device", "reference", "ref_ms", "ours_ms", "ratio",
                "rate", "rate_unit", "status", "note"}, ...]}

``ratio`` is always ``ref_ms / ours_ms`` (above 1: ours is faster). A calibration is timed in
alternating pairs (forward, calibrate), which cancels the machine's slow drifts: its row holds the
pair whose ratio is the median, and its note the range over the pairs. For an op, the reference is
its float64 pure-PyTorch implementation in :mod:`chanaxis_fast.reference`. For a calibration, the
reference is a plain ``torch.inference_mode`` forward of the model over the same images, so the
ratio is below 1 and the note gives the cost ``ours / reference`` ("1.19x forward"). ``rate`` is
ours in GFLOP/s or GB/s where a count of useful work is meaningful (else None). A case that cannot
run (a CUDA case without a GPU) is kept with ``status: "skipped"`` and says why in its note.

CPU cases are timed with ``time.perf_counter``, CUDA cases with CUDA events on the current stream
(median of the repeats after a warm-up). Sizes: ``"tiny"`` (seconds; the test), ``"quick"``
(under 2 minutes on 2 cores) and ``"full"`` (the issue-9 figures: resnet18 with the CIFAR stem on
512 random 32 x 32 images in batches of 128, resnet50 / mobilenet_v2 at 224 px, score from a
saved calibration; about 10-15 minutes on 2 cores).

Also ``python benchmarks/run_all.py`` (the same arguments).
"""

import copy
import math
import os
import platform
import re
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

SCHEMA = "chanaxis_fast.bench/1"
SIZES = ("tiny", "quick", "full")
FIELDS = ("group", "case", "device", "reference", "ref_ms", "ours_ms", "ratio", "rate", "rate_unit",
          "status", "note")


# ============================================================================ timing
def timeit(fn: Callable[[], object], *, repeat: int = 5, warmup: int = 1, min_time: float = 0.0,
           device=None) -> float:
    """Median time of ``fn()`` in seconds over ``repeat`` runs (at least ``min_time`` seconds in
    all) after ``warmup`` runs. On a CUDA ``device``: CUDA events on the current stream (the time
    the GPU spent from before the call to after it); else ``time.perf_counter``, with the GPU (if
    any) synchronised before and after each call when no device is given."""
    cuda = device is not None and torch.device(device).type == "cuda"
    sync = device is None and torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    times: List[float] = []
    if cuda:
        torch.cuda.synchronize(device)
    while len(times) < repeat or sum(times) < min_time:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            if sync:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if sync:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def ms(seconds: Optional[float]) -> str:
    """Seconds as a millisecond cell ("-" for None)."""
    return "-" if seconds is None else f"{seconds * 1e3:.2f} ms"


def format_table(header, rows) -> str:
    """Rows (lists of cells) under header, as a Markdown table."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line(r) for r in rows])


# ============================================================================ inputs
def correlation(C: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """Correlation of 4C samples of C channels with low-rank structure (C / 32 shared factors)."""
    g = torch.Generator().manual_seed(seed)
    N, rank = 4 * C, max(2, C // 32)
    X = torch.randn(N, C, generator=g, dtype=torch.float64)
    X += torch.randn(N, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, C, generator=g,
                                                                               dtype=torch.float64)
    return torch.corrcoef(X.T).to(dtype)


def layer_cov_t(C: int, n: int, seed: int = 0) -> torch.Tensor:
    """Covariance of ``[Y_1..Y_C, T]``: C correlated channels and a target that depends on a few."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, C, generator=g, dtype=torch.float64)
    y = y @ (torch.eye(C, dtype=torch.float64) + 0.05 * torch.randn(C, C, generator=g, dtype=torch.float64))
    t = y[:, :8].sum(1) + torch.randn(n, generator=g, dtype=torch.float64)
    return torch.cov(torch.cat([y, t[:, None]], 1).T)


def resnet18_cifar(num_classes: int = 10, seed: int = 0):
    """torchvision resnet18 with the CIFAR stem (3x3/1 conv, no max-pool), seeded random weights
    and random but non-trivial BatchNorms, in eval mode."""
    from .zoo import load_model

    model = load_model("resnet18", num_classes=num_classes, cifar_stem=True, seed=seed).model
    return _randomise_bn(model, seed)


def _randomise_bn(model, seed=0):
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.4 - 0.2)
    return model.eval()


def _loader(images: int, size: int, batch: int, classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(images, 3, size, size, generator=g)
    y = torch.randint(0, classes, (images,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


# ============================================================================ cases
@dataclass
class Case:
    """One row: ``ref`` and ``ours`` are timed side by side (``ref`` may be None: no reference)."""

    group: str
    case: str
    device: str
    reference: str
    ours: Callable[[], object]
    ref: Optional[Callable[[], object]] = None
    work: Optional[float] = None        # flops or bytes of ``ours`` per call
    unit: Optional[str] = None          # "GFLOP/s" or "GB/s"
    repeat: int = 3
    ref_repeat: Optional[int] = None
    warmup: int = 1
    paired: bool = False                # time ref and ours alternately, ``repeat`` pairs; the ratio
                                        # is the median of the pairs' ratios (slow drifts cancel)
    note: str = ""
    cost_note: bool = False             # note "ours / ref x forward" (end-to-end cases)
    cost_of: str = "forward"            # what the reference of a cost note is
    fixed: Optional[Callable[[], object]] = None  # the per-call part of ``ours`` (timed apart; noted)
    setup: Optional[Callable[[], object]] = None  # untimed, run first (only when the case runs)
    extra: dict = field(default_factory=dict)


def _op_cases(size: str, device: str) -> List[Case]:
    from . import ops, reference

    tiny, quick = size == "tiny", size == "quick"
    rep = 3 if tiny or quick else 5
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    out: List[Case] = []

    # channel_moments: all positions, sampled positions, gap
    if tiny:
        shapes = [("all", (16, 16, 8, 8), None), ("positions", (64, 32, 4, 4), 16), ("gap", (32, 32, 8, 8), None)]
    elif quick:
        shapes = [("all", (64, 64, 32, 32), None), ("positions", (1000, 512, 4, 4), 16),
                  ("gap", (128, 256, 8, 8), None)]
    else:
        shapes = [("all", (128, 64, 32, 32), None), ("all", (128, 256, 8, 8), None),
                  ("positions", (5000, 512, 4, 4), 16), ("gap", (512, 256, 8, 8), None)]
    for mode, shape, P in shapes:
        x = torch.randn(*shape, generator=g).to(dev)
        t = torch.randn(shape[0], generator=g, dtype=torch.float64).to(dev)
        pos = torch.randint(0, shape[2] * shape[3], (shape[0], P), generator=g).to(dev) if P else None
        N, C, H, W = shape
        n = N * (H * W if mode == "all" else P if mode == "positions" else 1)
        D = C + 1
        if mode == "gap":
            work, unit = x.numel() * x.element_size(), "GB/s"
        else:
            work, unit = n * D * (D + 1), "GFLOP/s"
        kw = dict(mode=mode)
        out.append(Case("op", f"channel_moments {mode} {'x'.join(map(str, shape))}"
                        + (f", {P} positions" if P else "") + f" (+target, {n} rows)", device,
                        "reference.channel_moments (float64)",
                        ours=lambda x=x, t=t, pos=pos, kw=kw: ops.channel_moments(x, t, pos, **kw),
                        ref=lambda x=x, t=t, pos=pos, kw=kw: reference.channel_moments(x, t, pos, **kw),
                        work=work, unit=unit, repeat=rep))

    # channel_moments_fold_: the batch folded into running statistics (what calibrate runs), against
    # the reference's moments of the batch merged into them
    C = 64 if tiny else 512 if quick else 2048
    x = torch.randn(16, C, 16, 1, generator=g).to(dev)  # 16 images x 16 sampled positions
    t = torch.randn(16, generator=g, dtype=torch.float64).to(dev)
    run = (torch.zeros((), dtype=torch.int64, device=dev),
           torch.zeros(C + 1, dtype=torch.float64, device=dev),
           torch.zeros(C + 1, C + 1, dtype=torch.float64, device=dev))

    def merged_reference(x=x, t=t):
        m = reference.channel_moments(x, t)
        return run[2] + m.comoment + torch.outer(m.mean - run[1], m.mean - run[1]) * 0.5

    out.append(Case("op", f"channel_moments_fold_ C={C}, 256 rows (16 images x 16 positions)", device,
                    "reference.channel_moments + merge (float64)",
                    ours=lambda x=x, t=t: ops.channel_moments_fold_(*run, x, t), ref=merged_reference,
                    work=256 * (C + 1) * (C + 2), unit="GFLOP/s", repeat=rep))
    # patch_moments (SFVR's input statistics; a CPU kernel)
    if dev.type == "cpu":
        N, C, H = (16, 16, 8) if tiny else (128, 128, 16) if quick else (128, 256, 16)
        x = torch.randn(N, C, H, H, generator=g)
        pos = torch.randint(0, H * H, (N, 16), generator=g)
        out.append(Case("op", f"patch_moments {N}x{C}x{H}x{H}, 3x3, 16 positions", device,
                        "reference.patch_moments (F.unfold, float64)",
                        ours=lambda x=x, pos=pos: ops.patch_moments(x, pos, 3, padding=1, out_width=H),
                        ref=lambda x=x, pos=pos: reference.patch_moments(x, pos, 3, padding=1, out_width=H),
                        repeat=rep))

    # peer_hulls and explained_variance
    C = 32 if tiny else 128 if quick else 256
    P = correlation(C).to(dev)
    out.append(Case("op", f"peer_hulls C={C} (max_size 10)", device, "reference.peer_hulls",
                    ours=lambda: ops.peer_hulls(P), ref=lambda: reference.peer_hulls(P),
                    repeat=rep, ref_repeat=1))
    members = ops.peer_hulls(P, max_size=10, eps=0.0).hull_members
    targets = torch.arange(C, device=dev)
    out.append(Case("op", f"explained_variance B={C} K={members.shape[1]}", device,
                    "reference.explained_variance",
                    ours=lambda: ops.explained_variance(P, targets, members),
                    ref=lambda: reference.explained_variance(P, targets, members),
                    repeat=rep, ref_repeat=1))

    # Gaussian MI
    C = 32 if tiny else 128 if quick else 512
    S = layer_cov_t(C, 4 * C).to(dev)
    K = min(50, C - 1)
    partners = ops.target_excess(S, partners=K, top=10).partners
    pairs = torch.stack([torch.arange(C, device=dev)[:, None].expand(C, K), partners], 2).reshape(-1, 2)
    gp = torch.Generator().manual_seed(1)
    pick = torch.stack([torch.randperm(K, generator=gp)[:2] for _ in range(C * 20)]).to(dev)
    owner = torch.arange(C, device=dev).repeat_interleave(20)
    triplets = torch.stack([owner, partners[owner, pick[:, 0]], partners[owner, pick[:, 1]]], 1)
    Sc = S[:C, :C]
    out += [
        Case("op", f"gaussian_mi_pairs P={pairs.shape[0]}", device, "reference.gaussian_mi_pairs",
             ours=lambda: ops.gaussian_mi_pairs(Sc, pairs), ref=lambda: reference.gaussian_mi_pairs(Sc, pairs),
             repeat=rep),
        Case("op", f"peer_overlap_mean C={C}", device, "reference.peer_overlap_mean",
             ours=lambda: ops.peer_overlap_mean(Sc), ref=lambda: reference.peer_overlap_mean(Sc), repeat=rep),
        Case("op", f"pair_target_excess P={pairs.shape[0]}", device, "reference.pair_target_excess",
             ours=lambda: ops.pair_target_excess(S, pairs), ref=lambda: reference.pair_target_excess(S, pairs),
             repeat=rep),
        Case("op", f"triplet_target_excess P={triplets.shape[0]}", device, "reference.triplet_target_excess",
             ours=lambda: ops.triplet_target_excess(S, triplets),
             ref=lambda: reference.triplet_target_excess(S, triplets), repeat=rep),
        Case("op", f"target_excess C={C} ({K} partners, top 10)", device, "reference.target_excess",
             ours=lambda: ops.target_excess(S, partners=K), ref=lambda: reference.target_excess(S, partners=K),
             repeat=rep),
    ]

    # CHIP: one image's C x S map
    Cc, Sc_ = (16, 64) if tiny else (64, 256) if quick else (256, 784)
    A = torch.randn(1, Cc, Sc_, generator=g, dtype=torch.float64).relu().to(dev)
    m = min(Cc, Sc_)
    out.append(Case("op", f"chip_drops 1 x {Cc} x {Sc_}", device, "reference.chip_drops (one SVD per channel)",
                    ours=lambda: ops.chip_drops(A), ref=lambda: reference.chip_drops(A),
                    work=2.0 * Cc * m * Sc_, unit=None, repeat=rep, ref_repeat=1))

    # HRank: the ranks of a batch of post-ReLU maps, against matrix_rank (one LAPACK SVD per map)
    for Nr, Cr, Hr in ([(2, 8, 8)] if tiny else [(4, 64, 16)] if quick else [(16, 64, 32), (16, 512, 4)]):
        maps = torch.randn(Nr, Cr, Hr, Hr, generator=g).relu().to(dev)
        out.append(Case("op", f"map_ranks {Nr}x{Cr}x{Hr}x{Hr}", device,
                        "torch.linalg.matrix_rank (float32 SVD per map)",
                        ours=lambda maps=maps: ops.map_ranks(maps),
                        ref=lambda maps=maps: torch.linalg.matrix_rank(maps),
                        work=8.0 / 3.0 * Nr * Cr * Hr ** 3, unit=None, repeat=rep))

    # mode "gap": the float64 mean of every read-out map (GB/s: float32 values read)
    Np, Cp, Hp = (4, 8, 8) if tiny else (32, 64, 32) if quick else (128, 64, 32)
    read = torch.randn(Np, Cp, Hp * Hp, generator=g).to(dev)
    out.append(Case("op", f"pooled_means {Np}x{Cp}x{Hp}x{Hp}", device,
                    "reference.pooled_means (x.double().mean(2))",
                    ours=lambda: ops.pooled_means(read), ref=lambda: reference.pooled_means(read),
                    work=4.0 * read.numel(), unit="GB/s", repeat=rep))
    return out


def calibrate_fixed_cost(model, loader, device) -> Callable[[], object]:
    """What ``calibrate`` pays once per call whatever the number of images: the trace on two
    images and the digests of the model, the dataset and the first batch."""
    from .digest import data_digest, digest, model_digest
    from .graph import trace_model

    x, y = next(iter(loader))

    def run():
        trace_model(model, x[:2].to(device))
        model_digest(model), data_digest(getattr(loader, "dataset", None)), digest([x, y])
    return run


def _e2e_cases(size: str, device: str) -> List[Case]:
    """Calibration of resnet18 (CIFAR stem) per configuration, against a plain forward."""
    from .calibration import calibrate

    tiny, quick = size == "tiny", size == "quick"
    images, batch, rank_images = (16, 8, 4) if tiny else (64, 32, 8) if quick else (512, 128, 64)
    dev = torch.device(device)
    model = resnet18_cifar().to(dev)
    loader = _loader(images, 32, batch, 10)

    def forward():
        with torch.inference_mode():
            for x, _ in loader:
                model(x.to(dev))

    weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]

    def forward_backward():
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x.to(dev)), y.to(dev), reduction="sum")
            torch.autograd.grad(loss, weights)

    fixed = calibrate_fixed_cost(model, loader, dev)
    f64, f32 = "float64", "float32"
    configs = [("sample", None, f64), ("sample", None, f32), ("gap", None, f64), ("all", None, f64),
               ("all", None, f32), ("sample", ["sfvr"], f64), ("sample", ["taylor"], f64),
               ("sample", ["hrank"], f64), ("sample", ["chip"], f64), ("sample", "all", f64)]
    if tiny:
        configs = [("sample", None, f64), ("gap", None, f64), ("sample", "all", f64)]
    out = []
    for mode, extras, precision in configs:
        label = "None" if extras is None else repr(extras) if extras != "all" else '"all"'
        ranks = extras is not None and any(e in ("hrank", "chip", "all") for e in
                                            ([extras] if isinstance(extras, str) else extras))
        out.append(Case(
            "calibrate", f"resnet18-cifar {images} img b{batch}: mode={mode}, extras={label}"
            + (f", precision={precision}" if precision != f64 else "")
            + (f" ({rank_images} rank images)" if ranks else ""), device,
            "plain inference_mode forward",
            ours=lambda mode=mode, extras=extras, precision=precision: calibrate(
                model, loader, mode=mode, extras=extras, rank_images=rank_images, progress=False,
                device=dev, precision=precision),
            ref=forward, repeat=3 if size == "full" else 2, warmup=0, paired=True, cost_note=True,
            fixed=fixed))
    if not tiny:
        # Taylor's floor: what plain PyTorch pays for the gradients it needs
        out.append(Case(
            "calibrate", f"resnet18-cifar {images} img b{batch}: mode=sample, extras=['taylor'] "
            "against forward + backward", device,
            "plain forward + autograd.grad of the summed cross-entropy w.r.t. the conv/linear weights",
            ours=lambda: calibrate(model, loader, mode="sample", extras=["taylor"], progress=False,
                                   device=dev),
            ref=forward_backward, repeat=3 if size == "full" else 2, warmup=0, paired=True,
            cost_note=True, cost_of="forward + backward"))
    if size == "full" and device == "cpu":
        # the same Taylor calibration of a channels_last copy of the model (oneDNN's backward is
        # cheaper in that layout), against the same plain forward of the model as it is
        model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        out.append(Case(
            "calibrate", f"resnet18-cifar {images} img b{batch}: mode=sample, extras=['taylor'], "
            "model in channels_last", device, "plain inference_mode forward (contiguous model)",
            ours=lambda: calibrate(model_cl, loader, mode="sample", extras=["taylor"],
                                   progress=False, device=dev),
            ref=forward, repeat=3, warmup=0, paired=True, cost_note=True, fixed=fixed))
    return out


def _scale_cases(size: str, device: str) -> List[Case]:
    """ImageNet-sized networks (224 px, batch 16, sample mode, extras=None), full size only."""
    if size != "full":
        return []
    import torchvision

    from .calibration import calibrate

    dev = torch.device(device)
    out = []
    for name, images in (("resnet50", 64), ("mobilenet_v2", 64)):
        torch.manual_seed(0)
        model = _randomise_bn(torchvision.models.get_model(name, weights=None, num_classes=1000)).to(dev)
        loader = _loader(images, 224, 16, 1000)

        def forward(model=model, loader=loader):
            with torch.inference_mode():
                for x, _ in loader:
                    model(x.to(dev))

        for precision in ("float64", "float32"):
            out.append(Case("calibrate", f"{name} 224px {images} img b16: mode=sample, extras=None"
                            + (", precision=float32" if precision == "float32" else ""), device,
                            "plain inference_mode forward",
                            ours=lambda model=model, loader=loader, precision=precision: calibrate(
                                model, loader, extras=None, progress=False, device=dev,
                                precision=precision),
                            ref=forward, repeat=3, warmup=0, paired=True, cost_note=True,
                            fixed=calibrate_fixed_cost(model, loader, dev),
                            extra={"images": images}))
    return out


def _score_cases(size: str, device: str) -> List[Case]:
    """score() of every default metric of mobilenet_v2 (17 k channels) from a saved calibration
    (full size only)."""
    from .calibration import Calibration, calibrate
    from .cli import DEFAULT_METRICS
    from .metrics import score

    if size != "full":  # (quick: about 20 s for resnet18 on 2 cores, more than the rest)
        return []
    import torchvision

    dev = torch.device(device)
    torch.manual_seed(0)
    model = _randomise_bn(torchvision.models.get_model("mobilenet_v2", weights=None, num_classes=100)).to(dev)
    name, loader, rank_images = "mobilenet_v2 (224 px, 32 images)", _loader(32, 224, 16, 100), 4
    path = os.path.join(tempfile.mkdtemp(prefix="chanaxis-bench-"), "cal.pt")

    def setup():
        calibrate(model, loader, rank_images=rank_images, progress=False, device=dev).save(path)

    def load_and_score():
        score(model, Calibration.load(path, dev), DEFAULT_METRICS)

    return [Case("score", f"score {len(DEFAULT_METRICS)} metrics, {name}", device, "-",
                 ours=load_and_score, repeat=1, warmup=0, setup=setup,
                 note="Calibration.load + score(every default metric) from a saved calibration")]


# ============================================================================ running
def _measure(c: Case) -> dict:
    row = dict(group=c.group, case=c.case, device=c.device, reference=c.reference, ref_ms=None,
               ours_ms=None, ratio=None, rate=None, rate_unit=None, status="ok", note=c.note)
    if c.setup is not None:
        c.setup()
    if c.paired and c.ref is not None:
        for _ in range(c.warmup):
            c.ref(), c.ours()
        pairs = [(timeit(c.ref, repeat=1, warmup=0, device=c.device),
                  timeit(c.ours, repeat=1, warmup=0, device=c.device)) for _ in range(c.repeat)]
        pairs.sort(key=lambda p: p[1] / p[0])
        t_ref, t_ours = pairs[(len(pairs) - 1) // 2]  # the median pair (its ratio is the median)
        row["ref_ms"], row["ours_ms"] = t_ref * 1e3, t_ours * 1e3
        row["ratio"] = row["ref_ms"] / row["ours_ms"]
        spread = (f" (pairs {pairs[0][1] / pairs[0][0]:.2f}-{pairs[-1][1] / pairs[-1][0]:.2f})"
                  if len(pairs) > 1 else "")
        if c.cost_note:
            row["note"] = (f"{row['ours_ms'] / row['ref_ms']:.2f}x {c.cost_of}{spread}"
                           + (f"; {c.note}" if c.note else ""))
            if c.fixed is not None:
                t_fixed = timeit(c.fixed, repeat=3, warmup=1, device=c.device) * 1e3
                row["fixed_ms"] = t_fixed
                row["note"] += (f"; {(row['ours_ms'] - t_fixed) / row['ref_ms']:.2f}x without the "
                                f"{t_fixed:.0f} ms per call (trace, digests)")
    else:
        t_ours = timeit(c.ours, repeat=c.repeat, warmup=c.warmup, device=c.device)
        row["ours_ms"] = t_ours * 1e3
    if c.ref is not None and not c.paired:
        t_ref = timeit(c.ref, repeat=c.ref_repeat or c.repeat, warmup=c.warmup, device=c.device)
        row["ref_ms"] = t_ref * 1e3
        row["ratio"] = row["ref_ms"] / row["ours_ms"]
        if c.cost_note:
            row["note"] = (f"{row['ours_ms'] / row['ref_ms']:.2f}x {c.cost_of}" + (f"; {c.note}" if c.note else ""))
    if c.work is not None and c.unit is not None:
        scale = 1e9
        row["rate"], row["rate_unit"] = c.work / t_ours / scale, c.unit
    row.update(c.extra)
    return row


def _skipped(group, what, device, why):
    return dict(group=group, case=what, device=device, reference="-", ref_ms=None, ours_ms=None,
                ratio=None, rate=None, rate_unit=None, status="skipped", note=why)


def run(size: str = "quick", *, devices=None, only: Optional[str] = None, groups=None,
        log: Optional[Callable[[str], None]] = None) -> dict:
    """Run the benchmark and return its result (see the module docstring).

    Args:
        size: "tiny", "quick" or "full".
        devices: e.g. ["cpu", "cuda"]; default: the CPU, and CUDA when a GPU is present (when none
            is, the CUDA cases are listed as skipped).
        only: a regex; only the cases whose name matches it (re.search) run.
        groups: a subset of ("op", "calibrate", "score"); default all of them.
        log: called with each finished row's table line (progress), e.g. print.
    """
    import chanaxis_fast

    if size not in SIZES:
        raise ValueError(f"bench: size must be one of {', '.join(SIZES)}, got {size!r}")
    groups = set(groups or ("op", "calibrate", "score"))
    gpu = torch.cuda.is_available()
    if devices is None:
        devices = ["cpu", "cuda"]
    cases_rows = []
    try:
        pattern = re.compile(only) if only else None
    except re.error as e:
        from .errors import UserInputError

        raise UserInputError(f"--only {only!r} is not a regular expression ({e})") from None
    builders = [("op", _op_cases), ("calibrate", _e2e_cases), ("calibrate", _scale_cases),
                ("score", _score_cases)]
    for device in devices:
        if torch.device(device).type == "cuda" and not gpu:
            cases_rows.append(_skipped("-", "every CUDA case", device, "skipped: no GPU on this machine"))
            continue
        for group, build in builders:
            if group not in groups:
                continue
            for c in build(size, device):
                if pattern is not None and not pattern.search(c.case):
                    continue
                row = _measure(c)
                cases_rows.append(row)
                if log is not None:
                    log(_row_cells(row))
    info = chanaxis_fast.build_info()
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(),
                cpu_capability=torch.backends.cpu.get_cpu_capability(), machine=platform.machine(),
                cuda_kernels=info.get("cuda_kernels"),
                gpu=torch.cuda.get_device_name() if gpu else None, size=size,
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return {"schema": SCHEMA, "meta": meta, "cases": cases_rows}


HEADER = ["case", "device", "reference", "ours", "ratio", "rate", "note"]


def _row_cells(r: dict) -> list:
    ref = "-" if r["ref_ms"] is None else f"{r['ref_ms']:.2f} ms"
    ours = "-" if r["ours_ms"] is None else f"{r['ours_ms']:.2f} ms"
    ratio = "-" if r["ratio"] is None else (f"{r['ratio']:.2f}x" if r["ratio"] < 10 else f"{r['ratio']:.0f}x")
    rate = "-" if r["rate"] is None else f"{r['rate']:.1f} {r['rate_unit']}"
    return [r["case"], r["device"], ref, ours, ratio, rate, r["note"]]


def table(result: dict) -> str:
    """The result as one Markdown table, with a header line on the machine."""
    m = result["meta"]
    head = (f"torch {m['torch']}, {m['threads']} threads, {m['cpu_capability']}, CUDA kernels: "
            f"{m['cuda_kernels']}, GPU: {m['gpu'] or 'none'}; size {m['size']}; ratio = reference / ours")
    return head + "\n" + format_table(HEADER, [_row_cells(r) for r in result["cases"]])


def check_result(result: dict) -> None:
    """Raise ValueError when ``result`` does not follow the schema (used by the tests)."""
    if result.get("schema") != SCHEMA or not isinstance(result.get("cases"), list):
        raise ValueError("bench: not a chanaxis_fast.bench/1 result")
    for r in result["cases"]:
        if set(r) < set(FIELDS):
            raise ValueError(f"bench: case {r.get('case')!r} lacks {sorted(set(FIELDS) - set(r))}")
        if r["status"] == "ok":
            if not (isinstance(r["ours_ms"], float) and r["ours_ms"] > 0 and math.isfinite(r["ours_ms"])):
                raise ValueError(f"bench: case {r['case']!r} has no time")
            if r["ref_ms"] is not None and not math.isclose(r["ratio"], r["ref_ms"] / r["ours_ms"],
                                                            rel_tol=1e-9):
                raise ValueError(f"bench: case {r['case']!r}: ratio is not ref_ms / ours_ms")


def main(argv=None) -> int:
    """``python benchmarks/run_all.py`` / ``python -m chanaxis_fast.bench``: parse, run, print."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    result = run_from_args(args)
    print(table(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return 0


def add_arguments(p) -> None:
    """The bench arguments (shared by ``chanaxis-fast bench`` and benchmarks/run_all.py)."""
    p.add_argument("--quick", action="store_true", help="the small set (under 2 minutes on 2 cores)")
    p.add_argument("--size", choices=SIZES, default=None, help="tiny, quick or full (default full; "
                                                              "--quick means quick)")
    p.add_argument("--only", default=None, help="regex: only the cases whose name matches")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: the CPU, and CUDA when a GPU is present")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="write the result as JSON to this file")


def run_from_args(args, log=None) -> dict:
    """:func:`run` with the parsed arguments of :func:`add_arguments`."""
    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.size or ("quick" if args.quick else "full")
    devices = None if args.device == "auto" else [args.device]
    return run(size, devices=devices, only=args.only, log=log)


if __name__ == "__main__":
    raise SystemExit(main())
