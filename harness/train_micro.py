"""`python -m harness.train_micro [model.train.seed=1 ...]`: build (or reuse) the embedded micro model
of conf/model/micro.yaml, with Hydra-style overrides of its recipe, and print where it is.

The trainer itself is harness/train/micro.py."""

from __future__ import annotations

import sys
import time

from omegaconf import OmegaConf


def main(argv: list[str]) -> int:
    from harness.run.config import compose_config
    from harness.train.micro import build_micro_model, check_recipe

    model = OmegaConf.to_object(compose_config(["model=micro", *argv]).model)
    try:
        check_recipe(model.train)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    directory = build_micro_model(model.path, model.arch, model.train)
    print(f"micro model: {directory} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
