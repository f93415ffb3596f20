"""LLaVA-OneVision adapter: vision tower -> projector -> 2x2 pooling -> compressor -> Qwen2 LLM.

The same code serves the embedded smoke model and the real 0.5B/7B checkpoints. It reproduces the
stock `transformers` video path (for method `none` the logits equal the stock model's), except that
the pooled features go through the configured compressor before they are placed in the prompt.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.random_model import random_seed
from harness.timing import Stopwatch
from harness.video import preprocess
from methods import decoder
from methods.base import Compressor, VideoTokens, VisualInput
from methods.decoder import LLM
from methods.flops import first_pruned


class ModelLoadError(RuntimeError):
    pass


def resolve_device(device: str) -> torch.device:
    if device == "auto":  # one GPU per process in data-parallel runs
        from harness.distributed import local_rank

        return torch.device(f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_path(path: str) -> None:
    """A model path is a local directory with config.json, or a hub id ("org/name")."""
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"model.path={path}: {local.resolve()} has no config.json "
                                 f"(expected a Hugging Face model directory)")
        return
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ModelLoadError(f"model.path={path}: no such directory ({local.resolve()}); "
                             f"expected a local model directory or a hub id like org/name")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false")
    if offline:
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(path, "config.json"), str):
            raise ModelLoadError(f"model.path={path}: not a local directory and not in the Hugging "
                                 f"Face cache ({os.environ.get('HF_HOME', '~/.cache/huggingface')}), "
                                 f"and HF_HUB_OFFLINE=1 forbids downloading it")


def model_fingerprint(directory: Path, dtype: str, device: torch.device) -> str:
    """Identifies the weights and numerics that produced a feature: config, weight files, dtype."""
    import hashlib

    h = hashlib.sha1((directory / "config.json").read_bytes())
    marker = directory / "RANDOM_WEIGHTS.json"  # random weights: their seed and architecture
    if marker.is_file():
        h.update(marker.read_bytes())
    for f in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(f"{dtype}:{device.type}".encode())
    return h.hexdigest()


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


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
            LlavaOnevisionVideoProcessor as Stock)

        path = directory / "video_preprocessor_config.json"
        if not path.is_file():
            path = directory / "preprocessor_config.json"
        cfg = _read_json(path) or {}
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


@dataclass
class VideoPass:
    """Everything measured while answering one prompt about one video."""

    video_tokens_in: int = 0  # F*N tokens produced by the vision side
    video_tokens_out: int = 0  # tokens the LLM's first pruned layer sees
    text_tokens: int = 0  # prompt tokens that are not video tokens (newline included)
    layer_video_tokens: list[int] = field(default_factory=list)  # video tokens per LLM layer's attention
    layer_mlp_video_tokens: list[int] = field(default_factory=list)  # ... per layer's MLP (fewer only
    # where a method acts between a layer's attention and its MLP)
    decode_video_visible: list[float] = field(default_factory=list)  # per decode step, share of the
    # cached video entries a decode policy let later layers attend to
    timings: dict = field(default_factory=dict)  # seconds: vision, compressor, prefill, decode, ttft
    decode_steps: int = 0  # generated tokens fed back through the LLM
    vision_cached: bool = False  # features came from the feature cache (vision time is 0)


@dataclass
class Prompt:
    """One prompt ready for the LLM: embeddings, position ids, where the video tokens are."""

    embeds: torch.Tensor  # (1, T, D)
    positions: torch.Tensor  # (1, T)
    span: tuple[int, int]  # video tokens at [start, end); the newline follows at end
    run: VideoPass
    groups: torch.Tensor | None = None  # a group id per video token, from the visual stage


@dataclass
class Encoded:
    """A video after the vision side: pooled features, the newline token, what producing them took."""

    visual: VisualInput
    newline: torch.Tensor
    timings: dict  # seconds: vision, scoring (patch attention, if computed)
    cached: bool = False


class LlavaOneVision:
    def __init__(self, path: str, *, dtype: str = "float32", device: str = "auto",
                 attn_implementation: str = "sdpa"):
        from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

        check_model_path(path)
        if dtype not in DTYPES:
            raise ModelLoadError(f"model.dtype={dtype}: expected one of {', '.join(DTYPES)}")
        self.device = resolve_device(device)
        directory = Path(path).expanduser()
        seed = random_seed(directory)
        if seed is None:
            self.model = LlavaOnevisionForConditionalGeneration.from_pretrained(
                path, dtype=DTYPES[dtype], attn_implementation=attn_implementation).to(self.device).eval()
        else:  # a random-weight architecture: initialised here, in place, in the target dtype
            self.model = random_weights(directory, seed, DTYPES[dtype], self.device, attn_implementation)
        self.random_weights = seed is not None
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if not directory.is_dir():  # a hub id: read the small files from the local cache
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(path, allow_patterns=["*.json", "*.jinja"]))
        self.config = self.model.config
        if self.config.vision_feature_select_strategy != "full":
            raise ModelLoadError(
                f"{path}: vision_feature_select_strategy={self.config.vision_feature_select_strategy!r}: "
                "LLaVA-OneVision's video path pools all 27x27 SigLIP patches (SigLIP has no CLS token), "
                "so only 'full' can run (its published configs use 'full')")
        vision = self.config.vision_config
        self.patch_grid = vision.image_size // vision.patch_size  # 27 for SigLIP 384/14
        self.grid = (math.ceil(self.patch_grid / 2),) * 2  # OneVision's 2x2 bilinear pooling
        self.tokens_per_frame = self.grid[0] * self.grid[1]
        self.preprocessing = Preprocessing.from_model_dir(directory)
        self.chat_template = self._chat_template(directory)
        self.video_token_id = self.config.video_token_id
        self.stop_ids = {i for i in (self.tokenizer.eos_token_id, self.config.text_config.eos_token_id)
                         if i is not None}
        self.stopwatch = Stopwatch(self.device)
        self.fingerprint = model_fingerprint(directory, dtype, self.device)

    # ---- prompt -------------------------------------------------------------------------------
    def _chat_template(self, directory: Path) -> str:
        processor = _read_json(directory / "chat_template.json")
        if processor and processor.get("chat_template"):
            return processor["chat_template"]
        if (directory / "chat_template.jinja").is_file():
            return (directory / "chat_template.jinja").read_text()
        if self.tokenizer.chat_template:
            return self.tokenizer.chat_template
        raise ModelLoadError(f"{directory}: no chat template (chat_template.json/.jinja or tokenizer)")

    def prompt_ids(self, question: str, answer: str | None = None) -> tuple[list[int], int]:
        """Token ids of the chat prompt holding one video placeholder, and the answer's length."""
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
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

    # ---- vision -------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor, needs: frozenset = frozenset(),
               timings: dict | None = None):
        """(F, 3, S, S) -> VisualInput with (F, N, D) pooled features, and the newline token.

        needs (methods.base.VISUAL_NEEDS) asks for more: "patch_scores", the attention each encoder
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
        return VisualInput(features=features, grid=self.grid, **captured), pooled[-1:]

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

    # ---- language model -----------------------------------------------------------------------
    @property
    def llm(self) -> LLM:
        """The narrow handle on the Qwen2 decoder that the shared driver runs."""
        from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

        lm = self.model.model.language_model
        return LLM(embed=lm.embed_tokens, layers=lm.layers, rotary=lm.rotary_emb, norm=lm.norm,
                   head=self.model.lm_head, config=lm.config, apply_rotary=apply_rotary_pos_emb)

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

    @torch.inference_mode()
    def encode_video(self, pixel_values: torch.Tensor, needs: frozenset = frozenset()) -> Encoded:
        """The timed vision side of one video: pooled features (and what `needs` asks for)."""
        timings = {}
        with self.stopwatch("vision", timings):
            visual, newline = self.encode(pixel_values, needs, timings)
        # scoring patches is the compressor's work, even though it runs inside the encoder
        timings["vision"] -= timings.get("scoring", 0.0)
        return Encoded(visual, newline, timings)

    @torch.inference_mode()
    def prepare(self, video: torch.Tensor | Encoded, compressor: Compressor, ids: list[int]) -> Prompt:
        """Vision encoder (unless `video` is already encoded) + the compressor's visual stage; the
        LLM's input embeddings, their positions, the video span and the measurements."""
        if not isinstance(video, Encoded):
            video = self.encode_video(video, compressor.needs)
        visual, newline = video.visual, video.newline
        run = VideoPass(vision_cached=video.cached)
        run.timings["vision"] = video.timings.get("vision", 0.0)
        run.timings["compressor"] = video.timings.get("scoring", 0.0)
        full = visual.features.shape[0] * visual.features.shape[1]
        tokens = visual.features.flatten(0, 1)
        if compressor.has("visual"):
            with self.stopwatch("compressor", run.timings):
                tokens = compressor.compress(visual)
        embeds, positions, span = self.embed(ids, tokens, newline, full)
        run.video_tokens_in, run.video_tokens_out = full, span[1] - span[0]
        run.text_tokens = len(ids)  # the placeholder becomes the newline token
        return Prompt(embeds, positions, span, run, getattr(tokens, "groups", None))

    def prefill(self, prompt: Prompt, compressor: Compressor, use_cache: bool, logits_to_keep: int = 0):
        """The LLM prefill through the shared driver, with the compressor's prefill policy if any."""
        llm = self.llm
        policy = compressor.prefill_policy(llm.shape) if compressor.has("prefill") else None
        out = decoder.prefill(llm, prompt.embeds, prompt.positions, prompt.span, policy,
                              use_cache=use_cache, logits_to_keep=logits_to_keep,
                              timer=lambda: self.stopwatch("compressor", prompt.run.timings),
                              video_groups=prompt.groups)
        prompt.run.layer_video_tokens = out.layer_video_tokens
        prompt.run.layer_mlp_video_tokens = out.layer_mlp_video_tokens
        prompt.run.video_tokens_out = first_pruned(out.layer_video_tokens)
        return out

    @torch.inference_mode()
    def generate(self, video, question: str, compressor: Compressor, max_new_tokens: int,
                 until: list[str] = ()):
        """Greedy answer to `question` about the video; returns (text, VideoPass).

        Timings: vision, compressor, prefill, decode, and ttft (from the call to the first token,
        the vision encoder included unless the video came encoded)."""
        ttft = {}
        with self.stopwatch("ttft", ttft):
            ids, _ = self.prompt_ids(question)
            prompt = self.prepare(video, compressor, ids)
            run, llm = prompt.run, self.llm
            with self.stopwatch("prefill", run.timings):
                out = self.prefill(prompt, compressor, use_cache=True, logits_to_keep=1)
                next_id = out.logits[0, -1].argmax()
        run.timings["ttft"] = ttft["ttft"]
        policy = compressor.decode_policy(llm.shape) if compressor.has("decode") else None
        generated = []
        with self.stopwatch("decode", run.timings):
            for _ in range(max_new_tokens):
                token = int(next_id)
                if token in self.stop_ids:
                    break
                generated.append(token)
                if len(generated) == max_new_tokens or _stops(self.tokenizer.decode(generated), until):
                    break
                logits = decoder.decode(llm, out.state, next_id.view(1, 1), policy,
                                        timer=lambda: self.stopwatch("compressor", run.timings))
                run.decode_steps += 1
                next_id = logits[0, -1].argmax()
        run.decode_video_visible = [float(v) for v in out.state.decode_video_visible]
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        for stop in until:
            if stop and stop in text:
                text = text.split(stop)[0]
        return text, run

    @torch.inference_mode()
    def loglikelihood(self, video, question: str, answer: str, compressor: Compressor):
        """(sum log p(answer | prompt), whether greedy decoding gives the answer, VideoPass)."""
        ttft = {}
        with self.stopwatch("ttft", ttft):
            ids, n_answer = self.prompt_ids(question, answer)
            prompt = self.prepare(video, compressor, ids)
            with self.stopwatch("prefill", prompt.run.timings):
                logits = self.prefill(prompt, compressor, use_cache=False).logits[0].float()
        prompt.run.timings["ttft"] = ttft["ttft"]
        targets = torch.tensor(ids[-n_answer:], device=logits.device)
        rows = logits[-n_answer - 1:-1].log_softmax(-1)
        logprob = rows.gather(1, targets[:, None]).sum().item()
        greedy = bool((rows.argmax(-1) == targets).all())
        prompt.run.timings.setdefault("decode", 0.0)
        return logprob, greedy, prompt.run


def random_weights(directory: Path, seed: int, dtype: torch.dtype, device: torch.device,
                   attn_implementation: str):
    """The model of `directory`'s config with seeded random weights (the model's own initialiser),
    built directly on `device` in `dtype`: no full-size float32 copy and nothing read from disk."""
    from transformers import AutoConfig, LlavaOnevisionForConditionalGeneration

    config = AutoConfig.from_pretrained(directory)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaOnevisionForConditionalGeneration._from_config(
                config, dtype=dtype, attn_implementation=attn_implementation)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


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


def _stops(text: str, until) -> bool:
    return any(stop and stop in text for stop in until)
