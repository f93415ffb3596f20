"""Scores on 0-100, their bootstrap interval, agreement and live-score checks."""

import pytest

from harness.errors import ConfigError
from harness.report.summary import (
    agreement,
    bootstrap_ci,
    live_score_mismatches,
    to_100,
)


def test_scores_are_normalised_and_a_wrong_scale_fails_loudly():
    assert to_100(0.25, 1.0, "x") == 25.0
    assert to_100(25.0, 100.0, "x") == 25.0
    with pytest.raises(ConfigError, match=r"videomme.score=62.5: expected a number in \[0, 1\]"):
        to_100(62.5, 1.0, "videomme.score")


def test_bootstrap_interval_is_seeded_and_has_the_sampling_distribution_s_width():
    values = [0.0, 100.0] * 20
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    spread = [float(i * i) for i in range(40)]
    assert bootstrap_ci(spread, seed=3) != bootstrap_ci(spread, seed=4)  # the seed is used
    # a resample's mean is 100 * Binomial(40, 1/2) / 40: its 2.5 % and 97.5 % quantiles are 35 and 65
    low, high = bootstrap_ci(values)
    assert low == pytest.approx(35.0, abs=2.5) and high == pytest.approx(65.0, abs=2.5)
    assert bootstrap_ci([1.0]) is None
    assert bootstrap_ci([7.0] * 30) == [7.0, 7.0]  # no spread, no interval width
    # a custom statistic (a task's own aggregation) is what gets resampled: the max of a resample
    # of 39 zeros and one 100 is 100 unless the 100 is missed (probability (39/40)^40 = 36 %)
    low, high = bootstrap_ci([0.0] * 39 + [100.0], statistic=max)
    assert (low, high) == (0.0, 100.0)


def test_agreement_compares_answers_on_the_same_samples():
    ok = lambda key, p: {"key": key, "status": "ok", "request": "generate_until", "prediction": p}  # noqa: E731
    records = [ok("a", "A"), ok("b", " B"), ok("c", "C"), {"key": "d", "status": "failed"}]
    reference = [ok("a", "A"), ok("b", "B"), ok("c", "D"), ok("d", "D")]
    assert agreement(records, reference) == pytest.approx(2 / 3)


def test_live_scores_that_differ_from_lmms_eval_are_reported():
    records = [{"doc_id": 0, "score": 1.0}, {"doc_id": 1, "score": 0.0}, {"doc_id": 2, "score": None}]
    logged = [{"doc_id": 0, "accuracy": 1.0}, {"doc_id": 1, "accuracy": 1.0}, {"doc_id": 2, "accuracy": 0.0}]
    assert live_score_mismatches(records, logged, "accuracy") == [1]
