"""Quality metrics of model outputs: classification, multi-label and regression metrics (scikit-learn and scipy),
per-label decision thresholds for multi-label (`tune_thresholds`, fitted on validation data), bootstrap confidence
intervals of the headline metrics, and calibration (ECE, NLL, temperature fitting).

Pure functions of numpy arrays; `quality_metrics` reads model logits, where a NaN row is a sample without a
prediction (see `training.scoring`): it counts as wrong (single-label: no class; multi-label: every label wrong;
probability-based metrics see the uniform prior), and regression leaves it out and counts it.

    >>> import numpy as np
    >>> from training.metrics import quality_metrics
    >>> logits = np.array([[2.0, 0.0], [0.0, 2.0], [np.nan, np.nan]])
    >>> quality_metrics(logits, np.array([0, 1, 1]), ["a", "b"], "single_label_classification")["accuracy"]
    0.6666666666666666
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from scipy import optimize, special, stats
from sklearn import metrics as skm
from sklearn.preprocessing import label_binarize

from training.scoring import MULTI_LABEL, REGRESSION, SINGLE_LABEL, scores

TEMPERATURE_RANGE = (0.05, 20.0)  # the temperatures fit_temperature searches


def finite_or_none(value: Any) -> float | None:
    """A JSON-safe float: None for NaN/inf (an undefined metric)."""
    value = float(value)
    return value if math.isfinite(value) else None


def _no_prediction(predictions: np.ndarray) -> np.ndarray:
    return predictions < 0


def classification_metrics(y_true: Sequence[int], probabilities: np.ndarray, label_names: Sequence[str],
                           predictions: Sequence[int] | None = None) -> dict[str, Any]:
    """Single-label metrics with scikit-learn: accuracy, balanced accuracy, precision/recall/F1 (macro, weighted,
    per class), ROC-AUC (binary, or one-vs-rest macro/weighted), PR-AUC (average precision), log loss and the
    confusion matrix (rows = true, columns = predicted, in `label_names` order).

    `probabilities` is (samples, classes); `predictions` defaults to its argmax, and -1 marks a sample without a
    prediction (it counts as wrong and is left out of the confusion matrix). Macro and weighted averages run over
    the classes that occur in the labels or predictions (scikit-learn's default); a class never predicted has
    precision 0 (`zero_division=0`). A metric that is undefined on these labels (ROC-AUC with one class in the
    labels) is None, with the reason under "undefined".
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    num_classes = len(label_names)
    if probabilities.shape != (len(y_true), num_classes):
        raise ValueError(f"probabilities: expected shape ({len(y_true)}, {num_classes}); got {probabilities.shape}")
    predictions = probabilities.argmax(1) if predictions is None else np.asarray(predictions, dtype=np.int64)
    every_class = list(range(num_classes))
    occurring = sorted(set(y_true.tolist()) | set(predictions[~_no_prediction(predictions)].tolist()))
    undefined: dict[str, str] = {}
    result: dict[str, Any] = {
        "samples": int(len(y_true)),
        "samples_without_prediction": int(_no_prediction(predictions).sum()),
        "accuracy": float(skm.accuracy_score(y_true, predictions)),
    }
    with quiet_warnings():  # "y_pred contains classes not in y_true": expected with -1 or a class missing from y
        result["balanced_accuracy"] = float(skm.balanced_accuracy_score(y_true, predictions))
    for average in ("macro", "weighted"):
        precision, recall, f1, _ = skm.precision_recall_fscore_support(
            y_true, predictions, labels=occurring, average=average, zero_division=0)
        result.update({f"{average}_precision": float(precision), f"{average}_recall": float(recall),
                       f"{average}_f1": float(f1)})
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, predictions, labels=every_class, average=None, zero_division=0)
    result["per_class"] = {
        name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
               "support": int(support[i])}
        for i, name in enumerate(label_names)
    }
    present = np.unique(y_true)
    if len(present) < 2:
        reason = f"only one class ({label_names[int(present[0])] if len(present) else 'none'}) in the labels"
        result["roc_auc"] = result["pr_auc"] = None
        undefined["roc_auc"] = undefined["pr_auc"] = reason
    elif num_classes == 2:
        result["roc_auc"] = float(skm.roc_auc_score(y_true, probabilities[:, 1]))
        result["pr_auc"] = float(skm.average_precision_score(y_true, probabilities[:, 1]))
    else:
        per_class_auc, per_class_ap = {}, {}
        for k, name in enumerate(label_names):
            positives = y_true == k
            if positives.all() or not positives.any():
                per_class_auc[name] = per_class_ap[name] = None
                continue
            per_class_auc[name] = float(skm.roc_auc_score(positives, probabilities[:, k]))
            per_class_ap[name] = float(skm.average_precision_score(positives, probabilities[:, k]))
        if len(present) == num_classes:
            result["roc_auc"] = float(skm.roc_auc_score(y_true, probabilities, multi_class="ovr", average="macro"))
            result["roc_auc_weighted"] = float(
                skm.roc_auc_score(y_true, probabilities, multi_class="ovr", average="weighted"))
            result["pr_auc"] = float(skm.average_precision_score(
                label_binarize(y_true, classes=every_class), probabilities, average="macro"))
        else:
            # scikit-learn refuses one-vs-rest AUC when a class is missing from the labels: average the defined ones
            defined = [v for v in per_class_auc.values() if v is not None]
            result["roc_auc"] = float(np.mean(defined))
            result["pr_auc"] = float(np.mean([v for v in per_class_ap.values() if v is not None]))
            missing = [name for name, v in per_class_auc.items() if v is None]
            undefined["roc_auc_per_class"] = f"no samples of {missing} in the labels; macro over the other classes"
        result["roc_auc_per_class"], result["pr_auc_per_class"] = per_class_auc, per_class_ap
    result["log_loss"] = float(skm.log_loss(y_true, probabilities, labels=every_class))
    result["confusion_matrix"] = skm.confusion_matrix(y_true, predictions, labels=every_class).tolist()
    result["undefined"] = undefined
    return result


def _multilabel_arrays(y_true: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`y_true` as int64 and `probabilities` as float64, both (samples, labels); refuses other shapes."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if y_true.ndim != 2 or probabilities.shape != y_true.shape:
        raise ValueError(f"probabilities: expected the shape of y_true, (samples, labels) = {y_true.shape}; "
                         f"got {probabilities.shape}")
    return y_true, probabilities


def label_thresholds(threshold: float | np.ndarray, num_labels: int) -> np.ndarray:
    """`threshold` (one probability, or one per label) as a float64 (num_labels,) array; refuses another length or a
    value outside [0, 1]."""
    values = np.asarray(threshold, dtype=np.float64)
    if values.ndim > 1 or values.size not in (1, num_labels):
        raise ValueError(f"threshold: expected a float or one per label ({num_labels},); got shape {values.shape}")
    if not np.all((values >= 0) & (values <= 1)):
        raise ValueError(f"threshold: probabilities must lie in [0, 1]; got {values.tolist()}")
    return np.broadcast_to(values, (num_labels,)).copy()


def tune_thresholds(y_true: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Per label, the probability threshold that maximises that label's F1 on these (validation) data: the
    threshold of `sklearn.metrics.precision_recall_curve` with the highest F1 (the lowest such on ties), so that
    `probabilities >= threshold` predicts the label. A label that is constant in the data has no curve to choose
    from and keeps 0.5. `y_true` and `probabilities` are (samples, labels); returns float64 (labels,)."""
    y_true, probabilities = _multilabel_arrays(y_true, probabilities)
    if not np.isfinite(probabilities).all():
        raise ValueError("probabilities: must be finite (a sample without a prediction scores the uniform prior)")
    thresholds = np.full(y_true.shape[1], 0.5)
    for j in range(y_true.shape[1]):
        column = y_true[:, j]
        if column.min() == column.max():
            continue
        precision, recall, candidates = skm.precision_recall_curve(column, probabilities[:, j])
        # the curve's last point (precision 1, recall 0) has no threshold; 0/0 (no true positive) is an F1 of 0
        precision, recall = precision[:-1], recall[:-1]
        f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision),
                       where=precision + recall > 0)
        thresholds[j] = candidates[int(np.argmax(f1))]
    return thresholds


def multilabel_metrics(y_true: np.ndarray, probabilities: np.ndarray, label_names: Sequence[str],
                       threshold: float | np.ndarray = 0.5, predictions: np.ndarray | None = None) -> dict[str, Any]:
    """Multi-label metrics with scikit-learn on (samples, labels) 0/1 arrays: micro/macro F1, subset accuracy
    (reported as "accuracy" too), Hamming loss, per-label F1, ROC-AUC and average precision, and their mean
    ("macro_roc_auc", "mean_average_precision": over the labels that are not constant; None if every label is). A
    label that is all 0 or all 1 has None for its AUC and average precision, with the reason under "undefined".

    `threshold` is one probability or one per label (`tune_thresholds`), reported under "thresholds";
    `predictions` defaults to `probabilities >= threshold`."""
    y_true, probabilities = _multilabel_arrays(y_true, probabilities)
    thresholds = label_thresholds(threshold, y_true.shape[1])
    predictions = (probabilities >= thresholds).astype(np.int64) if predictions is None else np.asarray(predictions)
    varying = y_true.min(0) != y_true.max(0)
    per_label_auc, per_label_ap = {}, {}
    for j, name in enumerate(label_names):
        if not varying[j]:
            per_label_auc[name] = per_label_ap[name] = None
            continue
        per_label_auc[name] = float(skm.roc_auc_score(y_true[:, j], probabilities[:, j]))
        per_label_ap[name] = float(skm.average_precision_score(y_true[:, j], probabilities[:, j]))
    defined = [v for v in per_label_auc.values() if v is not None]
    mean_average_precision = float(skm.average_precision_score(
        y_true[:, varying], probabilities[:, varying], average="macro")) if varying.any() else None
    per_label_f1 = skm.f1_score(y_true, predictions, average=None, zero_division=0)
    subset_accuracy = float(skm.accuracy_score(y_true, predictions))
    return {
        "samples": int(len(y_true)),
        "accuracy": subset_accuracy,
        "subset_accuracy": subset_accuracy,
        "micro_f1": float(skm.f1_score(y_true, predictions, average="micro", zero_division=0)),
        "macro_f1": float(skm.f1_score(y_true, predictions, average="macro", zero_division=0)),
        "hamming_loss": float(skm.hamming_loss(y_true, predictions)),
        "per_label": {name: {"f1": float(per_label_f1[j]), "roc_auc": per_label_auc[name],
                             "average_precision": per_label_ap[name], "support": int(y_true[:, j].sum())}
                      for j, name in enumerate(label_names)},
        "macro_roc_auc": float(np.mean(defined)) if defined else None,
        "mean_average_precision": mean_average_precision,
        "thresholds": {name: float(thresholds[j]) for j, name in enumerate(label_names)},
        "undefined": {f"{metric}[{name}]": "the label is constant in the data"
                      for name, v in per_label_auc.items() if v is None
                      for metric in ("roc_auc", "average_precision")},
    }


def _root_mean_squared_error(y_true: np.ndarray, y_pred: np.ndarray, **options: Any) -> Any:
    # scikit-learn >= 1.4 has it (and deprecates mean_squared_error(squared=False)); older ones take the root here
    if hasattr(skm, "root_mean_squared_error"):
        return skm.root_mean_squared_error(y_true, y_pred, **options)
    return np.sqrt(skm.mean_squared_error(y_true, y_pred, **options))


def regression_metrics(y_true: Sequence[float], y_pred: Sequence[float]) -> dict[str, Any]:
    """MSE, RMSE, MAE, R² (scikit-learn), Pearson and Spearman correlation (scipy); a correlation with a constant
    input is None, with the reason under "undefined"."""
    y_true, y_pred = np.asarray(y_true, dtype=np.float64).ravel(), np.asarray(y_pred, dtype=np.float64).ravel()
    result: dict[str, Any] = {
        "samples": int(len(y_true)),
        "mse": float(skm.mean_squared_error(y_true, y_pred)),
        "rmse": float(_root_mean_squared_error(y_true, y_pred)),
        "mae": float(skm.mean_absolute_error(y_true, y_pred)),
        "r2": finite_or_none(skm.r2_score(y_true, y_pred)) if len(y_true) > 1 else None,
        "undefined": {},
    }
    constant = len(y_true) < 2 or np.ptp(y_true) == 0 or np.ptp(y_pred) == 0
    for name, function in (("pearson", stats.pearsonr), ("spearman", stats.spearmanr)):
        if constant:
            result[name] = None
            result["undefined"][name] = "an input is constant (or fewer than 2 samples)"
        else:
            result[name] = finite_or_none(function(y_true, y_pred).statistic)
    return result


def bootstrap_intervals(statistics: dict[str, Any], samples: int, rounds: int, seed: int,
                        confidence_level: float = 0.95, batch: int | None = None) -> dict[str, list[float] | None]:
    """Percentile bootstrap confidence intervals (scipy.stats.bootstrap over resampled sample indices, so the
    samples stay paired) for each `statistics[name](indices) -> values`, vectorised: `indices` is an integer array
    (..., samples) and the result has shape `indices.shape[:-1]` (wrap a function of one index array with
    `per_resample`). `batch` resamples are drawn at a time (scipy's `batch`; default all `rounds` at once), which
    bounds the memory of the index arrays for many samples. None when there are fewer than 2 samples or `rounds`
    is 0."""
    if rounds == 0 or samples < 2:
        return {name: None for name in statistics}
    intervals = {}
    for offset, (name, statistic) in enumerate(statistics.items()):
        result = stats.bootstrap((np.arange(samples),), lambda indices, axis=-1, f=statistic: f(indices),
                                 n_resamples=rounds, batch=batch, vectorized=True, confidence_level=confidence_level,
                                 method="percentile", random_state=np.random.default_rng([seed, offset]))
        low, high = result.confidence_interval
        intervals[name] = [finite_or_none(low), finite_or_none(high)] if math.isfinite(low) and math.isfinite(high) else None
    return intervals


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], bins: int = 15
                               ) -> dict[str, Any]:
    """ECE with `bins` equal-width bins on [0, 1] (the last bin includes 1): the sample-weighted mean of
    |accuracy - mean confidence| over the non-empty bins. Returns {"ece", "bins": [{lower, upper, count,
    confidence, accuracy}]} (empty bins have None for confidence and accuracy)."""
    confidences = np.asarray(confidences, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    counts = stats.binned_statistic(confidences, correct, "count", bins=edges).statistic
    accuracy = stats.binned_statistic(confidences, correct, "mean", bins=edges).statistic
    confidence = stats.binned_statistic(confidences, confidences, "mean", bins=edges).statistic
    filled = counts > 0
    ece = float(np.sum(counts[filled] / counts.sum() * np.abs(accuracy[filled] - confidence[filled])))
    return {
        "ece": ece,
        "bins": [{"lower": float(edges[i]), "upper": float(edges[i + 1]), "count": int(counts[i]),
                  "confidence": finite_or_none(confidence[i]) if filled[i] else None,
                  "accuracy": finite_or_none(accuracy[i]) if filled[i] else None} for i in range(bins)],
    }


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, problem_type: str = SINGLE_LABEL) -> float:
    """Mean NLL of integer labels under softmax(logits) (single-label), or mean binary cross-entropy of 0/1 labels
    under sigmoid(logits) (multi-label)."""
    logits = np.asarray(logits, dtype=np.float64)
    if problem_type == MULTI_LABEL:
        labels = np.asarray(labels, dtype=np.float64)
        return float(-np.mean(labels * special.log_expit(logits) + (1 - labels) * special.log_expit(-logits)))
    log_probabilities = special.log_softmax(logits, axis=1)
    return float(-np.mean(log_probabilities[np.arange(len(labels)), np.asarray(labels, dtype=np.int64)]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, problem_type: str = SINGLE_LABEL) -> float:
    """The temperature T > 0 that minimises the NLL of `logits / T` (scipy's bounded scalar search over log T,
    T in `TEMPERATURE_RANGE`). Fit it on validation logits; it does not change the argmax."""
    logits = np.asarray(logits, dtype=np.float64)
    result = optimize.minimize_scalar(
        lambda log_t: negative_log_likelihood(logits / math.exp(log_t), labels, problem_type),
        bounds=tuple(math.log(t) for t in TEMPERATURE_RANGE), method="bounded", options={"xatol": 1e-5})
    return float(math.exp(result.x))


def predicted_labels(logits: np.ndarray, labels: np.ndarray, problem_type: str,
                     thresholds: np.ndarray | None = None) -> np.ndarray:
    """Class ids (single-label; -1 = no prediction) or 0/1 rows (multi-label: sigmoid(logits) >= `thresholds`, one
    probability per label, 0.5 by default; a sample without prediction gets the complement of its labels, i.e.
    counts as wrong on every label)."""
    missing = np.isnan(logits).any(1)
    if problem_type == MULTI_LABEL:
        # on probabilities, not logits, so tuned thresholds (probabilities of samples) split exactly as they were fit
        threshold = label_thresholds(0.5 if thresholds is None else thresholds, logits.shape[1])
        predicted = (scores(logits, MULTI_LABEL) >= threshold).astype(np.int64)
        predicted[missing] = 1 - labels[missing]
        return predicted
    return np.where(missing, -1, np.nan_to_num(logits, nan=0.0).argmax(1))


def _only_multilabel_thresholds(thresholds: np.ndarray | None, problem_type: str) -> None:
    if thresholds is not None and problem_type != MULTI_LABEL:
        raise ValueError(f"thresholds: per-label thresholds are for {MULTI_LABEL}; this is {problem_type}")


def quality_metrics(logits: np.ndarray, labels: np.ndarray, label_names: Sequence[str], problem_type: str,
                    thresholds: np.ndarray | None = None) -> dict[str, Any]:
    """The metrics of `problem_type` for model outputs `logits` (NaN rows: samples without a prediction).
    `thresholds` (multi-label only; refused otherwise): one probability per label (`tune_thresholds` on validation
    data) instead of 0.5."""
    _only_multilabel_thresholds(thresholds, problem_type)
    logits = np.asarray(logits, dtype=np.float64)
    if problem_type == REGRESSION:
        missing = np.isnan(logits).any(1)
        if missing.all():
            return {"samples": int(len(logits)), "samples_without_prediction": int(missing.sum()), "mse": None,
                    "rmse": None, "mae": None, "r2": None, "pearson": None, "spearman": None,
                    "undefined": {"all": "no sample has a prediction"}}
        values = logits[~missing]
        result = regression_metrics(labels[~missing], values[:, 0] if values.shape[1] == 1 else values)
        return {**result, "samples_without_prediction": int(missing.sum())}
    probabilities = scores(logits, problem_type)
    predicted = predicted_labels(logits, labels, problem_type, thresholds)
    if problem_type == MULTI_LABEL:
        result = multilabel_metrics(labels, probabilities, label_names, predictions=predicted,
                                    threshold=0.5 if thresholds is None else thresholds)
        return {**result, "samples_without_prediction": int(np.isnan(logits).any(1).sum())}
    return classification_metrics(labels, probabilities, label_names, predictions=predicted)


def primary_metric(problem_type: str) -> str:
    """The metric the ablation and robustness views lead with: R² for regression, else accuracy."""
    return "r2" if problem_type == REGRESSION else "accuracy"


def headline_keys(problem_type: str) -> tuple[str, ...]:
    """The headline metrics of `problem_type` (those with bootstrap intervals)."""
    if problem_type == REGRESSION:
        return ("mae", "rmse", "r2", "pearson", "spearman")
    if problem_type == MULTI_LABEL:
        return ("accuracy", "micro_f1", "macro_f1", "hamming_loss")  # accuracy: subset accuracy
    return ("accuracy", "macro_f1", "balanced_accuracy")


def per_resample(statistic: Callable[[np.ndarray], float]) -> Callable[[np.ndarray], np.ndarray]:
    """A function of one index array (samples,) applied to every row of an index array (..., samples)."""
    return lambda indices: np.apply_along_axis(statistic, -1, indices)


def _class_counts(values: np.ndarray, num_classes: int) -> np.ndarray:
    """Occurrences of each class id along the last axis of `values` (..., samples); -1 (no class) is not counted."""
    flat = values.reshape(-1, values.shape[-1])
    offsets = np.arange(len(flat))[:, None] * num_classes + flat
    counts = np.bincount(offsets[flat >= 0], minlength=len(flat) * num_classes)
    return counts.reshape(*values.shape[:-1], num_classes)


def headline_statistics(labels: np.ndarray, logits: np.ndarray, label_names: Sequence[str], problem_type: str,
                        thresholds: np.ndarray | None = None
                        ) -> tuple[int, dict[str, Callable[[np.ndarray], np.ndarray]]]:
    """(samples, {headline metric: vectorised statistic(indices)}) for `bootstrap_intervals`, the same definitions
    as `quality_metrics` (with the same multi-label `thresholds`). Classification statistics are computed with numpy
    from per-class (per-label) counts of all the resamples at once (the bootstrap's cost would otherwise be
    thousands of scikit-learn calls); regression ones with one scikit-learn/scipy call over all resamples (a
    resample is one output column for scikit-learn, one row along `axis` for scipy)."""
    _only_multilabel_thresholds(thresholds, problem_type)
    if problem_type == REGRESSION:
        keep = ~np.isnan(logits).any(1)
        y, p = np.asarray(labels, dtype=np.float64)[keep], logits[keep][:, 0]

        def columns(metric):  # metric(y_true, y_pred, multioutput=...) with each resample as one output column
            def statistic(i):
                flat = i.reshape(-1, i.shape[-1])  # (resamples, samples)
                return metric(y[flat].T, p[flat].T, multioutput="raw_values").reshape(i.shape[:-1])
            return statistic

        def spearman(i):  # Spearman's rho is Pearson's r of the (average) ranks, as scipy.stats.spearmanr computes it
            return stats.pearsonr(stats.rankdata(y[i], axis=-1), stats.rankdata(p[i], axis=-1), axis=-1).statistic

        return len(y), {"mae": columns(skm.mean_absolute_error), "rmse": columns(_root_mean_squared_error),
                        "r2": columns(skm.r2_score),
                        "pearson": lambda i: stats.pearsonr(y[i], p[i], axis=-1).statistic, "spearman": spearman}
    predicted = predicted_labels(logits, labels, problem_type, thresholds)
    if problem_type == MULTI_LABEL:
        truth, hit = labels.astype(bool), predicted.astype(bool)

        def label_counts(i):  # per label: 2 * true positives, and false positives + false negatives; (..., labels)
            y, p = truth[i], hit[i]  # (..., samples, labels)
            return 2 * (y & p).sum(-2), (y ^ p).sum(-2)

        def micro_f1(i):
            doubled_hits, errors = (count.sum(-1) for count in label_counts(i))
            return doubled_hits / np.maximum(doubled_hits + errors, 1)

        def macro_f1(i):  # mean over every label; 0 for a label neither true nor predicted (zero_division=0)
            doubled_hits, errors = label_counts(i)
            return (doubled_hits / np.maximum(doubled_hits + errors, 1)).mean(-1)

        return len(labels), {"accuracy": lambda i: (truth[i] == hit[i]).all(-1).mean(-1),
                             "micro_f1": micro_f1, "macro_f1": macro_f1,
                             "hamming_loss": lambda i: (truth[i] != hit[i]).mean((-2, -1))}
    num_classes = len(label_names)

    def counts(i):  # per class: true samples, predicted samples, true positives; each (..., classes)
        y, p = labels[i], predicted[i]
        return (_class_counts(y, num_classes), _class_counts(p, num_classes),
                _class_counts(np.where(y == p, y, -1), num_classes))

    def macro_f1(i):  # macro over the classes in the labels or predictions; 0 for a class never predicted
        true, pred, hits = counts(i)
        occurring = true + pred > 0
        f1 = 2 * hits / np.maximum(true + pred, 1)
        return (f1 * occurring).sum(-1) / occurring.sum(-1)

    def balanced_accuracy(i):  # mean recall over the classes in the labels
        true, _, hits = counts(i)
        present = true > 0
        return (hits / np.maximum(true, 1) * present).sum(-1) / present.sum(-1)

    return len(labels), {"accuracy": lambda i: (labels[i] == predicted[i]).mean(-1),
                         "macro_f1": macro_f1, "balanced_accuracy": balanced_accuracy}


def calibration_metrics(logits: np.ndarray, labels: np.ndarray, problem_type: str, bins: int) -> dict[str, Any]:
    """ECE (`expected_calibration_error` with `bins` bins, on the top-class confidence for single-label or on each
    label's max(p, 1 - p) for multi-label) and NLL of the samples that have a prediction (non-NaN `logits` rows)."""
    keep = ~np.isnan(logits).any(1)
    probabilities, labels = scores(logits[keep], problem_type), labels[keep]
    if problem_type == MULTI_LABEL:
        confidences = np.maximum(probabilities, 1 - probabilities).ravel()
        correct = ((probabilities >= 0.5).astype(np.int64) == labels).ravel()
    else:
        confidences, correct = probabilities.max(1), probabilities.argmax(1) == labels
    return {**expected_calibration_error(confidences, correct, bins),
            "nll": negative_log_likelihood(logits[keep], labels, problem_type)}


@contextlib.contextmanager
def quiet_warnings() -> Iterator[None]:
    """Silence warnings for the block: resamples of a bootstrap often lack a class, and scikit-learn warns about
    each one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
