"""PyramidDrop (methods/pdrop.py): staged in-LLM dropping, its KV cache, FLOPs matching.

The references never call methods/pdrop.py: tests/reference/pdrop.py runs the stock eager model
with the drops as attention masks at original positions and ranks with its eager attention
weights; counts are exact rational arithmetic.
"""

import pytest
import torch

import methods
from harness.data.video import preprocess, read_frames
from harness.errors import ConfigError
from harness.models.llava_onevision import LlavaOneVision
from harness.run.calibrate import TOLERANCE, CalibrationSet, bisect_knob, mean_measure
from methods.core import decoder
from methods.core.flops import LLMShape, retention_numbers
from methods.fastv import PruneByLastToken
from methods.pdrop import PyramidDrop, default_layers, pyramid_counts
from tests.helpers.tolerance import bound, close
from tests.reference.pdrop import reference_counts, reference_layers, reference_prefill

LAYERS = 8  # decoder layers of the tiny smoke model
QUESTION = "What colour is the moving square?\nA. red\nB. blue"


@pytest.fixture(scope="module")
def adapter(tiny_model_dir):
    return LlavaOneVision(str(tiny_model_dir))


@pytest.fixture(scope="module")
def eager(tiny_model_dir):
    return LlavaOneVision(str(tiny_model_dir), attn_implementation="eager")


@pytest.fixture(scope="module")
def clip(smoke_questions, adapter):
    p = adapter.preprocessing

    def frames(count):
        return preprocess(read_frames(smoke_questions.parent / "videos" / "clip_003.mp4", count),
                          p.size, p.mean, p.std)
    return frames


def prefill(adapter, pixels, compressor, **kwargs):
    ids, _ = adapter.prompt_ids(QUESTION)
    prompt = adapter.prepare(pixels, compressor, ids)
    with torch.no_grad():
        out = adapter.prefill(prompt, compressor, **kwargs)
    return prompt, out


def stock(eager):
    return eager.model.model.language_model, eager.model.lm_head


# ---- knobs and counts ---------------------------------------------------------------------------
@pytest.mark.parametrize("knobs, message", [
    ({"lambda_": 0.0}, r"pdrop.lambda_=0.0: expected a value in \(0.0, 1.0\]"),
    ({"lambda_": 1.5}, "pdrop.lambda_=1.5"), ({"lambda_": "half"}, "pdrop.lambda_='half'"),
    ({"layers": [0, 2, 4]}, r"pdrop.layers=\[0, 2, 4\]: expected a list of layer indices >= 1"),
    ({"layers": [2, 2.5]}, r"pdrop.layers=\[2, 2.5\]: expected a list of layer indices"),
    ({"layers": [4, 2, 6]}, r"pdrop.layers=\[4, 2, 6\]: expected increasing"),
    ({"layers": []}, r"pdrop.layers=\[\]: expected a list of layer indices"),
    ({"layers": "2,4"}, "pdrop.layers='2,4': expected a list"),
])
def test_bad_knobs_are_rejected(knobs, message):
    with pytest.raises(ValueError, match=message):
        methods.build("pdrop", **knobs)


def test_layers_at_or_beyond_the_depth_are_an_error():
    with pytest.raises(ValueError, match=r"pdrop.layers=8: expected a layer in \[1, 7\]"):
        PyramidDrop(layers=[2, 4, 8]).prefill_policy(LLMShape(64, 128, 8))
    with pytest.raises(ValueError, match="at least 4 layers"):
        PyramidDrop().prefill_policy(LLMShape(64, 128, 3))


@pytest.mark.parametrize("depth, expected", [(32, (8, 16, 24)), (28, (7, 14, 21)), (24, (6, 12, 18)),
                                             (80, (20, 40, 60)), (8, (2, 4, 6)), (6, (2, 3, 4))])
def test_default_layers_are_quarters_of_the_depth(depth, expected):
    assert default_layers(depth) == expected == tuple(reference_layers(depth))  # 32: official [8, 16, 24]


def test_counts_are_the_official_cumulative_floor():
    for video in (1, 2, 7, 196, 588, 784, 6272, 12544):
        for hundredths in range(1, 101):
            lam = hundredths / 100
            assert pyramid_counts(lam, video, 3) == reference_counts(lam, video), (lam, video)
    # cumulative from V0 and floored (official), not lambda of the current count, rounded
    assert pyramid_counts(0.3, 6272, 3) == [1881, 564, 169]
    assert pyramid_counts(0.5, 6272, 3) == [3136, 1568, 784]  # official ratio list [1, .5, .25, .125]
    assert pyramid_counts(0.01, 196, 3) == [1, 1, 1]  # never zero


@pytest.mark.parametrize("layers, lam, video", [(None, 0.5, 784), ([1, 3, 5], 0.3, 1568), ([2, 4, 6], 0.7, 196)])
def test_planned_counts_per_layer(layers, lam, video):
    policy = PyramidDrop(layers=layers, lambda_=lam).prefill_policy(LLMShape(64, 128, LAYERS))
    k1, k2, k3 = layers or (2, 4, 6)
    c1, c2, c3 = reference_counts(lam, video)
    assert policy.planned(video) == [video] * k1 + [c1] * (k2 - k1) + [c2] * (k3 - k2) + [c3] * (LAYERS - k3)


def test_the_shared_policy_ranks_with_the_layer_it_precedes_or_the_one_before():
    scores = torch.tensor([0.1, 0.3, 0.3, 0.2, 0.3, 0.0, 0.25, 0.05])
    asked = []

    class View:  # 8 video tokens + 2 text entries; records which layer's attention is read
        layer = 3
        video = torch.arange(8)

        def attention(self, layer=None):
            asked.append(layer)
            return torch.cat([scores, torch.tensor([0.5, 0.5])])[None]

    pdrop = PruneByLastToken((3, 5), 0.5, 8, counts=pyramid_counts, own_layer=True)
    assert pdrop.act(View()).video.tolist() == [1, 2, 4, 6]  # int(8 * 0.5), ties: lower index
    View.layer, View.video = 5, torch.arange(4)
    assert pdrop.act(View()).video.tolist() == [1, 2]  # int(8 * 0.25) of the V0 = 8 entering
    assert asked == [3, 5]
    fastv = PruneByLastToken((3,), 0.5, 8)
    View.layer, View.video = 3, torch.arange(8)
    assert fastv.act(View()).video.tolist() == [1, 2, 4, 6] and asked[-1] is None


# ---- prefill against the stock model -------------------------------------------------------------
@pytest.mark.parametrize("frames", [1, 3, 4])
@pytest.mark.parametrize("layers, lam", [(None, 0.5), ([1, 3, 5], 0.3), ([2, 4, 6], 0.7), ([3], 0.4)])
def test_prefill_equals_the_stock_model_with_the_drops_masked(adapter, eager, clip, frames, layers, lam):
    prompt, out = prefill(adapter, clip(frames), PyramidDrop(layers=layers, lambda_=lam), use_cache=True)
    (start, end), total = prompt.span, prompt.embeds.shape[1]
    stages = layers or [2, 4, 6]
    ref = reference_prefill(*stock(eager), prompt.embeds, prompt.span, total - 1, stages, lam)
    assert ref.margin > 1e-9  # no ranking decided by float32 round-off
    assert prompt.run.layer_video_tokens == ref.counts
    text = [i for i in range(total) if not start <= i < end]
    assert out.kept.tolist() == sorted(text + ref.kept[-1])  # text (and the newline) never dropped
    # the driver's staged prefill against the stock eager forward with the drops masked: attention
    # sums over at most `total` keys, in each of LAYERS layers (tests/helpers/tolerance.py)
    torch.testing.assert_close(out.logits, ref.logits[:, out.kept], **close(torch.float32, total, depth=LAYERS))
    # each layer's cache holds what it saw: the stage's kept tokens at their original positions
    for i, layer in enumerate(out.state.cache.layers):
        stage = sum(k <= i for k in stages)
        video = list(range(start, end)) if stage == 0 else ref.kept[stage - 1]
        assert out.state.layer_origin[i].tolist() == sorted(text + video)
        assert layer.keys.shape[-2] == len(text) + len(video)


@pytest.mark.parametrize("use_cache", [False, True])
def test_lambda_one_reproduces_the_unpruned_logits(adapter, clip, use_cache):
    prompt, out = prefill(adapter, clip(4), PyramidDrop(lambda_=1.0), use_cache=use_cache)
    with torch.no_grad():
        expected = adapter.model(inputs_embeds=prompt.embeds).logits
    # keeping every token runs the stock layers on the same inputs in the same order (the driver
    # with `none` is the stock model exactly, tests/test_model.py): exact
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=0)
    assert prompt.run.layer_video_tokens == [4 * 196] * LAYERS


@pytest.mark.slow
def test_cached_decoding_matches_the_uncached_stock_reference(adapter, eager, clip):
    """With generated tokens appended, the reference reruns the whole prompt (same drops: the
    query is still the last prompt token) uncached; every decode step's logits must match."""
    steps, lam = 6, 0.3
    compressor = PyramidDrop(layers=[1, 3, 5], lambda_=lam)
    prompt, out = prefill(adapter, clip(4), compressor, use_cache=True)
    embeds, query = prompt.embeds, prompt.embeds.shape[1] - 1
    state, logits, tokens = out.state, out.logits[0, -1], []
    embed = adapter.model.get_input_embeddings()
    for _ in range(steps):
        token = int(logits.argmax())
        if token in adapter.stop_ids:
            break
        tokens.append(token)
        with torch.no_grad():
            embeds = torch.cat([embeds, embed(torch.tensor([[token]]))], 1)
            logits = decoder.decode(adapter.llm, state, torch.tensor([[token]]))[0, -1]
        ref = reference_prefill(*stock(eager), embeds, prompt.span, query, [1, 3, 5], lam)
        # cached decode against the uncached stock eager recompute: at most embeds.shape[1] keys,
        # LAYERS layers
        torch.testing.assert_close(logits, ref.logits[0, -1], **close(torch.float32, embeds.shape[1], depth=LAYERS))
    assert tokens
    text, run = adapter.generate(clip(4), QUESTION, compressor, max_new_tokens=steps)
    assert text == adapter.tokenizer.decode(tokens, skip_special_tokens=True)
    assert run.layer_video_tokens == [784] + [235] * 2 + [70] * 2 + [21] * 3  # layers [1, 3, 5]
    assert 0 < run.timings["compressor"] < run.timings["prefill"]


# ---- retention by FLOPs matching ----------------------------------------------------------------
def flops_matched(target, layers, text, video, shape):
    data = CalibrationSet([text], [video])
    spec = PyramidDrop.retention_knob
    return bisect_knob(lambda v: mean_measure(PyramidDrop(layers=layers).with_knob("lambda_", v),
                                              spec.measure, data, shape),
                       *PyramidDrop().knob_range(spec.knob), target, precision=1e-5, what="pdrop")


@pytest.mark.parametrize("target, layers, text, video, shape", [
    (0.5, None, 100, 32 * 196, LLMShape(3584, 18944, 28)),  # LLaVA-OneVision-7B, 32 frames
    (0.35, None, 100, 32 * 196, LLMShape(3584, 18944, 28)),
    (0.4, None, 87, 16 * 196, LLMShape(896, 4864, 24)),  # 0.5B
    (0.6, None, 60, 8 * 196, LLMShape(64, 128, LAYERS)),  # the tiny smoke model
    (1.0, [1, 3, 5], 60, 8 * 196, LLMShape(64, 128, LAYERS)),
])
def test_flops_matching_reaches_the_target_within_one_token_per_stage(target, layers, text, video, shape):
    lam, achieved, _ = flops_matched(target, layers, text, video, shape)
    stages = list(layers or default_layers(shape.layers))
    counts = reference_counts(lam, video)

    def per_layer(c):
        out = []
        for i in range(shape.layers):
            done = sum(k <= i for k in stages)
            out.append(video if done == 0 else c[done - 1])
        return out

    numbers = retention_numbers(video, text, per_layer(counts), shape)
    # the same Python float arithmetic on the same per-layer counts (the mean of one prompt): exact
    assert numbers["rho_flops"] == achieved
    # one more token in every stage would overshoot the target: the step is at most that
    step = retention_numbers(video, text, per_layer([c + 1 for c in counts]), shape)["rho_flops"] - achieved
    assert abs(achieved - target) <= step


def test_unreachable_flops_ratio_names_the_reachable_range():
    shape, text, video = LLMShape(3584, 18944, 28), 100, 32 * 196
    lowest = retention_numbers(video, text, [video] * 7 + [1] * 21, shape)["rho_flops"]
    assert 0.25 < lowest < 0.26  # a quarter of the layers see every token
    with pytest.raises(ConfigError, match=f"retention=0.2: unreachable.*pdrop reaches {100 * lowest:.2f}%-100.00%"):
        flops_matched(0.2, None, text, video, shape)


@pytest.mark.slow
def test_retention_target_calibrates_lambda_by_flops(cfg_factory, adapter, clip):
    from harness.data.tasks import load_tasks, prepare_task_data
    from harness.run.calibrate import calibrate, calibration_set
    from tests.helpers import choice_of, job_of

    cfg = cfg_factory("+method=pdrop", "retention=0.5")
    choice = choice_of(cfg)
    assert choice.target_retention == 0.5 and choice.label == "r=0.5"
    prepare_task_data(job_of(cfg).task)
    tasks = load_tasks(job_of(cfg).task)
    size = cfg.task.calibration_size
    result = calibrate(choice.compressor, 0.5, adapter, tasks, frames=cfg.model.frames, size=size, identity={})
    lengths = calibration_set(adapter, tasks, size, cfg.model.frames, False, False).text_tokens
    video, lam = cfg.model.frames * 196, result["knobs"]["lambda_"]
    c1, c2, c3 = reference_counts(lam, video)
    layers = [video] * 2 + [c1] * 2 + [c2] * 2 + [c3] * 2
    shape = LLMShape(64, 128, LAYERS)
    per_doc = [retention_numbers(video, t, layers, shape)["rho_flops"] for t in lengths]
    # float64 means of the same per-prompt values, perhaps summed in another order
    assert result["achieved_on_calibration"] == pytest.approx(sum(per_doc) / len(per_doc),
                                                              abs=bound(torch.float64, len(per_doc)))
    assert result["achieved_on_calibration"] == pytest.approx(0.5, abs=TOLERANCE / 4)
    # the counts the LLM then processes are the planned ones
    _, run = adapter.generate(clip(cfg.model.frames), QUESTION, choice.compressor.with_knob("lambda_", lam), max_new_tokens=2)
    assert run.layer_video_tokens == layers

    # two of 8 layers see every token: 25 % of the FLOPs at least
    cfg = cfg_factory("+method=pdrop", "retention=0.2")
    with pytest.raises(ConfigError, match=r"retention=0.2: unreachable.*reaches 2\d\.\d\d%-100.00%"):
        calibrate(choice_of(cfg).compressor, 0.2, adapter, tasks, frames=cfg.model.frames, size=size,
                  identity={})


def test_label_names_layers_and_lambda(cfg_factory):
    from tests.helpers import choice_of

    choice = choice_of(cfg_factory("+method=pdrop", "method.lambda_=0.25", "method.layers=[2,4,6]"))
    assert choice.knobs == {"layers": [2, 4, 6], "lambda_": 0.25}
    assert choice.label == "layers=2/4/6,lambda_=0.25"  # '/' keeps run ids free of brackets
    assert choice_of(cfg_factory("+method=pdrop")).knobs == {"layers": None, "lambda_": 0.5}

