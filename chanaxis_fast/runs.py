"""Run folders: each command-line step records the arguments that define its result in
``run.json``, so that a later step can rebuild what it needs, and a rerun with other arguments
is refused (naming the argument that differs) instead of mixing or overwriting results.

Steps, in order: ``calibrate`` -> ``score`` -> ``sweep`` -> ``report``; ``run`` and ``demo`` do
them in a row. Replacing a step (``--force``) removes its outputs and those of every later step.
"""

import json
import os
import tempfile
from typing import Dict, Optional

from .errors import UserInputError

STEPS = ("calibrate", "score", "sweep", "lesion", "report")
OUTPUTS = {
    "calibrate": ["calibration.pt", "calibration.pt.indices.json"],
    "score": ["scores.pt", "scores.csv", "summaries.csv"],
    "sweep": ["sweep.json", "sweep.csv", "sweep.ckpt.json"],
    "lesion": ["lesion.json", "lesion.csv", "lesion.ckpt.json"],
    "report": ["index.html", "report.md", "figures", "tables"],
}
_FORMAT, _VERSION = "chanaxis_fast.run", 1


def check_out_dir(path: str, must_exist: bool = False) -> str:
    """``--out`` / ``RUN_DIR``: a folder (created later) whose nearest existing ancestor takes a
    new file; not a file. Writability is probed with a temporary file (removed at once), since
    permission bits do not tell for root, read-only mounts or /proc."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserInputError(f"--out: {path} is a file, not a folder")
    if must_exist and not os.path.isdir(path):
        raise UserInputError(f"run folder {path} does not exist")
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".chanaxis-probe-", dir=probe)
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise UserInputError(f"--out: {path} is not writable ({probe}: {e.strerror})") from None
    return path


class RunFolder:
    """The ``run.json`` of a run folder: per step, the arguments that define its result and facts
    about the run (timings, counts). Written atomically after every change."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.file = os.path.join(self.path, "run.json")
        self.data: Dict = {"format": _FORMAT, "version": _VERSION, "steps": {}}
        if os.path.exists(self.file):
            try:
                with open(self.file) as f:
                    data = json.load(f)
            except (OSError, ValueError) as e:
                raise UserInputError(f"{self.file} is not a readable run record: {e}") from None
            if not isinstance(data, dict) or data.get("format") != _FORMAT:
                raise UserInputError(f"{self.file} is not a chanaxis_fast run record")
            if data.get("version") != _VERSION:
                raise UserInputError(f"{self.file} was written by run format {data.get('version')}, "
                                     f"this chanaxis_fast writes {_VERSION}; use another --out")
            self.data = data

    def file_path(self, name: str) -> str:
        """Path of a file in the run folder."""
        return os.path.join(self.path, name)

    def step(self, name: str) -> Optional[dict]:
        """The record of a step, or None."""
        return self.data["steps"].get(name)

    def args(self, name: str) -> Optional[dict]:
        """The recorded arguments of a step, or None."""
        rec = self.step(name)
        return None if rec is None else rec.get("args")

    def check(self, name: str, args: dict, force: bool = False) -> bool:
        """Whether ``name`` was recorded with the same ``args``. Other arguments raise
        UserInputError naming the first that differs, unless ``force``, which removes the step's
        outputs and those of the later steps. Returns True when the step was recorded with these
        arguments (resume or reuse), False when it is new."""
        old = self.args(name)
        if old is None:
            return False
        diff = [k for k in sorted(set(old) | set(args)) if old.get(k) != args.get(k)]
        if not diff:
            return True
        if not force:
            k = diff[0]
            made = (f"other {_CONTENTS[k]} ({_digest(old.get(k))} there, {_digest(args.get(k))} now)"
                    if k in _CONTENTS else f"{_opt(k)} {_show(old.get(k))}, not {_show(args.get(k))}")
            raise UserInputError(
                f"--out {self.path} holds a {name} step made with {made}"
                + (f" (and {len(diff) - 1} more differences)" if len(diff) > 1 else "")
                + "; pass --force to replace it, or choose another --out")
        self.clear_from(name)
        return False

    def clear_from(self, name: str) -> None:
        """Remove the outputs and records of step ``name`` and every later step."""
        import glob
        import shutil

        from .distributed import rank_and_world

        for step in STEPS[STEPS.index(name):]:
            if rank_and_world()[0] == 0:
                for out in OUTPUTS[step]:
                    p = self.file_path(out)
                    if os.path.isdir(p):
                        shutil.rmtree(p)
                    elif os.path.exists(p):
                        os.remove(p)
                    for part in glob.glob(glob.escape(p) + ".rank*"):  # distributed partials
                        os.remove(part)
            self.data["steps"].pop(step, None)
        self.save()

    def record(self, name: str, args: dict, **facts) -> None:
        """Record step ``name`` with its arguments and facts, and save."""
        rec = self.data["steps"].setdefault(name, {})
        rec["args"] = args
        rec.update(facts)
        self.save()

    def save(self) -> None:
        """Write ``run.json`` atomically (the folder is created if needed); under
        torch.distributed only rank 0 writes."""
        from .distributed import rank_and_world

        os.makedirs(self.path, exist_ok=True)
        if rank_and_world()[0] != 0:
            return
        tmp = f"{self.file}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=2, default=str)
        os.replace(tmp, self.file)

    def require(self, name: str, for_step: str) -> dict:
        """The args of an earlier step that ``for_step`` builds on; UserInputError if missing."""
        args = self.args(name)
        if args is None or not self.step(name).get("complete", False):
            raise UserInputError(f"{for_step}: run folder {self.path} has no finished {name} step; run "
                                 f"`chanaxis-fast {name} --out {self.path} ...` first")
        return args


# recorded arguments that are not options but digests of what an option names
_CONTENTS = {"data_digest": "contents of --data (file names, sizes and labels, or tensors)",
             "weights_sha256": "contents of --weights"}


def _opt(key: str) -> str:
    return "--" + key.replace("_", "-")


def _show(v) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 100 else s[:97] + "..."


def _digest(v) -> str:
    return "none" if v is None else f"{str(v)[:18]}..."
