"""A run's identity: the directory name a setting always lands in (so a re-run resumes it), and the
versions of everything that produced it."""

from __future__ import annotations

import re

from harness.files import digest
from harness.run.config import REPO_ROOT


def model_identity(model) -> dict:
    """What fixes a model's answers: the weights (for a model the harness builds, what it is built
    from, not where the cache lives), the frames, dtype and device type (bfloat16 on a GPU does not
    resume float32 on a CPU)."""
    from harness.models.base import resolve_device

    if model.train:
        weights = {"recipe": {"arch": model.arch, "train": model.train}}
    elif model.random_init:
        weights = {"random_init": {"family": model.family, "arch": model.arch}}
    elif model.build_tiny:
        weights = {"tiny": model.family}
    else:
        weights = {"path": model.path}
    return {**weights, "frames": model.frames, "dtype": model.dtype,
            "device": resolve_device(model.device).type}


def run_id(job) -> str:
    """Readable and unique per setting: task-model-method-label-<hash of the setting>. The setting
    is its content (model, data, method, seed), never where the checkout or the cache lives, so a
    copy of a results directory resumes where it is."""
    from harness.data.identity import without_data_dir

    model, task, choice = job.model, job.task, job.method
    identity = {
        "model": model_identity(model),
        "task": {"lmms_task": task.lmms_task, "limit": task.limit,
                 "overrides": without_data_dir(task.overrides, task.data_dir)},
        "method": choice.name, "knobs": choice.knobs, "target": choice.target_retention,
        "calibration_size": task.calibration_size if choice.target_retention else None,
        "seed": job.seed,
    }
    return readable_id(task.name, model.name, choice.title, choice.label, identity)


def readable_id(*parts_and_identity) -> str:
    """'-'-joined readable parts (a label made safe as a directory name) and the first 8 hex digits of
    the identity's digest (the last argument)."""
    *parts, identity = parts_and_identity
    safe = [re.sub(r"[^A-Za-z0-9._+-]", "_", p.replace("=", "").replace(",", "_").replace("; ", "+"))[:80]
            for p in parts if p]
    return "-".join([*safe, digest(identity)[:8]])


def versions() -> dict:
    """The harness's git commit (and whether its tree has changes), the libraries and the device."""
    import platform
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {
        "harness_git": git("rev-parse", "HEAD"),
        # untracked files count: a method added in a new file changes what ran
        "harness_dirty": bool(git("status", "--porcelain")),
        "torch": torch.__version__, "transformers": installed("transformers"),
        "lmms_eval": installed("lmms_eval"), "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
    }
