"""A stack of methods: an encoder- and/or visual-stage method in front of a prefill- and/or
decode-stage method.

Machinery of this harness (no paper, no official code), used as
`+method=pipeline method.stages=[visionzip,fastv]` or `method.stages=[tome,fastv]`; the stages a method
can act in are `methods.core.base.STAGES`. Each part keeps its own knobs (`method.fastv.keep=0.3`); the
stack acts in the union of its parts' stages, one part per stage, in the order they act: the encoder
one first, then the visual one. A requested `retention=` sets the knob of the last part that takes one,
searched so that the whole stack reaches it; a stack with an encoder stage takes no `retention=` (the
search measures the visual stage on encoded features and does not model merging inside the encoder:
set each part's knob). A part that merges inside the encoder leaves no patch grid, so it does not
stack with a part that needs the encoder's patch scores or states, and a visual part after it sees each
frame's merged tokens as a (1, k) grid (a spatial pooling then pools along that row).
"""

from __future__ import annotations

import dataclasses

from methods import register
from methods.core.base import ENCODER_NEEDS, Compressor


@register
class Pipeline(Compressor):
    name = "pipeline"
    composite = True  # its stages are those of its parts

    DEFAULT_STAGES = ("uniform", "fastv")

    @classmethod
    def defaults(cls) -> dict:
        """The config node's knobs: the parts, each at its own defaults unless given."""
        return {"stages": list(cls.DEFAULT_STAGES)}

    @classmethod
    def knob_specs(cls) -> dict:
        return {}

    def knob_range(self, knob: str) -> tuple[float, float]:
        part_name, _, inner = knob.partition(".")
        return next(p for p in self.parts if p.name == part_name).knob_range(inner)

    @classmethod
    def from_knobs(cls, stages=None, **part_knobs) -> "Pipeline":
        """stages: method names in order; part_knobs: {name: {knob: value}} for any of them."""
        from methods import build

        if not isinstance(stages, (list, tuple)) or not all(isinstance(s, str) for s in stages):
            raise ValueError(f"pipeline.stages={stages!r}: expected a list of method names, "
                             "e.g. method.stages=[visionzip,fastv]")
        unknown = sorted(set(part_knobs) - set(stages))
        if unknown:
            raise ValueError(f"pipeline: knobs given for {', '.join(unknown)}, which is not among "
                             f"its stages {list(stages)}")
        return cls([build(name, **(part_knobs.get(name) or {})) for name in stages])

    def __init__(self, parts: list[Compressor]):
        if len(parts) < 2:
            raise ValueError(f"pipeline.stages={[p.name for p in parts]}: expected at least two methods")
        owner: dict[str, str] = {}
        for part in parts:
            if isinstance(part, Pipeline) or part.reference:
                raise ValueError(f"pipeline.stages: {part.name} cannot be a stage of a pipeline")
            for stage in part.stages:
                if stage in owner:
                    raise ValueError(f"pipeline.stages: {owner[stage]} and {part.name} both act in the "
                                     f"{stage} stage; a pipeline has one method per stage")
                owner[stage] = part.name
        leading = [owner[stage] for stage in ("encoder", "visual") if stage in owner]
        if [p.name for p in parts[:len(leading)]] != leading:
            what = " then ".join(f"the {stage}-stage method ({owner[stage]})" for stage in ("encoder", "visual")
                                 if stage in owner)
            raise ValueError(f"pipeline.stages: {what} must come first: "
                             f"{'they act' if len(leading) > 1 else 'it acts'} before the LLM")
        if "encoder" in owner:
            grid_needs = [p.name for p in parts if set(p.needs) & ENCODER_NEEDS]
            if grid_needs:
                raise ValueError(f"pipeline.stages: {owner['encoder']} merges tokens inside the vision encoder, "
                                 f"so there are no patch scores or states for {', '.join(grid_needs)}")
        self.parts = list(parts)
        self.stages = frozenset(owner)
        self._owner = {stage: next(p for p in parts if p.name == name) for stage, name in owner.items()}
        self.needs = frozenset().union(*(p.needs for p in parts))  # an encoder part's EncoderStage too
        tuned = [p for p in parts if p.retention_knob is not None]
        # the whole stack's retention is measured, so even a direct knob is searched
        self.retention_knob = (dataclasses.replace(tuned[-1].retention_knob, direct=False,
                                                   knob=f"{tuned[-1].name}.{tuned[-1].retention_knob.knob}")
                               if tuned and "encoder" not in owner else None)

    def held_knobs(self) -> str:
        """The knobs of the parts a retention search does not move, as `name k=v,...` (for its
        messages: they bound what the stack can reach)."""
        tuned = self.retention_knob.knob.split(".")[0] if self.retention_knob else None
        return "; ".join(f"{p.name} " + ",".join(f"{f.name}={getattr(p, f.name)}" for f in dataclasses.fields(p))
                         for p in self.parts if p.name != tuned and dataclasses.is_dataclass(p))

    @property
    def seed(self) -> int:
        return self.parts[0].seed

    @seed.setter
    def seed(self, value: int) -> None:
        for part in getattr(self, "parts", []):
            part.seed = value

    @property
    def shares_prefix(self) -> bool:
        return all(p.shares_prefix for p in self.parts)

    def encoder_policy(self, vision):
        return self._owner["encoder"].encoder_policy(vision)

    def compress(self, x):
        return self._owner["visual"].compress(x)

    def prefill_policy(self, llm):
        return self._owner["prefill"].prefill_policy(llm)

    def decode_policy(self, llm):
        return self._owner["decode"].decode_policy(llm)

    def flops(self, frames: int, tokens: int, dim: int) -> float | None:
        parts = [p.flops(frames, tokens, dim) for p in self.parts]
        return None if all(f is None for f in parts) else sum(f or 0.0 for f in parts)

    def notes(self) -> dict:
        return {k: v for p in self.parts for k, v in p.notes().items()}

    def with_knob(self, knob: str, value) -> "Pipeline":
        part_name, _, inner = knob.partition(".")
        parts = [p.with_knob(inner, value) if p.name == part_name else p for p in self.parts]
        new = Pipeline(parts)
        new.seed = self.seed
        return new

    def knobs(self) -> dict:
        return {"stages": [p.name for p in self.parts], **{p.name: p.knobs() for p in self.parts}}

    @property
    def title(self) -> str:
        return "+".join(p.name for p in self.parts)

