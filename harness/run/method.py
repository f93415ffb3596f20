"""The method a run evaluates: its knobs, and how `tau=` and `retention=` reach them.

One resolution serves the run, the bench and calibration: `choose_method` turns the `method` node
(its name and knobs) and the top-level shortcuts into a validated compressor, plus the retention
target to calibrate when the method's retention knob is not set directly (methods/core/base.py,
`RetentionKnob`). Nothing here loads a model.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import methods
from harness.errors import ConfigError
from methods.core.base import Compressor


@dataclass
class MethodChoice:
    name: str  # registry name (e.g. "pipeline")
    compressor: Compressor  # built and checked; calibration may still move its retention knob
    target_retention: float | None  # a retention to reach by calibrating the declared knob
    label: str  # e.g. "tau=0.9", "r=0.25"
    direct_retention: float | None = None  # a retention `retention=` set the declared knob to

    @property
    def title(self) -> str:
        """What tables call it (a pipeline: "visionzip+fastv")."""
        return self.compressor.title

    @property
    def knobs(self) -> dict:
        return self.compressor.knobs()


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "/".join(_value(x) for x in v)
    return str(v)


def _label(compressor: Compressor, knobs: dict, direct: bool = False) -> str:
    """The shown knobs (label_knobs) as k=v; knobs left at None (an official default the method
    derives, e.g. a layer scaled to the model's depth) are not shown. `direct`: the retention knob
    was set from `retention=`, so it reads r=..."""
    short = {"retention": "r"}  # r=0.25 reads the same for every method in a table
    if direct and compressor.retention_knob is not None:
        short[compressor.retention_knob.knob] = "r"
    shown = compressor.label_knobs if compressor.label_knobs is not None else knobs.keys()
    return ",".join(f"{short.get(k, k)}={_value(v)}" for k, v in knobs.items() if k in shown and v is not None)


def describe(compressor: Compressor, target: float | None, direct: bool = False) -> str:
    """A run's label: its knobs, or the retention its declared knob was calibrated to (or, `direct`,
    set to)."""
    if compressor.composite:
        tuned = compressor.retention_knob.knob.split(".")[0] if target is not None else None
        return "; ".join(f"r={target:g}" if p.name == tuned else _label(p, p.knobs())
                         for p in compressor.parts)
    return f"r={target:g}" if target is not None else _label(compressor, compressor.knobs(), direct)


def choose_method(spec: dict, tau: float | None = None, retention: float | None = None) -> MethodChoice:
    """The compressor of a `method` node ({"name": ..., knob: value, ...}) with the shortcuts
    `tau=` (the knob named tau) and `retention=` applied, every knob checked; ConfigError naming the
    field otherwise."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name is None:
        raise ConfigError("method.name is missing: select a method with +method=<name> "
                          f"({', '.join(methods.known())})")
    if name not in methods.known():
        raise ConfigError(f"method={name}: unknown method, expected one of {', '.join(methods.known())}")
    cls = methods.REGISTRY[name]
    if retention is not None and not (isinstance(retention, (int, float)) and 0 < retention <= 1):
        raise ConfigError(f"{name}.retention={retention:g}: expected a value in (0, 1]")
    if tau is not None:
        if "tau" not in cls.knob_specs():
            owners = [n for n in methods.known() if "tau" in methods.REGISTRY[n].knob_specs()]
            raise ConfigError(f"tau={tau}: method {name} has no knob tau (tau is a knob of "
                              f"{', '.join(owners)})")
        spec["tau"] = tau
    try:
        compressor = cls.from_knobs(**spec)  # every knob checked against its declaration
        mapping, target, direct = compressor.retention_knob, None, False
        if retention is not None and compressor.reference:
            # a sweep over retention includes the reference once: every point is the same run
            print(f"note: method {name} keeps every token; retention={retention} does not apply to it",
                  file=sys.stderr)
        elif retention is not None:
            if mapping is None:
                raise ConfigError(f"retention={retention}: method {name} has no retention to set")
            if mapping.direct:
                compressor, direct = compressor.with_knob(mapping.knob, float(retention)), True
            elif tau is not None and mapping.knob == "tau":
                raise ConfigError(f"give either tau={tau} or retention={retention}, not both: "
                                  "retention calibrates tau")
            else:
                target = float(retention)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(str(err)) from err
    return MethodChoice(name, compressor, target, describe(compressor, target, direct),
                        float(retention) if direct else None)
