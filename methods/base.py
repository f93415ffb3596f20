"""The one interface every compressor implements.

A compressor is a small dataclass whose fields are its knobs. It declares the stages it acts in
(shared/spec/methods-video.md, "Stages a method can act in") and implements one hook per stage:

- "visual":  `compress(VisualInput) -> (M, D) tokens` (or `VideoTokens` with their original
             positions), on the pooled video features before the LLM;
- "prefill": `prefill_policy(llm) -> PrefillPolicy`, acting inside the LLM at the layers it names,
             run by the shared decoder driver (`methods.decoder`);
- "decode":  `decode_policy(llm) -> DecodePolicy`, choosing which cached video entries later
             layers attend to at each generated token.

How a requested `retention=` reaches the method is declared too (`retention_knob`). Nothing here
knows about Hydra, lmms_eval or files: it is tensor code, on any device.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from methods.decoder import DecodePolicy, PrefillPolicy
    from methods.flops import LLMShape

STAGES = ("visual", "prefill", "decode")


@dataclass
class VisualInput:
    """What the vision side of a video LLM hands to a visual-stage compressor.

    A "frame" is a frame of tokens: one video frame on LLaVA-OneVision, one temporal patch of two
    frames on Qwen2.5-VL (whose N depends on the video's resolution)."""

    features: torch.Tensor  # (F, N, D): projected features, N = h*w tokens per frame, row-major
    grid: tuple[int, int]  # (h, w) of the per-frame token grid: 14x14 for OneVision (2x2-pooled),
    # the 2x2-merged patch grid for Qwen2.5-VL
    # what a method may ask for besides the features (Compressor.needs), at the encoder's patch
    # grid (H*W = 27*27 for SigLIP 384/14), from the last encoder layer whose output the model uses:
    patch_scores: torch.Tensor | None = None  # (F, H*W) attention each patch receives ("patch_scores")
    patch_keys: torch.Tensor | None = None  # (F, H*W, head_dim) that layer's keys, mean over heads
    # (given with "patch_scores")
    encoder_hidden: torch.Tensor | None = None  # (F, H*W, C) what the projector receives ("encoder_hidden")
    patch_grid: tuple[int, int] | None = None  # (H, W) of the patch grid, row-major (None: square)


VISUAL_NEEDS = frozenset({"patch_scores", "encoder_hidden"})


@dataclass
class VideoTokens:
    """A visual stage's output when its tokens keep their original position ids.

    positions[j] is the index in the flattened F*N input whose position id token j takes (a
    sequence position on LLaVA-OneVision, that token's (t, h, w) on Qwen2.5-VL's M-RoPE); the
    text after the video then starts where it would without compression. A plain (M, D) tensor
    from `compress` means the tokens take consecutive positions instead (on M-RoPE: consecutive on
    all three axes, as text).
    """

    tokens: torch.Tensor  # (M, D)
    positions: torch.Tensor  # (M,) long, ascending
    groups: torch.Tensor | None = None  # (M,) long: a group id per token, handed to the method's own
    # prefill policy (PrefillView.groups), for methods whose LLM stage acts per group (PruneVid)


@dataclass(frozen=True)
class RetentionKnob:
    """How `retention=r` sets a method's knob.

    direct: the knob takes r itself (its meaning is `measure`). Otherwise the harness searches the
    knob in [low, high] (bisection; `increasing` says which way retention moves) until the mean
    `measure` on the calibration set is r: measured by running the visual stage ("rho_tok"), or
    from the token counts the method plans per layer ("rho_flops", FLOPs matching).
    """

    knob: str
    measure: str = "rho_tok"  # rho_tok | rho_flops
    direct: bool = False
    low: float = 0.0
    high: float = 1.0
    increasing: bool = True


class Compressor:
    """Base class. Subclasses are dataclasses registered with `@register`."""

    name: ClassVar[str]
    stages: ClassVar[frozenset[str]] = frozenset()  # which of STAGES it acts in
    reference: ClassVar[bool] = False  # the uncompressed reference (`none`): no retention applies
    retention_knob: ClassVar[RetentionKnob | None] = None  # None: `retention=` does not apply
    label_knobs: ClassVar[tuple[str, ...] | None] = None  # knobs named in table labels (None: all)
    needs: ClassVar[frozenset[str]] = frozenset()  # extra vision-side inputs (VISUAL_NEEDS)
    composite: ClassVar[bool] = False  # a stack of methods whose stages are its parts' (pipeline)
    seed: int = 0  # set by the harness; methods that sample draw from a generator seeded by it

    _HOOKS = {"visual": "compress", "prefill": "prefill_policy", "decode": "decode_policy"}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not set(cls.needs) <= VISUAL_NEEDS:
            raise TypeError(f"{cls.__name__}.needs: unknown {sorted(set(cls.needs) - VISUAL_NEEDS)}; "
                            f"expected some of {sorted(VISUAL_NEEDS)}")
        unknown = set(cls.stages) - set(STAGES)
        if unknown:
            raise TypeError(f"{cls.__name__}.stages: unknown stage(s) {sorted(unknown)}; expected {STAGES}")
        for stage, hook in cls._HOOKS.items():
            overridden = getattr(cls, hook) is not getattr(Compressor, hook)
            if overridden != (stage in cls.stages) and not cls.composite:
                raise TypeError(f"{cls.__name__}: declares stages {sorted(cls.stages)} but "
                                f"{'defines' if overridden else 'lacks'} {hook}()")

    # ---- the three stage hooks ------------------------------------------------------------------
    def compress(self, x: VisualInput) -> torch.Tensor | VideoTokens:
        """(M, D) tokens for the LLM, or VideoTokens keeping original positions."""
        raise TypeError(f"{type(self).__name__} has no visual stage")

    def prefill_policy(self, llm: "LLMShape") -> "PrefillPolicy":
        """A fresh policy for one prefill of an LLM of this shape."""
        raise TypeError(f"{type(self).__name__} has no prefill stage")

    def decode_policy(self, llm: "LLMShape") -> "DecodePolicy":
        """A fresh policy for one generation (it may keep state across steps)."""
        raise TypeError(f"{type(self).__name__} has no decode stage")

    # ---- building and description ----------------------------------------------------------------
    @classmethod
    def from_knobs(cls, **knobs) -> "Compressor":
        """The method with these knobs; unknown knobs are an error naming the known ones."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(knobs) - fields)
        if unknown:
            raise ValueError(f"method {cls.name!r} has no knob {', '.join(unknown)}: "
                             f"its knobs are {', '.join(sorted(fields)) or '(none)'}")
        return cls(**knobs)

    def with_knob(self, knob: str, value) -> "Compressor":
        """A copy with one knob changed (what calibration searches over)."""
        new = dataclasses.replace(self, **{knob: value})
        new.seed = self.seed
        return new

    def flops(self, frames: int, tokens: int, dim: int) -> float | None:
        """Analytic FLOPs of the method's own work on F x N x D features, where it is not negligible
        next to the LLM (dense similarity products); None where it is not modelled."""
        return None

    def notes(self) -> dict:
        """How this instance runs, beyond its knobs, for the run's config and summary (e.g. which
        fallback it took)."""
        return {}

    def has(self, stage: str) -> bool:
        return stage in self.stages

    def knobs(self) -> dict:
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}

    @property
    def title(self) -> str:
        """The name tables show (a pipeline shows its parts)."""
        return self.name


def check_range(name: str, value, low: float, high: float, *, low_open=False, high_open=False):
    """Raise ValueError('<method>.<knob>=value: expected ...') when `value` is out of range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name}={value!r}: expected a number")
    bad_low = value <= low if low_open else value < low
    bad_high = value >= high if high_open else value > high
    if bad_low or bad_high:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"{name}={value}: expected a value in {lo}{low}, {high}{hi}")


def check_int(name: str, value, low: int, high: int | None = None):
    """Raise ValueError unless `value` is an integer in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r}: expected an integer")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name}={value}: expected an integer in [{low}, {'inf' if high is None else high}]")
