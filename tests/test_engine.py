"""The evaluation engine: grouping by video, shards of whole videos, decode-ahead, and the shared
prefix, which must give what the whole prompt gives (every method, both families)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import methods
from harness.models.base import StopStrings
from harness.run.engine import Prefetcher, group_by_video, shard
from tests.helpers.tolerance import close

FRAMES = 4
QUESTIONS = ["What colour is the moving square?\nA. red\nB. blue",
             "Which way does the square move?\nA. left\nB. right\nC. up\nD. down\nAnswer with the letter."]


# ---- scheduling -----------------------------------------------------------------------------------
def test_requests_are_grouped_by_video_in_order_of_first_appearance():
    groups = group_by_video(["b", "a", "b", "c", "a", "b"])
    assert [(g.video, g.requests) for g in groups] == [("b", [0, 2, 5]), ("a", [1, 4]), ("c", [3])]
    assert [(g.video, g.requests) for g in group_by_video(["b", "a", "b"], grouped=False)] == [
        ("b", [0]), ("a", [1]), ("b", [2])]


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_shards_hold_whole_videos_and_balanced_loads(world_size):
    sizes = [7, 1, 3, 3, 2, 9, 1, 1, 4, 2, 2, 5]
    videos = [v for v, n in enumerate(sizes) for _ in range(n)]
    groups = group_by_video(videos)
    shards = [shard(groups, rank, world_size) for rank in range(world_size)]
    seen = [g.video for part in shards for g in part]
    assert sorted(seen) == sorted(set(videos))  # every video on exactly one rank
    for part in shards:  # each rank keeps lmms_eval's order
        assert [g.video for g in part] == sorted(g.video for g in part)
    loads = [sum(len(g.requests) for g in part) for part in shards]
    assert max(loads) - min(loads) <= max(sizes)


def test_prefetch_reads_ahead_within_its_bound_and_a_bad_video_fails_alone():
    started, lock = [], threading.Lock()

    def load(key):
        with lock:
            started.append(key)
        time.sleep(0.02)
        if key == "bad":
            raise ValueError("cannot decode bad")
        return key.upper()

    keys = ["a", "b", "bad", "c", "d", "e"]
    with Prefetcher(keys, load, depth=2) as fetch:
        assert fetch.get("a") == "A"
        assert set(started) <= {"a", "b", "c"}  # never more than `depth` beyond the one in use
        assert fetch.get("b") == "B"
        with pytest.raises(ValueError, match="cannot decode bad"):
            fetch.get("bad")
        assert [fetch.get(k) for k in ("c", "d", "e")] == ["C", "D", "E"]
    assert started == keys and fetch.waited > 0
    with Prefetcher(keys[:2], load, depth=0) as inline:  # depth 0: each read in the caller's thread
        assert inline.get("a") == "A" and inline.waited == 0


def test_stop_strings_are_found_from_the_newest_tokens(tiny_llava):
    """Generation stops at the first token after which the decoded answer holds a stop string: the
    check on the newest tokens finds exactly that token, as decoding the whole answer would."""
    tok = tiny_llava.tokenizer
    text = "The answer is B, because é and ü are there.\nEND here"
    ids = tok(text, add_special_tokens=False).input_ids
    for until in (["\n"], ["END"], ["é and"], ["missing"], ["\n", "END"]):
        stops = StopStrings(tok, until)
        for n in range(1, len(ids) + 1):
            whole = any(u in tok.decode(ids[:n]) for u in until)
            assert stops.reached(ids[:n]) == whole, (until, n)
            if whole:  # generation ends here
                break


# ---- the shared prefix ---------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["llava_onevision", "qwen2_5_vl"])
def family(request, tiny_llava, qwen, smoke_questions):
    adapter = {"llava_onevision": tiny_llava, "qwen2_5_vl": qwen}[request.param]
    path = str(smoke_questions.parent / "videos" / "clip_005.mp4")
    return adapter, adapter.load_video(path, FRAMES)


# the fast tier checks three (no compression, a visual stage, a decode stage); the rest are slow
SHARING = [pytest.param(n, marks=() if n in ("none", "uniform", "dycoke") else pytest.mark.slow)
           for n in methods.known() if n != "pipeline" and methods.build(n).shares_prefix]


def build(name: str):
    compressor = methods.build(name, **({"keep": 0.5} if name == "dart" else {}))  # DART's default keeps
    # so little on the tiny model that its picks do not move with the question there
    if compressor.retention_knob is not None and compressor.retention_knob.direct:
        compressor = compressor.with_knob(compressor.retention_knob.knob, 0.5)
    return compressor


def defined_for(compressor, adapter) -> bool:
    """The family computes what the method needs and runs every stage it acts in (ToMe's encoder)."""
    from methods.core.base import ENCODER_NEEDS

    return set(compressor.needs) & ENCODER_NEEDS <= adapter.provides and compressor.stages <= adapter.stages


@pytest.mark.parametrize("name", SHARING)
def test_a_shared_prefix_gives_the_logits_of_the_whole_prompt(family, name):
    """Every question continued from the cached [head + video] prefix gets the logits one prefill of
    its whole prompt gives, within float32 rounding (the attention over the prefix is split into two
    kernels); the cache is back at the prefix after each question."""
    adapter, pixels = family
    compressor = build(name)
    if not defined_for(compressor, adapter):
        pytest.skip(f"{name} is not defined for {adapter.family}")
    compressed = adapter.compress(pixels, compressor)
    prefix = adapter.shared_prefix(compressed, compressor, adapter.prompt_ids(QUESTIONS[0])[0])
    length = prefix.state.cache.get_seq_length()
    width = adapter.llm_shape.hidden
    for question in QUESTIONS * 2:
        ids, _ = adapter.prompt_ids(question)
        whole = adapter.prompt(compressed, ids)
        # the question's entries: the last ones (a query-free policy may have merged the prefix)
        expected = adapter.prefill(whole, compressor, use_cache=False).logits[0, prefix.length - whole.embeds.shape[1]:]
        shared, _ = adapter._continue(prefix, adapter.prompt(compressed, ids), logits_to_keep=0)
        prefix.state.rewind(prefix.mark)
        assert prefix.state.cache.get_seq_length() == length
        torch.testing.assert_close(shared[0], expected, **close(torch.float32, whole.embeds.shape[1] + width,
                                                                  depth=adapter.llm_shape.layers))
        text_shared, run = adapter.generate(compressed, question, compressor, 6, prefix=prefix)
        text_whole, _ = adapter.generate(compressed, question, compressor, 6)
        assert text_shared == text_whole
        assert run.video_tokens_out == whole.run.video_tokens_out
    logprob, greedy, _ = adapter.loglikelihood(compressed, QUESTIONS[0], "A", compressor, prefix=prefix)
    reference = adapter.loglikelihood(compressed, QUESTIONS[0], "A", compressor)
    assert logprob == pytest.approx(reference[0], abs=1e-4) and greedy == reference[1]


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in methods.known() if n != "pipeline" and not methods.build(n).shares_prefix])
def test_a_method_that_reads_the_question_shares_no_prefix_and_really_reads_it(tiny_llava, smoke_questions, name):
    """The declaration is true: two questions about the same video keep different video tokens
    (in the visual stage for a method that reads the question there, else in the prefill)."""
    compressor = build(name)
    pixels = tiny_llava.load_video(str(smoke_questions.parent / "videos" / "clip_005.mp4"), FRAMES)
    encoded = tiny_llava.encode_video(pixels, compressor.needs)
    with pytest.raises(ValueError, match="reads the question"):
        tiny_llava.shared_prefix(tiny_llava.compress(encoded, compressor, QUESTIONS[0]), compressor,
                                 tiny_llava.prompt_ids(QUESTIONS[0])[0])
    kept = []
    for question in QUESTIONS:
        compressed = tiny_llava.compress(encoded, compressor, question)
        if compressor.reads_question_before_llm:
            kept.append(compressed.tokens if isinstance(compressed.tokens, torch.Tensor) else compressed.tokens.tokens)
            continue
        assert compressor.has("prefill") and compressor.prefill_reads_question
        prompt = tiny_llava.prompt(compressed, tiny_llava.prompt_ids(question)[0])
        out = tiny_llava.prefill(prompt, compressor, use_cache=False)
        start, end = prompt.span
        kept.append(torch.tensor([i for i in out.kept.tolist() if start <= i < end]))
    assert kept[0].shape != kept[1].shape or not torch.equal(kept[0], kept[1])


@pytest.mark.slow
@pytest.mark.parametrize("method", [[], ["+method=uniform", "retention=0.25"], ["+method=dycoke"],
                                    ["+method=fastv", "retention=0.6"], ["+method=sttm"],
                                    ["+method=scissor", "retention=0.25"]])
def test_the_engine_answers_every_question_as_the_naive_loop(tmp_path, cache_dir, method):
    """On the default setting (every clip asked 4 questions): grouped, read ahead and, where the
    method allows, prefilled once per video, the run gives the naive loop's every prediction."""
    import json

    from tests.helpers import make_cfg, run_config

    predictions = {}
    for engine in ("default", "naive"):
        cfg = make_cfg("model=micro", "task=synthetic", "task.limit=24", "feature_cache=false", *method,
                       f"engine={engine}", f"run_id={engine}", results_dir=tmp_path, cache_dir=cache_dir)
        run_dir = run_config(cfg)
        records = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
        assert len(records) == 24 and all(r["status"] == "ok" for r in records)
        predictions[engine] = {r["doc_id"]: r["prediction"] for r in records}
        shared = {r["engine"]["shared_prefix"] for r in records}
        assert shared == ({False} if engine == "naive" else {methods.build(cfg.method.name).shares_prefix})
    assert predictions["default"] == predictions["naive"]
