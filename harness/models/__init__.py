"""Model adapters, one file per family, behind one interface (harness/models/base.py).

`conf/model/<name>.yaml` names its family (`family: llava_onevision`); the runner, the lmms_eval
model and the bench load the adapter through `adapter_class(family)`, never by model name.
"""

from __future__ import annotations

import importlib

# family -> (module, class): adding a family is one adapter file and one line here
FAMILIES = {
    "llava_onevision": ("harness.models.llava_onevision", "LlavaOneVision"),
    "qwen2_5_vl": ("harness.models.qwen2_5_vl", "Qwen2_5_VL"),
}


def adapter_class(family: str):
    """The adapter class of `family`; an unknown family is an error naming the known ones."""
    if family not in FAMILIES:
        raise ValueError(f"model.family={family!r}: expected one of {', '.join(FAMILIES)}")
    module, name = FAMILIES[family]
    return getattr(importlib.import_module(module), name)


def load_adapter(family: str, path: str, **kwargs):
    """The adapter of `family` on the model at `path` (kwargs: dtype, device, attn_implementation)."""
    return adapter_class(family)(path, **kwargs)
