"""The micro LLaVA-OneVision: the real architecture, trained here on the synthetic task's train split.

Built on first use by the runner (harness.models.prepare), or alone by
`python -m harness.train_micro [model.train.seed=1 ...]` (harness/train_micro.py).

SigLIP encoder (14-px patches) -> 2-layer projector -> 2x2 bilinear pooling -> Qwen2 decoder, with
widths, depths and the input size (224 px, so 8x8 tokens per frame) from conf/model/micro.yaml
(`arch`); the recipe (`train`) is there too. It trains in two stages, as LLaVA does (a vision side
first, then the language model on instructions):

1. vision: the encoder and projector learn, on single frames full of squares of the task's colours
   (a stand-in for LLaVA's pretrained encoder, minutes instead of months), to say per pooled token
   what the frame shows there (the share of each colour under it, as soft targets) and where the
   token sits (row, column), through linear probes that are thrown away afterwards. SigLIP's learnt
   position embeddings start from 2-D sine-cosine values (as MAE initialises a ViT's), so the
   position probes learn in tens of steps rather than thousands.
2. language: the encoder is frozen (the decoder's queries and keys start at std 1/sqrt(width)); projector, image_newline and decoder learn to answer the four
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

import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf

from harness.data import synthetic as synth
from harness.data.video import uniform_indices
from harness.files import digest
from harness.models.model_dir import write_model_dir

MARKER = "MICRO_MODEL.json"
VERSION = 3  # bump when the training code changes what a recipe produces
VALIDATION_CLIPS = 64


def model_dir(path: str | Path, arch: dict, recipe: dict) -> Path:
    """Where the micro model of this architecture and recipe lives: `path` (model.path) with the
    key of both appended, so another recipe is another directory."""
    path = Path(path)
    return path.with_name(f"{path.name}-{digest({'arch': arch, 'train': recipe, 'version': VERSION})[:10]}")


def is_built(path: str | Path, arch: dict, recipe: dict) -> bool:
    """Whether the model of this architecture and recipe is already built (its marker written)."""
    return (model_dir(path, arch, recipe) / MARKER).is_file()


def build_micro_model(path: str | Path, arch: dict, recipe: dict, progress: bool = True) -> Path:
    """The trained micro model's directory (see model_dir): reused when already built, else trained
    now (minutes on a CPU) and written atomically."""
    directory = model_dir(path, arch, recipe)
    if (directory / MARKER).is_file():
        return directory
    started = time.perf_counter()
    model, tokenizer, report = train(arch, recipe, progress=progress)
    return write_model_dir(directory, weights=model, tokenizer=tokenizer, preprocessor=preprocessor(arch),
                           marker=MARKER, stamp={
        "what": "micro LLaVA-OneVision trained on the synthetic task's train split (harness.train_micro)",
        "arch": arch, "train": recipe, "version": VERSION,
        "seconds": round(time.perf_counter() - started, 1), "validation": report})


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
        need("language.warmup", language["warmup"], int, 1)
        need("language.lr", language["lr"], (int, float), 1e-12)
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
def _palette() -> tuple[torch.Tensor, list[str]]:
    colours = {f"{group}:{name}": rgb for group, p in synth.PALETTES.items() for name, rgb in p.items()}
    colours["mover"] = synth.MOVER
    return torch.tensor(list(colours.values()), dtype=torch.float32), list(colours)


def token_targets(frames: np.ndarray, grid: int) -> torch.Tensor:
    """(F, grid*grid, C) share of each colour class among the pixels under each pooled token."""
    palette, _ = _palette()
    x = torch.from_numpy(frames).float()  # (F, H, W, 3)
    nearest = torch.cdist(x.flatten(1, 2), palette).argmin(-1)  # (F, H*W)
    onehot = nnf.one_hot(nearest, len(palette)).float().view(x.shape[0], x.shape[1], x.shape[2], -1)
    shares = nnf.adaptive_avg_pool2d(onehot.permute(0, 3, 1, 2), grid)  # (F, C, grid, grid)
    return shares.flatten(2).transpose(1, 2)


def vision_frames(rng: random.Random, count: int) -> np.ndarray:
    """(count, SIZE, SIZE, 3) frames for the vision stage: a background of the task's and 3-10
    squares of any of the task's colours, of 1-3 cells, anywhere (not on the cell grid)."""
    colours = [rgb for p in synth.PALETTES.values() for rgb in p.values()] + [synth.MOVER]
    frames = np.empty((count, synth.SIZE, synth.SIZE, 3), np.uint8)
    for frame in frames:
        frame[:] = rng.choice(list(synth.PALETTES["background"].values()))
        for _ in range(rng.randint(3, 10)):
            side = rng.randint(synth.CELL // 2, 3 * synth.CELL)
            x, y = rng.randrange(synth.SIZE - side + 1), rng.randrange(synth.SIZE - side + 1)
            frame[y:y + side, x:x + side] = rng.choice(colours)
    return synth.round_trip(frames)


def _short_sample(clip: synth.Clip, count: int, rng: random.Random) -> list[int]:
    """`count` sorted frame indices spread over the clip with a random shift, one of them a flash frame."""
    span = synth.FRAMES - 1
    shift = rng.uniform(0, span / count)
    idx = sorted({min(span, int(shift + span * k / count)) for k in range(count)})
    start, end = clip.flash
    if not any(start <= i < end for i in idx):
        j = rng.randrange(len(idx))
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


def language_batch(model, prompts: Prompts, clips, frame_lists, kinds=synth.KINDS):
    """Logits at the answer slots (B * kinds * 2, V) and their targets for a batch of clips, every
    kind asked of every clip."""
    embed = model.model.language_model.embed_tokens
    size = model.config.vision_config.image_size
    with torch.no_grad():  # the encoder is frozen in this stage
        hidden = [_encoder_states(model, _pixels(c.frames[f], size)) for c, f in zip(clips, frame_lists)]
    rows, targets = [], []
    video = None
    for clip, states in zip(clips, hidden):
        pooled = _project_and_pool(model, states)  # (F*N + 1, D)
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
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup)
                                             * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def _bar(total: int, desc: str, progress: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not progress, file=sys.stderr, leave=False)


def _step(loss, params, optimizer, schedule) -> float:
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    schedule.step()
    return loss.item()


def train_vision(model, recipe: dict, rng: random.Random, progress: bool) -> float:
    """Stage 1: encoder + projector with per-token probes (colour shares, row, column)."""
    spec = recipe["vision"]
    size = model.config.vision_config.image_size
    grid = math.ceil((size // model.config.vision_config.patch_size) / 2)
    width = model.config.text_config.hidden_size
    probes = torch.nn.ModuleDict({"colour": torch.nn.Linear(width, len(_palette()[1])),
                                  "row": torch.nn.Linear(width, grid), "col": torch.nn.Linear(width, grid)})
    params = [*model.model.vision_tower.parameters(), *model.model.multi_modal_projector.parameters(),
              *probes.parameters()]
    optimizer = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)
    schedule = _schedule(optimizer, spec["steps"], spec["warmup"])
    rows = torch.arange(grid).repeat_interleave(grid)
    cols = torch.arange(grid).repeat(grid)
    loss_avg = None
    with _bar(spec["steps"], "micro model: vision", progress) as bar:
        for _ in range(spec["steps"]):
            frames = vision_frames(rng, spec["batch"])
            hidden = _encoder_states(model, _pixels(frames, size))
            tokens = model.model.apply_pooling(model.model.multi_modal_projector(hidden))  # (B, N, D)
            target = token_targets(frames, grid)
            loss = (torch.sum(-target * probes["colour"](tokens).log_softmax(-1), -1).mean()
                    + nnf.cross_entropy(probes["row"](tokens).flatten(0, 1), rows.repeat(len(frames)))
                    + nnf.cross_entropy(probes["col"](tokens).flatten(0, 1), cols.repeat(len(frames))))
            value = _step(loss, params, optimizer, schedule)
            loss_avg = value if loss_avg is None else 0.9 * loss_avg + 0.1 * value
            bar.set_postfix(loss=f"{loss_avg:.3f}")
            bar.update()
    return loss_avg


def train_language(model, prompts: Prompts, recipe: dict, clips, rng: random.Random, progress: bool,
                   validate) -> list[dict]:
    """Stage 2: projector, newline and decoder on all four questions of every clip."""
    spec = recipe["language"]
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0)
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
        with _bar(stage["steps"], f"micro model: language, {count} frames", progress) as bar:
            for _ in range(stage["steps"]):
                batch = clips.take(stage["batch"], stage.get("sides"))
                frame_lists = [_frames_for(c, count, recipe["frames"], rng) for c in batch]
                logits, targets = language_batch(model, prompts, batch, frame_lists)
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
