"""Shared fixtures: the tiny model and the smoke data, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import harness.config  # noqa: F401  (schemas and resolvers)

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache (tiny model, smoke videos) for the whole session; subprocesses get it via VTC_CACHE."""
    path = tmp_path_factory.mktemp("cache")
    os.environ["VTC_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(cache_dir) -> Path:
    from harness.models.tiny import build_tiny_model

    return build_tiny_model(cache_dir / "models" / "tiny-llava-onevision")


@pytest.fixture(scope="session")
def micro_model_dir(cache_dir) -> Path:
    """The trained micro model of conf/model/micro.yaml, where the harness looks for it (minutes,
    once per session; a later `python -m harness` with VTC_CACHE=cache_dir finds it built)."""
    from harness.train_micro import build_micro_model, recipe_of

    cfg = make_cfg("model=micro", "task=synthetic", results_dir=cache_dir / "unused", cache_dir=cache_dir)
    return build_micro_model(*recipe_of(cfg.model), progress=False)


@pytest.fixture(scope="session")
def smoke_questions(cache_dir) -> Path:
    from harness.smoke_data import generate

    return generate(cache_dir / "data" / "vtc_smoke")


def write_natural_video(path: Path, width: int, height: int, frames: int, fps: int = 8, seed: int = 0) -> Path:
    """An mp4 with gradients, a moving hard-edged block and noise (where resampling matters)."""
    import numpy as np

    from harness.video import encode_mp4

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
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=[
            f"results_dir={results_dir}", f"cache_dir={cache_dir}", "progress=false",
            *smoke_defaults(overrides), *overrides])


@pytest.fixture
def cfg_factory(tmp_path, cache_dir, tiny_model_dir, smoke_questions):
    def factory(*overrides):
        return make_cfg(*overrides, results_dir=tmp_path / "results", cache_dir=cache_dir)
    return factory


@pytest.fixture(scope="session")
def qwen_model_dir(cache_dir) -> Path:
    """The small random Qwen2.5-VL of conf/model/qwen2_5_vl_small.yaml (seeded weights, built in place)."""
    import yaml

    from harness.models.random_weights import random_model_dir

    arch = yaml.safe_load((CONF / "model" / "qwen2_5_vl_small.yaml").read_text())["arch"]
    return random_model_dir(cache_dir / "models", "qwen2_5_vl_small", arch, seed=0, family="qwen2_5_vl")


@pytest.fixture(scope="session")
def qwen(qwen_model_dir):
    """The small Qwen2.5-VL's adapter, shared by every test of the session (float32, CPU)."""
    from harness.models.qwen2_5_vl import Qwen2_5_VL

    return Qwen2_5_VL(str(qwen_model_dir), device="cpu")


@pytest.fixture(scope="session")
def tiny_llava(tiny_model_dir):
    """The tiny LLaVA-OneVision's adapter, shared by the tests that run both families."""
    from harness.models.llava_onevision import LlavaOneVision

    return LlavaOneVision(str(tiny_model_dir), device="cpu")
