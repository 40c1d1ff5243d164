"""Command line: calibrate a model, score its channels with every metric, write a report.

    chanaxis-fast run                       # built-in default: the trained MNIST CNN on real MNIST
    chanaxis-fast run --model torchvision:resnet50 --weights r50.pth \\
        --data imagefolder:/data/imagenet100/train --images 5000 --device cuda
    chanaxis-fast metrics                   # list the registered metrics
    chanaxis-fast info                      # build facts (CUDA kernels, architectures, ...)

A run writes into ``--out`` (default ``runs/<model>-<data>``): ``calibration.pt`` (resumable
checkpoint while running, the finished calibration afterwards), ``scores.csv`` (one row per
channel, one column per metric), ``summaries.csv`` (layer summaries), ``report.md`` and
``axes.png``. Running the same command again resumes an interrupted calibration.
"""

import argparse
import json
import os
import sys
import time

import torch

DEFAULT_METRICS = [
    "input_capture", "peer_overlap", "e_full", "hull_size", "compact_hull", "saturated",
    "task_information", "target_excess", "s2_mean", "s3_mean", "synergy_ratio",
    "magnitude_ix(alpha=0.5)", "ix_rx(beta=0.3)", "two_axis(alpha=1.0, beta=0.5)",
    "l1", "l2", "magnitude", "fpgm", "fermat", "bn_scale", "taylor", "activation_mean",
    "activation_rms", "sfvr", "hrank", "chip", "random",
]


def _load_model(spec, weights, num_classes, image_size):
    from . import data

    if spec == "mnist_cnn":
        return data.mnist_cnn(pretrained=weights is None), (1, 28, 28)
    if spec.startswith("torchvision:"):
        import torchvision

        name = spec.split(":", 1)[1]
        if not hasattr(torchvision.models, name):
            raise SystemExit(f"--model: torchvision has no model {name!r}")
        model = getattr(torchvision.models, name)(num_classes=num_classes)
        if weights:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        return model.eval(), (3, image_size, image_size)
    raise SystemExit(f"--model must be 'mnist_cnn' or 'torchvision:<name>', got {spec!r}")


def _load_data(spec, images, seed, image_size):
    """A seeded subset of `images` training images, and its indices."""
    from torch.utils.data import Subset

    from . import data

    if spec == "mnist":
        ds = data.load_mnist("train")
    elif spec.startswith("imagefolder:"):
        import torchvision.transforms as T
        from torchvision.datasets import ImageFolder

        root = spec.split(":", 1)[1]
        if not os.path.isdir(root):
            raise SystemExit(f"--data: {root!r} is not a directory")
        size = image_size[-1]
        ds = ImageFolder(root, T.Compose([
            T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]))
    else:
        raise SystemExit(f"--data must be 'mnist' or 'imagefolder:<path>', got {spec!r}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds), generator=g)[: min(images, len(ds))].sort().values.tolist()
    return Subset(ds, idx)


def _split_specs(text):
    """Split "a,b(x=1, y=2),c" at the commas outside parentheses."""
    specs, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            specs.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [s for s in specs + [cur.strip()] if s]


def cmd_run(args):
    import chanaxis_fast as cf
    from torch.utils.data import DataLoader

    from .report import write_report

    from .metrics import get_metric, parse_metric

    metrics = _split_specs(args.metrics) if args.metrics else DEFAULT_METRICS
    try:  # unknown metrics fail before the calibration, not after it
        for spec in metrics:
            get_metric(parse_metric(spec)[0])
    except ValueError as e:
        raise SystemExit(f"chanaxis-fast run: {e}")
    model, image_size = _load_model(args.model, args.weights, args.num_classes, args.image_size)
    if args.device:
        model = model.to(args.device)
    subset = _load_data(args.data, args.images, args.seed, image_size)
    out = args.out or os.path.join("runs", f"{args.model.split(':')[-1]}-{args.data.split(':')[0]}")
    os.makedirs(out, exist_ok=True)
    loader = DataLoader(subset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)
    t0 = time.perf_counter()
    cal = cf.calibrate(model, loader, positions_per_image=args.positions, mode=args.mode,
                       readout=args.readout, device=args.device, seed=args.seed,
                       progress=not args.quiet, checkpoint=os.path.join(out, "calibration.pt"))
    t_cal = time.perf_counter() - t0
    t0 = time.perf_counter()
    # The default set names every metric; those this model cannot support (bn_scale without
    # BatchNorm, ...) are skipped and listed in the report. Explicit metrics must all work.
    try:
        scores = cf.score(model, cal, metrics, missing="raise" if args.metrics else "skip")
    except (cf.MissingInputError, ValueError) as e:
        raise SystemExit(f"chanaxis-fast run: {e}")
    t_score = time.perf_counter() - t0
    scores.to_csv(os.path.join(out, "scores.csv"))
    scores.summaries_to_pandas().to_csv(os.path.join(out, "summaries.csv"), index_label="layer")
    info = dict(model=args.model, data=args.data, images=len(subset), readout=args.readout,
                mode=args.mode, seed=args.seed, calibration_s=round(t_cal, 2),
                scoring_s=round(t_score, 2), skipped=scores.skipped, build=cf.build_info())
    with open(os.path.join(out, "run.json"), "w") as f:
        json.dump(info, f, indent=2, default=str)
    report = write_report(scores, cal, out, info)
    print(f"\ncalibration {t_cal:.1f} s, scoring {t_score:.2f} s; wrote {out}/ "
          f"(scores.csv, summaries.csv, report.md, axes.png)\n")
    print(report)
    return 0


def cmd_metrics(args):
    from .metrics import available_metrics, get_metric

    for name in available_metrics():
        spec = get_metric(name)
        keep = "higher=keep" if spec.direction > 0 else "higher=removable"
        print(f"{name:18s} {spec.kind:9s} {'layer' if spec.summary else keep:16s} {spec.doc}")
    return 0


def cmd_info(args):
    import chanaxis_fast as cf

    print(json.dumps(cf.build_info(), indent=2))
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="chanaxis-fast", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="calibrate, score every channel, write a report")
    run.add_argument("--model", default="mnist_cnn", help="mnist_cnn (trained, built in) or torchvision:<name>")
    run.add_argument("--weights", default=None, help="state_dict file for a torchvision model")
    run.add_argument("--num-classes", type=int, default=100, help="classes of a torchvision model (default 100)")
    run.add_argument("--image-size", type=int, default=224, help="input size of a torchvision model")
    run.add_argument("--data", default="mnist", help="mnist (built in) or imagefolder:<path>")
    run.add_argument("--images", type=int, default=5000, help="calibration images (seeded subset)")
    run.add_argument("--batch-size", type=int, default=100)
    run.add_argument("--workers", type=int, default=0)
    run.add_argument("--positions", type=int, default=16, help="sampled positions per image")
    run.add_argument("--mode", default="sample", choices=["sample", "all", "gap"])
    run.add_argument("--readout", default="pre_bn", choices=["pre_bn", "post_bn", "post_act"])
    run.add_argument("--metrics", default=None, help="comma-separated metric specs (default: all)")
    run.add_argument("--device", default=None)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--out", default=None)
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.set_defaults(fn=cmd_run)
    sub.add_parser("metrics", help="list the registered metrics").set_defaults(fn=cmd_metrics)
    sub.add_parser("info", help="build facts").set_defaults(fn=cmd_info)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
