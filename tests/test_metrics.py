"""training.metrics (multi-label thresholds and average precision, RMSE, the headline metrics and their bootstrap
statistics) and the exact Shapley values of training.interpretability: every number equals scikit-learn's / scipy's
or a hand computation."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
from scipy import special
from sklearn import metrics as skm

from training.interpretability import shapley_values, subset_value
from training.metrics import (
    bootstrap_intervals,
    headline_keys,
    headline_statistics,
    multilabel_metrics,
    quality_metrics,
    quiet_warnings,
    regression_metrics,
    tune_thresholds,
)

SINGLE, MULTI, REGRESSION = "single_label_classification", "multi_label_classification", "regression"
LABELS3 = ["cat", "dog", "owl"]


def _separable_label_data(rng, samples=60):
    """(y, p) with 3 labels: "cat" positives have p in [0.2, 0.3] and negatives p < 0.15 (best threshold in
    (0.15, 0.3], F1 1, yet F1 0 at 0.5); "dog" is constant; "owl" is noise."""
    y = rng.integers(0, 2, (samples, 3))
    y[:, 1] = 1
    p = rng.random((samples, 3))
    p[:, 0] = np.where(y[:, 0] == 1, rng.uniform(0.2, 0.3, samples), rng.uniform(0.0, 0.15, samples))
    return y, p


# ---- multi-label: tuned thresholds ----------------------------------------------------------------------------------

def test_tuned_threshold_recovers_the_separating_threshold_and_keeps_0_5_for_a_constant_label(rng):
    y, p = _separable_label_data(rng)
    thresholds = tune_thresholds(y, p)
    assert thresholds.dtype == np.float64 and thresholds.shape == (3,)
    assert 0.15 < thresholds[0] <= 0.3
    assert skm.f1_score(y[:, 0], p[:, 0] >= thresholds[0]) == 1.0
    assert skm.f1_score(y[:, 0], p[:, 0] >= 0.5, zero_division=0) == 0.0  # what the fixed threshold would give
    assert thresholds[1] == 0.5


def test_tuned_threshold_reaches_the_best_f1_over_every_candidate(rng):
    y, p = _separable_label_data(rng)
    best = max(skm.f1_score(y[:, 2], p[:, 2] >= t, zero_division=0) for t in np.unique(p[:, 2]))
    assert skm.f1_score(y[:, 2], p[:, 2] >= tune_thresholds(y, p)[2]) == pytest.approx(best, abs=1e-12)


def test_multilabel_metrics_take_per_label_thresholds_and_report_them(rng):
    y, p = _separable_label_data(rng)
    thresholds = np.array([0.25, 0.5, 0.7])
    result = multilabel_metrics(y, p, LABELS3, threshold=thresholds)
    predictions = (p >= thresholds).astype(int)
    assert result["micro_f1"] == pytest.approx(skm.f1_score(y, predictions, average="micro"))
    assert result["macro_f1"] == pytest.approx(skm.f1_score(y, predictions, average="macro", zero_division=0))
    assert result["hamming_loss"] == pytest.approx(skm.hamming_loss(y, predictions))
    assert result["subset_accuracy"] == result["accuracy"] == skm.accuracy_score(y, predictions)
    assert result["thresholds"] == {"cat": 0.25, "dog": 0.5, "owl": 0.7}
    assert multilabel_metrics(y, p, LABELS3, threshold=0.3)["thresholds"] == {name: 0.3 for name in LABELS3}
    with pytest.raises(ValueError, match="threshold"):
        multilabel_metrics(y, p, LABELS3, threshold=np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="threshold"):
        multilabel_metrics(y, p, LABELS3, threshold=1.5)


def test_mean_average_precision_equals_sklearn_over_the_labels_that_vary(rng):
    y, p = _separable_label_data(rng)
    result = multilabel_metrics(y, p, LABELS3)
    by_hand = [skm.average_precision_score(y[:, k], p[:, k]) for k in (0, 2)]
    assert result["per_label"]["cat"]["average_precision"] == pytest.approx(by_hand[0]) == 1.0
    assert result["per_label"]["owl"]["average_precision"] == pytest.approx(by_hand[1])
    assert result["mean_average_precision"] == pytest.approx(np.mean(by_hand), abs=1e-12)
    assert result["per_label"]["dog"]["average_precision"] is None and "average_precision[dog]" in result["undefined"]
    assert multilabel_metrics(np.ones((5, 3), int), p[:5], LABELS3)["mean_average_precision"] is None


def test_quality_metrics_pass_tuned_thresholds_on_to_the_predictions(rng):
    y, p = _separable_label_data(rng)
    logits = special.logit(p)
    logits[:3] = np.nan  # samples without a prediction: wrong on every label, whatever the thresholds
    thresholds = tune_thresholds(y[3:], p[3:])
    result = quality_metrics(logits, y, LABELS3, MULTI, thresholds=thresholds)
    predictions = (special.expit(logits) >= thresholds).astype(int)
    predictions[:3] = 1 - y[:3]
    assert result["macro_f1"] == pytest.approx(skm.f1_score(y, predictions, average="macro", zero_division=0))
    assert result["per_label"]["cat"]["f1"] == pytest.approx(skm.f1_score(y[:, 0], predictions[:, 0]))
    assert result["thresholds"] == dict(zip(LABELS3, thresholds.tolist()))
    assert result["samples_without_prediction"] == 3
    with pytest.raises(ValueError, match="thresholds"):
        quality_metrics(logits[:, :2], y[:, 0], ["a", "b"], SINGLE, thresholds=thresholds[:2])


# ---- regression -----------------------------------------------------------------------------------------------------

def test_rmse_is_the_root_of_sklearns_mse_with_or_without_root_mean_squared_error(rng, monkeypatch):
    y = rng.normal(size=50)
    prediction = y + rng.normal(scale=0.3, size=50)
    mse = skm.mean_squared_error(y, prediction)
    assert regression_metrics(y, prediction)["rmse"] == pytest.approx(math.sqrt(mse), abs=1e-12)
    monkeypatch.delattr(skm, "root_mean_squared_error", raising=False)  # an older scikit-learn
    assert regression_metrics(y, prediction)["rmse"] == pytest.approx(math.sqrt(mse), abs=1e-12)


# ---- headline metrics and their bootstrap statistics ----------------------------------------------------------------

def test_headline_keys_per_problem_type():
    assert headline_keys(REGRESSION) == ("mae", "rmse", "r2", "pearson", "spearman")
    assert set(headline_keys(MULTI)) >= {"micro_f1", "macro_f1", "accuracy", "hamming_loss"}
    assert headline_keys(SINGLE) == ("accuracy", "macro_f1", "balanced_accuracy")


@pytest.mark.parametrize("case", ["random", "ties", "with samples without prediction"])
def test_regression_bootstrap_statistics_equal_the_reported_metrics(case, rng):
    """mae, rmse, r2, pearson and spearman over all resamples at once equal `regression_metrics` on each resample."""
    labels = rng.normal(size=40)
    logits = (labels + rng.normal(scale=0.5, size=40))[:, None]
    if case == "ties":  # spearman with average ranks
        labels, logits = np.round(labels), np.round(logits)
    if case == "with samples without prediction":
        logits[::6] = np.nan
    samples, statistics = headline_statistics(labels, logits, ["y"], REGRESSION)
    assert set(statistics) == set(headline_keys(REGRESSION))
    keep = ~np.isnan(logits[:, 0])
    assert samples == keep.sum()
    indices = rng.integers(0, samples, (25, samples))
    vectorised = {name: statistic(indices) for name, statistic in statistics.items()}
    for r, resample in enumerate(indices):
        expected = regression_metrics(labels[keep][resample], logits[keep][resample, 0])
        for name in statistics:
            assert vectorised[name][r] == pytest.approx(expected[name], abs=1e-12), (name, r)
    reported = quality_metrics(logits, labels, ["y"], REGRESSION)
    assert all(reported[name] is not None for name in headline_keys(REGRESSION))


def test_regression_bootstrap_of_300_rows_and_1000_rounds_takes_under_5_seconds(rng):
    labels = rng.normal(size=300)
    logits = (labels + rng.normal(scale=0.5, size=300))[:, None]
    started = time.perf_counter()
    samples, statistics = headline_statistics(labels, logits, ["y"], REGRESSION)
    with quiet_warnings():
        intervals = bootstrap_intervals(statistics, samples, rounds=1000, seed=0)
    assert time.perf_counter() - started < 5.0
    reported = regression_metrics(labels, logits[:, 0])
    for name, (low, high) in intervals.items():
        assert low <= reported[name] <= high, name


@pytest.mark.parametrize("thresholds", [None, np.array([0.25, 0.5, 0.7])])
def test_multilabel_bootstrap_statistics_equal_the_reported_metrics(thresholds, rng):
    labels = rng.integers(0, 2, (50, 3))
    labels[:, 1] = 0  # a label never true: its F1 is 0 unless predicted
    logits = rng.normal(size=(50, 3)) + labels
    logits[::9] = np.nan
    samples, statistics = headline_statistics(labels, logits, LABELS3, MULTI, thresholds=thresholds)
    assert set(statistics) == set(headline_keys(MULTI))
    indices = rng.integers(0, samples, (25, samples))
    vectorised = {name: statistic(indices) for name, statistic in statistics.items()}
    for r, resample in enumerate(indices):
        expected = quality_metrics(logits[resample], labels[resample], LABELS3, MULTI, thresholds=thresholds)
        for name in statistics:
            assert vectorised[name][r] == pytest.approx(expected[name], abs=1e-12), (name, r)


# ---- Shapley values per modality ------------------------------------------------------------------------------------

def _all_subsets(modalities):
    return [frozenset(c) for size in range(len(modalities) + 1) for c in itertools.combinations(modalities, size)]


def test_shapley_values_of_a_hand_computed_three_player_game():
    # v: {} 0, a 1, b 2, c 0, ab 4, ac 1, bc 3, abc 6; weights 1/3 (|S| = 0 or 2) and 1/6 (|S| = 1)
    # phi_a = 1/3 * 1 + 1/6 * (4 - 2) + 1/6 * (1 - 0) + 1/3 * (6 - 3) = 11/6
    # phi_b = 1/3 * 2 + 1/6 * (4 - 1) + 1/6 * (3 - 0) + 1/3 * (6 - 1) = 10/3
    # phi_c = 1/3 * 0 + 1/6 * (1 - 1) + 1/6 * (3 - 2) + 1/3 * (6 - 4) = 5/6
    v = {"": 0, "a": 1, "b": 2, "c": 0, "ab": 4, "ac": 1, "bc": 3, "abc": 6}
    phi = shapley_values({frozenset(k): np.array([float(x)]) for k, x in v.items()}, ["a", "b", "c"])
    assert phi["a"] == pytest.approx([11 / 6]) and phi["b"] == pytest.approx([10 / 3])
    assert phi["c"] == pytest.approx([5 / 6])


def test_shapley_values_are_efficient(rng):
    modalities = ["vision", "text", "audio"]
    values = {subset: rng.normal(size=(7, 4)) for subset in _all_subsets(modalities)}
    phi = shapley_values(values, modalities)
    total = sum(phi.values())
    assert total.shape == (7, 4)
    np.testing.assert_allclose(total, values[frozenset(modalities)] - values[frozenset()], rtol=0, atol=1e-12)
    one = shapley_values({frozenset(): np.zeros(3), frozenset({"text"}): np.arange(3.0)}, ["text"])
    assert one["text"].tolist() == [0.0, 1.0, 2.0]  # alone, a modality gets v({m}) - v({})


def test_symmetric_modalities_get_equal_values_and_a_dummy_gets_zero(rng):
    # v depends on how many of vision and text a subset holds, never on audio
    by_count = rng.normal(size=(3, 5))
    modalities = ["vision", "text", "audio"]
    values = {subset: by_count[len(subset & {"vision", "text"})] for subset in _all_subsets(modalities)}
    phi = shapley_values(values, modalities)
    np.testing.assert_allclose(phi["vision"], phi["text"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(phi["audio"], 0.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(phi["vision"], (by_count[2] - by_count[0]) / 2, rtol=0, atol=1e-12)


def test_shapley_values_are_nan_for_a_sample_whose_value_is_nan_and_refuse_a_missing_subset(rng):
    modalities = ["vision", "text"]
    values = {subset: rng.normal(size=4) for subset in _all_subsets(modalities)}
    values[frozenset({"text"})][1] = np.nan
    phi = shapley_values(values, modalities)
    for modality in modalities:
        assert np.isnan(phi[modality][1]) and np.isfinite(np.delete(phi[modality], 1)).all()
    for missing in (frozenset(), frozenset({"vision"})):
        with pytest.raises(ValueError, match="subset_values"):
            shapley_values({k: v for k, v in values.items() if k != missing}, modalities)
    with pytest.raises(ValueError, match="subset_values"):
        shapley_values({**values, frozenset({"audio"}): np.zeros(4)}, modalities)


def test_subset_value_is_the_log_odds_of_the_reference_class_under_the_softmax():
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 1000.0], [np.nan, np.nan, np.nan]])
    p = np.exp([1.0, 2.0, 3.0]) / np.exp([1.0, 2.0, 3.0]).sum()
    value = subset_value(logits, SINGLE, reference_class=np.array([0, 2, 1]))
    assert value[0] == pytest.approx(math.log(p[0] / (1 - p[0])), abs=1e-12)
    assert value[1] == pytest.approx(1000.0 - math.log(2.0), abs=1e-9)  # p rounds to 1, the log-odds stay finite
    assert value[2] == pytest.approx(math.log(1 / 2))  # no prediction: the uniform prior over 3 classes
    with pytest.raises(ValueError, match="reference_class"):
        subset_value(logits, SINGLE)
    with pytest.raises(ValueError, match="reference_class"):
        subset_value(logits, SINGLE, reference_class=np.array([0, 3, 1]))


def test_subset_value_for_multi_label_and_regression():
    logits = np.array([[0.5, -2.0], [np.nan, np.nan]])
    assert subset_value(logits, MULTI).tolist() == [[0.5, -2.0], [0.0, 0.0]]  # 0: the log-odds of p = 0.5
    regression = subset_value(logits[:, :1], REGRESSION)
    assert regression[0, 0] == 0.5 and np.isnan(regression[1, 0])
    with pytest.raises(ValueError, match="problem_type"):
        subset_value(logits, "ranking")


def test_contributions_from_subset_values_sum_to_the_log_odds_with_every_modality_minus_the_prior(rng):
    modalities = ["vision", "text", "audio"]
    logits = {subset: rng.normal(size=(6, 4)) for subset in _all_subsets(modalities)}
    logits[frozenset()] = np.full((6, 4), np.nan)  # no modality, no prediction
    predicted = logits[frozenset(modalities)].argmax(1)
    values = {subset: subset_value(x, SINGLE, reference_class=predicted) for subset, x in logits.items()}
    phi = shapley_values(values, modalities)
    p = special.softmax(logits[frozenset(modalities)], axis=1)[np.arange(6), predicted]
    np.testing.assert_allclose(sum(phi.values()), np.log(p / (1 - p)) - math.log(1 / 3), rtol=0, atol=1e-12)
