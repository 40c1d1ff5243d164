"""Command line: calibrate a model, score its channels, sweep the pruning protocol, write a report.

    chanaxis-fast run                       # the built-in default on its real data
    chanaxis-fast calibrate --model resnet50 --weights r50.pth --num-classes 100 \\
        --data imagefolder:/data/imagenet100 --images 5000 --device cuda --out runs/r50
    chanaxis-fast score runs/r50 --metrics "l1,input_capture,two_axis(alpha=1, beta=0.5)"
    chanaxis-fast metrics | chanaxis-fast info

Each step writes into a run folder and records its arguments in ``run.json``; the next step reads
the folder, so a user can rescore or resweep without recalibrating. A rerun with other arguments
is refused, naming the argument that differs (``--force`` replaces the step and what follows it).
A user error is one line on stderr and exit code 2, raised before any work; an interrupted
calibration (Ctrl-C, SIGTERM) saves its checkpoint and resumes when the same command runs again.
"""

import argparse
import hashlib
import json
import os
import sys
import time

import torch

from .errors import UserInputError

DEFAULT_METRICS = [
    "input_capture", "peer_overlap", "e_full", "hull_size", "compact_hull", "saturated",
    "task_information", "target_excess", "s2_mean", "s3_mean", "synergy_ratio",
    "magnitude_ix(alpha=0.5)", "ix_rx(beta=0.3)", "two_axis(alpha=1.0, beta=0.5)",
    "l1", "l2", "magnitude", "fpgm", "fermat", "bn_scale", "taylor", "activation_mean",
    "activation_rms", "sfvr", "hrank", "chip", "random",
]
DEFAULT_MODEL, DEFAULT_DATA = "mnist_cnn", "mnist"


# ============================================================================ argument types
class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error contract: one line on stderr, exit code 2."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {v}")
    return v


def _nonnegative_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0, got {v}")
    return v


def _positive_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return v


def split_specs(text):
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


def _device(text):
    if text is None:
        return torch.device("cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise UserInputError(f"--device: unknown device {text!r} (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError(f"--device {text}: no GPU is available here (torch.cuda.is_available() "
                                 f"is False)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserInputError(f"--device {text}: there are {torch.cuda.device_count()} GPUs")
    elif dev.type != "cpu":
        raise UserInputError(f"--device: {text!r} is not supported; use cpu or cuda[:N]")
    return dev


def _metric_specs(text):
    from .metrics import check_metric

    specs = split_specs(text) if text else list(DEFAULT_METRICS)
    if not specs:
        raise UserInputError("--metrics: no metric given")
    for s in specs:
        try:
            check_metric(s)
        except UserInputError as e:
            raise UserInputError(f"--metrics: {e}") from None
    return specs


# ============================================================================ steps
def _out_dir(args):
    from .runs import check_out_dir

    if args.out:
        return check_out_dir(args.out)
    model = args.model.split(":")[-1].split(".")[-1]
    data = args.data.split(":")[0]
    # the folder names the data it holds: other folders of images never share a default
    tag = hashlib.sha256(f"{args.model}|{_data_identity(args.data)}".encode()).hexdigest()[:8]
    return check_out_dir(os.path.join("runs", f"{model}-{data}-{tag}"))


def _data_identity(spec):
    kind, _, path = spec.partition(":")
    return f"{kind}:{os.path.abspath(os.path.expanduser(path))}" if path else spec


def _calibration_args(args, model_setup):
    weights = os.path.abspath(args.weights) if args.weights else None
    return dict(
        model=args.model, weights=weights,
        weights_sha256=_sha256(weights) if weights else None,
        num_classes=args.num_classes, cifar_stem=args.cifar_stem,
        image_size=args.image_size or model_setup.image_size, data=_data_identity(args.data),
        images=args.images, batch_size=args.batch_size, positions=args.positions, mode=args.mode,
        readout=args.readout, extras=args.extras, rank_images=args.rank_images, seed=args.seed)


def _sha256(path):
    from .zoo import file_sha256

    return file_sha256(path)


def _build_model(cargs, device=None):
    """The model of a recorded calibration step, checked against the recorded weights file."""
    from .zoo import load_model

    if cargs["weights"] and (not os.path.isfile(cargs["weights"])
                             or _sha256(cargs["weights"]) != cargs["weights_sha256"]):
        raise UserInputError(f"--weights: {cargs['weights']} is missing or changed since the "
                             f"calibration; recalibrate (--force)")
    setup = load_model(cargs["model"], weights=cargs["weights"], num_classes=cargs["num_classes"],
                       cifar_stem=cargs["cifar_stem"], seed=cargs["seed"])
    return setup.model.to(device) if device is not None else setup.model


def _preflight(model, subset, num_classes, device, readout):
    """Everything that can be wrong with the model and the data, checked on two images before any
    work: input size, number of classes, read-out points."""
    from .calibration import select_layers
    from .data import labels_of
    from .graph import trace_model

    x = torch.stack([subset[i][0] for i in range(min(2, len(subset)))]).to(device)
    try:
        with torch.no_grad():
            logits = model.eval()(x)
    except Exception as e:  # the model's own shape errors
        raise UserInputError(f"--image-size / --data: the model cannot take inputs of shape "
                             f"{list(x.shape)}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise UserInputError(f"--model: the model must return [N, classes] logits, got "
                             f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    K = logits.shape[1]
    labels = labels_of(subset)
    top = max(labels) if labels else num_classes - 1
    if top >= K:
        raise UserInputError(f"--num-classes: the data has labels up to {top} ({num_classes} classes), "
                             f"the model has {K} outputs")
    graph = trace_model(model, x)
    select_layers(model, graph, None, readout)
    return x


def step_calibrate(args, folder, quiet):
    """Build the model and the seeded data subset, check them, calibrate (resumable)."""
    from torch.utils.data import DataLoader

    from . import calibrate
    from .data import check_images, open_dataset, seeded_subset
    from .zoo import load_model

    device = _device(args.device)
    setup = load_model(args.model, weights=args.weights, num_classes=args.num_classes,
                       cifar_stem=args.cifar_stem, seed=args.seed)
    cargs = _calibration_args(args, setup)
    source = open_dataset(args.data, "train", image_size=cargs["image_size"])
    if len(source.dataset) == 0:
        raise UserInputError(f"--data {args.data}: no images")
    subset = seeded_subset(source.dataset, args.images, args.seed)
    check_images(source.dataset, subset.indices)
    model = setup.model.to(device)
    _preflight(model, subset, source.num_classes, device, args.readout)
    done = folder.check("calibrate", cargs, args.force)
    if not quiet:
        _say(f"calibrate: {setup.description}; {len(subset)} images of {args.data} "
             f"({'resuming' if done else 'new'}) -> {folder.path}")
    folder.record("calibrate", cargs, complete=False, model_description=setup.description,
                  random_weights=not setup.trained)
    with open(folder.file_path("calibration.pt.indices.json"), "w") as f:
        json.dump({"data": args.data, "root": source.root, "indices": list(subset.indices)}, f)
    loader = DataLoader(subset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)
    t0 = time.perf_counter()
    cal = calibrate(model, loader, positions_per_image=args.positions, mode=args.mode,
                    readout=args.readout, device=device, seed=args.seed, progress=not quiet,
                    extras=None if args.extras == "none" else args.extras.split(","),
                    rank_images=args.rank_images, checkpoint=folder.file_path("calibration.pt"),
                    checkpoint_every=args.checkpoint_every, checkpoint_seconds=args.checkpoint_seconds)
    seconds = time.perf_counter() - t0
    folder.record("calibrate", cargs, complete=True, images=cal.num_images, seconds=round(seconds, 2),
                  model_description=setup.description, random_weights=not setup.trained)
    return model, cal


def step_score(args, folder, quiet, model=None, cal=None):
    """Score every calibrated channel with the metrics; write scores.pt / .csv, summaries.csv."""
    from . import score
    from .calibration import Calibration

    metrics = _metric_specs(args.metrics)
    cargs = folder.require("calibrate", "score")
    folder.check("score", {"metrics": metrics}, args.force)
    if model is None:
        model = _build_model(cargs)
    if cal is None:
        cal = Calibration.load(folder.file_path("calibration.pt"))
    t0 = time.perf_counter()
    # the default set names every metric; those the model cannot support (bn_scale without
    # BatchNorm, ...) are skipped and listed; metrics named explicitly must all work
    scores = score(model, cal, metrics, missing="raise" if args.metrics else "skip",
                   progress=not quiet)
    seconds = time.perf_counter() - t0
    scores.save(folder.file_path("scores.pt"))
    scores.to_csv(folder.file_path("scores.csv"))
    scores.summaries_to_pandas().to_csv(folder.file_path("summaries.csv"), index_label="layer")
    folder.record("score", {"metrics": metrics}, complete=True, seconds=round(seconds, 2),
                  skipped=scores.skipped)
    return model, cal, scores


def _say(text):
    print(text, file=sys.stderr)


# ============================================================================ commands
def cmd_calibrate(args):
    """``chanaxis-fast calibrate``: the calibration step alone."""
    from .runs import RunFolder

    folder = RunFolder(_out_dir(args))
    _, cal = step_calibrate(args, folder, args.quiet or args.json)
    result = {"out": folder.path, "images": cal.num_images, "layers": cal.layers}
    _emit(args, result, f"calibrated {len(cal.layers)} layers on {cal.num_images} images -> "
                        f"{folder.file_path('calibration.pt')}")
    return 0


def cmd_score(args):
    """``chanaxis-fast score RUN_DIR``: score a calibrated run folder."""
    from .runs import RunFolder, check_out_dir

    folder = RunFolder(check_out_dir(args.run_dir, must_exist=True))
    _, _, scores = step_score(args, folder, args.quiet or args.json)
    _emit(args, {"out": folder.path, "metrics": scores.metrics, "summaries": list(scores.summaries),
                 "skipped": scores.skipped},
          f"scored {sum(len(v) for v in next(iter(scores.values.values()), {}).values())} channels "
          f"with {len(scores.metrics)} metrics -> {folder.file_path('scores.csv')}")
    return 0


def cmd_run(args):
    """``chanaxis-fast run``: calibrate, score and report in a row."""
    from .report import write_report
    from .runs import RunFolder

    quiet = args.quiet or args.json
    _metric_specs(args.metrics)  # bad specs fail before the calibration
    folder = RunFolder(_out_dir(args))
    model, cal = step_calibrate(args, folder, quiet)
    model, cal, scores = step_score(args, folder, quiet, model.cpu(), cal)
    cargs = folder.args("calibrate")
    info = dict(model=args.model, data=args.data, images=cal.num_images, readout=args.readout,
                mode=args.mode, seed=args.seed, calibration_s=folder.step("calibrate").get("seconds"),
                scoring_s=folder.step("score").get("seconds"), skipped=scores.skipped,
                random_weights=folder.step("calibrate").get("random_weights"), image_size=cargs["image_size"])
    text = write_report(scores, cal, folder.path, info)
    _emit(args, {"out": folder.path, "metrics": scores.metrics, "skipped": scores.skipped},
          f"\n{text}\nwrote {folder.path}/ (calibration.pt, scores.csv, summaries.csv, report.md, axes.png)")
    return 0


def cmd_track(args):
    """``chanaxis-fast track``: train a network from a seeded initialisation and track its axes."""
    from .tracking import track_training

    quiet = args.quiet or args.json
    try:
        widths = tuple(int(w) for w in args.widths.split(","))
    except ValueError:
        raise UserInputError(f"--widths: three comma-separated ints, got {args.widths!r}") from None
    if len(widths) != 3 or min(widths) < 1:
        raise UserInputError(f"--widths: three comma-separated ints >= 1, got {args.widths!r}")
    layers = args.layers
    if "," in layers:
        layers = [n.strip() for n in layers.split(",") if n.strip()]
    out = args.out or os.path.join("runs", f"track-{args.model.split(':')[-1]}-{args.data.split(':')[0]}")
    tracker = track_training(args.model, args.data, epochs=args.epochs, out=out, seed=args.seed,
                             calibration_images=args.images, layers=layers,
                             metrics=split_specs(args.metrics) if args.metrics else (),
                             modularity=not args.no_modularity, widths=widths,
                             batch_size=args.batch_size, lr=args.lr, train_images=args.train_images,
                             eval_images=args.eval_images, device=_device(args.device),
                             force=args.force, progress=not quiet)
    out = os.path.abspath(out)
    steps = tracker.steps_to_pandas()
    wide = tracker.to_pandas(wide=True)
    rho = wide.groupby("step")["cross_axis_rho"].mean()
    _emit(args, {"out": out, "layers": tracker.layers, "epochs": tracker.steps,
                 "cross_axis_rho": rho.tolist(), "test_accuracy": steps["test_accuracy"].tolist()},
          f"tracked {len(tracker.layers)} layers over {len(tracker.steps) - 1} epochs: mean cross-axis "
          f"rho {rho.iloc[0]:.3f} at initialisation -> {rho.iloc[-1]:.3f}, test accuracy "
          f"{steps['test_accuracy'].iloc[-1]:.4f}\nwrote {out}/ (series.csv, steps.csv, tracker.pt, "
          f"tracking.png, model.pt)")
    return 0


def cmd_metrics(args):
    """``chanaxis-fast metrics``: every registered metric, its kind, direction and formula."""
    from .metrics import available_metrics, get_metric

    rows = []
    for name in available_metrics():
        spec = get_metric(name)
        rows.append(dict(name=name, kind=spec.kind, direction=spec.direction, summary=spec.summary,
                         params=spec.params, doc=spec.doc))
    if args.json:
        print(json.dumps(rows, default=repr))
        return 0
    for r in rows:
        keep = "layer summary" if r["summary"] else ("higher=keep" if r["direction"] > 0 else "higher=removable")
        print(f"{r['name']:18s} {r['kind']:9s} {keep:16s} {r['doc']}")
    return 0


def cmd_info(args):
    """``chanaxis-fast info``: what this build contains (CUDA kernels, architectures, ...)."""
    import chanaxis_fast as cf

    print(json.dumps(cf.build_info(), indent=None if args.json else 2))
    return 0


def _emit(args, result, text):
    """The command's result on stdout: JSON with --json (and nothing else there), else text."""
    if args.json:
        print(json.dumps(result, default=str))
    else:
        print(text)


# ============================================================================ parser
def _add_common(p):
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars or status messages (the result is still printed)")
    p.add_argument("--json", action="store_true", help="print a machine-readable result on stdout")


def _add_calibration(p):
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="mnist_cnn (built in, trained), efficientnet_lite0 (ImageNet weights), a "
                        "torchvision name (resnet18, resnet50, vgg16_bn, mobilenet_v2, "
                        "convnext_tiny, ...; torchvision:<name> too) or module.path:factory")
    g.add_argument("--weights", default=None, help="state dict file loaded into the model (strictly)")
    g.add_argument("--num-classes", type=_positive_int, default=None,
                   help="outputs of a torchvision/factory model (default 1000)")
    g.add_argument("--cifar-stem", action="store_true", help="3x3 stride-1 ResNet stem for 32x32 inputs")
    g.add_argument("--image-size", type=_positive_int, default=None,
                   help="input size for image folders (default: the model's, 224)")
    g.add_argument("--data", default=DEFAULT_DATA,
                   help="mnist, fashion-mnist, imagefolder:PATH, cifar10:PATH or cifar100:PATH")
    g.add_argument("--images", type=_positive_int, default=5000, help="calibration images (seeded subset)")
    g.add_argument("--batch-size", type=_positive_int, default=100)
    g.add_argument("--workers", type=_nonnegative_int, default=0, help="data-loading processes")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds the subset, the sampled positions and a random initialisation")
    c = p.add_argument_group("calibration")
    c.add_argument("--positions", type=_positive_int, default=16, help="sampled positions per image")
    c.add_argument("--mode", default="sample", choices=["sample", "all", "gap"])
    c.add_argument("--readout", default="pre_bn", choices=["pre_bn", "post_bn", "post_act"])
    c.add_argument("--extras", default="sfvr,taylor,hrank,chip",
                   help="baseline inputs to gather: a comma list of sfvr,taylor,hrank,chip or none")
    c.add_argument("--rank-images", type=_positive_int, default=64, help="images used by HRank and CHIP")
    c.add_argument("--device", default=None, help="cpu (default), cuda or cuda:N")
    c.add_argument("--checkpoint-every", type=_positive_int, default=50,
                   help="save the calibration every N batches (and every --checkpoint-seconds)")
    c.add_argument("--checkpoint-seconds", type=_positive_float, default=60.0)


def _add_out(p):
    p.add_argument("--out", default=None, help="run folder (default runs/<model>-<data>-<hash>)")
    p.add_argument("--force", action="store_true",
                   help="replace a step recorded in --out with other arguments (and what follows it)")


def _add_metrics(p):
    p.add_argument("--metrics", default=None, help="comma-separated metric specs (default: all)")


def build_parser():
    """The ``chanaxis-fast`` argument parser (one subparser per command)."""
    parser = _Parser(prog="chanaxis-fast", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("run", help="calibrate, score every channel, write a report")
    _add_calibration(p)
    _add_metrics(p)
    _add_out(p)
    _add_common(p)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("calibrate", help="calibrate a model on a seeded data subset")
    _add_calibration(p)
    _add_out(p)
    _add_common(p)
    p.set_defaults(fn=cmd_calibrate)

    p = sub.add_parser("score", help="score a calibrated run folder with metrics")
    p.add_argument("run_dir", help="a run folder holding a calibration")
    _add_metrics(p)
    p.add_argument("--force", action="store_true", help="replace a score step with other metrics")
    _add_common(p)
    p.set_defaults(fn=cmd_score)

    p = sub.add_parser("track", help="train a network and track its two axes along training")
    p.add_argument("--model", default="resnet_mini",
                   help="resnet_mini (the built-in default, seeded initialisation) or a --model spec "
                        "of the other commands")
    p.add_argument("--widths", default="16,32,64", help="resnet_mini's three stage widths")
    p.add_argument("--data", default="fashion-mnist", help="fashion-mnist, mnist, imagefolder:PATH, ...")
    p.add_argument("--epochs", type=_positive_int, default=3)
    p.add_argument("--images", type=_positive_int, default=2000,
                   help="calibration images (a seeded subset of the training split)")
    p.add_argument("--layers", default="depth_spaced:6",
                   help="depth_spaced:K, a regex of module names, or a comma list of them")
    p.add_argument("--metrics", default=None, help="extra metrics whose per-layer mean is tracked")
    p.add_argument("--no-modularity", action="store_true", help="skip the R/S modularity gap")
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam's learning rate")
    p.add_argument("--train-images", type=_positive_int, default=None,
                   help="train on a seeded subset of this many images (default: all)")
    p.add_argument("--eval-images", type=_positive_int, default=None,
                   help="evaluate on the first N test images (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seeds the initialisation, data order and subset")
    p.add_argument("--device", default=None, help="cpu (default), cuda or cuda:N")
    p.add_argument("--out", default=None, help="output folder (default runs/track-<model>-<data>)")
    p.add_argument("--force", action="store_true", help="replace a tracked run in --out")
    _add_common(p)
    p.set_defaults(fn=cmd_track)

    p = sub.add_parser("metrics", help="list the registered metrics")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_metrics)
    p = sub.add_parser("info", help="build facts")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_info)
    return parser


def main(argv=None):
    """Entry point of ``chanaxis-fast`` and ``python -m chanaxis_fast``; returns the exit code.

    User errors (bad arguments, files, data, metric specs) print one line on stderr and return 2;
    Ctrl-C returns 130 and SIGTERM 143, after the running step saved its checkpoint.
    """
    from .runtime import Terminated
    from .stats import StatsFileError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (UserInputError, StatsFileError) as e:
        sys.stderr.write(f"chanaxis-fast {args.command}: error: {' '.join(str(e).split())}\n")
        return 2
    except Terminated:
        sys.stderr.write(f"chanaxis-fast {args.command}: terminated (SIGTERM); progress is saved, "
                         f"run the same command again to resume\n")
        return 143
    except KeyboardInterrupt:
        sys.stderr.write(f"chanaxis-fast {args.command}: interrupted; progress is saved, run the "
                         f"same command again to resume\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
