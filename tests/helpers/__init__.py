"""What tests share besides fixtures: paths, composing a config, running the harness (in process or
as a subprocess), small generated inputs. Tests import these, never another test module."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from harness.run.config import CONF, REPO_ROOT as REPO  # noqa: F401  (importing it registers the schemas)


def write_natural_video(path: Path, width: int, height: int, frames: int, fps: int = 8, seed: int = 0) -> Path:
    """An mp4 with gradients, a moving hard-edged block and noise (where resampling matters)."""
    import numpy as np

    from harness.data.video import encode_mp4

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    clip = []
    for t in range(frames):
        base = np.stack([(x * 255 / (width - 1)), (y * 255 / (height - 1)), ((x + y + 20 * t) % 256)], -1)
        base[height // 4:height // 2, width // 4 + 5 * t:width // 2 + 5 * t] = [250, 20, 30]
        clip.append(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
    encode_mp4(str(path), np.stack(clip), fps)
    return path


def smoke_defaults(overrides) -> list[str]:
    """The tests run on the fast SMOKE setup (random tiny model, smoke task) unless they choose a
    model or task; the harness's own defaults are the trained micro model on the synthetic task."""
    chosen = {o.split("=")[0].lstrip("+~") for o in overrides}
    return [f"{group}={name}" for group, name in (("model", "tiny"), ("task", "smoke")) if group not in chosen]


def make_cfg(*overrides: str, results_dir: Path, cache_dir: Path):
    """The composed config, as `python -m harness <overrides>` would see it (on the SMOKE setup
    unless the overrides choose a model or task)."""
    from harness.run.config import compose_config

    return compose_config([f"results_dir={results_dir}", f"cache_dir={cache_dir}", "progress=false",
                           *smoke_defaults(overrides), *overrides])


def run_config(cfg) -> Path:
    """`python -m harness` in this process on a composed config: its results directory."""
    from harness.run.evaluate import run
    from harness.run.job import job_from_config

    return run(job_from_config(cfg))


def job_of(cfg):
    """The objects a composed config becomes (harness.run.job.Job)."""
    from harness.run.job import job_from_config

    return job_from_config(cfg)


def choice_of(cfg):
    """The MethodChoice a composed config resolves to (method, knobs, retention target, label)."""
    return job_of(cfg).method


def harness(*args, results, cache, check=True):
    """`python -m harness` as a subprocess (on the SMOKE setup unless the args choose a model or
    task; Hydra's flags, e.g. -m, before the overrides)."""
    env = {**os.environ, "VTC_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    proc = subprocess.run([sys.executable, "-m", "harness", *flags, *smoke_defaults(overrides), *overrides,
                           f"results_dir={results}", "progress=false"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def only_run_dir(results: Path) -> Path:
    """The one run directory under a results directory."""
    dirs = [p for p in results.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "sweeps"]
    assert len(dirs) == 1, dirs
    return dirs[0]


def random_siglip(hidden=32, heads=4, seed=0):
    """A small SigLIP vision model with its attention-pooling head (FastVID's siglip_path)."""
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                                num_attention_heads=heads, image_size=28, patch_size=14,
                                vision_use_head=True)
    torch.manual_seed(seed)
    model = SiglipVisionModel(config)
    with torch.no_grad():  # non-trivial norms and a peaked attention
        for name, p in model.named_parameters():
            if "head" in name or "post_layernorm" in name:
                p.copy_(torch.randn_like(p) * (0.5 if p.dim() > 1 else 1.0))
    return model
