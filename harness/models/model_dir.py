"""Writing a model directory the way a checkpoint is laid out, so the adapters load every model the
harness builds (smoke, random weights, micro) through the same `from_pretrained` path as a real one.

The directory is built under a temporary name and renamed into place (harness.files); its marker
file, which says what the model is and from which recipe, is written last, so a directory without
its marker was never finished and is never loaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from harness.files import atomic_directory


def write_model_dir(directory: str | Path, *, weights, tokenizer, preprocessor: dict, marker: str,
                    stamp: dict | str) -> Path:
    """`weights` (a model, or only its config for random weights) with `save_pretrained`, the
    tokenizer and its chat template, the preprocessing file, then `marker` holding `stamp`."""
    directory = Path(directory)
    if directory.exists() and not (directory / marker).is_file():  # never finished: not a model
        shutil.rmtree(directory)
    with atomic_directory(directory) as tmp:
        weights.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "chat_template.json").write_text(json.dumps({"chat_template": tokenizer.chat_template}))
        (tmp / "preprocessor_config.json").write_text(json.dumps(preprocessor))
        (tmp / marker).write_text(stamp if isinstance(stamp, str) else json.dumps(stamp, indent=1))
    return directory
