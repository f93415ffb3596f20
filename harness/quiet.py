"""A quiet terminal: third-party logs and progress bars go to the run's log file, not the screen.

The terminal shows one line per setup step (harness.timing.step), the harness's own progress bar
over samples and the summary line. Hydra's job logging (conf/hydra/job_logging/quiet.yaml) sends
the standard `logging` records to the job's log file; this module does the same for what does not
use it: loguru (lmms_eval), Python warnings, and the progress bars of transformers, datasets and
huggingface_hub.
"""

from __future__ import annotations

import logging
from pathlib import Path


def log_file() -> Path | None:
    """The file the root logger writes to (Hydra's job log), if any."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            return Path(handler.baseFilename)
    return None


def quiet_libraries(path: Path | None) -> None:
    """Route loguru and warnings to `path` and switch off third-party progress bars."""
    import datasets
    import huggingface_hub.utils
    import transformers
    from loguru import logger

    logging.captureWarnings(True)  # warnings become records of the `py.warnings` logger -> the file
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    datasets.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    huggingface_hub.utils.disable_progress_bars()
    logger.remove()
    if path is not None:
        logger.add(path, level="INFO")
