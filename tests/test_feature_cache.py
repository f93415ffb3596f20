"""Cached vision features are exact, reused across a sweep, and never cross models or settings."""

import os

import pytest
import torch

from harness.data.feature_cache import FeatureCache
from harness.models.llava_onevision import LlavaOneVision
from harness.run.rundir import read_samples
from tests.helpers import run_config

NONE, SCORES = frozenset(), frozenset({"patch_scores"})


@pytest.mark.slow
def test_second_run_reuses_features_and_gives_identical_answers(cfg_factory):
    first = run_config(cfg_factory("+method=uniform", "retention=0.5", "task.limit=4"))
    second = run_config(cfg_factory("+method=uniform", "retention=0.25", "task.limit=4"))
    uncached = run_config(cfg_factory("+method=uniform", "retention=0.25", "task.limit=4",
                               "feature_cache=false", "run_id=uncached"))
    assert all(r["vision_cached"] for r in read_samples(second / "samples.jsonl"))
    assert not any(r["vision_cached"] for r in read_samples(uncached / "samples.jsonl"))
    cached = {r["key"]: r["prediction"] for r in read_samples(second / "samples.jsonl")}
    fresh = {r["key"]: r["prediction"] for r in read_samples(uncached / "samples.jsonl")}
    assert cached == fresh
    del first


def test_entries_are_exact_and_keyed_by_everything_that_changes_features(tiny_model_dir, smoke_questions, tmp_path):
    adapter = LlavaOneVision(str(tiny_model_dir))
    video = str(smoke_questions.parent / "videos" / "clip_001.mp4")
    cache = FeatureCache(tmp_path, adapter.fingerprint)
    p = adapter.preprocessing
    key = cache.key(video, 4, p, NONE)
    encoded = adapter.encode_video(torch.randn(4, 3, 384, 384))
    cache.save(key, encoded)
    loaded = cache.load(key, "cpu")
    assert loaded.cached and torch.equal(loaded.visual.features, encoded.visual.features)
    assert torch.equal(loaded.extras["newline"], encoded.extras["newline"])
    # the encoding's measured compute time travels with the entry (methods compare on compute time)
    assert loaded.timings == {"vision": pytest.approx(encoded.timings["vision"]), "scoring": 0.0}
    with_scores = adapter.encode_video(torch.randn(4, 3, 384, 384), needs=frozenset({"patch_scores"}))
    cache.save(cache.key(video, 4, p, SCORES), with_scores)
    reloaded = cache.load(cache.key(video, 4, p, SCORES), "cpu")
    assert torch.equal(reloaded.visual.patch_scores, with_scores.visual.patch_scores)
    assert torch.equal(reloaded.visual.patch_keys, with_scores.visual.patch_keys)
    hidden = adapter.encode_video(torch.randn(4, 3, 384, 384), needs=frozenset({"encoder_hidden"}))
    cache.save(cache.key(video, 4, p, frozenset({"encoder_hidden"})), hidden)
    assert torch.equal(cache.load(cache.key(video, 4, p, frozenset({"encoder_hidden"})), "cpu")
                       .visual.encoder_hidden, hidden.visual.encoder_hidden)
    # scoring is compressor work: its measured time survives the cache, the encoder's does not
    assert with_scores.timings["scoring"] > 0
    assert reloaded.timings["scoring"] == pytest.approx(with_scores.timings["scoring"])
    # another model, another frame count, patch scores, or a changed video file: other entries
    other_model = FeatureCache(tmp_path, "0" * 40)
    assert other_model.load(other_model.key(video, 4, p, NONE), "cpu") is None
    assert cache.key(video, 8, p, NONE) != key
    assert cache.key(video, 4, p, SCORES) != key != cache.key(video, 4, p, frozenset({"encoder_hidden"}))
    st = os.stat(video)
    os.utime(video, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    try:
        assert cache.key(video, 4, p, NONE) != key
    finally:
        os.utime(video, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_fingerprint_changes_with_dtype(tiny_model_dir):
    a = LlavaOneVision(str(tiny_model_dir))
    b = LlavaOneVision(str(tiny_model_dir), dtype="bfloat16")
    assert a.fingerprint != b.fingerprint
