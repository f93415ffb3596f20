"""LLaVA-OneVision adapter: SigLIP vision tower -> projector -> 2x2 pooling -> compressor -> Qwen2 LLM.

Follows transformers' `models/llava_onevision/modeling_llava_onevision.py` (the video path of
`LlavaOnevisionModel.get_video_features`: the vision tower at `vision_feature_layer`, the projector,
the 2x2 bilinear pooling of each frame's 27x27 patches to 14x14, then one `image_newline` after the
video) and `video_processing_llava_onevision.py` (harness/video.py). The same code serves the
embedded smoke model and the real 0.5B/7B checkpoints; for method `none` the logits equal the stock
model's (tests/test_model.py). The one deviation: the pooled features go through the configured
compressor before they are placed in the prompt. Positions are 1-D sequence indices.

With an encoder-stage method (ToMe) the adapter runs SigLIP's embeddings and encoder layers itself, as
transformers' `SiglipEncoderLayer.forward` does (layer_norm1, self_attn, residual, layer_norm2, mlp,
residual; the same attention function), with the method's policy acting after attention + residual and
before the MLP and its bias (ToMe's log(size)) added to the attention logits as a float mask; then the
projector on each frame's merged tokens, without the 2x2 bilinear pooling (merged tokens have no grid).
Without merges the loop equals the stock tower exactly, and its tokens, still the patch grid, are pooled
as the model pools them: the same features as `none` (tests/test_tome.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.data.video import preprocess, read_frames
from harness.models.base import Encoded, ModelLoadError, VideoLLM, preprocessor_config
from methods.core.base import ENCODER_NEEDS, Compressor, EncoderPolicy, VideoTokens, VisualInput, encoder_stage
from methods.core.decoder import LLM
from methods.core.flops import VisionShape, encoder_flops


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
    stages = VideoLLM.stages | {"encoder"}  # encode() runs SigLIP's layers itself for an encoder stage
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

    def uncompressed_tokens(self, visual: VisualInput) -> int:
        return visual.features.shape[0] * self.tokens_per_frame  # also when merged in the encoder

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
        encoder = encoder_stage(needs)
        if encoder is not None:
            return self.encode_merged(pixel_values, encoder, needs, timings)
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

    def encode_merged(self, pixel_values: torch.Tensor, encoder: Compressor, needs: frozenset = frozenset(),
                      timings: dict | None = None) -> Encoded:
        """(F, 3, S, S) -> Encoded with (F, k, D) features: SigLIP's layers run here with `encoder`'s
        policy inside them (`run_encoder`), then the projector on each frame's k tokens (no pooling: merged
        tokens are off the grid). A policy that merges nothing leaves the P patches in grid order: they are
        pooled as `get_video_features` pools them, so the features are `none`'s."""
        asked = sorted(n for n in needs if isinstance(n, str) and n in ENCODER_NEEDS)
        if asked:
            raise ValueError(f"{encoder.name} merges tokens inside the vision encoder: there are no per-patch "
                             f"{', '.join(asked)} to give")
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.siglip.modeling_siglip import eager_attention_forward

        tower = self.model.model.vision_tower
        vision = getattr(tower, "vision_model", tower)
        implementation = vision.config._attn_implementation
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        policy = encoder.encoder_policy(self.vision_shape)
        hidden, _ = run_encoder(vision, pixel_values, policy, self.encoder_depth(), attention, implementation)
        features = self.model.model.multi_modal_projector(hidden)
        if policy.merging:
            visual = VisualInput(features=features, grid=(1, features.shape[1]))
        else:  # still the patch grid: the model's 2x2 bilinear pooling, as in `encode`
            features = self.model.model.apply_pooling(features)
            visual = VisualInput(features=features, grid=self.grid)
        newline = self.model.model.image_newline[None].to(features.dtype)
        return Encoded(visual, {"newline": newline}, timings if timings is not None else {})

    def encoder_depth(self) -> int:
        """How many encoder layers the model uses: hidden_states[k] (vision_feature_layer) is the output
        of layer k - 1, so an encoder stage runs layers 0..k-1 only."""
        chosen = self.config.vision_feature_layer
        if not isinstance(chosen, int):
            raise ValueError(f"vision_feature_layer={chosen}: an encoder-stage method needs one encoder layer's "
                             "output (several are concatenated here)")
        depth = chosen % (self.config.vision_config.num_hidden_layers + 1)
        if depth == 0:
            raise ValueError("vision_feature_layer selects the embeddings: no encoder layer to act in")
        return depth

    @property
    def vision_shape(self) -> VisionShape:
        vision = self.config.vision_config
        return VisionShape(patches=self.patch_grid ** 2, layers=self.encoder_depth(), hidden=vision.hidden_size,
                           ffn=vision.intermediate_size, heads=vision.num_attention_heads,
                           tokens=self.tokens_per_frame)

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

    def vision_flops(self, frames: int, grid: tuple[int, int], encoder: Compressor | None = None) -> float:
        """The encoder, the projector; with `encoder`, each layer at the tokens its policy plans."""
        planned = encoder.encoder_policy(self.vision_shape).layer_tokens if encoder is not None else None
        return encoder_flops(self.config.vision_config, frames, self.config.text_config.hidden_size, planned)

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


def run_encoder(vision, pixel_values: torch.Tensor, policy: EncoderPolicy, depth: int, attention,
                implementation: str = "sdpa") -> tuple[torch.Tensor, torch.Tensor]:
    """SigLIP's embeddings and its first `depth` encoder layers on (B, 3, S, S) pixels, each layer as
    transformers' `SiglipEncoderLayer.forward` / `SiglipAttention.forward` compute it (the same modules,
    the same `attention` function, in the same order), with `policy` (methods.core.base.EncoderPolicy)
    acting after attention + residual and before the MLP, and its bias added to the attention logits
    (a float mask: SDPA keeps a fused kernel). Returns the policy's (tokens (B, k, C), smallest original
    patch index of each (B, k))."""
    hidden = vision.embeddings(pixel_values)
    policy.start(hidden)
    for index, layer in enumerate(vision.encoder.layers[:depth]):
        residual = hidden
        x = layer.layer_norm1(hidden)
        attn = layer.self_attn
        shape = (*x.shape[:-1], -1, attn.head_dim)
        queries = attn.q_proj(x).view(shape).transpose(1, 2)
        keys = attn.k_proj(x).view(shape).transpose(1, 2)
        values = attn.v_proj(x).view(shape).transpose(1, 2)
        bias = policy.attention_bias(queries.dtype)
        if bias is not None and implementation.startswith("flash"):
            raise ValueError(f"attn_implementation={implementation} takes no attention bias: ToMe's proportional "
                             "attention needs sdpa or eager (or prop_attn=false)")
        out, _ = attention(attn, queries, keys, values, bias, is_causal=attn.is_causal, scaling=attn.scale,
                           dropout=0.0)
        hidden = residual + attn.out_proj(out.reshape(*x.shape[:-1], -1).contiguous())
        hidden = policy.act(index, hidden, keys.mean(1))  # ToMe's metric: the keys, mean over heads
        residual = hidden
        hidden = residual + layer.mlp(layer.layer_norm2(hidden))
    return policy.finish(hidden)


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


