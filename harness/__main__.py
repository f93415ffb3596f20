"""`python -m harness [+method=NAME] [knob=value ...]` -- see README.md."""

import sys

import hydra
from omegaconf import DictConfig

import harness.config  # noqa: F401  (registers the structured schemas and resolvers)
from harness.errors import ConfigError
from harness.llava import ModelLoadError


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> str:
    from harness.run import run, record_job_output

    try:
        path = run(cfg)
    except (ConfigError, ModelLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    record_job_output(path)
    return str(path)


if __name__ == "__main__":
    main()
