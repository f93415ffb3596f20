"""Shared fixtures: the tiny model and the smoke data, built once per test session."""

from __future__ import annotations

import os

# OpenMP threads that wait by sleeping, not spinning: with another process busy on the same cores
# (a subprocess test, a second job on CI) spinning threads slow every small kernel many times over.
# Set before torch loads (its OpenMP runtime reads it once); subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.helpers import CONF, make_cfg  # noqa: E402


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
    from omegaconf import OmegaConf

    from harness.train.micro import build_micro_model

    cfg = make_cfg("model=micro", "task=synthetic", results_dir=cache_dir / "unused", cache_dir=cache_dir)
    model = OmegaConf.to_object(cfg.model)
    return build_micro_model(model.path, model.arch, model.train, progress=False)


@pytest.fixture(scope="session")
def smoke_questions(cache_dir) -> Path:
    from harness.data.smoke import generate

    return generate(cache_dir / "data" / "vtc_smoke")


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
def qwen3(cache_dir):
    """The small random Qwen3-VL of conf/model/qwen3_vl_small.yaml (seeded weights, float32, CPU),
    shared by every test of the session."""
    import yaml

    from harness.models.qwen3_vl import Qwen3_VL
    from harness.models.random_weights import random_model_dir

    arch = yaml.safe_load((CONF / "model" / "qwen3_vl_small.yaml").read_text())["arch"]
    return Qwen3_VL(str(random_model_dir(cache_dir / "models", "qwen3_vl_small", arch, seed=0, family="qwen3_vl")),
                    device="cpu")


@pytest.fixture(scope="session")
def tiny_llava(tiny_model_dir):
    """The tiny LLaVA-OneVision's adapter, shared by the tests that run both families."""
    from harness.models.llava_onevision import LlavaOneVision

    return LlavaOneVision(str(tiny_model_dir), device="cpu")
