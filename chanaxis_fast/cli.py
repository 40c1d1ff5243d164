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
# what the sweep compares by default: the classic criteria, the two axes and their composites
SWEEP_METRICS = ["l1", "fpgm", "bn_scale", "taylor", "sfvr", "input_capture", "ix_rx(beta=0.3)",
                 "e_full", "task_information", "target_excess", "two_axis(alpha=1.0, beta=0.5)",
                 "random"]
DEFAULT_MODEL, DEFAULT_DATA = "resnet_mini_fmnist", "fashion-mnist"
DEFAULT_RATIOS = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,0.95"
# the demo: ratios dense where accuracy still differs, a short fine-tune at every point
# (20 batches of 32 recover far more than 10 of 128 at half the cost: more steps matter here)
DEMO = dict(ratios="0.05,0.1,0.2,0.3,0.4,0.5", finetune_batches=20, finetune_batch_size=32,
            eval_images=500, images=5000, lesion_per_bin=1, lesion_bins=2, lesion_images=200)


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


def _calibration_args(args, model_setup, subset):
    """What defines a calibration's result: the arguments, and digests of the weights file and
    of the selected samples (so other contents under the same paths are refused, not resumed)."""
    from .digest import data_digest

    weights = os.path.abspath(args.weights) if args.weights else None
    return dict(
        model=args.model, weights=weights,
        weights_sha256=_sha256(weights) if weights else None,
        num_classes=args.num_classes, cifar_stem=args.cifar_stem,
        image_size=_image_size(args, model_setup), data=_data_identity(args.data),
        data_digest=data_digest(subset),
        images=args.images, batch_size=args.batch_size, positions=args.positions, mode=args.mode,
        readout=args.readout, extras=args.extras, rank_images=args.rank_images, seed=args.seed,
        amp=args.amp, precision=args.precision, layers=args.layers)


def _image_size(args, model_setup):
    return args.image_size or model_setup.image_size


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


def _layers_arg(text):
    return None if text == "conv" else text


def _preflight(model, subset, num_classes, device, readout, layers=None):
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
    try:
        select_layers(model, graph, layers, readout)
    except UserInputError as e:
        raise UserInputError(f"{'--layers' if readout == 'pre_bn' else f'--readout {readout}'}: {e}") from None
    return x


def step_calibrate(args, folder, quiet):
    """Build the model and the seeded data subset, check them, calibrate (resumable)."""
    from torch.utils.data import DataLoader

    from . import calibrate
    from .data import check_images, open_dataset, seeded_subset
    from .distributed import barrier
    from .zoo import load_model

    device = _device(args.device)
    setup = load_model(args.model, weights=args.weights, num_classes=args.num_classes,
                       cifar_stem=args.cifar_stem, seed=args.seed)
    source = open_dataset(args.data, "train", image_size=_image_size(args, setup))
    if len(source.dataset) == 0:
        raise UserInputError(f"--data {args.data}: no images")
    subset = seeded_subset(source.dataset, args.images, args.seed)
    check_images(source.dataset, subset.indices)
    model = setup.model.to(device)
    _preflight(model, subset, source.num_classes, device, args.readout, _layers_arg(args.layers))
    cargs = _calibration_args(args, setup, subset)
    done = folder.check("calibrate", cargs, args.force)
    if not quiet:
        _say(f"calibrate: {setup.description}; {len(subset)} images of {args.data} "
             f"({'resuming' if done else 'new'}) -> {folder.path}")
    finished = done and folder.step("calibrate").get("complete", False)
    if not done:  # a rerun with the same arguments leaves the record alone (and a refusal too)
        folder.record("calibrate", cargs, complete=False, model_description=setup.description,
                      random_weights=not setup.trained)
    barrier()  # under torchrun: rank 0 has made the folder (and cleared it with --force)
    if not done and _writer():
        with open(folder.file_path("calibration.pt.indices.json"), "w") as f:
            json.dump({"data": args.data, "root": source.root, "indices": list(subset.indices)}, f)
    loader = DataLoader(subset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers)
    t0 = time.perf_counter()
    cal = calibrate(model, loader, positions_per_image=args.positions, mode=args.mode,
                    readout=args.readout, device=device, seed=args.seed, progress=not quiet,
                    extras=None if args.extras == "none" else args.extras.split(","),
                    rank_images=args.rank_images, checkpoint=folder.file_path("calibration.pt"),
                    checkpoint_every=args.checkpoint_every, checkpoint_seconds=args.checkpoint_seconds,
                    amp=args.amp, precision=args.precision, layers=_layers_arg(args.layers))
    seconds = time.perf_counter() - t0
    if not finished:
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
    if _writer():
        scores.save(folder.file_path("scores.pt"))
        scores.to_csv(folder.file_path("scores.csv"))
        scores.summaries_to_pandas().to_csv(folder.file_path("summaries.csv"), index_label="layer")
    folder.record("score", {"metrics": metrics}, complete=True, seconds=round(seconds, 2),
                  skipped=scores.skipped)
    return model, cal, scores


def _ratios(text):
    try:
        ratios = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise UserInputError(f"--ratios: {text!r} is not a comma-separated list of numbers") from None
    if not ratios:
        raise UserInputError("--ratios: no ratio given")
    bad = [r for r in ratios if not 0 < r < 1]
    if bad:
        raise UserInputError(f"--ratios: every ratio must lie in (0, 1), got {bad[0]}")
    if len(set(ratios)) != len(ratios):
        raise UserInputError(f"--ratios: {text!r} repeats a ratio")
    return ratios


def _sweep_metrics(text, scores=None):
    """The sweep's metrics: named ones must all be scored; the default set keeps those scored."""
    from .metrics import parse_metric

    if text:
        metrics = split_specs(text)
        if scores is not None:
            for m in metrics:
                if m not in scores.values and parse_metric(m)[0] != "random":
                    raise UserInputError(f"--sweep-metrics: {m!r} was not scored; scored: "
                                         f"{', '.join(scores.values)} (rescore with --metrics)")
        return metrics
    return [m for m in SWEEP_METRICS if scores is None or m in scores.values or m == "random"]


def _sweep_args(args):
    return dict(metrics=args.sweep_metrics, ratios=_ratios(args.ratios), eval_images=args.eval_images,
                eval_batch_size=args.eval_batch_size, finetune_batches=args.finetune_batches,
                finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr,
                finetune_batch_size=args.finetune_batch_size, random_seeds=args.random_seeds,
                allocation=args.allocation, max_ratio=args.max_ratio)


def step_sweep(args, folder, quiet, model=None, scores=None):
    """The FLOPs-matched sweep on the evaluation split, fine-tuning on the training split."""
    from torch.utils.data import DataLoader

    from . import sweep
    from .data import check_images, eval_split, open_dataset, seeded_subset
    from .distributed import barrier
    from .metrics import Scores
    from .sweep import classifier_evaluator, classifier_finetuner

    sargs = _sweep_args(args)
    cargs = folder.require("calibrate", "sweep")
    folder.require("score", "sweep")
    if not 0 < args.max_ratio <= 1:
        raise UserInputError(f"--max-ratio must be in (0, 1], got {args.max_ratio}")
    device = _device(args.device)
    if scores is None:
        scores = Scores.load(folder.file_path("scores.pt"))
    metrics = _sweep_metrics(args.sweep_metrics, scores)
    if not metrics:
        raise UserInputError("--sweep-metrics: none of the metrics to sweep was scored")
    split = eval_split(cargs["data"])
    source = open_dataset(cargs["data"], split, image_size=cargs["image_size"])
    subset = seeded_subset(source.dataset, args.eval_images, cargs["seed"])
    check_images(source.dataset, subset.indices)
    folder.check("sweep", sargs, args.force)
    if model is None:
        model = _build_model(cargs)
    model = model.to(device)
    evaluate = classifier_evaluator(DataLoader(subset, batch_size=args.eval_batch_size,
                                               num_workers=args.workers), device)
    finetune = None
    if args.finetune_batches > 0:
        train = open_dataset(cargs["data"], "train", image_size=cargs["image_size"]).dataset
        g = torch.Generator().manual_seed(cargs["seed"])
        loader = DataLoader(train, batch_size=args.finetune_batch_size, shuffle=True, generator=g,
                            num_workers=args.workers)
        finetune = classifier_finetuner(loader, epochs=args.finetune_epochs,
                                        max_batches=args.finetune_batches, lr=args.finetune_lr,
                                        device=device, seed=cargs["seed"])
    if not quiet:
        _say(f"sweep: {len(metrics)} metrics x {len(sargs['ratios'])} ratios on {len(subset)} "
             f"{split} images{f', fine-tuning {args.finetune_batches} batches per point' if finetune else ''}")
    folder.record("sweep", sargs, complete=False)
    barrier()
    t0 = time.perf_counter()
    result = sweep(model, scores, metrics, sargs["ratios"], evaluate=evaluate, finetune=finetune,
                   allocation=args.allocation, max_ratio=args.max_ratio, random_seeds=args.random_seeds,
                   checkpoint=folder.file_path("sweep.json"), progress=not quiet)
    if _writer():
        result.to_pandas().to_csv(folder.file_path("sweep.csv"), index=False)
    folder.record("sweep", sargs, complete=True, seconds=round(time.perf_counter() - t0, 2),
                  eval_split=split, eval_images=len(subset))
    return model, result


def step_lesion(args, folder, quiet, model=None, scores=None):
    """The lesion study: channels sampled over the I_X x I(T;Y) plane, lesioned and replaced."""
    from torch.utils.data import DataLoader

    from .calibration import Calibration
    from .data import eval_split, open_dataset, seeded_subset
    from .distributed import barrier
    from .lesion_study import lesion_study
    from .metrics import Scores
    from .sweep import classifier_evaluator

    largs = dict(per_bin=args.lesion_per_bin, bins=args.lesion_bins, eval_images=args.lesion_images)
    cargs = folder.require("calibrate", "lesion")
    folder.require("score", "lesion")
    need = {"input_capture", "task_information", "e_full", "hull_size", "compact_hull"}
    if scores is None:
        scores = Scores.load(folder.file_path("scores.pt"))
    missing = sorted(need - set(scores.values))
    if missing:
        raise UserInputError(f"lesion: the scores lack {', '.join(missing)}; score them first "
                             f"(chanaxis-fast score RUN_DIR --metrics ...)")
    device = _device(args.device)
    source = open_dataset(cargs["data"], eval_split(cargs["data"]), image_size=cargs["image_size"])
    subset = seeded_subset(source.dataset, args.lesion_images, cargs["seed"] + 1)
    folder.check("lesion", largs, args.force)
    if model is None:
        model = _build_model(cargs)
    model = model.to(device)
    cal = Calibration.load(folder.file_path("calibration.pt"), device)
    evaluate = classifier_evaluator(DataLoader(subset, batch_size=500), device)
    folder.record("lesion", largs, complete=False)
    barrier()
    t0 = time.perf_counter()
    study = lesion_study(model, cal, scores, evaluate, per_bin=args.lesion_per_bin, bins=args.lesion_bins,
                         seed=cargs["seed"], checkpoint=folder.file_path("lesion.json"),
                         progress=not quiet)
    if _writer():
        study.to_pandas().to_csv(folder.file_path("lesion.csv"), index=False)
    folder.record("lesion", largs, complete=True, seconds=round(time.perf_counter() - t0, 2),
                  channels=len(study.rows))
    return model, study


def step_report(folder, model=None, skip=()):
    """Write index.html, report.md, figures/ and tables/ of the run folder."""
    from .report import write_report

    if not _writer():
        return ""
    if model is None and folder.args("calibrate") is not None:
        model = _build_model(folder.args("calibrate"))
    text = write_report(folder.path, model=model.cpu() if model is not None else None, skip=skip)
    folder.record("report", {}, complete=True)
    return text


def _auc_text(result):
    table = result.auc_table()
    cols = ["rank", "metric", "auc_before"] + (["auc_after"] if result.finetuned else [])
    lines = ["  ".join(f"{c:>12s}" if c != "metric" else f"{c:32s}" for c in cols)]
    for _, r in table.iterrows():
        cells = []
        for c in cols:
            if c == "metric":
                cells.append(f"{r[c]:32s}")
            elif c == "rank":
                cells.append(f"{int(r[c]):12d}")
            else:
                rng = (f" ({r[c + '_min']:.3f}-{r[c + '_max']:.3f})" if r.get("seeds", 1) > 1 else "")
                cells.append(f"{r[c]:.3f}{rng}".rjust(12))
        lines.append("  ".join(cells))
    return "\n".join(lines)


def _writer() -> bool:
    """Whether this process writes files and prints (rank 0 under torchrun)."""
    from .distributed import rank_and_world

    return rank_and_world()[0] == 0


def _say(text):
    if _writer():
        print(text, file=sys.stderr)


# ============================================================================ commands
def cmd_calibrate(args):
    """``chanaxis-fast calibrate``: the calibration step alone."""
    from .runs import RunFolder

    folder = RunFolder(_out_dir(args))
    _, cal = step_calibrate(args, folder, args.quiet or args.json)
    random = folder.step("calibrate").get("random_weights", False)
    result = {"out": folder.path, "images": cal.num_images, "layers": cal.layers,
              "random_weights": random}
    _emit(args, result, f"calibrated {len(cal.layers)} layers on {cal.num_images} images -> "
                        f"{folder.file_path('calibration.pt')}" + _random_note(args, random))
    return 0


def _random_note(args, random):
    """The result line's warning that the model was not trained."""
    return (f"\nnote: the model has random weights (seeded by --seed {args.seed}), not trained ones; "
            f"pass --weights FILE for a trained model" if random else "")


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


def cmd_sweep(args):
    """``chanaxis-fast sweep RUN_DIR``: the FLOPs-matched sweep of a scored run folder."""
    from .runs import RunFolder, check_out_dir

    folder = RunFolder(check_out_dir(args.run_dir, must_exist=True))
    _, result = step_sweep(args, folder, args.quiet or args.json)
    _emit(args, {"out": folder.path, "auc": result.auc_table().to_dict(orient="records")},
          _auc_text(result) + f"\nwrote {folder.file_path('sweep.json')}")
    return 0


def cmd_lesion(args):
    """``chanaxis-fast lesion RUN_DIR``: the lesion and peer-replacement study of a scored run."""
    from .runs import RunFolder, check_out_dir

    folder = RunFolder(check_out_dir(args.run_dir, must_exist=True))
    _, study = step_lesion(args, folder, args.quiet or args.json)
    summary = study.summary()
    _emit(args, {"out": folder.path, "summary": summary.to_dict(orient="records")},
          summary.to_string(index=False) + f"\nwrote {folder.file_path('lesion.json')}")
    return 0


def cmd_report(args):
    """``chanaxis-fast report RUN_DIR``: write the run folder's report."""
    from .runs import RunFolder, check_out_dir

    folder = RunFolder(check_out_dir(args.run_dir, must_exist=True))
    skip = [s for s in (args.skip or "").split(",") if s]
    bad = [s for s in skip if s not in ("modularity", "cwda")]
    if bad:
        raise UserInputError(f"--skip: unknown section {bad[0]!r}; choose from modularity, cwda")
    text = step_report(folder, skip=skip)
    _emit(args, {"out": folder.path, "index": folder.file_path("index.html")},
          text if not args.quiet else f"wrote {folder.file_path('index.html')}")
    return 0


def cmd_run(args):
    """``chanaxis-fast run`` / ``demo``: calibrate, score, sweep and report in a row."""
    from .runs import RunFolder

    quiet = args.quiet or args.json
    _metric_specs(args.metrics)  # bad specs and ratios fail before the calibration
    _ratios(args.ratios)
    _sweep_metrics(args.sweep_metrics)
    folder = RunFolder(_out_dir(args))
    t0 = time.perf_counter()
    model, cal = step_calibrate(args, folder, quiet)
    model, cal, scores = step_score(args, folder, quiet, model.cpu(), cal)
    result = None
    if not args.no_sweep:
        model, result = step_sweep(args, folder, quiet, model, scores)
    if args.lesion_per_bin > 0:
        model, _ = step_lesion(args, folder, quiet, model, scores)
    text = step_report(folder, model)
    seconds = time.perf_counter() - t0
    random_weights = folder.step("calibrate").get("random_weights")
    summary = {"out": folder.path, "seconds": round(seconds, 1), "metrics": scores.metrics,
               "skipped": scores.skipped, "random_weights": random_weights}
    if result is not None:
        summary["auc"] = result.auc_table().to_dict(orient="records")
    body = (_auc_text(result) if result is not None else text)
    _emit(args, summary, f"{body}\n\n{seconds:.0f} s; report: {folder.file_path('index.html')}"
          + _random_note(args, random_weights))
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


def cmd_bench(args):
    """``chanaxis-fast bench``: every op against its reference and the end-to-end calibration against
    a plain forward, in one table (and JSON with ``--out``); see :mod:`chanaxis_fast.bench`."""
    from . import bench

    log = None if args.quiet or args.json else (lambda cells: _say("  " + " | ".join(cells)))
    result = bench.run_from_args(args, log=log)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    _emit(args, result, bench.table(result) + (f"\nwrote {args.out}" if args.out else ""))
    return 0


def cmd_info(args):
    """``chanaxis-fast info``: what this build contains (CUDA kernels, architectures, ...)."""
    import chanaxis_fast as cf

    print(json.dumps(cf.build_info(), indent=None if args.json else 2))
    return 0


def _emit(args, result, text):
    """The command's result on stdout: JSON with --json (and nothing else there), else text."""
    if not _writer():
        return
    if args.json:
        print(json.dumps(result, default=str))
    else:
        print(text)


# ============================================================================ parser
def _add_common(p):
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars or status messages (the result is still printed)")
    p.add_argument("--json", action="store_true", help="print a machine-readable result on stdout")


def _add_calibration(p, images=5000):
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
    g.add_argument("--images", type=_positive_int, default=images, help="calibration images (seeded subset)")
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
    c.add_argument("--amp", default=None, choices=["bf16", "fp16"],
                   help="forward under torch.autocast in this dtype (statistics stay float64)")
    c.add_argument("--precision", default="float64", choices=["float64", "float32"],
                   help="arithmetic of each batch's co-moment product (float32: about 1e-7 relative, "
                        "faster on wide layers and on consumer GPUs); sums, means and totals stay float64")
    c.add_argument("--layers", default="conv+linear",
                   help="conv (every Conv2d with >= 4 outputs but the classifier), conv+linear (and "
                        "nn.Linear layers on channels-last maps, e.g. ConvNeXt MLPs; default) or a "
                        "regex matching whole module names")
    c.add_argument("--checkpoint-every", type=_positive_int, default=50,
                   help="save the calibration every N batches (and every --checkpoint-seconds)")
    c.add_argument("--checkpoint-seconds", type=_positive_float, default=60.0)


def _add_lesion(p, per_bin=3, bins=3):
    g = p.add_argument_group("lesion study")
    g.add_argument("--lesion-per-bin", type=_nonnegative_int, default=per_bin,
                   help="channels lesioned per I_X x I(T;Y) cell and layer (0: no lesion study)")
    g.add_argument("--lesion-bins", type=_positive_int, default=bins, help="quantile bins per axis")
    g.add_argument("--lesion-images", type=_positive_int, default=DEMO["lesion_images"],
                   help="evaluation images of the lesions (a seeded subset of the test/val split)")


def _add_out(p, default=None):
    p.add_argument("--out", default=default,
                   help=f"run folder (default {default or 'runs/<model>-<data>-<hash>'})")
    p.add_argument("--force", action="store_true",
                   help="replace a step recorded in --out with other arguments (and what follows it)")


def _add_metrics(p):
    p.add_argument("--metrics", default=None, help="comma-separated metric specs (default: all)")


def _add_sweep(p, demo=False):
    d = DEMO if demo else {}
    g = p.add_argument_group("sweep")
    g.add_argument("--sweep-metrics", default=None,
                   help="metrics to sweep (default: " + ", ".join(SWEEP_METRICS) + ", those scored)")
    g.add_argument("--ratios", default=d.get("ratios", DEFAULT_RATIOS),
                   help="fractions of channels removed per layer, comma-separated, in (0, 1)")
    g.add_argument("--eval-images", type=_positive_int, default=d.get("eval_images", 10000),
                   help="evaluation images (seeded subset of the test/val split)")
    g.add_argument("--eval-batch-size", type=_positive_int, default=500)
    g.add_argument("--finetune-batches", type=_nonnegative_int, default=d.get("finetune_batches", 0),
                   help="fine-tuning batches per epoch at every point (0: no fine-tuning)")
    g.add_argument("--finetune-epochs", type=_positive_int, default=1)
    g.add_argument("--finetune-lr", type=_positive_float, default=1e-4 if not demo else 1e-3)
    g.add_argument("--finetune-batch-size", type=_positive_int, default=d.get("finetune_batch_size", 64))
    g.add_argument("--random-seeds", type=_positive_int, default=3, help="seeds of the random baseline")
    g.add_argument("--allocation", default="uniform", choices=["uniform", "global"])
    g.add_argument("--max-ratio", type=_positive_float, default=0.95, help="per-layer cap on the ratio")


def build_parser():
    """The ``chanaxis-fast`` argument parser (one subparser per command)."""
    parser = _Parser(prog="chanaxis-fast", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    for name, demo in (("run", False), ("demo", True)):
        p = sub.add_parser(name, help="calibrate, score, sweep and report in a row" if not demo else
                           "the built-in experiment: the trained BatchNorm ResNet on Fashion-MNIST, "
                           "every metric, a fine-tuned FLOPs-matched sweep, the report")
        _add_calibration(p, images=DEMO["images"] if demo else 5000)
        _add_metrics(p)
        _add_sweep(p, demo)
        p.add_argument("--no-sweep", action="store_true", help="calibrate, score and report only")
        _add_lesion(p, per_bin=DEMO["lesion_per_bin"] if demo else 0, bins=DEMO["lesion_bins"] if demo else 3)
        _add_out(p, default="runs/demo" if demo else None)
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

    p = sub.add_parser("sweep", help="the FLOPs-matched sweep of a scored run folder")
    p.add_argument("run_dir", help="a run folder holding scores")
    _add_sweep(p)
    p.add_argument("--device", default=None, help="cpu (default), cuda or cuda:N")
    p.add_argument("--workers", type=_nonnegative_int, default=0, help="data-loading processes")
    p.add_argument("--force", action="store_true", help="replace a sweep made with other arguments")
    _add_common(p)
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("lesion", help="lesion and peer-replacement study of a scored run folder")
    p.add_argument("run_dir", help="a run folder holding scores")
    _add_lesion(p)
    p.add_argument("--device", default=None, help="cpu (default), cuda or cuda:N")
    p.add_argument("--force", action="store_true", help="replace a study made with other arguments")
    _add_common(p)
    p.set_defaults(fn=cmd_lesion)

    p = sub.add_parser("report", help="write the report of a run folder (index.html, report.md)")
    p.add_argument("run_dir", help="a run folder")
    p.add_argument("--skip", default=None,
                   help="comma list of costly sections to leave out: modularity, cwda")
    _add_common(p)
    p.set_defaults(fn=cmd_report)

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
    p = sub.add_parser("bench", help="every op against pure PyTorch, and calibrate against a plain "
                                     "forward, in one table")
    from .bench import add_arguments as _bench_arguments

    _bench_arguments(p)
    _add_common(p)
    p.set_defaults(fn=cmd_bench)
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

    from .distributed import init_from_environment

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if init_from_environment(getattr(args, "device", None)):  # under torchrun
            args.quiet = args.quiet or not _writer()
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
