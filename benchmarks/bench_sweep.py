"""What one sweep point costs besides its evaluation: plan, mask, restore and count FLOPs.

For torchvision resnet50 and mobilenet_v2 (random weights, 224 x 224), one point at ratio 0.3 by
l1: `plan` (grouping, ranking, the plan's FLOPs and parameters, counted analytically), `apply_masks` +
restore (the context manager) — what a sweep point adds to its evaluation — and, for reference,
`flops(model, x, plan)`, which traces the model once (one forward of x) and then counts
analytically; a sweep never calls it per point. Each is compared with one evaluation pass
over 1,000 images. The evaluation is timed on `--eval-images` images (batch 32, inference_mode)
and scaled to 1,000, since a full pass takes minutes on 2 cores; the table says so.

    python benchmarks/bench_sweep.py [--models resnet50 mobilenet_v2] [--eval-images 64] [--json F]
"""

import argparse
import json
import os
import sys

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, timeit  # noqa: E402

import chanaxis_fast as cf  # noqa: E402
from chanaxis_fast.flops import flops  # noqa: E402


def bench_model(name, eval_images, batch=32, ratio=0.3):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    x1 = torch.randn(1, 3, 224, 224)
    graph = cf.trace_model(model, x1)
    scores = cf.score(model, None, ["l1"], graph=graph)

    def do_plan():
        return cf.plan(model, scores, "l1", ratio)

    p = do_plan()

    def do_mask():
        with cf.apply_masks(model, p):
            pass

    def do_flops():
        return flops(model, x1, p)

    t_plan = timeit(do_plan, repeat=5)
    t_mask = timeit(do_mask, repeat=5)
    t_flops = timeit(do_flops, repeat=5)
    xb = torch.randn(batch, 3, 224, 224)
    n_batches = max(1, eval_images // batch)

    def do_eval():
        with torch.inference_mode():
            for _ in range(n_batches):
                model(xb)

    t_eval = timeit(do_eval, repeat=1, warmup=1) / (n_batches * batch) * 1000
    rows = []
    for what, t in (("plan (with its analytic FLOPs)", t_plan), ("mask + restore", t_mask),
                    ("one point: plan + mask + restore", t_plan + t_mask),
                    ("flops(model, x, plan), traces the model", t_flops)):
        rows.append({"model": name, "step": what, "ms": t * 1e3, "eval_1000_ms": t_eval * 1e3,
                     "fraction_of_eval": t / t_eval, "channels": sum(l.out_channels for l in graph.layers.values()),
                     "flops_removed": p.flops_removed, "eval_images_timed": n_batches * batch})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2"])
    ap.add_argument("--eval-images", type=int, default=64,
                    help="images actually evaluated; the time is scaled to 1,000 (default 64)")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}")
    rows = []
    for m in args.models:
        rows += bench_model(m, args.eval_images)
    print_table(["model", "step", "time", "eval of 1,000 images (scaled)", "fraction of eval"],
                [[r["model"], r["step"], f"{r['ms']:.1f} ms", f"{r['eval_1000_ms'] / 1e3:.1f} s",
                  f"{100 * r['fraction_of_eval']:.3f} %"] for r in rows])
    print(f"(evaluation timed on {rows[0]['eval_images_timed']} images at 224 px, batch 32, "
          f"scaled to 1,000; FLOPs are counted analytically, without a forward pass)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
