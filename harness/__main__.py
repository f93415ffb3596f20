"""`python -m harness [+method=NAME] [knob=value ...]` -- see README.md."""

import sys

import hydra
from omegaconf import DictConfig

import harness.config  # noqa: F401  (registers the structured schemas and resolvers)
from harness.errors import ConfigError
from harness.llava import ModelLoadError


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig):
    from harness.run import record_job_error, record_job_output, run

    try:
        path = run(cfg)
    except (ConfigError, ModelLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        if record_job_error(err):  # in a sweep: this point is reported, the others still run
            return None
        sys.exit(2)
    record_job_output(path)
    return str(path)


if __name__ == "__main__":
    main()
