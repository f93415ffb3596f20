"""Registry of compressors: one module per method, found by name.

Every module in this package that defines a `@register`-ed class is imported on first use, so
adding a method is one file here plus one YAML in conf/method/.
"""

from __future__ import annotations

import importlib
import pkgutil

from methods.core.base import Compressor, RetentionKnob, VideoTokens, VisualInput

REGISTRY: dict[str, type[Compressor]] = {}


def register(cls: type[Compressor]) -> type[Compressor]:
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"two compressors are named {cls.name!r}")
    REGISTRY[cls.name] = cls
    return cls


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):  # building blocks register nothing: harmless
        importlib.import_module(f"{__name__}.{info.name}")


def known() -> list[str]:
    _discover()
    return sorted(REGISTRY)


def build(name: str, **knobs) -> Compressor:
    """The compressor `name` with the given knobs; unknown names or knobs are errors naming both."""
    _discover()
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}: expected one of {', '.join(known())}")
    return REGISTRY[name].from_knobs(**knobs)


__all__ = ["Compressor", "RetentionKnob", "VideoTokens", "VisualInput", "REGISTRY", "register", "build", "known"]
