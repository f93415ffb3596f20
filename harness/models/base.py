"""The model-adapter interface: what the runner, the compressors, the feature cache, the bench and
the FLOPs/retention accounting need from a video LLM, and the flow every family shares.

A family (harness/models/<family>.py) subclasses `VideoLLM` and supplies:

- `family`, `model_class` (the transformers class), `provides` (which of methods.core.base.VISUAL_NEEDS
  its vision side can compute); for random weights `config_from_arch` (its config from conf/model
  `arch`), `OFFLINE_PREPROCESSOR`, and the offline tokenizer's `OFFLINE_SPECIAL_TOKENS` and
  `OFFLINE_CHAT_TEMPLATE`;
- `load_video(path, frames)`: the video read and preprocessed as its processor would (the frame
  sampling of lmms_eval's model for this family), and `video_tokens(path, frames)`: how many video
  tokens that video becomes, without encoding it;
- `encode(pixels, needs, timings) -> Encoded`: the vision side, (F', N, D) tokens on an (h, w) grid
  per token frame, plus what the prompt needs besides them (`Encoded.extras`);
- `embed_video(ids, tokens, encoded, full)`: prompt embeddings with the video span placed, and the
  position ids the family's decoder takes (1-D, or (3, 1, T) for M-RoPE), and optionally a fourth
  value, {"video_mask", "deepstack"} (Prompt: text between frames, DeepStack features; Qwen3-VL);
  `tokens_after_video`, the tokens it puts in the placeholder's place besides the video tokens
  (OneVision's newline);
- `llm`: the narrow decoder handle of methods.core.decoder (prefill and decode run there, shared);
- `vision_flops(frames, grid)`: analytic FLOPs of its vision encoder on a video of that many token
  frames of an (h, w) token grid (`encoder=`: an encoder-stage method acting inside it, for a family
  that runs that stage);
- `stages`: the method stages (methods.core.base.STAGES) it runs: "encoder" only where `encode` runs
  the vision encoder's layers itself with an encoder-stage method's policy (the needs' EncoderStage),
  which then also gives `uncompressed_tokens`, the F'*N tokens the video makes without it, and
  `vision_shape` (methods.core.flops.VisionShape), the encoder the method plans for.

Everything else (prepare, prefill, generate, loglikelihood, prompts, timings, fingerprints) is
here, once. Adding a family is one adapter file plus one conf/model YAML (README, "Adding a model
family").
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import torch

from harness.timing import Stopwatch
from methods.core import decoder
from methods.core.base import Compressor, VideoTokens, VisualInput, encoder_stage, vision_needs
from methods.core.decoder import LLM
from methods.core.flops import LLMShape, first_pruned


class ModelLoadError(RuntimeError):
    pass


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":  # one GPU per process in data-parallel runs
        from harness.run.distributed import local_rank

        return torch.device(f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
    from huggingface_hub import HfApi, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(path, "config.json"), str):
        return
    where = (f"model.path={path}: not a local directory and not in the Hugging Face cache "
             f"({os.environ.get('HF_HOME', '~/.cache/huggingface')})")
    advice = (f"; download it on a connected machine (hf download {path}) and give model.path=<its directory>, "
              "or run its architecture with random weights: model.random_init=true")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false"):
        raise ModelLoadError(where + ", and HF_HUB_OFFLINE=1 forbids downloading it" + advice)
    try:  # one request, before transformers' download retries (a minute of them offline)
        HfApi().model_info(path, timeout=10)
    except Exception as err:  # noqa: BLE001  (no network, no such repository, no access: all one line)
        raise ModelLoadError(f"{where}, and the hub cannot give it ({type(err).__name__}: "
                             f"{(str(err).splitlines() or [''])[0][:120]})" + advice) from None


def model_fingerprint(directory: Path, dtype: str, device: torch.device) -> str:
    """Identifies the weights and numerics that produced a feature: config, weight files, dtype."""
    h = hashlib.sha1((directory / "config.json").read_bytes())
    marker = directory / "RANDOM_WEIGHTS.json"  # random weights: their seed and architecture
    if marker.is_file():
        h.update(marker.read_bytes())
    for f in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(f"{dtype}:{device.type}".encode())
    return h.hexdigest()


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def preprocessor_config(directory: Path) -> tuple[Path, dict]:
    """video_preprocessor_config.json (else preprocessor_config.json) of a model directory."""
    path = directory / "video_preprocessor_config.json"
    if not path.is_file():
        path = directory / "preprocessor_config.json"
    return path, read_json(path) or {}


@dataclass
class VideoPass:
    """Everything measured while answering one prompt about one video."""

    video_tokens_in: int = 0  # F'*N tokens produced by the vision side
    video_tokens_out: int = 0  # tokens the LLM's first pruned layer sees
    text_tokens: int = 0  # prompt tokens that are not video tokens (newline included)
    frames: int = 0  # token frames F' of the video (Qwen2.5-VL: temporal patches of 2 frames)
    grid: tuple[int, int] = (0, 0)  # (h, w) token grid of a frame: N = h*w tokens per token frame
    layer_video_tokens: list[int] = field(default_factory=list)  # video tokens per LLM layer's attention
    layer_mlp_video_tokens: list[int] = field(default_factory=list)  # ... per layer's MLP (fewer only
    # where a method acts between a layer's attention and its MLP)
    decode_video_visible: list[float] = field(default_factory=list)  # per decode step, share of the
    # cached video entries a decode policy let later layers attend to
    timings: dict = field(default_factory=dict)  # seconds: vision, compressor, prefill, decode, ttft
    decode_steps: int = 0  # generated tokens fed back through the LLM
    vision_cached: bool = False  # features came from the feature cache (vision time is 0)

    @property
    def frame_tokens(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass
class Prompt:
    """One prompt ready for the LLM: embeddings, position ids, where the video tokens are."""

    embeds: torch.Tensor  # (1, T, D)
    positions: torch.Tensor  # (1, T), or (3, 1, T) for M-RoPE
    span: tuple[int, int]  # video tokens at [start, end)
    run: VideoPass
    groups: torch.Tensor | None = None  # a group id per video token, from the visual stage
    video_index: torch.Tensor | None = None  # (V,) index of each video token in the F'*N input
    # a family with text between frames (Qwen3-VL's timestamps) marks its video tokens in the span,
    # (end - start,) bool; one with DeepStack gives the (V, D) features of each level (decoder.prefill)
    video_mask: torch.Tensor | None = None
    deepstack: list | None = None


@dataclass
class Encoded:
    """A video after the vision side: its tokens, what the prompt needs besides them (`extras`:
    OneVision's newline token; Qwen2.5-VL's temporal position step), what producing them took."""

    visual: VisualInput
    extras: dict  # name -> tensor, family-specific (saved with the features by the feature cache)
    timings: dict  # seconds: vision, scoring (patch attention, if computed)
    cached: bool = False


def video_index(tokens) -> torch.Tensor:
    """(M,) index in the F'*N input of each token a visual stage returned: its kept positions
    (VideoTokens), else 0..M-1 (tokens at consecutive positions)."""
    if isinstance(tokens, VideoTokens):
        return tokens.positions
    return torch.arange(tokens.shape[0], device=tokens.device)


class VideoLLM(ABC):
    """A video LLM behind the harness: a family subclasses it (see the module docstring) and must
    supply every abstract method below (a family that misses one cannot be instantiated)."""

    family: ClassVar[str]
    model_class: ClassVar[str]  # the transformers class name
    provides: ClassVar[frozenset[str]] = frozenset()  # VISUAL_NEEDS its vision side computes
    stages: ClassVar[frozenset[str]] = frozenset({"visual", "prefill", "decode"})  # the method stages it runs
    tokens_after_video: ClassVar[int] = 0  # tokens the prompt gets after the video tokens, in the
    # placeholder's place (OneVision: its newline)

    def __init__(self, path: str, *, dtype: str = "float32", device: str = "auto",
                 attn_implementation: str = "sdpa"):
        import transformers
        from transformers import AutoTokenizer

        from harness.models.random_weights import random_seed, random_weights

        check_model_path(path)
        if dtype not in DTYPES:
            raise ModelLoadError(f"model.dtype={dtype}: expected one of {', '.join(DTYPES)}")
        self.device = resolve_device(device)
        directory = Path(path).expanduser()
        model_type = (read_json(directory / "config.json") or {}).get("model_type")
        expected = getattr(transformers, self.model_class).config_class.model_type
        if model_type is not None and model_type != expected:
            raise ModelLoadError(f"model.path={path}: its config.json has model_type {model_type!r}; "
                                 f"the {self.family} adapter expects {expected!r} (model.family)")
        cls = getattr(transformers, self.model_class)
        seed = random_seed(directory)
        if seed is None:
            self.model = cls.from_pretrained(path, dtype=DTYPES[dtype],
                                             attn_implementation=attn_implementation).to(self.device).eval()
        else:  # a random-weight architecture: initialised here, in place, in the target dtype
            self.model = random_weights(cls, directory, seed, DTYPES[dtype], self.device, attn_implementation)
        self.random_weights = seed is not None
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if not directory.is_dir():  # a hub id: read the small files from the local cache
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(path, allow_patterns=["*.json", "*.jinja"]))
        self.directory = directory
        self.config = self.model.config
        self.chat_template = self._chat_template(directory)
        self.video_token_id = self.config.video_token_id
        self.stop_ids = {i for i in (self.tokenizer.eos_token_id, self.config.text_config.eos_token_id)
                         if i is not None}
        self.stopwatch = Stopwatch(self.device)
        self.fingerprint = model_fingerprint(directory, dtype, self.device)

    # what random weights are built with (harness/models/random_weights.py)
    OFFLINE_SPECIAL_TOKENS: ClassVar[list[str]]  # ChatML's and the family's media tokens
    OFFLINE_CHAT_TEMPLATE: ClassVar[str]
    OFFLINE_PREPROCESSOR: ClassVar[dict]  # the preprocessor_config.json written with them

    @classmethod
    def offline_tokenizer(cls):
        """The byte-level tokenizer of the family's embedded and random-weight models (ChatML)."""
        from harness.models.tokenizer import chat_tokenizer

        return chat_tokenizer(cls.OFFLINE_SPECIAL_TOKENS, eos="<|im_end|>", pad="<|endoftext|>",
                              chat_template=cls.OFFLINE_CHAT_TEMPLATE)

    # ---- what a family supplies -------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def config_from_arch(cls, arch: dict, tokenizer):
        """The transformers config of `arch` (conf/model `arch`), with `tokenizer`'s special ids."""

    @abstractmethod
    def load_video(self, path: str, frames: int):
        """The encoder's input for the video at `path`, `frames` frames sampled (harness.data.video)."""

    @abstractmethod
    def video_tokens(self, path: str, frames: int) -> int:
        """F'*N: the video tokens that video becomes, without encoding it."""

    @abstractmethod
    def encode(self, pixels, needs: frozenset = frozenset(), timings: dict | None = None) -> Encoded:
        """The vision side on `pixels`: F' x N x D tokens on their grid, plus the `needs` it provides."""

    @abstractmethod
    def embed_video(self, ids: list[int], tokens, encoded: Encoded, full_video: int):
        """(embeds (1, T, D), positions, (start, end) of the video tokens) for prompt `ids`."""

    @property
    @abstractmethod
    def llm(self) -> LLM:
        """The decoder handle methods/core/decoder.py drives (embeddings, layers, rotary, norm, head)."""

    @abstractmethod
    def vision_flops(self, frames: int, grid: tuple[int, int], encoder: Compressor | None = None) -> float:
        """Analytic FLOPs of the vision encoder for `frames` frames giving a `grid` of tokens each
        (`encoder`, an encoder-stage method acting inside it, is given only to a family whose
        `stages` include "encoder")."""

    def uncompressed_tokens(self, visual: VisualInput) -> int:
        """F'*N: the video tokens of these features without compression (a family with an encoder stage
        says how many the encoder would have made without it)."""
        return visual.features.shape[0] * visual.features.shape[1]

    # ---- shared ---------------------------------------------------------------------------------
    @property
    def llm_shape(self) -> LLMShape:
        return LLMShape.of(self.config.text_config)

    def _chat_template(self, directory: Path) -> str:
        processor = read_json(directory / "chat_template.json")
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

    def question_embeddings(self, question: str) -> torch.Tensor:
        """(q, D) the LLM's input embeddings of the question's own tokens (no chat template)."""
        ids = self.tokenizer(question, add_special_tokens=False).input_ids
        return self.model.get_input_embeddings()(torch.tensor(ids, device=self.device))

    def text_tokens(self, ids: list[int], video=None) -> int:
        """The prompt's tokens other than video tokens once its placeholder is replaced (by `video`'s
        tokens: a family that puts text between frames, Qwen3-VL's timestamps, counts it from it)."""
        return len(ids) - 1 + self.tokens_after_video

    @torch.inference_mode()
    def encode_video(self, pixels, needs: frozenset = frozenset()) -> Encoded:
        """The timed vision side of one video (and what `needs` asks for)."""
        needs = vision_needs(needs)  # the question is the prompt's, not the encoder's
        missing = {n for n in needs if isinstance(n, str)} - self.provides
        if missing:
            raise ValueError(f"the {self.family} vision side does not compute {', '.join(sorted(missing))}")
        encoder = encoder_stage(needs)
        if encoder is not None and "encoder" not in self.stages:
            raise ValueError(f"{encoder.name} acts inside the vision encoder, which the {self.family} adapter "
                             "does not run layer by layer: it is not defined for this family")
        timings = {}
        with self.stopwatch("vision", timings):
            encoded = self.encode(pixels, needs, timings)
        # scoring patches is the compressor's work, even though it runs inside the encoder
        timings["vision"] -= timings.get("scoring", 0.0)
        encoded.timings = timings
        return encoded

    @torch.inference_mode()
    def compress(self, video, compressor: Compressor, question: str | None = None) -> "Compressed":
        """Vision encoder (unless `video` is already `Encoded`) and the compressor's visual stage:
        what every question about the video shares, unless the visual stage reads the question
        (`needs` "question": then `question` is given and its token embeddings reach the stage)."""
        if isinstance(video, Compressed):
            return video
        if not isinstance(video, Encoded):
            video = self.encode_video(video, compressor.needs)
        visual = video.visual
        if "question" in compressor.needs:
            if question is None:
                raise ValueError(f"{compressor.title} reads the question at its visual stage: give it")
            visual = replace(visual, question=self.question_embeddings(question))
        timings = {"vision": video.timings.get("vision", 0.0), "compressor": video.timings.get("scoring", 0.0)}
        full = self.uncompressed_tokens(visual)
        if compressor.has("visual"):
            with self.stopwatch("compressor", timings):
                tokens = compressor.compress(visual)
        elif visual.features.shape[0] * visual.features.shape[1] != full:  # merged in the encoder:
            tokens = visual.features.flatten(0, 1)  # at consecutive positions
        else:  # every token at its own position
            tokens = VideoTokens(visual.features.flatten(0, 1), torch.arange(full, device=visual.features.device))
        return Compressed(video, tokens, full, timings)

    def prompt(self, compressed: "Compressed", ids: list[int]) -> Prompt:
        """The LLM's input embeddings for prompt `ids` around a compressed video, their positions, the
        video span and the run's measurements so far."""
        visual = compressed.encoded.visual
        run = VideoPass(vision_cached=compressed.encoded.cached, frames=visual.features.shape[0],
                        grid=tuple(visual.grid), timings=dict(compressed.timings))
        embeds, positions, span, *layout = self.embed_video(ids, compressed.tokens, compressed.encoded,
                                                            compressed.full)
        layout = layout[0] if layout else {}  # a family's video_mask and deepstack (Prompt)
        mask = layout.get("video_mask")
        run.video_tokens_in = compressed.full
        run.video_tokens_out = span[1] - span[0] if mask is None else int(mask.sum())
        run.text_tokens = embeds.shape[1] - run.video_tokens_out
        return Prompt(embeds, positions, span, run, getattr(compressed.tokens, "groups", None),
                      video_index(compressed.tokens).to(self.device), mask, layout.get("deepstack"))

    def prepare(self, video, compressor: Compressor, ids: list[int]) -> Prompt:
        """`compress` then `prompt`."""
        return self.prompt(self.compress(video, compressor), ids)

    def prefill(self, prompt: Prompt, compressor: Compressor, use_cache: bool, logits_to_keep: int = 0):
        """The LLM prefill through the shared driver, with the compressor's prefill policy if any."""
        llm = self.llm
        policy = compressor.prefill_policy(llm.shape) if compressor.has("prefill") else None
        out = decoder.prefill(llm, prompt.embeds, prompt.positions, prompt.span, policy,
                              use_cache=use_cache, logits_to_keep=logits_to_keep,
                              timer=lambda: self.stopwatch("compressor", prompt.run.timings),
                              video_groups=prompt.groups, video_index=prompt.video_index,
                              frame_tokens=prompt.run.frame_tokens, grid=prompt.run.grid,
                              video_mask=prompt.video_mask, deepstack=prompt.deepstack)
        prompt.run.layer_video_tokens = out.layer_video_tokens
        prompt.run.layer_mlp_video_tokens = out.layer_mlp_video_tokens
        prompt.run.video_tokens_out = first_pruned(out.layer_video_tokens)
        return out

    # ---- a prefix shared by every question about one video --------------------------------------
    def prefix_length(self, prompt: Prompt) -> int:
        """Prompt entries up to the end of the video tokens (and what the family puts right after
        them in the placeholder's place): the part no question changes."""
        return prompt.span[1] + self.tokens_after_video

    @torch.inference_mode()
    def shared_prefix(self, compressed: "Compressed", compressor: Compressor, ids: list[int]) -> "SharedPrefix":
        """The KV cache of [head text + video tokens] of prompt `ids`, computed once; every question
        whose prompt starts with the same head continues from it (`generate`/`loglikelihood` with
        `prefix=`). Only for a compressor whose work up to the end of the video does not read the
        question (`Compressor.shares_prefix`)."""
        if not compressor.shares_prefix:
            raise ValueError(f"{compressor.title}'s prefill reads the question: its prefix cannot be shared")
        prompt = self.prompt(compressed, ids)
        length = self.prefix_length(prompt)
        head = Prompt(prompt.embeds[:, :length], prompt.positions[..., :length], prompt.span, prompt.run,
                      prompt.groups, prompt.video_index, prompt.video_mask, prompt.deepstack)
        timings: dict = {}
        with self.stopwatch("prefill", timings):  # a query-free prefill policy acts here, once
            out = self.prefill(head, compressor, use_cache=True, logits_to_keep=1)
        return SharedPrefix(out.state, out.state.mark(), length, ids[:ids.index(self.video_token_id)],
                            timings["prefill"], head.run.layer_video_tokens, head.run.layer_mlp_video_tokens)

    def _continue(self, prefix: "SharedPrefix", prompt: Prompt, logits_to_keep: int):
        """The rest of `prompt` after the shared prefix, on its cache: (logits, state)."""
        llm = self.llm
        logits = decoder.extend(llm, prefix.state, prompt.embeds[:, prefix.length:],
                                prompt.positions[..., prefix.length:], logits_to_keep=logits_to_keep)
        prompt.run.layer_video_tokens = list(prefix.layer_video_tokens)
        prompt.run.layer_mlp_video_tokens = list(prefix.layer_mlp_video_tokens)
        prompt.run.video_tokens_out = first_pruned(prefix.layer_video_tokens)
        return logits, prefix.state

    def _prefix_for(self, prefix: "SharedPrefix | None", ids: list[int]) -> "SharedPrefix | None":
        """`prefix` if prompt `ids` starts with its head, else None (then the whole prompt is run)."""
        if prefix is None or ids[:ids.index(self.video_token_id)] != prefix.head:
            return None
        return prefix

    # ---- answering -------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, video, question: str, compressor: Compressor, max_new_tokens: int,
                 until: list[str] = (), prefix: "SharedPrefix | None" = None):
        """Greedy answer to `question` about the video (pixels, `Encoded` or `Compressed`); returns
        (text, VideoPass). With `prefix` (from `shared_prefix` of the same compressed video) only
        the question's part of the prompt is prefilled; the cache is rewound after the answer.

        Timings: vision, compressor, prefill, decode, and ttft (vision + compressor + prefill + the
        prompt's assembly: the time to the first token of this question)."""
        compressed = self.compress(video, compressor, question)
        ids, _ = self.prompt_ids(question)
        prefix = self._prefix_for(prefix, ids)
        before = compressed.timings["vision"] + compressed.timings["compressor"]
        assembly = {}
        with self.stopwatch("assembly", assembly):
            prompt = self.prompt(compressed, ids)
            run, llm = prompt.run, self.llm
            with self.stopwatch("prefill", run.timings):
                if prefix is not None:
                    logits, state = self._continue(prefix, prompt, logits_to_keep=1)
                else:
                    out = self.prefill(prompt, compressor, use_cache=True, logits_to_keep=1)
                    logits, state = out.logits, out.state
                next_id = logits[0, -1].argmax()
        run.timings["ttft"] = before + assembly["assembly"]
        policy = compressor.decode_policy(llm.shape) if compressor.has("decode") else None
        stops = StopStrings(self.tokenizer, until)
        generated = []
        try:
            with self.stopwatch("decode", run.timings):
                for _ in range(max_new_tokens):
                    token = int(next_id)
                    if token in self.stop_ids:
                        break
                    generated.append(token)
                    if len(generated) == max_new_tokens or stops.reached(generated):
                        break
                    logits = decoder.decode(llm, state, next_id.view(1, 1), policy,
                                            timer=lambda: self.stopwatch("compressor", run.timings))
                    run.decode_steps += 1
                    next_id = logits[0, -1].argmax()
            run.decode_video_visible = [float(v) for v in state.decode_video_visible]
        finally:
            if prefix is not None:
                prefix.state.rewind(prefix.mark)
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        for stop in until:
            if stop and stop in text:
                text = text.split(stop)[0]
        return text, run

    @torch.inference_mode()
    def loglikelihood(self, video, question: str, answer: str, compressor: Compressor,
                      prefix: "SharedPrefix | None" = None):
        """(sum log p(answer | prompt), whether greedy decoding gives the answer, VideoPass)."""
        compressed = self.compress(video, compressor, question)
        ids, n_answer = self.prompt_ids(question, answer)
        prefix = self._prefix_for(prefix, ids)
        before = compressed.timings["vision"] + compressed.timings["compressor"]
        assembly = {}
        with self.stopwatch("assembly", assembly):
            prompt = self.prompt(compressed, ids)
            with self.stopwatch("prefill", prompt.run.timings):
                if prefix is not None:
                    try:
                        logits = self._continue(prefix, prompt, logits_to_keep=n_answer + 1)[0][0].float()
                    finally:
                        prefix.state.rewind(prefix.mark)
                else:
                    logits = self.prefill(prompt, compressor, use_cache=False).logits[0].float()
        run = prompt.run
        run.timings["ttft"] = before + assembly["assembly"]
        targets = torch.tensor(ids[-n_answer:], device=logits.device)
        rows = logits[-n_answer - 1:-1].log_softmax(-1)
        logprob = rows.gather(1, targets[:, None]).sum().item()
        greedy = bool((rows.argmax(-1) == targets).all())
        run.timings.setdefault("decode", 0.0)
        return logprob, greedy, run


@dataclass
class Compressed:
    """A video after the vision side and the compressor's visual stage (`VideoLLM.compress`)."""

    encoded: Encoded
    tokens: torch.Tensor | VideoTokens  # what enters the LLM
    full: int  # F'*N: the video tokens without compression
    timings: dict  # seconds: vision, compressor (the visual stage and patch scoring)


@dataclass
class SharedPrefix:
    """The cached [head text + video tokens] of one compressed video (`VideoLLM.shared_prefix`)."""

    state: decoder.DecoderState
    mark: decoder.StateMark  # the state right after the prefix, rewound to after each question
    length: int  # prompt entries in the prefix
    head: list[int]  # the prompt ids before the video it was built with
    seconds: float  # its prefill time
    layer_video_tokens: list[int]  # what its prefill's layers saw (a query-free policy may prune)
    layer_mlp_video_tokens: list[int]


class StopStrings:
    """Whether generated text has reached a stop string, decoding only the newest tokens at each
    step (a stop string that ends at the newest token lies within its last 4 bytes per character,
    and a byte-level token is at least one byte), not the whole answer again."""

    def __init__(self, tokenizer, until):
        self.tokenizer = tokenizer
        self.until = [u for u in until if u]
        self.window = 4 * max((len(u) for u in self.until), default=0) + 8

    def reached(self, generated: list[int]) -> bool:
        if not self.until:
            return False
        tail = self.tokenizer.decode(generated[-self.window:])
        return any(stop in tail for stop in self.until)
