"""Every config value with a type or a range, checked before anything loads.

Each check raises ConfigError naming the field, what was given and what was expected. Method knobs
are checked against their declarations when the method is built (harness.run.method); knobs that depend on
the model (a layer index below the LLM's depth) are checked against the model's config.json here,
before its weights load.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from harness.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
ATTENTION = ("sdpa", "eager", "flash_attention_2")


def _int(field: str, value, low: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        expected = f"an integer >= {low}" + (" or null" if optional else "")
        raise ConfigError(f"{field}={value!r}: expected {expected}")


def check_config(model, task, seed: int, engine=None) -> None:
    """The model and task settings (ModelConf, TaskConf), the seed and the engine of a run."""
    from harness.models import FAMILIES

    if model.family not in FAMILIES:
        raise ConfigError(f"model.family={model.family!r}: expected one of {', '.join(FAMILIES)}")
    if model.build_tiny and model.family != "llava_onevision":
        raise ConfigError(f"model.build_tiny=true builds the embedded LLaVA-OneVision smoke model: "
                          f"expected model.family=llava_onevision, got {model.family!r} (for a small "
                          f"{model.family} use model.random_init=true with a small model.arch)")
    if model.train:
        if model.family != "llava_onevision" or model.random_init:
            raise ConfigError("model.train trains the embedded micro LLaVA-OneVision (harness.train_micro): "
                              f"expected model.family=llava_onevision and model.random_init=false, got "
                              f"{model.family!r} and {model.random_init}")
        from harness.train.micro import check_recipe

        try:
            check_recipe(model.train)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    _int("model.frames", model.frames, 1)
    _int("model.max_new_tokens", model.max_new_tokens, 1)
    if model.dtype not in DTYPES:
        raise ConfigError(f"model.dtype={model.dtype!r}: expected one of {', '.join(DTYPES)}")
    if not DEVICE.match(str(model.device)):
        raise ConfigError(f"model.device={model.device!r}: expected auto, cpu, mps, cuda or cuda:N")
    check_device(str(model.device))
    if model.attn_implementation not in ATTENTION:
        raise ConfigError(f"model.attn_implementation={model.attn_implementation!r}: expected one "
                          f"of {', '.join(ATTENTION)}")
    _int("task.limit", task.limit, 1, optional=True)
    _int("task.calibration_size", task.calibration_size, 1)
    _int("seed", seed, 0)
    if engine is not None:
        _int("engine.prefetch", engine.prefetch, 0)
    # tau= and retention= are the method's knobs: harness.run.method checks them under the
    # method's name (scissor.tau=1.5), before anything loads


def check_device(device: str) -> None:
    """The device is there: a run asked for on a GPU this machine does not have stops here, before
    anything loads (and before a finished CPU run of the same setting could be taken for it)."""
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"model.device={device}: no CUDA device is visible (torch "
                              f"{torch.__version__}, torch.cuda.is_available() is False); use "
                              "model.device=cpu or auto")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"model.device={device}: {torch.cuda.device_count()} CUDA device(s) are "
                              f"visible (cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("model.device=mps: the MPS backend is not available on this machine")


def check_method_family(compressor, family: str, config: dict | None = None) -> None:
    """A method that acts in a stage the family's adapter does not run (ToMe inside the vision encoder
    of Qwen2.5-VL), or that needs vision-side inputs it does not compute (e.g. FastVID's SigLIP head
    on `encoder_hidden`), is not defined for that family: an error before anything loads."""
    from harness.models import adapter_class
    from methods.core.base import ENCODER_NEEDS, STAGES

    adapter = adapter_class(family)
    unrun = [stage for stage in STAGES if stage in compressor.stages and stage not in adapter.stages]
    if unrun:
        raise ConfigError(f"method {compressor.title} acts in the {', '.join(unrun)} stage, which the "
                          f"model.family={family} adapter does not run: the method is not defined for this "
                          f"family (it runs the {', '.join(s for s in STAGES if s in adapter.stages)} stages)")
    missing = set(compressor.needs) & ENCODER_NEEDS - adapter_class(family).provides
    if missing:
        raise ConfigError(f"method {compressor.title} needs {', '.join(sorted(missing))} from the vision "
                          f"encoder, which model.family={family} does not provide: the method is not "
                          f"defined for this family (it provides {', '.join(sorted(adapter_class(family).provides)) or 'none'})")
    check = getattr(adapter_class(family), "check_method", None)  # what the family refuses itself
    if check is not None:  # (Qwen3-VL: merges its DeepStack features cannot follow), on the
        try:  # checkpoint's config.json when given, else on the family's published shapes
            check(compressor, config)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def read_model_config(path: str) -> dict | None:
    """The model directory's config.json as a dict (None for a hub id not on disk); a file that is
    not valid JSON is an error naming it and where it breaks."""
    config = Path(path).expanduser() / "config.json"
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"model.path={path}: {config} is not valid JSON (line {err.lineno}, column "
                          f"{err.colno}: {err.msg}); expected a Hugging Face model config") from None
    if not isinstance(data, dict) or not isinstance(text_config(data), dict):
        raise ConfigError(f"model.path={path}: {config} has no text_config: expected a video LLM's "
                          "config (model_type llava_onevision, qwen2_5_vl or qwen3_vl)")
    return data


def text_config(config: dict) -> dict | None:
    """The LLM's fields of a config.json: its text_config, or the top level of a flat one (the
    published Qwen2.5-VL checkpoints keep the decoder's fields there)."""
    if isinstance(config.get("text_config"), dict):
        return config["text_config"]
    return config if "num_hidden_layers" in config and "hidden_size" in config else None


def check_method_fits(compressor, config: dict | None) -> None:
    """Build the method's LLM-stage policies for the model's depth (e.g. FastV's K < layers), from
    config.json alone, so a bad knob stops before the weights load."""
    if config is None:
        return
    from methods.core.flops import LLMShape

    text = text_config(config)
    try:
        shape = LLMShape(text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"])
    except KeyError as err:
        raise ConfigError(f"the model's config.json has no text_config.{err.args[0]}") from None
    try:
        if compressor.has("prefill"):
            compressor.prefill_policy(shape)
        if compressor.has("decode"):
            compressor.decode_policy(shape)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    family = _family_of_config(config)
    if family is not None:  # what the family refuses, on this checkpoint's depth and shapes
        check_method_family(compressor, family, config)


def _family_of_config(config: dict) -> str | None:
    """The family whose transformers class reads a config.json of this model_type (None: none)."""
    import transformers

    from harness.models import FAMILIES, adapter_class

    for family in FAMILIES:
        if getattr(transformers, adapter_class(family).model_class).config_class.model_type == config.get("model_type"):
            return family
    return None
