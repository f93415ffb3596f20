"""Qwen2.5-VL adapter: windowed ViT on 2-frame temporal patches -> 2x2 patch merger -> compressor ->
Qwen2 decoder with 3-D rotary positions (M-RoPE).

Follows transformers 5.x `models/qwen2_5_vl/modeling_qwen2_5_vl.py`: the video tokens are
`Qwen2_5_VLModel.get_video_features` (patch embedding of C x 2 x 14 x 14 patches, windowed
attention with full attention in `fullatt_block_indexes`, the merger of 2x2 patches, returned in
row-major order of the merged grid), one token frame per temporal patch of 2 frames, so F' =
ceil(F / 2) frames of N = (H/28)(W/28) tokens; the positions are `get_rope_index`'s: text before the
video 0..s-1 on all three axes, video token (t, i, j) at (s + floor(t * tokens_per_second *
second_per_grid), s + i, s + j), the text after it from s + max(H/28, W/28) on; decoding continues
after the largest position (`rope_deltas`). The video input is lmms_eval's qwen2_5_vl pipeline
(harness/models/qwen2_5_vl_video.py; `processing_qwen2_5_vl.py`, `models/qwen2_vl/
video_processing_qwen2_vl.py`). For method `none` the logits equal the stock model's
(tests/test_qwen2_5_vl.py).

How the harness's contracts map onto it, and the deviations:
- Compressed videos: tokens a visual stage returns as `VideoTokens` take the (t, h, w) positions of
  the input tokens they keep, and the text after the video sits where it would uncompressed; LLM-stage
  methods keep each kept token's positions (methods.core.decoder). A plain (M, D) output (methods whose
  official code renumbers the compressed tokens consecutively) takes consecutive positions on all
  three axes, as Qwen2.5-VL positions text: the M-RoPE counterpart of that renumbering.
- second_per_grid: temporal_patch_size / the sampled frame rate of the frames the model sees
  (transformers' `VideoMetadata.sampled_fps` with the video's real metadata). lmms_eval 0.7.3 hands
  the processor bare frames without metadata, and transformers 5.x then assumes 24 fps (temporal
  positions step by 1/6): that artefact is not reproduced.
- "patch_scores": the attention each patch receives in the last vision block (a full-attention block
  in the published configs; otherwise within its windows), mean over heads and over the queries of
  its attention segment (one temporal patch, or one window), recomputed from that block's input as
  for OneVision; keys are that block's key projections before the rotary embedding, mean over heads.
  Both come in row-major patch order (`VisualInput.patch_grid` = (H/14, W/14)), so the methods'
  bilinear pooling to the token grid is exactly the mean of each token's 2x2 patches.
- "encoder_hidden" (FastVID's SigLIP head on the projector's input) is SigLIP-specific: not provided,
  so `fastvid siglip_path=...` is refused before the model loads.
"""

from __future__ import annotations

import torch

from harness.models.base import Encoded, ModelLoadError, VideoLLM, preprocessor_config
from harness.models.qwen2_5_vl_video import (
    QwenPreprocessing,
    QwenVideo,
    load_qwen_video,
    video_tokens,
)
from methods.core.base import VideoTokens, VisualInput
from methods.core.decoder import LLM
from methods.core.flops import attention_flops, mlp_flops

# Qwen2.5-VL's chat template (Qwen/Qwen2.5-VL-*-Instruct chat_template.json)
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


class Qwen2_5_VL(VideoLLM):
    family = "qwen2_5_vl"
    model_class = "Qwen2_5_VLForConditionalGeneration"
    provides = frozenset({"patch_scores"})
    # no encoder stage: merging inside the tower is not defined here (its window attention and 2x2
    # patch merger need the full grid), so a method acting there is refused before anything loads
    stages = frozenset({"visual", "prefill", "decode"})
    OFFLINE_SPECIAL_TOKENS, OFFLINE_CHAT_TEMPLATE = SPECIAL_TOKENS, CHAT_TEMPLATE
    # the published checkpoints' preprocessor_config.json (Qwen2VLImageProcessor settings)
    OFFLINE_PREPROCESSOR = {"image_mean": CLIP_MEAN, "image_std": CLIP_STD, "rescale_factor": 1 / 255,
                            "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
                            "min_pixels": 3136, "max_pixels": 12845056}

    def __init__(self, path: str, **kwargs):
        super().__init__(path, **kwargs)
        self.vision = self.config.vision_config
        self.preprocessing = self._preprocessing()

    def _preprocessing(self) -> QwenPreprocessing:
        """The checkpoint's normalisation and patch sizes (its preprocessor config, else the
        Qwen2VLVideoProcessor defaults); they must agree with the vision tower's config."""
        return read_preprocessing(self.directory, self.vision, CLIP_MEAN, CLIP_STD, 14,
                                  ("do_resize", "do_rescale", "do_normalize"), "Qwen2.5-VL")

    @classmethod
    def config_from_arch(cls, arch: dict, tokenizer):
        """A Qwen2_5_VLConfig from `arch`: vision_config, text_config (rope_theta and mrope_section
        become its rope_parameters; tie_word_embeddings goes to the top level), with the special
        token ids of `tokenizer`."""
        from transformers import Qwen2_5_VLConfig

        arch = dict(arch)
        vision, text = dict(arch.pop("vision_config")), dict(arch.pop("text_config"))
        tie = text.pop("tie_word_embeddings", False)
        rope = {"rope_type": "default", "rope_theta": text.pop("rope_theta", 1000000.0),
                "mrope_section": list(text.pop("mrope_section", [16, 24, 24]))}
        check_arch(rope, text["hidden_size"] // text["num_attention_heads"], vision, text)
        return qwen_config(Qwen2_5_VLConfig, arch, vision, text, tie, rope, tokenizer)

    # ---- video --------------------------------------------------------------------------------
    def load_video(self, path: str, frames: int) -> QwenVideo:
        """The video as lmms_eval's qwen2_5_vl model feeds it, at most `frames` frames."""
        return load_qwen_video(path, frames, self.preprocessing)

    def video_tokens(self, path: str, frames: int) -> int:
        return video_tokens(path, frames, self.preprocessing)

    @torch.inference_mode()
    def encode(self, video: QwenVideo, needs: frozenset = frozenset(), timings: dict | None = None) -> Encoded:
        """QwenVideo -> Encoded: VisualInput with (F', N, D) merged tokens on the (H/28, W/28) grid;
        extras["time_interval"], the temporal position step (tokens_per_second * second_per_grid).
        "patch_scores" as the module docstring says (its time in `timings["scoring"]`)."""
        visual, _ = encode_video(self, video, needs, timings, self.row_major)
        interval = self.vision.tokens_per_second * torch.tensor(video.second_per_grid, dtype=torch.float32)
        return Encoded(visual, {"time_interval": interval}, timings if timings is not None else {})

    def row_major(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """(P,) index into the vision blocks' patch order (windows of merge units) of each patch in
        row-major (t, row, column) order."""
        from transformers.vision_utils import get_vision_window_index

        merge = self.vision.spatial_merge_size
        window_index, _ = get_vision_window_index(grid_thw, merge, self.vision.window_size, self.vision.patch_size)
        unit = torch.empty_like(window_index)
        unit[window_index] = torch.arange(len(window_index), device=window_index.device)  # unit -> its slot
        t, gh, gw = grid_thw[0].tolist()
        # processor order of the patches: (t, row block, column block, row in block, column in block)
        slots = (unit.view(-1, 1) * merge * merge + torch.arange(merge * merge, device=unit.device)).view(
            t, gh // merge, gw // merge, merge, merge)
        return slots.permute(0, 1, 3, 2, 4).reshape(-1).to(self.device)

    @staticmethod
    def received_attention(attn, hidden: torch.Tensor, cu_seqlens: torch.Tensor, rotary):
        """(P, C) input of a vision attention -> ((P,) softmax attention each patch receives in its
        attention segment, mean over heads and the segment's queries; (P, head_dim) keys before the
        rotary embedding, mean over heads), float32, in the block's patch order. One segment and
        one head at a time keeps memory at (n, n)."""
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            apply_rotary_pos_emb_vision,
        )

        patches = hidden.shape[0]
        q, k, _ = attn.qkv(hidden).reshape(patches, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        keys = k.float().mean(1)
        cos, sin = rotary
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        out = torch.empty(patches, dtype=torch.float32, device=hidden.device)
        bounds = cu_seqlens.tolist()
        for a, b in zip(bounds[:-1], bounds[1:]):
            received = torch.zeros(b - a, dtype=torch.float32, device=hidden.device)
            for h in range(attn.num_heads):
                weights = (q[a:b, h].float() @ k[a:b, h].float().T * attn.scaling).softmax(-1)
                received += weights.mean(0)
            out[a:b] = received / attn.num_heads
        return out, keys

    def vision_flops(self, frames: int, grid: tuple[int, int]) -> float:
        """The vision tower on `frames` temporal patches of a (h, w) token grid, in the convention of
        methods/core/flops.py: patch embedding, each block's attention over its segments (windows, or the
        whole temporal patch in full-attention blocks) and its gated MLP (three matrices), the merger."""
        from transformers.vision_utils import get_vision_window_index

        v, merge = self.vision, self.vision.spatial_merge_size
        gh, gw = grid[0] * merge, grid[1] * merge
        patches, width = gh * gw, v.hidden_size
        _, cu = get_vision_window_index(torch.tensor([[1, gh, gw]]), merge, v.window_size, v.patch_size)
        windows = (cu[1:] - cu[:-1]).tolist()
        embed = 2 * patches * v.in_channels * v.temporal_patch_size * v.patch_size ** 2 * width
        blocks = 0.0
        for i in range(v.depth):
            segments = [patches] if i in v.fullatt_block_indexes else windows
            blocks += sum(attention_flops(n, width) for n in segments) + 3 * mlp_flops(patches, width, v.intermediate_size)
        units, wide = patches // merge ** 2, width * merge ** 2
        merger = 2 * units * wide * (wide + v.out_hidden_size)
        return frames * (embed + blocks + merger)

    # ---- language model -----------------------------------------------------------------------
    @property
    def llm(self) -> LLM:
        """The narrow handle on the Qwen2.5-VL decoder (M-RoPE rotary) that the shared driver runs."""
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            apply_rotary_pos_emb,
        )

        lm = self.model.model.language_model
        return LLM(embed=lm.embed_tokens, layers=lm.layers, rotary=lm.rotary_emb, norm=lm.norm,
                   head=self.model.lm_head, config=lm.config, apply_rotary=apply_rotary_pos_emb)

    def video_positions(self, start: int, frames: int, grid: tuple[int, int], interval: torch.Tensor) -> torch.Tensor:
        """(3, F'*N) M-RoPE positions of the uncompressed video tokens starting at `start`
        (`Qwen2_5_VLModel.get_vision_position_ids`)."""
        t = (torch.arange(frames, device=self.device) * interval.to(self.device)).long()
        tt, hh, ww = torch.meshgrid(t, torch.arange(grid[0], device=self.device),
                                    torch.arange(grid[1], device=self.device), indexing="ij")
        return torch.stack([tt, hh, ww]).reshape(3, -1) + start

    def embed_video(self, ids: list[int], tokens, encoded: Encoded, full_video: int):
        """Prompt embeddings with the video placeholder replaced by the video tokens, their (3, 1, T)
        M-RoPE positions (module docstring) and the video span."""
        where = ids.index(self.video_token_id)
        text = self.model.get_input_embeddings()(torch.tensor(ids, device=self.device))
        video = tokens.tokens if isinstance(tokens, VideoTokens) else tokens
        n = video.shape[0]
        embeds = torch.cat([text[:where], video.to(text.dtype), text[where + 1:]])[None]
        before = torch.arange(where, device=self.device).expand(3, -1)
        if isinstance(tokens, VideoTokens):
            frames, grid = encoded.visual.features.shape[0], encoded.visual.grid
            mine = self.video_positions(where, frames, grid, encoded.extras["time_interval"])
            mine = mine[:, tokens.positions.to(self.device)]
            after_start = where + max(grid)
        else:  # consecutive, as text
            mine = torch.arange(where, where + n, device=self.device).expand(3, -1)
            after_start = where + n
        after = torch.arange(len(ids) - where - 1, device=self.device).expand(3, -1) + after_start
        positions = torch.cat([before, mine, after], dim=1)[:, None]
        return embeds, positions, (where, where + n)


# ---- shared with Qwen3-VL (harness/models/qwen3_vl.py), whose processor and tower take the same calls ----
def read_preprocessing(directory, vision, mean: list[float], std: list[float], patch_size: int,
                       flags: tuple[str, ...], name: str) -> QwenPreprocessing:
    """The checkpoint's normalisation and patch sizes from its preprocessor config in `directory`
    (else `mean`, `std`, `patch_size` and the processors' other defaults); ModelLoadError where they
    disagree with the vision tower's config `vision`, or where one of `flags` (do_* keys the harness
    implements only as true) is not true. `name`: the model, for the message."""
    path, cfg = preprocessor_config(directory)
    pre = QwenPreprocessing(
        mean=list(cfg.get("image_mean", mean)), std=list(cfg.get("image_std", std)),
        rescale=float(cfg.get("rescale_factor", 1 / 255)), patch_size=int(cfg.get("patch_size", patch_size)),
        temporal_patch_size=int(cfg.get("temporal_patch_size", 2)), merge_size=int(cfg.get("merge_size", 2)))
    for key, model_key in (("patch_size", "patch_size"), ("temporal_patch_size", "temporal_patch_size"),
                           ("merge_size", "spatial_merge_size")):
        if getattr(pre, key) != getattr(vision, model_key):
            raise ModelLoadError(f"{path}: {key}={getattr(pre, key)} but the vision config has "
                                 f"{model_key}={getattr(vision, model_key)}: expected them equal")
    for key in flags:
        if cfg.get(key, True) is not True:
            raise ModelLoadError(f"{path}: {key}={cfg[key]!r}: the harness implements {name}'s "
                                 f"video preprocessing with {key}=true")
    return pre


def check_arch(rope: dict, head_dim: int, vision: dict, text: dict) -> None:
    """ValueError where an arch's mrope sections do not sum to head_dim/2 or its vision tower's
    out_hidden_size is not the LLM's hidden size."""
    if sum(rope["mrope_section"]) * 2 != head_dim:
        raise ValueError(f"text_config.mrope_section={rope['mrope_section']}: expected sections summing "
                         f"to head_dim/2 = {head_dim // 2}")
    if vision.get("out_hidden_size") != text["hidden_size"]:
        raise ValueError(f"vision_config.out_hidden_size={vision.get('out_hidden_size')}: expected "
                         f"text_config.hidden_size={text['hidden_size']} (the merger feeds the LLM)")


def qwen_config(config_class, arch: dict, vision: dict, text: dict, tie: bool, rope: dict, tokenizer):
    """`config_class` (Qwen2_5_VLConfig, Qwen3VLConfig) from the parts `config_from_arch` split off
    `arch`: `text` takes `rope` as its rope_parameters and the tokenizer's eos and pad ids; the special
    token ids are the tokenizer's."""
    ids = tokenizer.convert_tokens_to_ids
    text.update(rope_parameters=rope, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    return config_class(
        vision_config=vision, text_config=text, tie_word_embeddings=tie,
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"), **arch)


def encode_video(adapter: VideoLLM, video, needs: frozenset, timings: dict | None, patch_order):
    """Run `adapter`'s vision tower (`get_video_features`) on `video` (its pixels and (t, h, w) patch
    grid_thw): (VisualInput with (t, N, D) merged tokens on the (h/merge, w/merge) grid, the tower's
    output). With "patch_scores" in `needs`, a hook on the last vision block's attention adds
    "patch_scores" (t, h*w) and "patch_keys" (t, h*w, d) (`Qwen2_5_VL.received_attention`) in the
    row-major order `patch_order(grid_thw)` gives, timed as `timings["scoring"]`."""
    t, gh, gw = video.grid_thw
    grid_thw = torch.tensor([video.grid_thw], device=adapter.device)
    captured: dict = {}
    hook = None
    if "patch_scores" in needs:
        def score(module, args, kwargs):
            with adapter.stopwatch("scoring", timings if timings is not None else {}):
                scores, keys = Qwen2_5_VL.received_attention(module, args[0], kwargs["cu_seqlens"],
                                                             kwargs["position_embeddings"])
                order = patch_order(grid_thw)
                captured["patch_scores"] = scores[order].view(t, gh * gw)
                captured["patch_keys"] = keys[order].view(t, gh * gw, -1)

        hook = adapter.model.model.visual.blocks[-1].attn.register_forward_pre_hook(score, with_kwargs=True)
    try:
        out = adapter.model.model.get_video_features(
            pixel_values_videos=video.pixels.to(adapter.device, adapter.model.dtype), video_grid_thw=grid_thw)
    finally:
        if hook is not None:
            hook.remove()
    merge = adapter.vision.spatial_merge_size
    grid = (gh // merge, gw // merge)
    features = out.pooler_output[0].reshape(t, grid[0] * grid[1], -1)
    return VisualInput(features=features, grid=grid, patch_grid=(gh, gw), mrope=True, **captured), out
