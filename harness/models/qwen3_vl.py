"""Qwen3-VL adapter: ViT on 2-frame temporal patches (learned position embeddings, full attention
within each temporal patch) -> 2x2 patch merger, plus DeepStack features -> compressor -> Qwen3
decoder with interleaved 3-D rotary positions (M-RoPE), the DeepStack features added after its
first layers, a timestamp before each token frame.

Follows transformers 5.x `models/qwen3_vl/modeling_qwen3_vl.py`: the video tokens are
`Qwen3VLModel.get_video_features` (patch embedding of C x 2 x 16 x 16 patches, each temporal patch
attending within itself, the merger of 2x2 patches, in row-major order of the merged grid), one
token frame per temporal patch of 2 frames, so F' = ceil(F / 2) frames of N = (H/32)(W/32) tokens;
its `deepstack_features`, one (F'·N, D) tensor per `deepstack_visual_indexes` block, are added to
the video tokens' hidden states after decoder layers 0, 1, ... (`Qwen3VLTextModel.
_deepstack_process`). The prompt is `Qwen3VLProcessor`'s (`processing_qwen3_vl.py`): the video
placeholder becomes, per token frame k, `<{t_k:.1f} seconds><|vision_start|>` + its N tokens +
`<|vision_end|>` (inside the chat template's own `<|vision_start|>`...`<|vision_end|>`). The
positions are `get_rope_index`'s: the video is split into one grid per token frame, text runs (the
timestamps and markers among them) take consecutive positions on all three axes, frame k's token
(i, j) sits at (s_k, s_k + i, s_k + j), s_k the position after the text before it, and the text
after it goes on from s_k + max(H/32, W/32); decoding continues after the largest position
(`rope_deltas`). The video input is lmms_eval's qwen3_vl pipeline (harness/models/qwen3_vl_video.py),
its prompt lmms_eval's too (its default system prompt "You are a helpful assistant." as a system
message: Qwen3-VL's chat template adds none by itself). For method `none` the logits equal the stock
model's (tests/test_adapters.py, tests/test_qwen3_vl.py).

How the harness's contracts map onto it, and the deviations:
- The timestamps and markers between frames are text: kept in place, never counted as video tokens
  (the driver's `video_mask` marks the video tokens inside the span from the first to the last one).
- Compressed videos: each output token goes into the segment of its frame, in order; a frame left
  with no tokens keeps its timestamp and markers (`<t seconds><|vision_start|><|vision_end|>`).
  Tokens a visual stage returns as `VideoTokens` take the (t, h, w) positions of the input tokens
  they keep, frame = position // N, and every text entry (timestamps, markers, the text after the
  video) keeps its uncompressed position; LLM-stage methods keep each kept token's positions. A plain
  (M, D) output (methods whose official code renumbers the compressed tokens consecutively) is placed
  in the frame given by its weighted mean frame (harness/models/qwen3_vl_deepstack.py; a stable
  sort, tokens of one frame keeping their order), and the whole prompt takes consecutive positions
  on all three axes, as Qwen2.5-VL positions a plain output: the M-RoPE counterpart of that
  renumbering.
- DeepStack: a visual stage's kept, merged or dropped tokens carry their DeepStack features the same
  way (forward-mode replay, or a widened replay where forward AD has no formula for one of the
  stage's ops, harness/models/qwen3_vl_deepstack.py; the replay is not counted as compressor time:
  a native implementation would gather them with the tokens); a stage whose replay fails or is not
  a fixed weighted mean is refused with one line, and so is a prefill policy that merges video tokens
  before the last DeepStack layer (`check_method`, before anything loads). One that only drops
  (FastV) is defined: the levels still to come are added to the tokens it kept.
- Each timestamp is tokenized on its own (`stamp_ids`), the processor tokenizes the whole expanded
  text: the same ids, since the special tokens on both sides of a timestamp split the text before
  the tokenizer's pre-tokenization (tests/test_qwen3_vl.py compares the two).
- `text_tokens(ids, video)` counts the timestamps and markers from the video (calibration and the
  bench give it: `(path, frames)` reads only the file's frame count and rate); without a video, only
  the prompt's own text is counted.
- lmms_eval 0.7.3's qwen3_vl has no log-likelihood (`loglikelihood` raises there); the harness's is
  the same computation as for the other families (sum of the answer tokens' log-probabilities).
- "patch_scores": the attention each patch receives in the last vision block (full attention within
  its temporal patch), mean over heads and over the queries of that temporal patch, recomputed from
  the block's input as for Qwen2.5-VL (the same computation: `Qwen2_5_VL.received_attention`; the
  two models' vision rotary functions are the same code); keys are that block's key projections
  before the rotary embedding, mean over heads. Both come in row-major patch order
  (`VisualInput.patch_grid` = (H/16, W/16)).
- "encoder_hidden" (FastVID's SigLIP head) is SigLIP-specific: not provided.
- No encoder stage: the vision tower runs whole, as the stock model runs it (its DeepStack mergers
  take the full patch grid of intermediate blocks), so ToMe, which merges inside it, is refused
  before anything loads, as on Qwen2.5-VL.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from harness.models.base import (
    Compressed,
    Encoded,
    VideoLLM,
)
from harness.models.qwen2_5_vl import (
    SPECIAL_TOKENS,
    check_arch,
    encode_video,
    qwen_config,
    read_preprocessing,
)
from harness.models.qwen2_5_vl_video import QwenPreprocessing
from harness.models.qwen3_vl_deepstack import (
    DeepStackTokens,
    ReplayError,
    carry,
    check_visual_stage,
    merging_layers,
)
from harness.models.qwen3_vl_video import (
    LMMS_SYSTEM_PROMPT,
    Qwen3Video,
    load_qwen3_video,
    timestamp_text,
    video_timestamps,
    video_tokens,
)
from methods.core.decoder import LLM
from methods.core.flops import LLMShape, attention_flops, mlp_flops

# Qwen/Qwen3-VL-*-Instruct's chat template (chat_template.json), its branches for a system message
# and user/assistant turns (the tools branches left out): no default system message
CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].content is string %}{{- messages[0].content }}{%- else %}"
    "{%- for content in messages[0].content %}{%- if 'text' in content %}{{- content.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}{%- else %}"
    "{%- for content in message.content %}"
    "{%- if content.type == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content.type == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{- content.text }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}{%- else %}"
    "{%- for content_item in message.content %}{%- if 'text' in content_item %}{{- content_item.text }}"
    "{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
HALF = [0.5, 0.5, 0.5]  # Qwen3-VL's image_mean and image_std (Qwen3VLVideoProcessor defaults)
# what `check_method` assumes before a checkpoint's config is read: the published checkpoints'
# three DeepStack levels, and the 2B's 28 decoder layers for methods whose layers scale with depth
PUBLISHED_LEVELS, PUBLISHED_LAYERS = 3, 28


class Qwen3_VL(VideoLLM):
    family = "qwen3_vl"
    model_class = "Qwen3VLForConditionalGeneration"
    provides = frozenset({"patch_scores"})
    # no encoder stage: `encode` runs the stock vision tower whole (its DeepStack mergers read the full
    # patch grid of intermediate blocks), so a method acting inside it (ToMe) is refused in one line
    # before anything loads (harness.run.validate.check_method_family)
    stages = frozenset({"visual", "prefill", "decode"})
    OFFLINE_SPECIAL_TOKENS, OFFLINE_CHAT_TEMPLATE = SPECIAL_TOKENS, CHAT_TEMPLATE
    # the published checkpoints' video_preprocessor_config.json (Qwen3VLVideoProcessor settings)
    OFFLINE_PREPROCESSOR = {"image_mean": HALF, "image_std": HALF, "rescale_factor": 1 / 255,
                            "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2}
    system_prompt = LMMS_SYSTEM_PROMPT

    def __init__(self, path: str, **kwargs):
        super().__init__(path, **kwargs)
        self.vision = self.config.vision_config
        self.preprocessing = self._preprocessing()
        self.levels = len(self.vision.deepstack_visual_indexes)
        self._stamps: dict[str, tuple[int, ...]] = {}  # timestamp text -> its ids

    def _preprocessing(self) -> QwenPreprocessing:
        """The checkpoint's normalisation and patch sizes (its preprocessor config, else the
        Qwen3VLVideoProcessor defaults); they must agree with the vision tower's config. The pixel
        budget is lmms_eval's (min_pixels, max_pixels), not the processor's: lmms_eval resizes
        before it and passes do_resize=False."""
        return read_preprocessing(self.directory, self.vision, HALF, HALF, 16, ("do_rescale", "do_normalize"),
                                  "Qwen3-VL")

    @classmethod
    def config_from_arch(cls, arch: dict, tokenizer):
        """A Qwen3VLConfig from `arch`: vision_config, text_config (rope_theta and mrope_section
        become its rope_parameters, interleaved; tie_word_embeddings goes to the top level), with
        the special token ids of `tokenizer`."""
        from transformers import Qwen3VLConfig

        arch = dict(arch)
        vision, text = dict(arch.pop("vision_config")), dict(arch.pop("text_config"))
        tie = text.pop("tie_word_embeddings", False)
        rope = {"rope_type": "default", "rope_theta": text.pop("rope_theta", 5000000.0),
                "mrope_section": list(text.pop("mrope_section", [24, 20, 20])), "mrope_interleaved": True}
        head_dim = text.setdefault("head_dim", text["hidden_size"] // text["num_attention_heads"])
        check_arch(rope, head_dim, vision, text)
        indexes = list(vision.get("deepstack_visual_indexes", []))
        if any(not 0 <= i < vision["depth"] for i in indexes) or len(indexes) > text["num_hidden_layers"]:
            raise ValueError(f"vision_config.deepstack_visual_indexes={indexes}: expected vision blocks in "
                             f"[0, {vision['depth'] - 1}], at most one per decoder layer")
        return qwen_config(Qwen3VLConfig, arch, vision, text, tie, rope, tokenizer)

    # ---- methods that cannot carry DeepStack ---------------------------------------------------
    @classmethod
    def check_method(cls, compressor, config: dict | None = None) -> None:
        """ValueError (one line) for a method Qwen3-VL's DeepStack features cannot go through: a
        prefill policy that merges video tokens before the last DeepStack layer, a visual stage
        that cannot be replayed as fixed weighted means (qwen3_vl_deepstack). `config`: the
        checkpoint's config.json (its depth and DeepStack levels; default the published ones)."""
        levels, shape = PUBLISHED_LEVELS, LLMShape(2048, 6144, PUBLISHED_LAYERS)
        if config is not None:
            text = config.get("text_config") or config
            levels = len((config.get("vision_config") or {}).get("deepstack_visual_indexes", [8, 16, 24]))
            shape = LLMShape(text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"])
        if compressor.has("prefill") and levels:
            try:
                policy = compressor.prefill_policy(shape)
            except ValueError:  # a knob that does not fit the model: check_method_fits says so
                policy = None
            early = [layer for layer in merging_layers(policy) if layer < levels] if policy is not None else []
            if early:
                raise ValueError(
                    f"method {compressor.title} merges video tokens inside the LLM at layer {early[0]}, before "
                    f"Qwen3-VL has added its DeepStack features (after layers 0-{levels - 1}), which a merged "
                    f"token cannot carry: the method is not defined for model.family=qwen3_vl"
                    + (f" (a merge from layer {levels} on is)" if type(policy).__name__ != "FrameFusionPolicy" else ""))
        if compressor.has("visual"):
            try:
                check_visual_stage(compressor)
            except ReplayError as err:
                raise ValueError(f"method {compressor.title}: {err}; its DeepStack features cannot follow its "
                                 "tokens, so it is not defined for model.family=qwen3_vl") from None

    # ---- prompt ---------------------------------------------------------------------------------
    def prompt_ids(self, question: str, answer: str | None = None) -> tuple[list[int], int]:
        """Token ids of lmms_eval's qwen3_vl chat prompt (its system prompt, then the video and the
        question), holding one video placeholder, and the answer's length."""
        messages = [{"role": "system", "content": self.system_prompt},
                    {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
        prompt = self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
        if ids.count(self.video_token_id) != 1:
            raise ValueError(f"the prompt must hold exactly one video token, found "
                             f"{ids.count(self.video_token_id)} in {prompt!r}")
        if answer is None:
            return ids, 0
        answer_ids = self.tokenizer(answer, add_special_tokens=False).input_ids
        return ids + answer_ids, len(answer_ids)

    def stamp_ids(self, seconds: float) -> tuple[int, ...]:
        """The timestamp text before a token frame, tokenized on its own: special tokens on both sides
        split it from its neighbours, so the whole prompt tokenizes to the same ids."""
        text = timestamp_text(seconds)
        if text not in self._stamps:
            self._stamps[text] = tuple(self.tokenizer(text, add_special_tokens=False).input_ids)
        return self._stamps[text]

    def timestamps(self, video) -> list[float]:
        """Seconds of each token frame of `video`: a Qwen3Video, its Encoded, or (path, frames), the
        file as `load_video(path, frames)` would read it (its metadata only, nothing decoded)."""
        if isinstance(video, Encoded):
            return [float(s) for s in video.extras["timestamps"].tolist()]
        if isinstance(video, tuple):
            return list(video_timestamps(*video, self.preprocessing))
        return list(video.timestamps)

    def text_tokens(self, ids: list[int], video=None) -> int:
        """The prompt's tokens other than video tokens: with `video` (Qwen3Video, Encoded or (path,
        frames)), the timestamps and markers between its frames too (without it, only the prompt's own)."""
        between = sum(len(self.stamp_ids(s)) + 2 for s in self.timestamps(video)) if video is not None else 0
        return len(ids) - 1 + between

    # ---- video --------------------------------------------------------------------------------
    def load_video(self, path: str, frames: int) -> Qwen3Video:
        """The video as lmms_eval's qwen3_vl model feeds it, at most `frames` frames."""
        return load_qwen3_video(path, frames, self.preprocessing)

    def video_tokens(self, path: str, frames: int) -> int:
        return video_tokens(path, frames, self.preprocessing)

    @torch.inference_mode()
    def encode(self, video: Qwen3Video, needs: frozenset = frozenset(), timings: dict | None = None) -> Encoded:
        """Qwen3Video -> Encoded: VisualInput with (F', N, D) merged tokens on the (H/32, W/32) grid;
        extras["deepstack"] (L, F', N, D) the DeepStack features, extras["timestamps"] (F',) float64
        seconds. "patch_scores" as the module docstring says (its time in `timings["scoring"]`)."""
        order = self.row_major(video.grid_thw) if "patch_scores" in needs else None
        visual, out = encode_video(self, video, needs, timings, lambda _: order)
        t, features, grid = video.grid_thw[0], visual.features, visual.grid
        deepstack = (torch.stack([level[0] for level in out.deepstack_features]) if out.deepstack_features
                     else features.new_zeros(0, *features.reshape(-1, features.shape[-1]).shape))
        extras = {"deepstack": deepstack.reshape(-1, t, grid[0] * grid[1], features.shape[-1]),
                  "timestamps": torch.tensor(video.timestamps, dtype=torch.float64)}
        return Encoded(visual, extras, timings if timings is not None else {})

    def row_major(self, grid_thw: tuple[int, int, int]) -> torch.Tensor:
        """(P,) index into the processor's patch order ((t, row block, column block, row in block,
        column in block), which the vision blocks keep) of each patch in row-major (t, row, column)
        order."""
        t, gh, gw = grid_thw
        merge = self.vision.spatial_merge_size
        slots = torch.arange(t * gh * gw, device=self.device).view(t, gh // merge, gw // merge, merge, merge)
        return slots.permute(0, 1, 3, 2, 4).reshape(-1)

    def compress(self, video, compressor, question: str | None = None) -> Compressed:
        """VideoLLM.compress, its output carrying each token's DeepStack features and frame
        (qwen3_vl_deepstack.carry; ValueError, one line, for a stage that cannot carry them)."""
        compressed = super().compress(video, compressor, question)
        if isinstance(compressed.tokens, DeepStackTokens):
            return compressed
        visual = compressed.encoded.visual
        if compressor.has("visual") and "question" in compressor.needs:
            visual = replace(visual, question=self.question_embeddings(question))
        try:
            tokens = carry(compressor if compressor.has("visual") else None, visual, compressed.tokens,
                           compressed.encoded.extras["deepstack"])
        except ReplayError as err:
            raise ValueError(f"method {compressor.title}: {err}; its DeepStack features cannot follow its "
                             "tokens, so it is not defined for model.family=qwen3_vl") from None
        return replace(compressed, tokens=tokens)

    def vision_flops(self, frames: int, grid: tuple[int, int], encoder=None) -> float:
        """The vision tower on `frames` temporal patches of a (h, w) token grid, in the convention of
        methods/core/flops.py: patch embedding, each block's attention over its temporal patch and its
        MLP (two matrices), the merger and the DeepStack mergers."""
        v, merge = self.vision, self.vision.spatial_merge_size
        patches, width = grid[0] * merge * grid[1] * merge, v.hidden_size
        embed = 2 * patches * v.in_channels * v.temporal_patch_size * v.patch_size ** 2 * width
        blocks = v.depth * (attention_flops(patches, width) + 2 * mlp_flops(patches, width, v.intermediate_size))
        units, wide = patches // merge ** 2, width * merge ** 2
        mergers = (1 + len(v.deepstack_visual_indexes)) * 2 * units * wide * (wide + v.out_hidden_size)
        return frames * (embed + blocks + mergers)

    # ---- language model -----------------------------------------------------------------------
    @property
    def llm(self) -> LLM:
        """The narrow handle on the Qwen3-VL decoder (interleaved M-RoPE) that the shared driver runs."""
        from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb

        lm = self.model.model.language_model
        return LLM(embed=lm.embed_tokens, layers=lm.layers, rotary=lm.rotary_emb, norm=lm.norm,
                   head=self.model.lm_head, config=lm.config, apply_rotary=apply_rotary_pos_emb)

    def layout(self, ids: list[int], tokens: DeepStackTokens, encoded: Encoded):
        """The prompt ids with the placeholder replaced by every token frame's segment
        (timestamp, <|vision_start|>, its tokens as video placeholders, <|vision_end|>), and their
        (3, T) positions (module docstring)."""
        where = ids.index(self.video_token_id)
        frames, grid = encoded.visual.features.shape[0], encoded.visual.grid
        per_frame = grid[0] * grid[1]
        counts = torch.bincount(tokens.frames.cpu(), minlength=frames).tolist()
        start, end = self.config.vision_start_token_id, self.config.vision_end_token_id
        out, positions = list(ids[:where]), list(range(where))
        pos = where  # the uncompressed layout's next position (get_rope_index's current_pos)
        starts = []
        for k, seconds in enumerate(self.timestamps(encoded)):
            text = list(self.stamp_ids(seconds)) + [start]
            out += text
            positions += list(range(pos, pos + len(text)))
            pos += len(text)
            starts.append(pos)
            out += [self.video_token_id] * counts[k]
            positions += [-1] * counts[k]  # filled below
            pos += max(grid)
            out.append(end)
            positions.append(pos)
            pos += 1
        rest = ids[where + 1:]
        out += rest
        positions += list(range(pos, pos + len(rest)))
        is_video = torch.tensor(out, device=self.device) == self.video_token_id
        if not tokens.original:  # consecutive on all three axes, as text
            return out, torch.arange(len(out), device=self.device).expand(3, -1), is_video
        positions = torch.tensor(positions, device=self.device).expand(3, -1).clone()
        index = tokens.positions.to(self.device)
        frame, cell = index // per_frame, index % per_frame
        first = torch.tensor(starts, device=self.device)[frame]
        positions[:, is_video] = torch.stack([first, first + cell // grid[1], first + cell % grid[1]])
        return out, positions, is_video

    def embed_video(self, ids: list[int], tokens, encoded: Encoded, full_video: int):
        """Prompt embeddings with the video placeholder replaced by the frames' segments, their
        (3, 1, T) M-RoPE positions, the span from the first to the last video token, and the video
        mask and DeepStack features over it (the driver's `video_mask`, `deepstack`)."""
        if not isinstance(tokens, DeepStackTokens):
            raise TypeError("Qwen3-VL's video tokens come from Qwen3_VL.compress (with their DeepStack features)")
        out, positions, is_video = self.layout(ids, tokens, encoded)
        embeds = self.model.get_input_embeddings()(torch.tensor(out, device=self.device))
        embeds[is_video] = tokens.tokens.to(self.device, embeds.dtype)
        where = is_video.nonzero().flatten()
        span = (int(where[0]), int(where[-1]) + 1)
        deepstack = [level.to(self.device) for level in tokens.deepstack]
        return embeds[None], positions[:, None], span, {"video_mask": is_video[span[0]:span[1]], "deepstack": deepstack}
