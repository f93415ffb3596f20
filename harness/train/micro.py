"""The micro LLaVA-OneVision: the real architecture, trained here on the synthetic task's train split.

Built on first use by the runner (harness.models.prepare), or alone by
`python -m harness.train_micro [model.train.seed=1 ...]` (harness/train_micro.py).

SigLIP encoder (14-px patches) -> 2-layer projector -> 2x2 bilinear pooling -> Qwen2 decoder, with
widths, depths and the input size (224 px, so 8x8 tokens per frame) from conf/model/micro.yaml
(`arch`); the recipe (`train`) is there too. It trains in two stages, as LLaVA does (a vision side
first, then the language model on instructions):

1. vision: the encoder and projector learn, on single frames full of squares of the task's colours
   (a stand-in for LLaVA's pretrained encoder, minutes instead of months), to say per pooled token
   what the frame shows there (the share of each colour under it, as soft targets), where the
   token sits (row, column) and the texture under it (the frame minus its flat class colours, in
   2x2 sub-blocks per channel), through probes that are thrown away afterwards. The texture probe
   reads the unit token through unit-norm weights times a fixed `texture` scale, so the texture has
   to be in the token's direction, which every cosine similarity sees, not in a small-norm corner
   a linear probe could read; Wang & Isola's uniformity loss on the unit tokens (weight
   `uniformity`; "Understanding Contrastive Representation Learning through Alignment and
   Uniformity on the Hypersphere", ICML 2020) spreads them over the sphere as contrastive
   pretraining spreads a real encoder's. Without the two, neighbouring background tokens and one
   place in consecutive frames had cosines of 0.999+ and similarity thresholds acted in a regime
   real checkpoints never produce. SigLIP's learnt position embeddings start from 2-D sine-cosine
   values (as MAE initialises a ViT's), so the position probes learn in tens of steps rather than
   thousands.
2. language: the encoder and the projector are frozen, so the video tokens every compressor sees
   are the vision stage's (trained on in this stage, the projector drifted back to tokens with
   cosines near 1 and, on this task, the direction stayed at chance); image_newline and the
   decoder (its queries and keys start at std 1/sqrt(width)) learn to answer the four
   question kinds, the loss on the answer letter and the <|im_end|> after it. Every clip is asked
   all four questions in one forward pass: the questions follow the shared prompt-and-video prefix
   side by side, each attending to the prefix and to itself only, at the positions it would have
   alone (a block mask), which is the same computation as four separate prompts (tested). A
   curriculum (`stages`) starts on few frames and larger objects (short sequences where the
   evidence is a larger share of the tokens; a clip's sampled frames then always include a flash
   frame) and ends on the task's own clips at the frame count the model is evaluated with, sampled
   as the harness samples them. Each stage warms up and decays (cosine) from its own learning rate:
   with one schedule over all stages the last, longest-sequence stage ran at the schedule's tail and
   barely moved the weights, and whether the model then generalised from 2 to 8 frames depended on
   the machine's floating-point rounding (87.9 % on one CPU, 99 % on another).

The tokenizer is byte-level BPE whose merges are learnt from the task's prompt texts (as a real
checkpoint's BPE is learnt from its corpus), so a question is ~35 tokens instead of ~120 bytes;
any other text still tokenizes, byte by byte.

Everything is seeded (`train.seed`); the model directory is keyed by the recipe and the
architecture (model.path + "-<key>") and rebuilt when either changes. It is saved with
`save_pretrained` and loaded by the harness through the same `from_pretrained` path as a real
checkpoint. Training prints one progress bar per stage with its loss and, after each stage, the
accuracy per kind on a held-out validation set (not the test split).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf

from harness.data import synthetic as synth
from harness.data.video import uniform_indices
from harness.files import atomic_directory, digest
from harness.models.model_dir import write_model_dir

MARKER = "MICRO_MODEL.json"
VERSION = 7  # bump when the training code changes what a recipe produces
VALIDATION_CLIPS = 64


SHIPPED = Path(__file__).resolve().parent / "weights" / "micro"  # the weights the repository ships


class ShippedWeightsError(RuntimeError):
    """The shipped micro model's files do not match their recorded checksum."""


def recipe_key(arch: dict, recipe: dict) -> str:
    """What identifies a micro model: its architecture, its recipe and this trainer's version."""
    return digest({"arch": arch, "train": recipe, "version": VERSION})[:10]


def model_dir(path: str | Path, arch: dict, recipe: dict) -> Path:
    """Where the micro model of this architecture and recipe is built: `path` (model.path) with its
    recipe key appended, so another recipe is another directory."""
    path = Path(path)
    return path.with_name(f"{path.name}-{recipe_key(arch, recipe)}")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shipped(arch: dict, recipe: dict) -> Path | None:
    """The shipped model's directory when it was trained by this architecture and recipe (its
    MICRO_MODEL.json says so, and its weights match the checksum recorded there), else None."""
    marker = SHIPPED / MARKER
    if not marker.is_file():
        return None
    stamp = json.loads(marker.read_text())
    if stamp.get("key") != recipe_key(arch, recipe):
        return None
    weights = SHIPPED / "model.safetensors"
    if not weights.is_file() or sha256(weights) != stamp.get("sha256"):
        raise ShippedWeightsError(f"{weights} does not match the checksum in {marker}: the checkout is "
                                  "damaged (restore it with git) or rebuild with python -m harness.train_micro")
    return SHIPPED


def is_built(path: str | Path, arch: dict, recipe: dict) -> bool:
    """Whether the model of this architecture and recipe is shipped or already built."""
    return shipped(arch, recipe) is not None or (model_dir(path, arch, recipe) / MARKER).is_file()


def build_micro_model(path: str | Path, arch: dict, recipe: dict, progress: bool = True,
                      use_shipped: bool = True) -> Path:
    """The trained micro model's directory: the shipped one when it was trained by this recipe (and
    `use_shipped`), else the one built under `model_dir` (trained now, minutes on a CPU, written
    atomically with its marker last, then reused)."""
    if use_shipped and (found := shipped(arch, recipe)) is not None:
        return found
    directory = model_dir(path, arch, recipe)
    if (directory / MARKER).is_file():
        return directory
    started = time.perf_counter()
    model, tokenizer, report = train(arch, recipe, progress=progress)
    return write_model_dir(directory, weights=model, tokenizer=tokenizer, preprocessor=preprocessor(arch),
                           marker=MARKER, stamp={
        "what": "micro LLaVA-OneVision trained on the synthetic task's train split (harness.train_micro)",
        "key": recipe_key(arch, recipe), "arch": arch, "train": recipe, "version": VERSION,
        "seconds": round(time.perf_counter() - started, 1), "validation": report})


def ship(directory: Path) -> Path:
    """Copy a built micro model into the repository (SHIPPED), its weights' checksum recorded."""
    stamp = json.loads((directory / MARKER).read_text())
    with atomic_directory(SHIPPED) as tmp:
        for f in directory.iterdir():
            if f.name != MARKER:
                shutil.copy2(f, tmp / f.name)
        stamp["sha256"] = sha256(tmp / "model.safetensors")
        (tmp / MARKER).write_text(json.dumps(stamp, indent=1))
        shutil.rmtree(SHIPPED, ignore_errors=True)
    return SHIPPED


def preprocessor(arch: dict) -> dict:
    """SigLIP's preprocessing as the llava-hf checkpoints ship it, at the architecture's input size."""
    from harness.models.llava_onevision import LlavaOneVision

    size = int(arch["vision_config"].get("image_size", 384))
    return {**LlavaOneVision.OFFLINE_PREPROCESSOR, "size": {"height": size, "width": size}}


def check_recipe(recipe: dict) -> None:
    """A ValueError naming the first field of `recipe` (model.train) that is missing or out of range."""
    def need(where: str, value, kind, low):
        if isinstance(value, bool) or not isinstance(value, kind) or value < low:
            raise ValueError(f"model.train.{where}={value!r}: expected {'an integer' if kind is int else 'a number'} >= {low}")

    def sides(where: str, value):
        if value is None:
            return
        if not isinstance(value, dict) or set(value) - set(synth.SIDES):
            raise ValueError(f"model.train.{where}={value!r}: expected a mapping of some of {sorted(synth.SIDES)}")
        for key, side in value.items():
            for one in side if isinstance(side, list) and side else [side]:
                need(f"{where}.{key}", one, int, 1)
                if one > 3:
                    raise ValueError(f"model.train.{where}.{key}={side}: expected sides of at most 3 cells")

    try:
        need("seed", recipe["seed"], int, 0)
        need("frames", recipe["frames"], int, 1)
        vision, language = recipe["vision"], recipe["language"]
        for key in ("steps", "batch", "warmup"):
            need(f"vision.{key}", vision[key], int, 1)
        need("vision.lr", vision["lr"], (int, float), 1e-12)
        need("vision.texture", vision["texture"], (int, float), 1e-12)
        need("vision.uniformity", vision["uniformity"], (int, float), 0)
        need("language.warmup", language["warmup"], int, 1)
        need("language.lr", language["lr"], (int, float), 1e-12)
        for key, value in (language.get("augment") or {}).items():
            if key not in ("drop", "min_keep", "shuffle") or isinstance(value, bool) or not isinstance(
                    value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"model.train.language.augment.{key}={value!r}: expected drop, min_keep "
                                 "or shuffle, each a number in [0, 1]")
        stages = language["stages"]
    except (KeyError, TypeError) as err:
        raise ValueError(f"model.train: missing field {err} (see conf/model/micro.yaml)") from None
    if recipe["frames"] > synth.FRAMES:
        raise ValueError(f"model.train.frames={recipe['frames']}: expected at most {synth.FRAMES}, the clips' length")
    if not isinstance(stages, list) or not stages:
        raise ValueError(f"model.train.language.stages={stages!r}: expected a non-empty list")
    for i, stage in enumerate(stages):
        for key in ("frames", "steps", "batch"):
            need(f"language.stages[{i}].{key}", stage.get(key), int, 1)
        if stage["frames"] > synth.FRAMES:
            raise ValueError(f"model.train.language.stages[{i}].frames={stage['frames']}: expected at "
                             f"most {synth.FRAMES}, the clips' length")
        sides(f"language.stages[{i}].sides", stage.get("sides"))
        if "lr" in stage:
            need(f"language.stages[{i}].lr", stage["lr"], (int, float), 1e-12)
        if "warmup" in stage:
            need(f"language.stages[{i}].warmup", stage["warmup"], int, 1)


# ---- data -------------------------------------------------------------------------------------------
EVIDENCE = [i for i, name in enumerate(synth.CLASSES) if name.split(":")[0] in ("flash", "small", "mover")]


def token_targets(labels: np.ndarray, grid: int) -> torch.Tensor:
    """(F, grid*grid, C) share of each colour class (synth.CLASSES) among the pixels under each
    pooled token, from the rendered class of every pixel."""
    onehot = nnf.one_hot(torch.from_numpy(labels).long(), len(synth.CLASSES)).float()  # (F, H, W, C)
    shares = nnf.adaptive_avg_pool2d(onehot.permute(0, 3, 1, 2), grid)  # (F, C, grid, grid)
    return shares.flatten(2).transpose(1, 2)


TEXTURE_CELLS = 2  # the texture target's sub-blocks per pooled token and side


def texture_targets(frames: np.ndarray, labels: np.ndarray, grid: int) -> torch.Tensor:
    """(F, grid*grid, 3*TEXTURE_CELLS**2) the texture under each pooled token: the frame minus the
    flat colour of each pixel's class (what is left is the background's texture and gradient, the
    lighting and the noise), averaged over TEXTURE_CELLS x TEXTURE_CELLS sub-blocks per channel,
    standardised per channel over the batch."""
    k = TEXTURE_CELLS
    residual = torch.from_numpy(frames.astype(np.float32) - synth.COLOURS[labels]).permute(0, 3, 1, 2)
    blocks = nnf.adaptive_avg_pool2d(residual, grid * k)  # (F, 3, grid*k, grid*k)
    out = blocks.view(len(frames), 3, grid, k, grid, k).permute(0, 2, 4, 1, 3, 5)
    out = out.reshape(len(frames), grid * grid, 3, k * k)  # per token: channels, then sub-blocks
    out = (out - out.mean((0, 1, 3), keepdim=True)) / out.std((0, 1, 3), keepdim=True).clamp_min(1e-6)
    return out.flatten(2)


def uniformity(tokens: torch.Tensor) -> torch.Tensor:
    """Wang & Isola's uniformity loss, log E exp(-2 |u_i - u_j|^2), over all pairs of the unit rows
    of `tokens` (..., D)."""
    units = nnf.normalize(tokens.flatten(0, -2), dim=-1)
    return torch.pdist(units).pow(2).mul(-2).exp().mean().log()


def evidence_tokens(labels: np.ndarray, grid: int) -> torch.Tensor:
    """(F, grid*grid) bool: the pooled tokens that show any of a question's objects."""
    return token_targets(labels, grid)[..., EVIDENCE].sum(-1) > 0


def _short_sample(clip: synth.Clip, count: int, rng: random.Random) -> list[int]:
    """`count` sorted frame indices spread over the clip with a random shift, one of them a flash frame
    (put in place of one of the others, never of the last: the latest frame shows how far the mover
    went, without it a short sample of an early flash leaves the direction to guess)."""
    span = synth.FRAMES - 1
    shift = rng.uniform(0, span / count)
    idx = sorted({min(span, int(shift + span * k / count)) for k in range(count)})
    start, end = clip.flash
    if not any(start <= i < end for i in idx):
        j = rng.randrange(max(1, len(idx) - 1))
        idx[j] = rng.randrange(start, end)
        idx = sorted(set(idx))
    while len(idx) < count:  # a collision above: fill with unused frames
        idx = sorted(set(idx) | {rng.choice([i for i in range(synth.FRAMES) if i not in idx])})
    return idx


# ---- the model -----------------------------------------------------------------------------------
def micro_tokenizer():
    """Byte-level BPE with merges learnt from the task's prompts and the chat template's words, and
    the special tokens of LLaVA-OneVision (harness.models.tokenizer)."""
    from harness.models.llava_onevision import CHAT_TEMPLATE, SPECIAL_TOKENS
    from harness.models.tokenizer import chat_tokenizer

    corpus = [synth.prompt_text(kind) for kind in synth.KINDS] + ["user\n", "assistant\n"]
    return chat_tokenizer(SPECIAL_TOKENS, eos="<|im_end|>", pad="<|endoftext|>", chat_template=CHAT_TEMPLATE,
                          corpus=corpus)


def sincos_positions(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) 2-D sine-cosine position values (MAE's), rows then columns."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    parts = []
    for coordinate in (ys.flatten(), xs.flatten()):
        angles = coordinate[:, None].float() * omega[None]
        parts += [angles.sin(), angles.cos()]
    out = torch.cat(parts, 1)
    return nnf.pad(out, (0, dim - out.shape[1]))


def _new_model(arch: dict, seed: int):
    from transformers import LlavaOnevisionForConditionalGeneration

    from harness.models.llava_onevision import LlavaOneVision

    tokenizer = micro_tokenizer()
    config = LlavaOneVision.config_from_arch({**arch, "text_config": {
        **arch["text_config"], "vocab_size": len(tokenizer)}}, tokenizer)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    with torch.no_grad():
        model.model.image_newline.normal_(0.0, 0.02)  # its random init is far off the embedding scale
        # queries and keys at std 1/sqrt(width) instead of Qwen2's 0.02: from 0.02 the attention
        # logits start near 0 and their gradients with them, and picking out one token of a few
        # hundred (the small square) was learnt by some seeds only, in the steps there are
        width = config.text_config.hidden_size
        for layer in model.model.language_model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.normal_(0.0, width ** -0.5)
        positions = model.model.vision_tower.embeddings.position_embedding.weight
        side = config.vision_config.image_size // config.vision_config.patch_size
        positions.copy_(sincos_positions(side, positions.shape[1]))
    return model, tokenizer


def _pixels(frames: np.ndarray, size: int) -> torch.Tensor:
    from harness.data.video import preprocess
    from harness.models.llava_onevision import LlavaOneVision

    pre = LlavaOneVision.OFFLINE_PREPROCESSOR
    return preprocess(frames, size, pre["image_mean"], pre["image_std"], pre["rescale_factor"])


class Prompts:
    """Token ids of the chat prompt around the video, once per question kind."""

    def __init__(self, tokenizer, video_token_id: int):
        from harness.models.llava_onevision import CHAT_TEMPLATE

        self.prefix, self.tails = None, {}
        for kind in synth.KINDS:
            messages = [{"role": "user", "content": [{"type": "video"},
                                                     {"type": "text", "text": synth.prompt_text(kind)}]}]
            text = tokenizer.apply_chat_template(messages, chat_template=CHAT_TEMPLATE, tokenize=False,
                                                 add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False).input_ids
            where = ids.index(video_token_id)
            self.prefix = ids[:where]  # the same for every kind
            self.tails[kind] = ids[where + 1:]
        self.letters = {letter: tokenizer.convert_tokens_to_ids(letter) for letter in synth.LETTERS}
        self.end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def answer(self, kind: str, value: str) -> list[int]:
        return [self.letters[synth.question(kind, value)[2]], self.end]


def _layout(prompts: Prompts, video: int, kinds: tuple[str, ...]):
    """Positions, the block mask and the answer slots of a prefix + video + one branch per kind
    (each branch: its prompt tail, then its two answer tokens)."""
    shared = len(prompts.prefix) + video
    positions, branches = [torch.arange(shared)], []
    cursor = shared
    for kind in kinds:
        n = len(prompts.tails[kind]) + 2
        branches.append((cursor, n))
        positions.append(torch.arange(shared, shared + n))
        cursor += n
    allowed = torch.zeros(cursor, cursor, dtype=torch.bool)
    allowed[:shared, :shared] = torch.ones(shared, shared).tril().bool()
    for start, n in branches:
        allowed[start:start + n, :shared] = True
        allowed[start:start + n, start:start + n] = torch.ones(n, n).tril().bool()
    return torch.cat(positions), allowed, branches


def language_batch(model, prompts: Prompts, clips, frame_lists, kinds=synth.KINDS, augment=None):
    """Logits at the answer slots (B * kinds * 2, V) and their targets for a batch of clips, every
    kind asked of every clip. `augment(pooled (F, N, D), evidence (F, N)) -> (M, D)` reduces the video
    tokens (the same M for the whole batch) before the newline is appended."""
    embed = model.model.language_model.embed_tokens
    size = model.config.vision_config.image_size
    with torch.no_grad():  # the vision side is frozen in this stage
        hidden = [_encoder_states(model, _pixels(c.frames[f], size)) for c, f in zip(clips, frame_lists)]
    rows, targets = [], []
    video = None
    for clip, frames, states in zip(clips, frame_lists, hidden):
        pooled = _project_and_pool(model, states)  # (F*N + 1, D)
        if augment is not None:
            tokens = pooled[:-1].view(len(frames), -1, pooled.shape[-1])
            grid = round(tokens.shape[1] ** 0.5)
            pooled = torch.cat([augment(tokens, evidence_tokens(clip.labels[frames], grid)), pooled[-1:]])
        video = pooled.shape[0]
        tails = []
        for kind in kinds:
            answer = prompts.answer(kind, clip.answers[kind])
            tails.append(torch.tensor(prompts.tails[kind] + answer))
            targets.append(torch.tensor(answer))
        rows.append(torch.cat([embed(torch.tensor(prompts.prefix)), pooled, embed(torch.cat(tails))]))
    positions, allowed, branches = _layout(prompts, video, kinds)
    hidden = model.model.language_model(
        inputs_embeds=torch.stack(rows), position_ids=positions[None].expand(len(clips), -1),
        attention_mask=allowed[None, None].expand(len(clips), 1, -1, -1)).last_hidden_state
    # the logits predicting the answer tokens sit one position before them in each branch
    slots = torch.tensor([start + n - 3 + k for start, n in branches for k in (0, 1)])
    logits = model.lm_head(hidden[:, slots])  # (B, kinds*2, V)
    return logits.flatten(0, 1), torch.cat(targets)


class Reduction:
    """The language stage's augmentation: a random reduction of the video tokens, so that the decoder
    reads where a token came from in what the token carries (its features keep the patch's position)
    and not in where it sits in the sequence, as a compressor that drops or reorders tokens needs.
    With probability `drop`, each frame keeps the same random number of its tokens (a share drawn
    from [min_keep, 1] per batch), the question objects' tokens first; with probability `shuffle`,
    each frame's tokens are then put in a random order. Frames keep their order."""

    def __init__(self, spec: dict | None, rng: random.Random):
        spec = spec or {}
        self.drop, self.min_keep, self.shuffle = spec.get("drop", 0.0), spec.get("min_keep", 1.0), spec.get("shuffle", 0.0)
        self.rng = rng

    def for_batch(self):
        """The augment function for one batch (None: this batch keeps its tokens as they are)."""
        drop, shuffle = self.rng.random() < self.drop, self.rng.random() < self.shuffle
        if not (drop or shuffle):
            return None
        share = self.rng.uniform(self.min_keep, 1.0) if drop else 1.0
        g = torch.Generator().manual_seed(self.rng.getrandbits(63))

        def augment(tokens: torch.Tensor, evidence: torch.Tensor) -> torch.Tensor:
            frames, n, _ = tokens.shape
            rows = torch.arange(frames)[:, None]
            order = torch.rand(frames, n, generator=g).argsort(-1)  # a random order, evidence first
            order = order[rows, (~evidence).gather(1, order).long().argsort(dim=-1, stable=True)]
            kept = order[:, :max(1, round(share * n))]
            if shuffle:  # a fresh random order of the kept tokens
                kept = kept[rows, torch.rand(kept.shape, generator=g).argsort(-1)]
            else:
                kept = kept.sort(-1).values
            return tokens[rows, kept].flatten(0, 1)

        return augment


def _encoder_states(model, pixels: torch.Tensor) -> torch.Tensor:
    """(F, 3, S, S) -> (F, P, C): the encoder layer the model uses (vision_feature_layer=-1, the
    last layer's output before SigLIP's post-layernorm), as get_video_features selects it."""
    layer = model.config.vision_feature_layer
    return model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[layer]


def _project_and_pool(model, hidden: torch.Tensor) -> torch.Tensor:
    """SigLIP's hidden states (F, P, C) -> projector -> 2x2 pooling -> (F*N + 1, D) with the
    newline, as transformers' get_video_features does after the tower."""
    feats = model.model.multi_modal_projector(hidden)
    pooled = model.model.apply_pooling(feats)  # (F, N, D)
    return torch.cat([pooled.flatten(0, 1), model.model.image_newline[None].to(pooled.dtype)])


# ---- training ------------------------------------------------------------------------------------
def _schedule(optimizer, steps: int, warmup: int):
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=steps)


def _bar(total: int, desc: str, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, file=sys.stderr, leave=False)


@contextlib.contextmanager
def _ahead(make, count: int):
    """`count` results of `make()`, each made in a background thread while the previous one is used:
    generating a batch of clips (numpy, the codec) takes about as long as a training step, and
    runs beside it. One thread calls `make` in order, so the stream is the same as inline."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        def stream():
            pending = pool.submit(make) if count else None
            for i in range(count):
                current = pending.result()
                pending = pool.submit(make) if i + 1 < count else None
                yield current
        yield stream()


def _step(loss, params, optimizer, schedule) -> float:
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    schedule.step()
    return loss.item()


def train_vision(model, recipe: dict, rng: random.Random, progress: bool) -> float:
    """Stage 1: encoder + projector with per-token probes (colour shares, row, column, texture) and
    the uniformity of the tokens."""
    spec = recipe["vision"]
    size = model.config.vision_config.image_size
    grid = math.ceil((size // model.config.vision_config.patch_size) / 2)
    width = model.config.text_config.hidden_size
    probes = torch.nn.ModuleDict({"colour": torch.nn.Linear(width, len(synth.CLASSES)),
                                  "row": torch.nn.Linear(width, grid), "col": torch.nn.Linear(width, grid),
                                  "texture": torch.nn.Linear(width, 3 * TEXTURE_CELLS ** 2)})
    params = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters(),
              *probes.parameters()]
    optimizer = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)
    schedule = _schedule(optimizer, spec["steps"], spec["warmup"])
    rows = torch.arange(grid).repeat_interleave(grid)
    cols = torch.arange(grid).repeat(grid)
    loss_avg = None
    with _bar(spec["steps"], "micro model: vision", progress) as bar, \
            _ahead(lambda: synth.scene_frames(rng, spec["batch"]), spec["steps"]) as batches:
        for frames, labels in batches:
            hidden = _encoder_states(model, _pixels(frames, size))
            tokens = model.model.apply_pooling(model.model.multi_modal_projector(hidden))  # (B, N, D)
            target = token_targets(labels, grid)
            texture = spec["texture"] * nnf.linear(nnf.normalize(tokens, dim=-1), nnf.normalize(
                probes["texture"].weight, dim=1), probes["texture"].bias)  # read from the direction only
            loss = (torch.sum(-target * probes["colour"](tokens).log_softmax(-1), -1).mean()
                    + nnf.cross_entropy(probes["row"](tokens).flatten(0, 1), rows.repeat(len(frames)))
                    + nnf.cross_entropy(probes["col"](tokens).flatten(0, 1), cols.repeat(len(frames)))
                    + nnf.mse_loss(texture, texture_targets(frames, labels, grid))
                    + spec["uniformity"] * uniformity(tokens))
            value = _step(loss, params, optimizer, schedule)
            loss_avg = value if loss_avg is None else 0.9 * loss_avg + 0.1 * value
            bar.set_postfix(loss=f"{loss_avg:.3f}")
            bar.update()
    return loss_avg


def train_language(model, prompts: Prompts, recipe: dict, clips, rng: random.Random, progress: bool,
                   validate) -> list[dict]:
    """Stage 2: newline and decoder on all four questions of every clip (the vision side frozen)."""
    spec = recipe["language"]
    for p in [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters()]:
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)
    reduction = Reduction(spec.get("augment"), random.Random(f"{recipe['seed']}:augment"))
    report = []
    for stage in spec["stages"]:
        # each stage warms up and decays on its own (a warm restart): a stage on longer clips
        # starts where the shorter ones left the model and needs a learning rate of its own, not
        # the tail of one schedule over all stages (there it barely moved the weights)
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"] = stage.get("lr", spec["lr"])
        schedule = _schedule(optimizer, stage["steps"], stage.get("warmup", spec["warmup"]))
        count = stage["frames"]
        loss_avg = None
        with _bar(stage["steps"], f"micro model: language, {count} frames", progress) as bar, \
                _ahead(lambda: clips.take(stage["batch"], stage.get("sides")), stage["steps"]) as batches:
            for batch in batches:
                frame_lists = [_frames_for(c, count, recipe["frames"], rng) for c in batch]
                logits, targets = language_batch(model, prompts, batch, frame_lists, augment=reduction.for_batch())
                value = _step(nnf.cross_entropy(logits, targets), params, optimizer, schedule)
                loss_avg = value if loss_avg is None else 0.9 * loss_avg + 0.1 * value
                bar.set_postfix(loss=f"{loss_avg:.3f}")
                bar.update()
        accuracy = validate(model, count)
        report.append({"frames": count, "sides": stage.get("sides"), "loss": round(loss_avg, 4),
                       "validation_accuracy": accuracy})
        if progress:
            print(f"micro model: {count} frames, loss {loss_avg:.3f}, validation accuracy "
                  + ", ".join(f"{k} {100 * v:.0f}%" for k, v in accuracy.items()), file=sys.stderr)
    return report


def _frames_for(clip, count: int, evaluated: int, rng: random.Random) -> list[int]:
    if count == evaluated:
        return [int(i) for i in uniform_indices(synth.FRAMES, count)]
    return _short_sample(clip, count, rng)


def _validator(prompts: Prompts, evaluated: int, seed: int):
    """validate(model, frames) -> accuracy per kind on VALIDATION_CLIPS held-out clips of the test
    split's kind (its own seed), at `frames` frames (uniform at the evaluated count, else as in
    training)."""
    rng = random.Random(f"{seed}:validation")
    clips = []
    for _ in range(VALIDATION_CLIPS):
        clip = synth.make_clip(rng)
        clip.frames = synth.round_trip(clip.frames)
        clips.append(clip)

    @torch.no_grad()
    def validate(model, frames: int) -> dict:
        model.eval()
        sampler = random.Random(f"{seed}:validation-frames")
        correct = {kind: 0 for kind in synth.KINDS}
        for i in range(0, len(clips), 8):
            batch = clips[i:i + 8]
            idx = [_frames_for(c, frames, evaluated, sampler) for c in batch]
            logits, targets = language_batch(model, prompts, batch, idx)
            hits = (logits.argmax(-1) == targets).view(len(batch), len(synth.KINDS), 2)[..., 0]
            for j, kind in enumerate(synth.KINDS):
                correct[kind] += int(hits[:, j].sum())
        model.train()
        return {kind: correct[kind] / len(clips) for kind in synth.KINDS}

    return validate


def train(arch: dict, recipe: dict, progress: bool = True):
    """(model, tokenizer, validation report) trained by `recipe` (conf/model/micro.yaml `train`)."""
    seed = int(recipe["seed"])
    torch.manual_seed(seed)
    model, tokenizer = _new_model(arch, seed)
    model.train()
    vision_loss = train_vision(model, recipe, random.Random(f"{seed}:vision"), progress)
    prompts = Prompts(tokenizer, model.config.video_token_id)
    validate = _validator(prompts, recipe["frames"], seed)
    stages = train_language(model, prompts, recipe, synth.TrainSplit(seed), random.Random(f"{seed}:frames"),
                            progress, validate)
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval(), tokenizer, {"vision_loss": round(vision_loss, 4), "language": stages}


def token_geometry(directory: Path, data_dir: str, frames: int, clips: int = 16) -> dict:
    """How alike a model's pooled video tokens are on the first `clips` clips of the test split:
    quantiles of the cosine similarity over all pairs of a clip's tokens (median over clips, and
    the range over clips). Real videos through a real encoder give medians well below 1; a flat
    synthetic scene gives most pairs near 1, where every similarity threshold behaves differently."""
    from harness.data.generated import DATA_ENV, video_path
    from harness.data.synthetic import generate
    from harness.models.llava_onevision import LlavaOneVision
    from methods.core.similarity import unit_rows

    questions = generate(data_dir)
    os.environ[DATA_ENV] = str(questions.parent)  # where its relative video paths point
    videos = list(dict.fromkeys(json.loads(line)["video"] for line in questions.read_text().splitlines()))[:clips]
    adapter = LlavaOneVision(str(directory), device="cpu")
    levels = (0.01, 0.1, 0.5, 0.9, 0.99)
    per_clip = []
    for video in videos:
        features = adapter.encode_video(adapter.load_video(video_path(video), frames)).visual.features
        units = unit_rows(features.flatten(0, 1).double())
        sims = units @ units.T
        pairs = sims[torch.triu(torch.ones_like(sims, dtype=torch.bool), diagonal=1)]
        per_clip.append(torch.quantile(pairs, torch.tensor(levels, dtype=pairs.dtype)).tolist())
    values = torch.tensor(per_clip)
    return {"clips": len(videos), "tokens_per_clip": int(features.shape[0] * features.shape[1]),
            "median_over_clips": {f"q{round(100 * q)}": round(float(values[:, i].median()), 4) for i, q in enumerate(levels)},
            "range_over_clips": {f"q{round(100 * q)}": [round(float(values[:, i].min()), 4), round(float(values[:, i].max()), 4)]
                                 for i, q in enumerate(levels)}}
