"""FastV (methods/fastv.py): in-LLM pruning, its KV cache, and retention by FLOPs matching.

The references here do not reuse FastV's code: the kept set comes from the stock model's eager
attention weights, and the pruned forward is checked against the stock model run on the full
sequence with the pruned keys masked out in layers >= K (see
`test_cached_decoding_matches_masked_full_recompute`).
"""

import pytest
import torch

import methods
from harness.data.video import preprocess, read_frames
from harness.errors import ConfigError
from harness.models.llava_onevision import LlavaOneVision
from harness.run.calibrate import TOLERANCE, CalibrationSet, bisect_knob, mean_measure
from methods.core import decoder
from methods.core.attention import query_attention
from methods.core.flops import LLMShape, retention_numbers
from methods.fastv import FastV
from tests.helpers.tolerance import bound, close, close_probabilities

FRAMES = 4
LAYERS = 8  # decoder layers of the tiny smoke model (harness/tiny_model.py)
QUESTION = "What colour is the moving square?\nA. red\nB. blue"


@pytest.fixture(scope="module")
def adapter(tiny_model_dir):
    return LlavaOneVision(str(tiny_model_dir))  # SDPA, as the harness runs it


@pytest.fixture(scope="module")
def eager(tiny_model_dir):
    """A separately loaded copy with eager attention: attention weights and 4D masks."""
    return LlavaOneVision(str(tiny_model_dir), attn_implementation="eager")


@pytest.fixture(scope="module")
def pixels(smoke_questions, adapter):
    p = adapter.preprocessing
    return preprocess(read_frames(smoke_questions.parent / "videos" / "clip_003.mp4", FRAMES),
                      p.size, p.mean, p.std)


def prefill(adapter, pixels, compressor, **kwargs):
    ids, _ = adapter.prompt_ids(QUESTION)
    prompt = adapter.prepare(pixels, compressor, ids)
    with torch.no_grad():
        out = adapter.prefill(prompt, compressor, **kwargs)
    return prompt.embeds, prompt.span, prompt.run, out


def literal_top_k(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))[:k])


# ---- knobs --------------------------------------------------------------------------------------
@pytest.mark.parametrize("knobs, message", [
    ({"K": 0}, "fastv.K=0"), ({"K": 1.5}, "fastv.K=1.5"), ({"K": True}, "fastv.K=True"),
    ({"keep": 0.0}, r"fastv.keep=0.0: expected a value in \(0.0, 1.0\]"),
    ({"keep": 1.5}, "fastv.keep=1.5"), ({"keep": "half"}, "fastv.keep='half'"),
])
def test_bad_knobs_are_rejected(knobs, message):
    with pytest.raises(ValueError, match=message):
        methods.build("fastv", **knobs)


def test_k_at_or_beyond_the_llm_depth_is_an_error(adapter, pixels):
    depth = adapter.config.text_config.num_hidden_layers
    with pytest.raises(ValueError, match=rf"fastv.K={depth}: expected a layer in \[1, {depth - 1}\]"):
        prefill(adapter, pixels, FastV(K=depth), use_cache=True)


# ---- prefill ------------------------------------------------------------------------------------
@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("use_cache", [False, True])
def test_keep_one_reproduces_the_unpruned_logits(adapter, pixels, K, use_cache):
    embeds, _, run, out = prefill(adapter, pixels, FastV(K=K, keep=1.0), use_cache=use_cache)
    with torch.no_grad():
        expected = adapter.model(inputs_embeds=embeds).logits
    # keeping every token runs the stock layers on the same inputs in the same order (the driver
    # with `none` is the stock model exactly, tests/test_model.py): exact
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=0)
    assert run.layer_video_tokens == [FRAMES * 196] * LAYERS


@pytest.mark.parametrize("K, keep", [(2, 0.25), (1, 0.1), (3, 0.5)])
def test_layers_from_k_on_process_only_the_kept_tokens(adapter, pixels, K, keep):
    seen = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
             for layer in adapter.model.model.language_model.layers]
    try:
        embeds, (start, end), run, out = prefill(adapter, pixels, FastV(K=K, keep=keep),
                                                 use_cache=True, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    total, video, k = embeds.shape[1], FRAMES * 196, round(keep * FRAMES * 196)
    assert end - start == video
    assert seen == [total] * K + [total - video + k] * (LAYERS - K)
    assert run.layer_video_tokens == [video] * K + [k] * (LAYERS - K)
    assert run.video_tokens_out == k and out.logits.shape[1] == 1
    # text tokens (the trailing newline at `end` included) are never pruned
    kept = set(out.kept.tolist())
    assert set(range(start)) | set(range(end, total)) <= kept and len(kept) == total - video + k
    numbers = retention_numbers(video, run.text_tokens, run.layer_video_tokens, LLMShape(64, 128, LAYERS))
    assert numbers["rho_tok"] == pytest.approx(k / video)
    assert numbers["rho_avg"] == pytest.approx((K + (LAYERS - K) * k / video) / LAYERS)


def test_at_least_one_video_token_is_kept(adapter, pixels):
    _, (start, end), run, out = prefill(adapter, pixels, FastV(keep=1e-6), use_cache=False)
    assert run.layer_video_tokens == [784, 784] + [1] * (LAYERS - 2)
    assert sum(start <= p < end for p in out.kept.tolist()) == 1


@pytest.mark.parametrize("K", [1, 2, 3])
def test_selection_is_the_top_k_of_eager_attention_at_layer_k_minus_1(adapter, eager, pixels, K):
    keep = 0.25
    embeds, (start, end), _, out = prefill(adapter, pixels, FastV(K=K, keep=keep), use_cache=False)
    with torch.no_grad():
        attentions = eager.model(inputs_embeds=embeds, output_attentions=True).attentions
    row = attentions[K - 1][0, :, -1].mean(0)  # last query, mean over heads: (T,)
    # the one-row computation equals the eager weights ...
    lm = adapter.model.model.language_model
    with torch.no_grad():
        hidden = lm(inputs_embeds=embeds, output_hidden_states=True).hidden_states[K - 1]
        positions = torch.arange(embeds.shape[1])[None]
        last = torch.tensor([embeds.shape[1] - 1])
        ours = query_attention(lm.layers[K - 1], hidden, lm.rotary_emb(embeds, positions), last,
                               adapter.llm.apply_rotary)[0]
    # the one-row recomputation (on the SDPA model's hidden states) against the eager weights: softmax
    # rows over every key, after layers 0..K-1
    torch.testing.assert_close(ours, row, **close_probabilities(torch.float32, embeds.shape[1], depth=K))
    # ... and the kept video tokens are its literal top-k (ties: lower index)
    expected = literal_top_k(row[start:end], round(keep * (end - start)))
    assert [p - start for p in out.kept.tolist() if start <= p < end] == expected


def test_selection_breaks_ties_towards_lower_indices():
    from methods.core.select import top_k_ascending
    from methods.fastv import PruneByLastToken

    scores = torch.tensor([0.1, 0.3, 0.3, 0.2, 0.3, 0.0])
    assert top_k_ascending(scores, 3).tolist() == [1, 2, 4]
    assert top_k_ascending(scores, 2).tolist() == [1, 2]
    assert top_k_ascending(torch.zeros(10), 3).tolist() == [0, 1, 2]

    class View:  # a prefill view whose attention row is `scores` over 6 video tokens + 2 text
        video = torch.arange(6)

        def attention(self):
            return torch.cat([scores, torch.tensor([0.5, 0.5])])[None]

    assert PruneByLastToken((2,), 0.5, 8).act(View()).video.tolist() == [1, 2, 4]


# ---- decoding -----------------------------------------------------------------------------------
def masked_reference_logits(eager, embeds, kept_prompt, K):
    """Last-position logits of the stock eager model on `embeds` (prompt + generated tokens), all
    layers run over every token, with layers >= K forbidden to attend to the pruned prompt tokens.

    Pruned tokens then influence nothing in layers >= K, so every other position's output is what
    FastV computes on the shortened sequence, at the original positions, without any cache.
    """
    total, prompt = embeds.shape[1], kept_prompt[-1] + 1  # the last prompt token is always kept
    allowed = torch.ones(total, dtype=torch.bool)
    allowed[sorted(set(range(prompt)) - set(kept_prompt))] = False  # generated tokens stay visible
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    mask = torch.zeros(total, total).masked_fill(~(causal & allowed), torch.finfo(torch.float32).min)

    def pruned_mask(module, args, kwargs):
        kwargs["attention_mask"] = mask[None, None]
        return args, kwargs

    layers = eager.model.model.language_model.layers
    hooks = [layers[i].register_forward_pre_hook(pruned_mask, with_kwargs=True)
             for i in range(K, len(layers))]
    try:
        with torch.no_grad():
            return eager.model(inputs_embeds=embeds).logits[0]
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("K, keep", [(2, 0.25), (1, 0.1)])
@pytest.mark.slow
def test_cached_decoding_matches_masked_full_recompute(adapter, eager, pixels, K, keep):
    """Formulation: with the kept set S chosen at prefill, FastV's answer is the stock model run
    on prompt + generated tokens where layers < K attend causally to everything and layers >= K
    attend causally to S and the generated tokens only (original positions throughout, no cache).
    The cached prefill + `FastV.decode` steps must give those logits at every step, and
    `LlavaOneVision.generate` the greedy tokens they imply."""
    steps = 6
    compressor = FastV(K=K, keep=keep)
    embeds, _, _, out = prefill(adapter, pixels, compressor, use_cache=True)
    kept = out.kept.tolist()
    reference = masked_reference_logits(eager, embeds, kept, K)
    # the pruned cached prefill against the masked eager full forward: attention sums over at most
    # every prompt key, in each of LAYERS layers (tests/helpers/tolerance.py)
    torch.testing.assert_close(out.logits[0], reference[kept], **close(torch.float32, embeds.shape[1], depth=LAYERS))

    state, logits, tokens = out.state, out.logits[0, -1], []
    embed = adapter.model.get_input_embeddings()
    for _ in range(steps):
        token = int(logits.argmax())
        if token in adapter.stop_ids:
            break
        tokens.append(token)
        embeds = torch.cat([embeds, embed(torch.tensor([[token]]))], 1)
        with torch.no_grad():
            logits = decoder.decode(adapter.llm, state, torch.tensor([[token]]))[0, -1]
        # cached decode against the uncached masked eager recompute: embeds.shape[1] keys, LAYERS layers
        torch.testing.assert_close(logits, masked_reference_logits(eager, embeds, kept, K)[-1],
                                   **close(torch.float32, embeds.shape[1], depth=LAYERS))
    assert tokens  # the random model does not stop at once: decoding was exercised
    # every token decoded above is in the cache: all of them below K, kept + generated from K on
    assert [layer.keys.shape[-2] for layer in state.cache.layers] == (
        [embeds.shape[1]] * K + [len(kept) + len(tokens)] * (LAYERS - K))

    text, run = adapter.generate(pixels, QUESTION, compressor, max_new_tokens=steps)
    assert text == adapter.tokenizer.decode(tokens, skip_special_tokens=True)
    assert set(run.timings) == {"vision", "compressor", "prefill", "decode", "ttft"}
    assert run.timings["ttft"] >= run.timings["prefill"] + run.timings["vision"]
    assert 0 < run.timings["compressor"] < run.timings["prefill"]


def test_loglikelihood_scores_the_answer_on_the_pruned_sequence(adapter, eager, pixels):
    compressor = FastV(K=2, keep=0.25)
    logprob, _, run = adapter.loglikelihood(pixels, QUESTION, "AB", compressor)
    ids, n = adapter.prompt_ids(QUESTION, "AB")
    prompt = adapter.prepare(pixels, compressor, ids)
    embeds = prompt.embeds
    with torch.no_grad():
        out = adapter.prefill(prompt, compressor, use_cache=False)
    kept = out.kept.tolist()
    logits = masked_reference_logits(eager, embeds, kept, 2)
    total = embeds.shape[1]
    # the pruned prefill against the masked eager full forward: attention sums over at most `total`
    # keys, in each of LAYERS layers (tests/helpers/tolerance.py); the kept tokens at compacted
    # positions would be ~3e-2 off
    tol = bound(torch.float32, total, depth=LAYERS)
    torch.testing.assert_close(out.logits[0], logits[kept], rtol=tol, atol=tol)
    logp = logits.log_softmax(-1)
    expected = sum(logp[total - n - 1 + i, ids[-n + i]].item() for i in range(n))
    # each answer token's log-probability is its logit less the log-sum-exp: within twice the logits'
    # bound, tol * (1 + their largest magnitude); the unpruned sequence would be ~2 off
    largest = float(logits[total - n - 1:total - 1].abs().max())
    assert logprob == pytest.approx(expected, rel=0, abs=n * 2 * tol * (1 + largest))
    assert run.layer_video_tokens == [784, 784] + [196] * (LAYERS - 2)


# ---- retention by FLOPs matching ----------------------------------------------------------------
def flops_matched(target, K, layers, text, video, d, m):
    """FastV's keep for a target rho_flops, found by the harness's generic calibration."""
    shape, data = LLMShape(d, m, layers), CalibrationSet([text], [video])
    spec = FastV.retention_knob
    return bisect_knob(lambda v: mean_measure(FastV(K=K).with_knob("keep", v), spec.measure, data, shape),
                       *FastV().knob_range(spec.knob), target, precision=1e-5, what="fastv")


@pytest.mark.parametrize("target, K, layers, text, video, d, m", [
    (0.5, 2, 28, 100, 32 * 196, 3584, 18944),  # LLaVA-OneVision-7B, 32 frames
    (0.2, 2, 28, 100, 32 * 196, 3584, 18944),
    (0.3, 3, 24, 87, 16 * 196, 896, 4864),  # 0.5B
    (0.75, 2, LAYERS, 60, 8 * 196, 64, 128),  # the tiny smoke model
    (1.0, 2, LAYERS, 60, 8 * 196, 64, 128),
])
def test_flops_matching_reaches_the_target_to_one_token(target, K, layers, text, video, d, m):
    shape = LLMShape(d, m, layers)
    keep, achieved, _ = flops_matched(target, K, layers, text, video, d, m)
    kept = max(1, round(keep * video))
    numbers = retention_numbers(video, text, [video] * K + [kept] * (layers - K), shape)
    # the same Python float arithmetic on the same per-layer counts (the mean of one prompt): exact
    assert numbers["rho_flops"] == achieved
    # no whole number of kept tokens comes closer to the target
    for other in (kept - 1, kept + 1):
        if 1 <= other <= video:
            alt = retention_numbers(video, text, [video] * K + [other] * (layers - K), shape)["rho_flops"]
            assert abs(alt - target) >= abs(achieved - target)
    assert numbers["rho_avg"] == pytest.approx((K + (layers - K) * kept / video) / layers)


def test_unreachable_flops_ratio_names_the_reachable_range():
    d, m, layers, K, text, video = 3584, 18944, 28, 2, 100, 32 * 196
    shape = LLMShape(d, m, layers)
    lowest = retention_numbers(video, text, [video] * K + [1] * (layers - K), shape)["rho_flops"]
    assert 2 / 28 < lowest < 0.09  # two full layers of 28 already cost 8.3 %, more than 5 %
    with pytest.raises(ConfigError, match=f"retention=0.05: unreachable.*fastv reaches {100 * lowest:.2f}%-100.00%"):
        flops_matched(0.05, K, layers, text, video, d, m)
    keep, achieved, _ = flops_matched(lowest, K, layers, text, video, d, m)  # the boundary is reachable
    assert max(1, round(keep * video)) == 1 and achieved == pytest.approx(lowest)


@pytest.mark.slow
def test_retention_target_calibrates_keep_by_flops(cfg_factory, adapter):
    from harness.data.tasks import load_tasks, prepare_task_data
    from harness.run.calibrate import calibrate, calibration_set
    from tests.helpers import choice_of, job_of

    cfg = cfg_factory("+method=fastv", "retention=0.6")
    choice = choice_of(cfg)
    assert choice.target_retention == 0.6 and choice.label == "r=0.6"
    prepare_task_data(job_of(cfg).task)
    tasks = load_tasks(job_of(cfg).task)
    size = cfg.task.calibration_size
    result = calibrate(choice.compressor, 0.6, adapter, tasks, frames=cfg.model.frames, size=size, identity={})
    lengths = calibration_set(adapter, tasks, size, cfg.model.frames, False, False).text_tokens
    assert len(lengths) == size
    video = cfg.model.frames * 196
    kept = max(1, round(result["knobs"]["keep"] * video))
    shape = LLMShape(64, 128, LAYERS)
    per_doc = [retention_numbers(video, t, [video] * 2 + [kept] * (LAYERS - 2), shape)["rho_flops"]
               for t in lengths]
    # float64 means of the same per-prompt values, perhaps summed in another order
    assert result["achieved_on_calibration"] == pytest.approx(sum(per_doc) / len(per_doc),
                                                              abs=bound(torch.float64, len(per_doc)))
    assert result["achieved_on_calibration"] == pytest.approx(0.6, abs=TOLERANCE / 4)

    # with K=2 of 8 layers unpruned, 25 % of the prefill FLOPs is already spent: an error
    cfg = cfg_factory("+method=fastv", "retention=0.2")
    with pytest.raises(ConfigError, match=r"retention=0.2: unreachable.*reaches 2\d\.\d\d%-100.00%"):
        calibrate(choice_of(cfg).compressor, 0.2, adapter, tasks, frames=cfg.model.frames, size=size,
                  identity={})


def test_label_names_k_and_keep(cfg_factory):
    from tests.helpers import choice_of

    choice = choice_of(cfg_factory("+method=fastv", "method.keep=0.25"))
    assert choice.knobs == {"K": 2, "keep": 0.25} and choice.label == "K=2,keep=0.25"
