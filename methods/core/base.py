"""The one interface every compressor implements.

A compressor is a small dataclass whose fields are its knobs, each declared once with `knob()`:
its default, the values it takes (a range, an integer, a choice, optional) and what it means. The
harness builds its Hydra config node, its `--cfg job` view and every range check from these
declarations; a value out of range or NaN is refused in one place (`check_value`) for every knob.

A compressor declares the stages it acts in and implements one hook per stage:

- "encoder": `encoder_policy(vision) -> EncoderPolicy`, acting inside the vision encoder's layers
             (the adapter runs them itself; ToMe merges patch tokens there), before any other stage;
- "visual":  `compress(VisualInput) -> (M, D) tokens` (or `VideoTokens` with their original
             positions), on the pooled video features before the LLM;
- "prefill": `prefill_policy(llm) -> PrefillPolicy`, acting inside the LLM at the layers it names,
             run by the shared decoder driver (`methods.core.decoder`);
- "decode":  `decode_policy(llm) -> DecodePolicy`, choosing which cached video entries later
             layers attend to at each generated token.

How a requested `retention=` reaches the method is declared too (`retention_knob`). Nothing here
knows about Hydra, lmms_eval or files: it is tensor code, on any device.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch

if TYPE_CHECKING:
    from methods.core.decoder import DecodePolicy, PrefillPolicy
    from methods.core.flops import LLMShape, VisionShape

STAGES = ("encoder", "visual", "prefill", "decode")  # in the order they act


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
    mrope: bool = False  # the model places video tokens by M-RoPE (t, h, w) ids (Qwen2.5-VL), not 1-D
    question: torch.Tensor | None = None  # (q, D) the LLM's input embeddings of the question's tokens
    # ("question": a visual stage that reads the question, e.g. instruction-conditioned selection;
    # such a method is compressed once per question, not once per video)


VISUAL_NEEDS = frozenset({"patch_scores", "encoder_hidden", "question"})
ENCODER_NEEDS = VISUAL_NEEDS - {"question"}  # what the vision side computes (the question comes from the prompt)


class EncoderStage:
    """The member of a compressor's `needs` that names its encoder-stage method (set for every
    compressor acting in the "encoder" stage, a pipeline's part included), so that whatever carries
    `needs` to the vision side (the engine, the feature cache, calibration, the bench) carries the
    method that must act inside the encoder too. Equal, and hashed, by the method's name and knobs
    (`identity`): two settings never share an encoding, the same setting always does."""

    __slots__ = ("method",)

    def __init__(self, method: "Compressor"):
        self.method = method

    @property
    def identity(self) -> str:
        return json.dumps({"method": self.method.name, "knobs": self.method.knobs()}, sort_keys=True, default=str)

    def __eq__(self, other) -> bool:
        return isinstance(other, EncoderStage) and other.identity == self.identity

    def __hash__(self) -> int:
        return hash(self.identity)

    def __repr__(self) -> str:
        return f"EncoderStage({self.identity})"


def encoder_stage(needs) -> "Compressor | None":
    """The encoder-stage method a `needs` set carries (None: the encoder runs as the model ships it)."""
    return next((n.method for n in needs if isinstance(n, EncoderStage)), None)


def vision_needs(needs) -> frozenset:
    """What of `needs` the vision side acts on: its ENCODER_NEEDS names and the encoder stage (the
    question comes from the prompt)."""
    return frozenset(n for n in needs if isinstance(n, EncoderStage) or n in ENCODER_NEEDS)


class EncoderPolicy(Protocol):
    """What an encoder-stage method does inside the vision encoder, for one batch of frames (a fresh
    policy per video, from `Compressor.encoder_policy(VisionShape)`).

    The adapter runs the encoder's layers itself. On the embeddings h (B, P, C) (a frame per row) it
    calls `start(h)`; then, in each layer l = 0.. of those whose output the model uses:

        bias = policy.attention_bias(dtype)   # None, or (B, 1, 1, t): added to the attention logits
        h = h + attention(norm1(h), bias)
        h = policy.act(l, h, metric)          # metric (B, t, head_dim): this layer's keys, mean over heads
        h = h + mlp(norm2(h))

    and at the end `h, origin = policy.finish(h)`: the tokens in the order the LLM receives them and
    each one's smallest original patch index (B, k). Every row keeps the same number of tokens.
    `layer_tokens` plans, per layer, the tokens per frame its attention and its MLP see (the encoder
    FLOPs count reads it; methods.core.flops.encoder_flops). `merging` False says that the tokens stay
    the P patches in grid order (ToMe with r = 0): the adapter then treats them as the stock encoder's
    output (LLaVA-OneVision pools them as it does for every other method)."""

    layer_tokens: list[tuple[int, int]]
    merging: bool = True

    def start(self, hidden: torch.Tensor) -> None:
        ...

    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        ...

    def act(self, layer: int, hidden: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
        ...

    def finish(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ...


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
class Knob:
    """The values one knob takes. `kind`: number | integer | choice | layers (a list of layer
    indices) | text. Numbers and integers are finite and within [low, high] (an end open with
    low_open / high_open; None: unbounded); `optional` admits null (a default the method derives, e.g. a
    layer scaled to the model's depth)."""

    kind: str = "number"
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    optional: bool = False
    help: str = ""

    def expected(self, value=None) -> str:
        """What a valid value is, in words, for an error about `value`: its kind when `value` is of
        the wrong type, else its range."""
        if self.kind == "choice":
            what = "one of " + ", ".join(map(str, self.choices))
        elif self.kind == "text":
            what = "a string"
        elif self.kind == "layers":
            what = "a list of layer indices" + (f" >= {self.low:g}" if self.low is not None else "")
        elif not self._is_number(value):
            what = "an integer" if self.kind == "integer" else "a number"
        elif self.kind == "integer":
            low = "-inf" if self.low is None else f"{self.low:g}"
            what = f"an integer in [{low}, {'inf' if self.high is None else f'{self.high:g}'}]"
        else:
            low = "-inf" if self.low is None else float(self.low)
            high = "inf" if self.high is None else float(self.high)
            what = (f"a value in {'(' if self.low_open or self.low is None else '['}{low}, {high}"
                    f"{')' if self.high_open or self.high is None else ']'}")
        return what + (" or null" if self.optional else "")

    def _is_number(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return isinstance(value, int) if self.kind == "integer" else True

    def admits(self, value) -> bool:
        if value is None:
            return self.optional
        if self.kind == "choice":
            return value in self.choices
        if self.kind == "text":
            return isinstance(value, str)
        if self.kind == "layers":
            return (isinstance(value, (list, tuple)) and len(value) > 0
                    and all(Knob("integer", self.low, self.high).admits(v) for v in value))
        if not self._is_number(value):
            return False
        if not math.isfinite(value):  # NaN compares false with every bound; inf is no setting
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True


def knob(default, help: str = "", **spec) -> Any:
    """A compressor's knob: `retention: float = knob(0.25, "share of tokens kept", low=0, high=1,
    low_open=True)`. The spec is a `Knob`'s fields; lists are copied per instance."""
    declared = Knob(help=help, **spec)
    if not declared.admits(default):
        raise TypeError(f"knob default {default!r} is not {declared.expected(default)}")
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"knob": declared})
    return dataclasses.field(default=default, metadata={"knob": declared})


def check_value(where: str, value, spec: Knob) -> None:
    """ValueError('<where>=<value>: expected ...') unless `spec` admits `value` (NaN never does)."""
    if not spec.admits(value):
        raise ValueError(f"{where}={value!r}: expected {spec.expected(value)}")


# the usual knob kinds, so a range reads the same in every method
def share(default, help: str = "", **more):
    """A share of something in [0, 1]."""
    return knob(default, help, low=0.0, high=1.0, **more)


def fraction(default, help: str = "", **more):
    """A share that must keep something: (0, 1] (retention, kept fractions)."""
    return knob(default, help, low=0.0, high=1.0, low_open=True, **more)


def cosine_threshold(default, help: str = "", **more):
    """A threshold on a cosine similarity: [-1, 1]."""
    return knob(default, help, low=-1.0, high=1.0, **more)


def layer(default, help: str = "", low: int = 1, **more):
    """A decoder layer index (checked against the model's depth when the policy is built); null:
    the method's official layer, scaled to the model's depth."""
    return knob(default, help, kind="integer", low=low, optional=default is None or more.pop("optional", False),
                **more)


POSITIONS = ("compact", "original")


def positions_knob():
    """The `positions` knob of a visual stage that keeps tokens: compact | original | null (by model)."""
    return knob(None, "compact: consecutive positions; original: each kept token keeps its own; null: "
                "original on M-RoPE models (Qwen2.5-VL), compact otherwise (LLaVA-OneVision's standard "
                "concatenation)", kind="choice", choices=POSITIONS, optional=True)


def placed(kept: VideoTokens, x: VisualInput, positions: str | None) -> torch.Tensor | VideoTokens:
    """A visual stage's kept tokens as the LLM receives them: `VideoTokens` (original position ids)
    for positions="original", a plain tensor (consecutive positions) for "compact"; None: original
    where the model places video tokens by M-RoPE (`x.mrope`), compact otherwise."""
    original = positions == "original" or (positions is None and x.mrope)
    return kept if original else kept.tokens


@dataclass(frozen=True)
class RetentionKnob:
    """How `retention=r` sets a method's knob.

    direct: the knob takes r itself (its meaning is `measure`). Otherwise the harness searches the
    knob over its declared range (bisection; `increasing` says which way retention moves) until the
    mean `measure` on the calibration set is r: measured by running the visual stage ("rho_tok"),
    or from the token counts the method plans per layer ("rho_flops", FLOPs matching).
    """

    knob: str
    measure: str = "rho_tok"  # rho_tok | rho_flops
    direct: bool = False
    increasing: bool = True


class Compressor:
    """Base class. Subclasses are dataclasses registered with `@register`."""

    name: ClassVar[str]
    stages: ClassVar[frozenset[str]] = frozenset()  # which of STAGES it acts in
    reference: ClassVar[bool] = False  # the uncompressed reference (`none`): no retention applies
    retention_knob: ClassVar[RetentionKnob | None] = None  # None: `retention=` does not apply
    label_knobs: ClassVar[tuple[str, ...] | None] = None  # knobs named in table labels (None: all)
    needs: ClassVar[frozenset[str]] = frozenset()  # extra vision-side inputs (VISUAL_NEEDS); an instance
    # acting in the encoder stage adds its EncoderStage to its own copy
    composite: ClassVar[bool] = False  # a stack of methods whose stages are its parts' (pipeline)
    # its prefill stage's decisions read the question (FastV: the last prompt token's attention);
    # False for a query-free one, whose prefill over [head + video] serves every question of a video
    prefill_reads_question: ClassVar[bool] = True
    seed: int = 0  # set by the harness; methods that sample draw from a generator seeded by it

    _HOOKS = {"encoder": "encoder_policy", "visual": "compress", "prefill": "prefill_policy",
              "decode": "decode_policy"}

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

    # ---- the stage hooks ------------------------------------------------------------------------
    def encoder_policy(self, vision: "VisionShape") -> EncoderPolicy:
        """A fresh policy for one video through a vision encoder of this shape."""
        raise TypeError(f"{type(self).__name__} has no encoder stage")

    def compress(self, x: VisualInput) -> torch.Tensor | VideoTokens:
        """(M, D) tokens for the LLM, or VideoTokens keeping original positions."""
        raise TypeError(f"{type(self).__name__} has no visual stage")

    def prefill_policy(self, llm: "LLMShape") -> "PrefillPolicy":
        """A fresh policy for one prefill of an LLM of this shape."""
        raise TypeError(f"{type(self).__name__} has no prefill stage")

    def decode_policy(self, llm: "LLMShape") -> "DecodePolicy":
        """A fresh policy for one generation (it may keep state across steps)."""
        raise TypeError(f"{type(self).__name__} has no decode stage")

    # ---- knobs: declared once on the dataclass fields (knob()), checked here ----------------------
    def __post_init__(self):
        """Every knob against its declaration, then the method's checks across knobs (`validate`)."""
        type(self).check_knobs(**self.knobs())
        self.validate()
        if "encoder" in self.stages:  # the vision side must run this very setting
            self.needs = frozenset(type(self).needs) | {EncoderStage(self)}

    def validate(self) -> None:
        """Checks that involve several knobs (a method overrides it); single knobs are declared."""

    @classmethod
    def knob_specs(cls) -> dict[str, Knob]:
        """{knob name: its declaration}, in field order."""
        specs = {}
        for f in dataclasses.fields(cls):
            if "knob" not in f.metadata:
                raise TypeError(f"{cls.__name__}.{f.name}: a compressor's field must be declared with knob()")
            specs[f.name] = f.metadata["knob"]
        return specs

    @classmethod
    def defaults(cls) -> dict:
        """{knob name: default value}: what conf/method/<name>.yaml selects."""
        return {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for f in dataclasses.fields(cls)}

    @classmethod
    def check_knobs(cls, **values) -> None:
        """ValueError naming `<method>.<knob>=value` and what is expected, for the first value its
        declaration does not admit (pure functions of a method check their arguments with it too)."""
        specs = cls.knob_specs()
        for name, value in values.items():
            check_value(f"{cls.name}.{name}", value, specs[name])

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

    def knob_range(self, knob: str) -> tuple[float, float]:
        """The closed interval a retention search may move `knob` over: its declared range (an
        open end moved inside by 1e-9)."""
        spec = type(self).knob_specs()[knob]
        if spec.low is None or spec.high is None:
            raise TypeError(f"{self.name}.{knob}: a searched knob needs a bounded range")
        return spec.low + (1e-9 if spec.low_open else 0.0), spec.high - (1e-9 if spec.high_open else 0.0)

    # ---- description ---------------------------------------------------------------------------
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

    @property
    def shares_prefix(self) -> bool:
        """Whether its work up to the end of the video tokens is the same for every question about a
        video (its visual stage never reads the question; its decode stage acts after the prompt),
        so one prefill of [head + video] serves them all."""
        return self.reads_question_before_llm is False and (not self.has("prefill") or not self.prefill_reads_question)

    @property
    def reads_question_before_llm(self) -> bool:
        """Whether its visual stage reads the question (then it runs once per question)."""
        return "question" in self.needs

    def knobs(self) -> dict:
        return dataclasses.asdict(self) if dataclasses.is_dataclass(self) else {}

    @property
    def title(self) -> str:
        """The name tables show (a pipeline shows its parts)."""
        return self.name


def check_layer(where: str, layer: int, depth: int, low: int = 1, high: int | None = None) -> int:
    """`layer` itself, or ValueError unless low <= layer <= high (default: depth - 1, the last
    layer a pruned set can still reach) for an LLM of `depth` layers."""
    high = depth - 1 if high is None else high
    if not low <= layer <= high:
        raise ValueError(f"{where}={layer}: expected a layer in [{low}, {high}] for an LLM of {depth} layers")
    return layer
