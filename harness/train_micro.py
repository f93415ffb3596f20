"""`python -m harness.train_micro [--ship] [--geometry] [model.train.seed=1 ...]`: the embedded micro
model of conf/model/micro.yaml.

Without flags it trains the model of the configured recipe (Hydra-style overrides change it) into
the cache, ignoring the weights the repository ships, and prints its validation accuracy per kind
beside the shipped model's (a rebuild on another machine reaches the same accuracy, not the same
bits). `--ship` then copies it into harness/train/weights/micro with its checksum (maintainers).
`--geometry` prints the token geometry of the model the default run loads: quantiles of the
pairwise cosine similarity of its pooled video tokens on test clips. The trainer itself is
harness/train/micro.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from omegaconf import OmegaConf


def main(argv: list[str] | None = None) -> int:
    from harness.run.config import compose_config
    from harness.train import micro

    parser = argparse.ArgumentParser(prog="python -m harness.train_micro", description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="model.train.<field>=<value> ...")
    parser.add_argument("--ship", action="store_true", help="copy the built model into the repository")
    parser.add_argument("--geometry", action="store_true", help="print the token geometry and stop")
    parser.add_argument("--clips", type=int, default=16, help="test clips for --geometry")
    args = parser.parse_args(argv)
    cfg = compose_config(["model=micro", *args.overrides])
    model = OmegaConf.to_object(cfg.model)
    try:
        micro.check_recipe(model.train)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.geometry:
        directory = micro.build_micro_model(model.path, model.arch, model.train)
        print(json.dumps(micro.token_geometry(directory, cfg.task.data_dir, model.frames, args.clips), indent=1))
        return 0
    started = time.perf_counter()
    directory = micro.build_micro_model(model.path, model.arch, model.train, use_shipped=False)
    built = json.loads((directory / micro.MARKER).read_text())
    print(f"micro model: {directory} ({time.perf_counter() - started:.0f} s)")
    shipped = (micro.SHIPPED / micro.MARKER)
    reference = json.loads(shipped.read_text()) if shipped.is_file() else None
    for name, stamp in (("built", built), ("shipped", reference)):
        if stamp is not None:
            accuracy = stamp["validation"]["language"][-1]["validation_accuracy"]
            print(f"{name:8s} validation accuracy: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in accuracy.items())
                  + ("" if stamp.get("key") == built["key"] else " (another recipe)"))
    if args.ship:
        print(f"shipped: {micro.ship(directory)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
