"""The model directory a run loads: a checkpoint as given, or one the harness builds first.

Three kinds are built, each cached under cache_dir/models and written atomically with a marker
file last (harness.models.model_dir): the embedded smoke model (`model.build_tiny`), a random-weight
architecture (`model.random_init`, the published shapes of `model.arch`), and the micro model a
training recipe describes (`model.train`, harness.train.micro).
"""

from __future__ import annotations

from pathlib import Path

from harness.errors import ConfigError


def model_directory(model, cache_dir: Path, seed: int, progress: bool = True) -> str:
    """The directory (or hub id) of the model a ModelConf names, building it first if it is one the
    harness makes and it is not cached yet."""
    if model.train:
        from harness.train.micro import build_micro_model

        return str(build_micro_model(model.path, model.arch, model.train, progress=progress))
    if model.random_init:
        from harness.models.random_weights import random_model_dir

        try:
            return str(random_model_dir(Path(cache_dir) / "models", model.name, model.arch, seed,
                                        family=model.family))
        except (TypeError, ValueError) as err:  # a shape the config classes reject
            raise ConfigError(f"model.arch of {model.name}: {err}") from err
    if model.build_tiny:
        from harness.models.tiny import build_tiny_model

        build_tiny_model(model.path, seed=seed)
    return model.path


def building(model) -> str | None:
    """What preparing the model will do before it can load, for the terminal (None: nothing, or a
    model already built and cached)."""
    if model.train:
        from harness.train.micro import is_built

        if is_built(model.path, model.arch, model.train):
            return None
        return f"training model {model.name} (harness.train_micro, once; cached)"
    if model.random_init:
        return f"building model {model.name} (random weights)"
    if model.build_tiny:
        return f"building model {model.name}"
    return None
