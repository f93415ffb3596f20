"""LLaVA-OneVision adapter: SigLIP vision tower -> projector -> 2x2 pooling -> compressor -> Qwen2 LLM.

Follows transformers' `models/llava_onevision/modeling_llava_onevision.py` (the video path of
`LlavaOnevisionModel.get_video_features`: the vision tower at `vision_feature_layer`, the projector,
the 2x2 bilinear pooling of each frame's 27x27 patches to 14x14, then one `image_newline` after the
video) and `video_processing_llava_onevision.py` (harness/video.py). The same code serves the
embedded smoke model and the real 0.5B/7B checkpoints; for method `none` the logits equal the stock
model's (tests/test_model.py). The one deviation: the pooled features go through the configured
compressor before they are placed in the prompt. Positions are 1-D sequence indices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.data.video import preprocess, read_frames
from harness.models.base import Encoded, ModelLoadError, VideoLLM, preprocessor_config
from methods.core.base import VideoTokens, VisualInput
from methods.core.decoder import LLM
from methods.core.flops import encoder_flops


@dataclass
class Preprocessing:
    """The checkpoint's video preprocessing (harness/video.py applies it)."""

    size: int
    mean: list[float]
    std: list[float]
    rescale: float = 1 / 255

    @classmethod
    def from_model_dir(cls, directory: Path) -> "Preprocessing":
        """Read video_preprocessor_config.json (else preprocessor_config.json); what it leaves out
        takes transformers' LlavaOnevisionVideoProcessor defaults, as the processor would. Settings
        harness/video.py does not implement are an error naming the file and field."""
        from transformers.models.llava_onevision.video_processing_llava_onevision import (
            LlavaOnevisionVideoProcessor as Stock,
        )

        path, cfg = preprocessor_config(directory)
        setting = {k: cfg.get(k, getattr(Stock, k)) for k in (
            "size", "image_mean", "image_std", "rescale_factor", "resample", "do_resize", "do_rescale",
            "do_normalize", "do_center_crop")}
        expected = {"resample": 3, "do_resize": True, "do_rescale": True, "do_normalize": True}
        for key, value in expected.items():
            if setting[key] != value:
                raise ModelLoadError(f"{path}: {key}={setting[key]!r}: the harness implements the "
                                     f"LLaVA-OneVision video preprocessing with {key}={value!r}")
        if setting["do_center_crop"]:
            raise ModelLoadError(f"{path}: do_center_crop=true: the harness implements the "
                                 "LLaVA-OneVision video preprocessing without a centre crop")
        size = setting["size"]
        if isinstance(size, dict):
            if size.get("height") != size.get("width") or not size.get("height"):
                raise ModelLoadError(f"{path}: size={size}: expected a square {{height, width}}")
            size = size["height"]
        return cls(size=int(size), mean=list(setting["image_mean"]), std=list(setting["image_std"]),
                   rescale=float(setting["rescale_factor"]))

    def apply(self, frames) -> torch.Tensor:
        """uint8 (F, H, W, 3) frames -> the encoder's (F, 3, size, size) input."""
        return preprocess(frames, self.size, self.mean, self.std, self.rescale)


# The chat template of the llava-hf OneVision processors (Qwen2 ChatML with media first).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% if not loop.first or message['content'] | rejectattr('type', 'equalto', 'text') | list %}{{ '\n' }}{% endif %}"
    "{{ content['text'] }}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]


class LlavaOneVision(VideoLLM):
    family = "llava_onevision"
    model_class = "LlavaOnevisionForConditionalGeneration"
    provides = frozenset({"patch_scores", "encoder_hidden"})
    tokens_after_video = 1  # the image_newline
    OFFLINE_SPECIAL_TOKENS, OFFLINE_CHAT_TEMPLATE = SPECIAL_TOKENS, CHAT_TEMPLATE
    # what random weights are built with (harness/models/random_weights.py): SigLIP's preprocessing
    # as the llava-hf checkpoints ship it
    OFFLINE_PREPROCESSOR = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
                            "size": {"height": 384, "width": 384}, "rescale_factor": 1 / 255, "resample": 3}

    def __init__(self, path: str, **kwargs):
        super().__init__(path, **kwargs)
        if self.config.vision_feature_select_strategy != "full":
            raise ModelLoadError(
                f"{path}: vision_feature_select_strategy={self.config.vision_feature_select_strategy!r}: "
                "LLaVA-OneVision's video path pools all 27x27 SigLIP patches (SigLIP has no CLS token), "
                "so only 'full' can run (its published configs use 'full')")
        vision = self.config.vision_config
        self.patch_grid = vision.image_size // vision.patch_size  # 27 for SigLIP 384/14
        self.grid = (math.ceil(self.patch_grid / 2),) * 2  # OneVision's 2x2 bilinear pooling
        self.tokens_per_frame = self.grid[0] * self.grid[1]
        self.preprocessing = Preprocessing.from_model_dir(self.directory)

    @classmethod
    def config_from_arch(cls, arch: dict, tokenizer):
        """A LlavaOnevisionConfig from `arch` (vision_config, text_config and top-level fields), with
        the special token ids of `tokenizer`."""
        from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

        arch = dict(arch)
        vision = SiglipVisionConfig(**{"vision_use_head": False, **arch.pop("vision_config")})
        text = dict(arch.pop("text_config"))
        rope = text.pop("rope_theta", None)
        if rope is not None:
            text["rope_parameters"] = {"rope_type": "default", "rope_theta": rope}
        text = Qwen2Config(**text, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        return LlavaOnevisionConfig(
            vision_config=vision, text_config=text,
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
            tie_word_embeddings=text.tie_word_embeddings, **arch)

    # ---- video --------------------------------------------------------------------------------
    def load_video(self, path: str, frames: int) -> torch.Tensor:
        """(F, 3, S, S): `frames` frames sampled uniformly (lmms_eval's llava_onevision rule)."""
        return self.preprocessing.apply(read_frames(path, frames))

    def video_tokens(self, path: str, frames: int) -> int:
        return frames * self.tokens_per_frame

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor, needs: frozenset = frozenset(),
               timings: dict | None = None) -> Encoded:
        """(F, 3, S, S) -> Encoded: VisualInput with (F, N, D) pooled features; extras["newline"].

        needs (methods.core.base.VISUAL_NEEDS) asks for more: "patch_scores", the attention each encoder
        patch receives in the last vision layer whose output the model uses (mean over heads and
        queries) and that layer's keys (mean over heads), recomputed for that one layer from its
        input so the encoder itself keeps its fast attention kernel (the time spent is added to
        `timings["scoring"]`); "encoder_hidden", the encoder features the projector receives.
        """
        pixel_values = pixel_values.to(self.device, self.model.dtype)
        captured: dict = {}
        hooks = []
        if "patch_scores" in needs:
            def score(module, args, kwargs):
                with self.stopwatch("scoring", timings if timings is not None else {}):
                    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                    captured["patch_scores"], captured["patch_keys"] = received_attention(module, hidden)

            hooks.append(self.scoring_layer().self_attn.register_forward_pre_hook(score, with_kwargs=True))
        if "encoder_hidden" in needs:
            def keep_input(module, args):
                captured["encoder_hidden"] = args[0]

            hooks.append(self.model.model.multi_modal_projector.register_forward_pre_hook(keep_input))
        try:
            out = self.model.model.get_video_features(
                pixel_values_videos=pixel_values[None],
                vision_feature_layer=self.config.vision_feature_layer,
                vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            )
        finally:
            for hook in hooks:
                hook.remove()
        pooled = out.pooler_output[0]  # (F*N + 1, D): the newline comes last
        frames = pixel_values.shape[0]
        features = pooled[:-1].reshape(frames, self.tokens_per_frame, -1)
        visual = VisualInput(features=features, grid=self.grid, **captured)
        return Encoded(visual, {"newline": pooled[-1:]}, timings if timings is not None else {})

    def scoring_layer(self):
        """The encoder layer whose output the model uses (config.vision_feature_layer)."""
        tower = self.model.model.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers
        chosen = self.config.vision_feature_layer
        if not isinstance(chosen, int):
            chosen = chosen[-1]  # several layers concatenated: score with the deepest
        index = chosen % (len(layers) + 1) - 1  # hidden_states[k] is the output of layer k-1
        if index < 0:
            raise ValueError("vision_feature_layer selects the embeddings: no attention to score with")
        return layers[index]

    def vision_flops(self, frames: int, grid: tuple[int, int]) -> float:
        return encoder_flops(self.config.vision_config, frames, self.config.text_config.hidden_size)

    # ---- language model -----------------------------------------------------------------------
    @property
    def llm(self) -> LLM:
        """The narrow handle on the Qwen2 decoder that the shared driver runs."""
        from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

        lm = self.model.model.language_model
        return LLM(embed=lm.embed_tokens, layers=lm.layers, rotary=lm.rotary_emb, norm=lm.norm,
                   head=self.model.lm_head, config=lm.config, apply_rotary=apply_rotary_pos_emb)

    def embed_video(self, ids: list[int], tokens, encoded: Encoded, full_video: int):
        return self.embed(ids, tokens, encoded.extras["newline"], full_video)

    def embed(self, ids: list[int], video: torch.Tensor | VideoTokens, newline: torch.Tensor,
              full_video: int):
        """Prompt embeddings with the video placeholder replaced by the video tokens + newline,
        their position ids and the video span. Tokens that keep their original positions
        (VideoTokens) take them; the newline and the text after it then sit where they would
        with all `full_video` tokens."""
        where = ids.index(self.video_token_id)
        ids_t = torch.tensor(ids, device=self.device)
        text = self.model.get_input_embeddings()(ids_t)
        tokens = video.tokens if isinstance(video, VideoTokens) else video
        embeds = torch.cat([text[:where], tokens.to(text.dtype), newline.to(text.dtype), text[where + 1:]])[None]
        n = tokens.shape[0]
        positions = torch.arange(embeds.shape[1], device=self.device)
        if isinstance(video, VideoTokens):
            positions[where:where + n] = where + video.positions.to(self.device)
            positions[where + n:] += full_video - n
        return embeds, positions[None], (where, where + n)


def received_attention(attention, hidden: torch.Tensor):
    """(B, P, C) input of a SigLIP attention -> ((B, P) softmax attention each key receives,
    averaged over heads and queries; (B, P, head_dim) the keys averaged over heads), float32.
    One frame at a time keeps memory at (H, P, P)."""
    batch, patches, _ = hidden.shape
    heads = attention.num_heads
    q = attention.q_proj(hidden).view(batch, patches, heads, -1).transpose(1, 2)
    k = attention.k_proj(hidden).view(batch, patches, heads, -1).transpose(1, 2)
    out = torch.empty(batch, patches, dtype=torch.float32, device=hidden.device)
    for b in range(batch):
        weights = (q[b].float() @ k[b].float().transpose(-1, -2) * attention.scale).softmax(-1)
        out[b] = weights.mean(dim=(0, 1))
    return out, k.float().mean(1)


