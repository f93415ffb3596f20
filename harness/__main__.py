"""`python -m harness [+method=NAME] [knob=value ...]` -- see README.md.

Whatever goes wrong ends in one `error:` line: a bad config value names the field and what was
expected; anything else names the exception, the log file holding its full traceback and the run's
results directory (HYDRA_FULL_ERROR=1 shows the traceback on the terminal too). In a multirun the
point is recorded as failed and the sweep goes on.
"""

import logging
import os
import sys

import hydra
from omegaconf import DictConfig

import harness.run.config  # noqa: F401  (registers the structured schemas, method knobs and sweeps)
from harness.errors import ConfigError, RunFailed
from harness.models.base import ModelLoadError
from harness.run.rundir import RunDirBusy


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig):
    from harness.quiet import log_file
    from harness.report.sweep import record_job_error, record_job_output
    from harness.run.evaluate import run, run_dir_of
    from harness.run.job import job_from_config

    job = None
    try:
        job = job_from_config(cfg)
        path = run(job)
    except (ConfigError, ModelLoadError, RunDirBusy, RunFailed) as err:
        message = str(err)
    except Exception as err:  # noqa: BLE001  (every failure becomes one line; the log keeps it all)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        logging.getLogger("harness").exception("the run failed")
        log = log_file()
        where = run_dir_of(job) if job is not None else None
        message = (f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                   + (f" (full traceback in {log}" if log else " (run with HYDRA_FULL_ERROR=1 for the traceback")
                   + (f"; results in {where})" if where is not None and where.is_dir() else ")"))
    else:
        record_job_output(path)
        return str(path)
    print(f"error: {message}", file=sys.stderr)
    if record_job_error(message):  # in a multirun: this point is reported, the others still run
        return None
    sys.exit(2)


if __name__ == "__main__":
    main()
