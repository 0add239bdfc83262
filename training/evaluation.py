"""`mm-eval`: one reproducible report of an mm-fusion classifier's quality, modality robustness, calibration,
efficiency and interpretability.

    mm-eval --model outputs/sample/model --data ~/.cache/mm-fusion/sample/test.csv
    mm-eval --model outputs/run/model --data my_dataset_dir --split test --validation_data val.csv --batch_size 64

`evaluate_model` does the work (mm-train calls it for its final evaluation); `main` is the command line.
It writes into the output folder (default `<model>/evaluation`):

- `report.json`: everything, machine-readable, with the model, data, seed and package versions. Every number that
  depends on timing or on the machine's load is under the key `"efficiency"` and nowhere else, so two runs with the
  same seed give the same file apart from that key.
- `report.md`: the tables a person reads, with links to the plots.
- `confusion_matrix.png`, `reliability_diagram.png`, `robustness.png`, `ablation.png` (matplotlib, Agg canvas).
- `predictions.jsonl`: per sample, the label, prediction, probabilities and modality contributions.

Conventions, also stated in every report (`report["conventions"]`):

- Modalities have user-facing names "image", "text", "audio" everywhere in reports and in `explain_sample`; the model
  calls its vision stream "vision" internally (`model.modalities`).
- A modality is withheld by setting its `has_image`/`has_text`/`has_audio` mask to False, never by zero-filling
  inputs, so the tower does not run for that sample and the fusion does not see it. A sample left with no modality
  has no prediction and counts as wrong (uniform probabilities for the probability-based metrics; for regression it
  is left out of the metrics and counted).
- ECE uses 15 equal-width bins (settable) on the top-class confidence (single-label) or on each label's
  max(p, 1 - p) (multi-label).
- The contribution of a modality to a sample is p(predicted class | all its modalities) - p(predicted class | that
  modality withheld); a sample with only that modality falls back to the uniform prior 1 / num_labels.
- Corruptions are applied to the decoded media before the processor, with a numpy Generator seeded per
  (seed, corruption, level, row), so results do not depend on batch size, order or workers.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets
import numpy as np
import torch
from PIL import Image, ImageFilter
from scipy import optimize, special, stats
from sklearn import metrics as skm
from sklearn.preprocessing import label_binarize
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import HfArgumentParser
from transformers.utils import logging as hf_logging

import modeling_mm  # noqa: F401  (registers the Auto classes)
from modeling_mm.modeling_mm import PRESENCE_KEYS
from processors import MMFusionProcessor, MediaLimits, load_audio, load_image
from training.data import SPLIT_NAMES, DataSettings, MMFusionCollator, _undecoded, find_bad_rows, load_table

logger = logging.getLogger("mm_fusion.evaluation")

# user-facing modality names (reports, explain_sample) <-> the model's internal stream names
USER_NAMES = {"vision": "image", "text": "text", "audio": "audio"}
SINGLE_LABEL, MULTI_LABEL, REGRESSION = "single_label_classification", "multi_label_classification", "regression"
CORRUPTION_KINDS = ("audio_noise", "image_blur", "image_noise", "text_typos")
CORRUPTION_MODALITY = {"audio_noise": "audio", "image_blur": "vision", "image_noise": "vision", "text_typos": "text"}
CORRUPTION_LEVEL_NAMES = {"audio_noise": "SNR (dB)", "image_blur": "blur radius (px)",
                          "image_noise": "noise std (fraction of 255)", "text_typos": "typo rate per character"}
TEMPERATURE_RANGE = (0.05, 20.0)  # the temperatures fit_temperature searches
# every plot has this size, so a reader (and the tests) can rely on it: 640 x 480 pixels
FIGURE_SIZE, FIGURE_DPI = (6.4, 4.8), 100

CONVENTIONS = [
    "Modality names: image, text, audio (the model's internal stream 'vision' is reported as 'image').",
    "A modality is withheld by setting its has_* mask to False (its tower does not run), never by zero-filling "
    "inputs. A sample left with no modality has no prediction and counts as wrong (uniform probabilities for "
    "probability-based metrics; for regression it is left out and counted).",
    "ECE: 15 equal-width bins (settable) on the top-class confidence (single-label) or on each label's "
    "max(p, 1 - p) (multi-label); reported as is and, when validation data is given, separately after temperature "
    "scaling fitted on the validation data.",
    "Contribution of a modality to a sample: p(predicted | all of the sample's modalities) - p(predicted | that "
    "modality withheld); with that modality alone, the withheld prediction is the uniform prior 1 / num_labels.",
    "Cross-attention mass: the attention weight each stream's real query tokens put on the tokens of each other "
    "stream (and on the learned sink), averaged over heads, query tokens, fusion layers and samples.",
    "Corruptions are applied to decoded media before the processor, seeded per (seed, corruption, level, row).",
    "Every timing- or load-dependent number is under 'efficiency'.",
]


@dataclass
class EvaluationSettings:
    """What `evaluate_model` computes and how. Every field is also an `mm-eval` flag.

    Example:

    ```python
    >>> from training.evaluation import EvaluationSettings
    >>> settings = EvaluationSettings(bootstrap_rounds=200, skip_efficiency=True)
    >>> settings.calibration_bins, settings.audio_snr_db
    (15, [20.0, 10.0, 0.0, -10.0])
    ```
    """

    batch_size: int = field(default=32, metadata={"help": "Samples per forward pass."})
    num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes that decode media."})
    seed: int = field(default=42, metadata={"help": "Seed of the bootstrap and the corruptions."})
    bootstrap_rounds: int = field(default=1000, metadata={
        "help": "Bootstrap resamples for the confidence intervals of the headline metrics (0 = none)."})
    confidence_level: float = field(default=0.95, metadata={"help": "Confidence level of the bootstrap intervals."})
    audio_snr_db: list[float] = field(default_factory=lambda: [20.0, 10.0, 0.0, -10.0], metadata={
        "help": "Robustness: signal-to-noise ratios (dB) of white noise added to the audio."})
    image_blur_radii: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0], metadata={
        "help": "Robustness: Gaussian blur radii (pixels of the original image)."})
    image_noise_std: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2], metadata={
        "help": "Robustness: std of Gaussian pixel noise, as a fraction of 255."})
    text_typo_rates: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2], metadata={
        "help": "Robustness: per-character probability of a typo (swap, delete, insert or substitute)."})
    calibration_bins: int = field(default=15, metadata={"help": "Equal-width confidence bins of the ECE."})
    temperature_scaling: bool = field(default=True, metadata={
        "help": "Fit a temperature on the validation data (when given) and report calibration with it separately."})
    efficiency_batch_size: int = field(default=8, metadata={"help": "Batch size of the throughput measurement."})
    latency_runs: int = field(default=20, metadata={"help": "Timed forward passes for latency and throughput."})
    skip_ablation: bool = field(default=False, metadata={"help": "Skip the modality ablation (and contributions)."})
    skip_robustness: bool = field(default=False, metadata={"help": "Skip the corruption curves."})
    skip_calibration: bool = field(default=False, metadata={"help": "Skip calibration."})
    skip_efficiency: bool = field(default=False, metadata={"help": "Skip parameter/latency/memory/FLOP measurement."})
    skip_interpretability: bool = field(default=False, metadata={
        "help": "Skip contributions and cross-attention mass."})
    skip_plots: bool = field(default=False, metadata={"help": "Write no PNG files."})

    def __post_init__(self):
        for name in ("batch_size", "efficiency_batch_size", "latency_runs", "calibration_bins"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1; got {getattr(self, name)}")
        if self.num_workers < 0 or self.bootstrap_rounds < 0:
            raise ValueError(f"num_workers, bootstrap_rounds: must be >= 0; got {self.num_workers}, "
                             f"{self.bootstrap_rounds}")
        if not 0 < self.confidence_level < 1:
            raise ValueError(f"confidence_level: must be in (0, 1); got {self.confidence_level}")
        for name in ("image_blur_radii", "image_noise_std", "text_typo_rates"):
            if any(level < 0 for level in getattr(self, name)):
                raise ValueError(f"{name}: levels must be >= 0; got {getattr(self, name)}")
        if any(rate > 1 for rate in self.text_typo_rates):
            raise ValueError(f"text_typo_rates: rates must be <= 1; got {self.text_typo_rates}")


@dataclass
class EvaluationArguments:
    """The `mm-eval` command line besides `EvaluationSettings`: what to evaluate and where to write."""

    model: str | None = field(default=None, metadata={
        "help": "A model folder written by mm-train (merged, or a peft adapter folder) with its processor."})
    data: str | None = field(default=None, metadata={
        "help": "Data as for mm-train's --train_data: a CSV/JSON/JSONL/Parquet file, an imagefolder/audiofolder-style "
                "folder, a save_to_disk folder or a Hub data set name."})
    split: str = field(default="test", metadata={
        "help": "Split of --data to evaluate (a single table file is used whole)."})
    validation_data: str | None = field(default=None, metadata={
        "help": "Data for temperature scaling; default: the 'validation' split of --data, when it has one."})
    output_dir: str | None = field(default=None, metadata={
        "help": "Where the report goes (default <model>/evaluation)."})
    text_column: str = field(default="text", metadata={"help": "Column with the text."})
    image_column: str = field(default="image", metadata={"help": "Column with image paths or bytes."})
    audio_column: str = field(default="audio", metadata={"help": "Column with audio paths or bytes."})
    label_column: str = field(default="label", metadata={"help": "Column with the label."})
    strict: bool = field(default=False, metadata={
        "help": "Fail on a bad row (missing/corrupt file, unknown label) instead of skipping it with a warning."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1, ... (default: cuda if available)."})
    quantize: bool = field(default=False, metadata={
        "help": "Evaluate on the CPU with dynamic int8 Linear layers, as mm-demo --quantize serves the model "
                "(training.quantize.quantize_for_cpu). Parameter counts and FLOPs then leave out the int8 Linears, "
                "which torch counts as neither; benchmarks/cpu_quantized.py puts float32 and int8 side by side."})


# ---- metrics (scikit-learn and scipy; pure functions of arrays) ------------------------------------------------------

def _number(value: Any) -> float | None:
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
    with _quiet_warnings():  # "y_pred contains classes not in y_true": expected with -1 or a class missing from y
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


def multilabel_metrics(y_true: np.ndarray, probabilities: np.ndarray, label_names: Sequence[str],
                       threshold: float = 0.5, predictions: np.ndarray | None = None) -> dict[str, Any]:
    """Multi-label metrics with scikit-learn on (samples, labels) 0/1 arrays: micro/macro F1, subset accuracy
    (reported as "accuracy" too), Hamming loss, per-label F1 and ROC-AUC (None where a label is all 0 or all 1).
    `predictions` defaults to `probabilities >= threshold`."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    predictions = (probabilities >= threshold).astype(np.int64) if predictions is None else np.asarray(predictions)
    per_label_auc = {}
    for j, name in enumerate(label_names):
        column = y_true[:, j]
        per_label_auc[name] = None if column.min() == column.max() else float(
            skm.roc_auc_score(column, probabilities[:, j]))
    defined = [v for v in per_label_auc.values() if v is not None]
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
                             "support": int(y_true[:, j].sum())} for j, name in enumerate(label_names)},
        "macro_roc_auc": float(np.mean(defined)) if defined else None,
        "undefined": {f"roc_auc[{name}]": "the label is constant in the data"
                      for name, v in per_label_auc.items() if v is None},
    }


def regression_metrics(y_true: Sequence[float], y_pred: Sequence[float]) -> dict[str, Any]:
    """MSE, MAE, R² (scikit-learn), Pearson and Spearman correlation (scipy); a correlation with a constant input
    is None, with the reason under "undefined"."""
    y_true, y_pred = np.asarray(y_true, dtype=np.float64).ravel(), np.asarray(y_pred, dtype=np.float64).ravel()
    result: dict[str, Any] = {
        "samples": int(len(y_true)),
        "mse": float(skm.mean_squared_error(y_true, y_pred)),
        "mae": float(skm.mean_absolute_error(y_true, y_pred)),
        "r2": _number(skm.r2_score(y_true, y_pred)) if len(y_true) > 1 else None,
        "undefined": {},
    }
    constant = len(y_true) < 2 or np.ptp(y_true) == 0 or np.ptp(y_pred) == 0
    for name, function in (("pearson", stats.pearsonr), ("spearman", stats.spearmanr)):
        if constant:
            result[name] = None
            result["undefined"][name] = "an input is constant (or fewer than 2 samples)"
        else:
            result[name] = _number(function(y_true, y_pred).statistic)
    return result


def bootstrap_intervals(statistics: dict[str, Any], samples: int, rounds: int, seed: int,
                        confidence_level: float = 0.95) -> dict[str, list[float] | None]:
    """Percentile bootstrap confidence intervals (scipy.stats.bootstrap over resampled sample indices, so the
    samples stay paired) for each `statistics[name](indices) -> values`, vectorised: `indices` is an integer array
    (..., samples) and the result has shape `indices.shape[:-1]` (wrap a function of one index array with
    `_per_resample`). None when there are fewer than 2 samples or `rounds` is 0."""
    if rounds == 0 or samples < 2:
        return {name: None for name in statistics}
    intervals = {}
    for offset, (name, statistic) in enumerate(statistics.items()):
        result = stats.bootstrap((np.arange(samples),), lambda indices, axis=-1, f=statistic: f(indices),
                                 n_resamples=rounds, vectorized=True, confidence_level=confidence_level,
                                 method="percentile", random_state=np.random.default_rng([seed, offset]))
        low, high = result.confidence_interval
        intervals[name] = [_number(low), _number(high)] if math.isfinite(low) and math.isfinite(high) else None
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
                  "confidence": _number(confidence[i]) if filled[i] else None,
                  "accuracy": _number(accuracy[i]) if filled[i] else None} for i in range(bins)],
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


# ---- corruptions (on decoded media, before the processor) ------------------------------------------------------------

def corrupt_audio(waveform: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """Add white Gaussian noise at `snr_db` dB below the waveform's mean power."""
    waveform = np.asarray(waveform, dtype=np.float32)
    power = float(np.mean(waveform.astype(np.float64) ** 2))
    noise_std = math.sqrt(power / 10 ** (snr_db / 10)) if power > 0 else 0.0
    return (waveform + rng.normal(0.0, noise_std, waveform.shape)).astype(np.float32)


def corrupt_image_blur(image: Image.Image, radius: float) -> Image.Image:
    """PIL's Gaussian blur with `radius` pixels (of the image as decoded)."""
    return image.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else image


def corrupt_image_noise(image: Image.Image, std: float, rng: np.random.Generator) -> Image.Image:
    """Add Gaussian noise of `std` x 255 to every pixel channel, clipped to [0, 255]."""
    pixels = np.asarray(image, dtype=np.float64)
    noisy = np.clip(pixels + rng.normal(0.0, std * 255.0, pixels.shape), 0, 255)
    return Image.fromarray(np.round(noisy).astype(np.uint8), mode=image.mode)


def corrupt_text(text: str, rate: float, rng: np.random.Generator) -> str:
    """Character-level typos: each character, with probability `rate`, is swapped with the next one, deleted,
    doubled by a random lowercase letter inserted after it, or substituted by one (each kind equally likely).
    Never returns an empty string (the processor refuses empty text)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    characters, output, i = list(text), [], 0
    while i < len(characters):
        character = characters[i]
        if rng.random() >= rate:
            output.append(character)
            i += 1
            continue
        kind = rng.integers(4)
        if kind == 0 and i + 1 < len(characters):  # swap with the next character
            output += [characters[i + 1], character]
            i += 2
            continue
        if kind == 2:  # insert
            output += [character, letters[rng.integers(26)]]
        elif kind == 3 or kind == 0:  # substitute (also a swap at the last character)
            output.append(letters[rng.integers(26)])
        i += 1  # kind 1: delete
    corrupted = "".join(output)
    return corrupted if corrupted.strip() else text[:1] if text.strip() else text


@dataclass(frozen=True)
class Corruption:
    """One robustness condition: a kind from `CORRUPTION_KINDS` at one level (SNR dB, blur radius, noise std or
    typo rate); `index` is the level's position, part of the per-row seed.

    Example:

    ```python
    >>> from training.evaluation import Corruption, EvaluationSettings, robustness_conditions
    >>> Corruption("audio_noise", -10.0, 3).name
    'audio_noise@-10'
    >>> [c.name for c in robustness_conditions(EvaluationSettings(), ("vision",))]
    ['image_blur@1', 'image_blur@2', 'image_blur@4', 'image_noise@0.05', 'image_noise@0.1', 'image_noise@0.2']
    ```
    """

    kind: str
    level: float
    index: int

    @property
    def name(self) -> str:
        return f"{self.kind}@{self.level:g}"


def robustness_conditions(settings: EvaluationSettings, modalities: Sequence[str]) -> list[Corruption]:
    """The corruptions of `settings` that apply to a model with these (internal) modalities."""
    levels = {"audio_noise": settings.audio_snr_db, "image_blur": settings.image_blur_radii,
              "image_noise": settings.image_noise_std, "text_typos": settings.text_typo_rates}
    return [Corruption(kind, float(level), index) for kind in CORRUPTION_KINDS
            if CORRUPTION_MODALITY[kind] in modalities for index, level in enumerate(levels[kind])]


# ---- rows -> batches -------------------------------------------------------------------------------------------------

class _IndexedRows(torch.utils.data.Dataset):
    """A datasets.Dataset whose items carry their row index (for per-row seeds and per-row results)."""

    def __init__(self, dataset: datasets.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, dict[str, Any]]:
        return index, self.dataset[index]


class _EvaluationCollator:
    """Rows -> {"clean": batch, corruption name: batch, ...}, labels, row indices. Decodes each row's media once
    per corrupted modality and corrupts every level from it. Picklable, so it runs in DataLoader workers."""

    def __init__(self, processor: MMFusionProcessor, columns: DataSettings, label_names: Sequence[str],
                 problem_type: str, corruptions: Sequence[Corruption], seed: int):
        self.rows_to_inputs = MMFusionCollator(processor, columns, label_names)
        self.processor, self.columns, self.label_names = processor, columns, list(label_names)
        self.problem_type, self.corruptions, self.seed = problem_type, list(corruptions), seed
        self.limits = MediaLimits(max_image_pixels=processor.max_image_pixels,
                                  max_audio_seconds=processor.max_audio_seconds)

    def labels(self, rows: Sequence[dict[str, Any]]) -> torch.Tensor:
        values = [row.get(self.columns.label_column) for row in rows]
        if self.problem_type == REGRESSION:
            return torch.tensor([float(v) for v in values], dtype=torch.float64)
        if self.problem_type == MULTI_LABEL:
            encoded = torch.zeros(len(values), len(self.label_names), dtype=torch.int64)
            for i, value in enumerate(values):
                names = value if isinstance(value, (list, tuple)) else [
                    part for part in str(value or "").replace(";", ",").replace("|", ",").split(",") if part.strip()]
                for name in names:
                    encoded[i, self.rows_to_inputs.label_id(name)] = 1
            return encoded
        return torch.tensor([self.rows_to_inputs.label_id(v) for v in values], dtype=torch.int64)

    def __call__(self, items: Sequence[tuple[int, dict[str, Any]]]):
        indices = [index for index, _ in items]
        rows = [row for _, row in items]
        inputs = self.rows_to_inputs.inputs(rows)
        batches = {"clean": dict(self.processor(**inputs))}
        decoded: dict[str, list] = {}
        for corruption in self.corruptions:
            key = {"audio_noise": "audio", "text_typos": "text"}.get(corruption.kind, "images")
            if key not in inputs:
                continue
            if key not in decoded:
                decoded[key] = self._decode(key, inputs[key])
            corrupted = dict(inputs)
            corrupted[key] = [None if value is None else self._corrupt(corruption, value, row_index)
                              for value, row_index in zip(decoded[key], indices)]
            rate = self.processor.feature_extractor.sampling_rate if key == "audio" else None
            batches[corruption.name] = dict(self.processor(**corrupted, sampling_rate=rate))
        return batches, self.labels(rows), torch.tensor(indices)

    def _decode(self, key: str, values: list) -> list:
        if key == "text":
            return values
        if key == "images":
            return [None if v is None else load_image(v, self.limits, name=f"images[{i}]")
                    for i, v in enumerate(values)]
        rate = self.processor.feature_extractor.sampling_rate
        return [None if v is None else load_audio(v, rate, None, self.limits, name=f"audio[{i}]")
                for i, v in enumerate(values)]

    def _corrupt(self, corruption: Corruption, value: Any, row_index: int) -> Any:
        # one generator per (seed, kind, level, row): a row's corruption never depends on batching or order
        rng = np.random.default_rng([self.seed, CORRUPTION_KINDS.index(corruption.kind), corruption.index, row_index])
        if corruption.kind == "audio_noise":
            return corrupt_audio(value, corruption.level, rng)
        if corruption.kind == "image_blur":
            return corrupt_image_blur(value, corruption.level)
        if corruption.kind == "image_noise":
            return corrupt_image_noise(value, corruption.level, rng)
        return corrupt_text(value, corruption.level, rng)


# ---- running the model -----------------------------------------------------------------------------------------------

def _classifier(model: torch.nn.Module) -> torch.nn.Module:
    """The MMFusionForSequenceClassification inside `model` (a PeftModel wraps it)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "classifier") or not hasattr(base, "model"):
        raise ValueError(f"model: {type(base).__name__} has no classification head; mm-eval evaluates "
                         "MMFusionForSequenceClassification models")
    return base


def problem_type_of(model: torch.nn.Module) -> str:
    """The model's `config.problem_type`, or what transformers infers at loss time when it is unset: regression
    for one output, else single-label classification."""
    config = _classifier(model).config
    if config.problem_type:
        return config.problem_type
    return REGRESSION if config.num_labels == 1 else SINGLE_LABEL


def _fusion_configs(model: torch.nn.Module) -> list:
    """Every distinct config object the fusion reads its attention implementation from. Usually one; but peft's
    `modules_to_save` deep-copies the fusion layers, and each copy carries its own copy of the config, which
    `set_attn_implementation` on the model never reaches."""
    found = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "fusion_hidden_size"):
            found.setdefault(id(config), config)
    return list(found.values())


def _set_fusion_attention(config, implementation: str) -> None:
    # setting it on the composite config also sets it on the towers' sub-configs: keep theirs
    towers = [sub for key in config.sub_configs if (sub := getattr(config, key, None)) is not None]
    kept = [tower._attn_implementation for tower in towers]
    config._attn_implementation = implementation
    for tower, implementation in zip(towers, kept):
        tower._attn_implementation = implementation


@contextlib.contextmanager
def _evaluation_mode(model: torch.nn.Module, eager_fusion: bool = False) -> Iterator[None]:
    """Eval mode (restored afterwards); with `eager_fusion`, the fusion layers' attention switched to eager, the
    only implementation that returns weights, with the towers left on theirs (and restored afterwards)."""
    _classifier(model)  # refuse a model without a head before changing anything
    was_training = model.training
    configs = _fusion_configs(model) if eager_fusion else []
    previous = [config._attn_implementation for config in configs]
    verbosity = hf_logging.get_verbosity()
    model.eval()
    try:
        if eager_fusion:
            # output_attentions also reaches the towers, and a tower on sdpa warns that it returns no weights: we
            # only read the fusion's, so that warning would only confuse
            hf_logging.set_verbosity_error()
        for config in configs:
            _set_fusion_attention(config, "eager")
        yield
    finally:
        for config, implementation in zip(configs, previous):
            _set_fusion_attention(config, implementation)
        hf_logging.set_verbosity(verbosity)
        model.train(was_training)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _forward(model: torch.nn.Module, batch: dict[str, torch.Tensor], keep: Sequence[str], num_labels: int,
             output_attentions: bool = False):
    """Logits (float64, NaN rows for samples left with no modality), the present-sample mask, and the fusion
    output, with only the internal modalities in `keep`: the others are withheld through their has_* masks."""
    batch = dict(batch)
    for modality, key in PRESENCE_KEYS.items():
        if key in batch and modality not in keep:
            batch[key] = torch.zeros_like(batch[key])
    present = torch.stack([batch[key] for key in PRESENCE_KEYS.values() if key in batch], 1).any(1)
    size = len(present)
    logits = torch.full((size, num_labels), float("nan"), dtype=torch.float64)
    if not bool(present.any()):
        return logits, present, None
    device = _device(model)
    inputs = {key: value[present].to(device) for key, value in batch.items()}
    with torch.no_grad():
        output = model(**inputs, output_attentions=True if output_attentions else None)
    logits[present] = output.logits.detach().double().cpu()
    return logits, present, output.fusion_output


def _cross_attention_mass(fusion_output, modalities: Sequence[str]) -> dict[str, tuple[dict[str, torch.Tensor],
                                                                                    torch.Tensor]]:
    """Per stream: ({"sink" | other stream: mass per sample (batch,)}, samples that have the stream). Each
    `{m}_cross_attentions` layer is (batch, heads, queries, 1 + tokens of the other active streams): the learned
    sink first, then the others in model order, each as wide as its (padded) token mask."""
    active = [m for m in modalities if getattr(fusion_output, f"{m}_cross_attentions", None)]
    result = {}
    for stream in active:
        layers = getattr(fusion_output, f"{stream}_cross_attentions")
        if layers[0] is None:
            raise ValueError("output_attentions: the fusion returned no attention weights (not eager attention)")
        others = [m for m in active if m != stream]
        widths = [1] + [getattr(fusion_output, f"{m}_token_mask").shape[1] for m in others]
        weights = torch.stack(layers).float().mean(dim=(0, 2))  # mean over layers and heads: (batch, queries, keys)
        parts = torch.stack([part.sum(-1) for part in weights.split(widths, dim=-1)], -1)  # (batch, queries, parts)
        query_mask = getattr(fusion_output, f"{stream}_token_mask").unsqueeze(-1).float()  # (batch, queries, 1)
        per_sample = (parts * query_mask).sum(1) / query_mask.sum(1).clamp(min=1.0)  # (batch, parts)
        masses = {name: per_sample[:, j].cpu() for j, name in enumerate(["sink", *others])}
        result[stream] = (masses, query_mask.squeeze(-1).any(1).cpu())
    return result


def _scores(logits: np.ndarray, problem_type: str) -> np.ndarray:
    """Probabilities (softmax / sigmoid), or the raw outputs for regression. NaN rows (no prediction) become the
    uniform prior (1 / num_labels, or 0.5 per label)."""
    logits = np.asarray(logits, dtype=np.float64)
    missing = np.isnan(logits).any(1)
    if problem_type == REGRESSION:
        return logits
    safe = np.where(missing[:, None], 0.0, logits)  # zero logits: softmax gives 1 / num_labels, sigmoid 0.5
    return special.expit(safe) if problem_type == MULTI_LABEL else special.softmax(safe, axis=1)


def explain_sample(model: torch.nn.Module, processor: MMFusionProcessor, text: str | None = None, image: Any = None,
                   audio: Any = None, sampling_rate: int | None = None) -> dict[str, Any]:
    """The per-sample view for the demo: the model's probabilities for one sample, what each given modality
    contributes, and where each stream's cross-attention goes.

    Inputs are one sample in any form `MMFusionProcessor.__call__` accepts (text a str; image a path, bytes, PIL
    image or array; audio a path, bytes, Gradio `(sampling_rate, array)` tuple, or an array with `sampling_rate`);
    any subset, at least one. Returns:

    - "probabilities": {label name: probability} (softmax; sigmoid per label for a multi-label model);
    - "predicted": the label with the highest probability;
    - "contributions": {modality: p(predicted | all given) - p(predicted | that modality withheld through its has_*
      mask)} for each given modality ("image", "text", "audio"). When only one modality is given, its contribution
      is p(predicted) - 1 / num_labels (the uniform prior stands for the prediction without any input);
    - "cross_attention" (when more than one modality is given): {stream: {other modality: mass}}, the attention
      weight the stream's tokens put on each other given modality, averaged over heads, tokens and fusion layers
      (the rest of each stream's weight goes to the learned sink token).

    Bad input raises the processor's `ValueError` unchanged; a regression model raises `ValueError` (there is no
    predicted class to explain).

    Example:

    ```python
    >>> from training.evaluation import explain_sample
    >>> view = explain_sample(model, processor, text="a red circle, high tone", image="circle.png")  # doctest: +SKIP
    >>> view["predicted"], sorted(view["contributions"])  # doctest: +SKIP
    ('match', ['image', 'text'])
    ```
    """
    problem_type = problem_type_of(model)
    if problem_type == REGRESSION:
        raise ValueError("model: explain_sample explains a predicted class; this is a regression model")
    batch = dict(processor(text=text, images=image, audio=audio, sampling_rate=sampling_rate))
    base = _classifier(model)
    label_names = [base.config.id2label[i] for i in range(base.config.num_labels)]
    given = [m for m in base.model.modalities if bool(batch[PRESENCE_KEYS[m]][0])]
    # One batch: row 0 with every given modality, row 1 + j with the j-th withheld (the model's output for a sample
    # does not depend on the other samples of its batch).
    rows = len(given) + 1 if len(given) > 1 else 1
    batch = {key: value.repeat(rows, *[1] * (value.dim() - 1)) for key, value in batch.items()}
    for j, modality in enumerate(given if rows > 1 else []):
        batch[PRESENCE_KEYS[modality]][1 + j] = False
    with _evaluation_mode(model, eager_fusion=rows > 1):
        logits, _, fusion_output = _forward(model, batch, keep=base.model.modalities,
                                            num_labels=len(label_names), output_attentions=rows > 1)
    probabilities = _scores(logits.numpy(), problem_type)
    predicted = int(probabilities[0].argmax())
    view: dict[str, Any] = {
        "probabilities": {name: float(p) for name, p in zip(label_names, probabilities[0])},
        "predicted": label_names[predicted],
    }
    if rows == 1:
        prior = 0.5 if problem_type == MULTI_LABEL else 1.0 / len(label_names)
        view["contributions"] = {USER_NAMES[given[0]]: float(probabilities[0, predicted] - prior)}
        return view
    view["contributions"] = {USER_NAMES[m]: float(probabilities[0, predicted] - probabilities[1 + j, predicted])
                             for j, m in enumerate(given)}
    masses = _cross_attention_mass(fusion_output, base.model.modalities)
    view["cross_attention"] = {
        USER_NAMES[stream]: {USER_NAMES[other]: float(mass[0]) for other, mass in parts.items() if other != "sink"}
        for stream, (parts, _) in masses.items()
    }
    return view


# ---- one pass over a data set ----------------------------------------------------------------------------------------

def _subset_name(subset: Sequence[str]) -> str:
    return "+".join(USER_NAMES[m] for m in subset)


@dataclass
class _Collected:
    """Everything one pass over a data set produced, indexed by row."""

    labels: np.ndarray
    presence: np.ndarray  # (rows, modalities of the model), bool: what each row has
    logits: dict[str, np.ndarray]  # subset name or corruption name -> (rows, num_labels), NaN = no prediction
    attention_sums: dict[str, dict[str, float]]
    attention_counts: dict[str, int]


def _equal(a: Any, b: Any) -> bool:
    """Exact equality of call arguments: tensors (shape, dtype, device and values), lists, tuples, dicts, scalars."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and bool(a == b)


@contextlib.contextmanager
def _reusing_tower_outputs(model: torch.nn.Module) -> Iterator[list]:
    """While active, a tower called with inputs exactly equal to those of an earlier call returns that call's output
    instead of running again; clear the yielded cache to forget them. In one batch of `_collect`, every modality
    subset and every corruption of another modality gives a tower the same inputs, so each tower runs once per
    batch plus once per corruption of its own modality, instead of once per subset and corruption. Only equal inputs
    reuse an output (eval mode, no_grad), so no number changes. A call that asks for the tower's attentions or hidden
    states never reuses an output computed without them."""
    base = _classifier(model)
    towers = [base.model.get_tower(m) for m in base.model.modalities]
    flags = ("output_attentions", "output_hidden_states")
    cache: list[tuple[torch.nn.Module, dict[str, bool], tuple, Any]] = []

    def reusing(tower, run):
        def forward(*args, **kwargs):
            asked = {flag: bool(kwargs.get(flag)) for flag in flags}
            inputs = (args, {key: value for key, value in kwargs.items() if key not in flags})
            for owner, had, earlier, output in cache:
                if owner is tower and all(had[f] or not asked[f] for f in flags) and _equal(earlier, inputs):
                    return output
            output = run(*args, **kwargs)
            cache.append((tower, asked, inputs, output))
            return output
        return forward

    # the instance attribute shadows the class's forward (an earlier instance attribute, e.g. accelerate's hooks,
    # is wrapped and put back)
    previous = [tower.__dict__.get("forward") for tower in towers]
    for tower in towers:
        tower.forward = reusing(tower, tower.forward)
    try:
        yield cache
    finally:
        cache.clear()
        for tower, earlier in zip(towers, previous):
            if earlier is None:
                del tower.forward
            else:
                tower.forward = earlier


def _collect(model: torch.nn.Module, processor: MMFusionProcessor, dataset: datasets.Dataset, columns: DataSettings,
             label_names: Sequence[str], problem_type: str, settings: EvaluationSettings,
             subsets: Sequence[tuple[str, ...]], corruptions: Sequence[Corruption], attention: bool,
             desc: str) -> _Collected:
    """Run every modality subset on the clean batches and the full model on every corrupted copy, in one pass over
    the data (each row is decoded once per corrupted modality, whatever the number of levels; each tower runs once
    per batch and corruption of its modality, see `_reusing_tower_outputs`)."""
    base = _classifier(model)
    modalities, num_labels = base.model.modalities, base.config.num_labels
    collator = _EvaluationCollator(processor, columns, label_names, problem_type, corruptions, settings.seed)
    loader = DataLoader(_IndexedRows(dataset), batch_size=settings.batch_size, shuffle=False,
                        num_workers=settings.num_workers, collate_fn=collator)
    rows = len(dataset)
    logits = {name: np.full((rows, num_labels), np.nan) for name in
              [_subset_name(s) for s in subsets] + [c.name for c in corruptions]}
    labels, presence = None, np.zeros((rows, len(modalities)), dtype=bool)
    sums: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    with _evaluation_mode(model, eager_fusion=attention), _reusing_tower_outputs(model) as tower_outputs:
        for batches, batch_labels, indices in tqdm(loader, desc=desc, leave=False):
            tower_outputs.clear()
            if labels is None:
                labels = np.zeros((rows, *batch_labels.shape[1:]), dtype=batch_labels.numpy().dtype)
            labels[indices.numpy()] = batch_labels.numpy()
            clean = batches["clean"]
            for j, modality in enumerate(modalities):
                key = PRESENCE_KEYS[modality]
                presence[indices.numpy(), j] = clean[key].numpy() if key in clean else False
            for subset in subsets:
                wants_attention = attention and tuple(subset) == tuple(modalities)
                out, present, fusion_output = _forward(model, clean, subset, num_labels, wants_attention)
                logits[_subset_name(subset)][indices.numpy()] = out.numpy()
                if wants_attention and fusion_output is not None:
                    for stream, (parts, has_stream) in _cross_attention_mass(fusion_output, modalities).items():
                        stream_sums = sums.setdefault(USER_NAMES[stream], {})
                        for part, mass in parts.items():
                            name = "sink" if part == "sink" else USER_NAMES[part]
                            stream_sums[name] = stream_sums.get(name, 0.0) + float(mass[has_stream].double().sum())
                        counts[USER_NAMES[stream]] = counts.get(USER_NAMES[stream], 0) + int(has_stream.sum())
            for corruption in corruptions:
                batch = batches.get(corruption.name, clean)  # rows of a batch without that modality stay clean
                out, _, _ = _forward(model, batch, modalities, num_labels)
                logits[corruption.name][indices.numpy()] = out.numpy()
    return _Collected(labels, presence, logits, sums, counts)


# ---- quality from logits ---------------------------------------------------------------------------------------------

def _predictions(logits: np.ndarray, labels: np.ndarray, problem_type: str) -> np.ndarray:
    """Class ids (single-label; -1 = no prediction) or 0/1 rows (multi-label; a sample without prediction gets the
    complement of its labels, i.e. counts as wrong on every label)."""
    missing = np.isnan(logits).any(1)
    if problem_type == MULTI_LABEL:
        predicted = (np.nan_to_num(logits, nan=0.0) >= 0).astype(np.int64)
        predicted[missing] = 1 - labels[missing]
        return predicted
    return np.where(missing, -1, np.nan_to_num(logits, nan=0.0).argmax(1))


def quality_metrics(logits: np.ndarray, labels: np.ndarray, label_names: Sequence[str], problem_type: str
                    ) -> dict[str, Any]:
    """The metrics of `problem_type` for model outputs `logits` (NaN rows: samples without a prediction)."""
    logits = np.asarray(logits, dtype=np.float64)
    if problem_type == REGRESSION:
        missing = np.isnan(logits).any(1)
        if missing.all():
            return {"samples": int(len(logits)), "samples_without_prediction": int(missing.sum()), "mse": None,
                    "mae": None, "r2": None, "pearson": None, "spearman": None,
                    "undefined": {"all": "no sample has a prediction"}}
        values = logits[~missing]
        result = regression_metrics(labels[~missing], values[:, 0] if values.shape[1] == 1 else values)
        return {**result, "samples_without_prediction": int(missing.sum())}
    scores = _scores(logits, problem_type)
    predicted = _predictions(logits, labels, problem_type)
    if problem_type == MULTI_LABEL:
        result = multilabel_metrics(labels, scores, label_names, predictions=predicted)
        return {**result, "samples_without_prediction": int(np.isnan(logits).any(1).sum())}
    return classification_metrics(labels, scores, label_names, predictions=predicted)


def _primary_metric(problem_type: str) -> str:
    return "r2" if problem_type == REGRESSION else "accuracy"


def _headline_keys(problem_type: str) -> tuple[str, ...]:
    if problem_type == REGRESSION:
        return ("mse", "mae", "r2")
    if problem_type == MULTI_LABEL:
        return ("accuracy", "micro_f1", "macro_f1")
    return ("accuracy", "macro_f1", "balanced_accuracy")


def _per_resample(statistic):
    """A function of one index array (samples,) applied to every row of an index array (..., samples)."""
    return lambda indices: np.apply_along_axis(statistic, -1, indices)


def _class_counts(values: np.ndarray, num_classes: int) -> np.ndarray:
    """Occurrences of each class id along the last axis of `values` (..., samples); -1 (no class) is not counted."""
    flat = values.reshape(-1, values.shape[-1])
    offsets = np.arange(len(flat))[:, None] * num_classes + flat
    counts = np.bincount(offsets[flat >= 0], minlength=len(flat) * num_classes)
    return counts.reshape(*values.shape[:-1], num_classes)


def _headline_statistics(labels: np.ndarray, logits: np.ndarray, label_names: Sequence[str], problem_type: str):
    """{headline metric: vectorised statistic(indices)} for the bootstrap, the same definitions as
    `quality_metrics`. Single-label statistics are computed with numpy from per-class counts of all the resamples
    at once (the bootstrap's cost would otherwise be thousands of scikit-learn calls); the others call
    scikit-learn once per resample."""
    if problem_type == REGRESSION:
        keep = ~np.isnan(logits).any(1)
        y, p = labels[keep], logits[keep][:, 0]
        return len(y), {"mse": _per_resample(lambda i: skm.mean_squared_error(y[i], p[i])),
                        "mae": _per_resample(lambda i: skm.mean_absolute_error(y[i], p[i])),
                        "r2": _per_resample(lambda i: skm.r2_score(y[i], p[i]))}
    predicted = _predictions(logits, labels, problem_type)
    if problem_type == MULTI_LABEL:
        return len(labels), {
            "accuracy": _per_resample(lambda i: skm.accuracy_score(labels[i], predicted[i])),
            "micro_f1": _per_resample(lambda i: skm.f1_score(labels[i], predicted[i], average="micro",
                                                             zero_division=0)),
            "macro_f1": _per_resample(lambda i: skm.f1_score(labels[i], predicted[i], average="macro",
                                                             zero_division=0))}
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


@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    # resamples of a bootstrap often lack a class; scikit-learn warns about each one
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _compact(metrics: dict[str, Any], problem_type: str) -> dict[str, Any]:
    """The ablation/robustness view of a metrics dict: headline metrics, AUC and log loss, missing samples."""
    keys = list(_headline_keys(problem_type)) + {SINGLE_LABEL: ["roc_auc", "log_loss"], MULTI_LABEL: [
        "macro_roc_auc"], REGRESSION: ["pearson", "spearman"]}[problem_type]
    return {**{key: metrics.get(key) for key in keys},
            "samples_without_modality": metrics.get("samples_without_prediction", 0)}


# ---- sections --------------------------------------------------------------------------------------------------------

def _ablation(collected: _Collected, subsets, label_names, problem_type) -> tuple[list[dict], dict | None]:
    rows = []
    for subset in subsets:
        metrics = quality_metrics(collected.logits[_subset_name(subset)], collected.labels, label_names, problem_type)
        rows.append({"modalities": [USER_NAMES[m] for m in subset], **_compact(metrics, problem_type)})
    primary = _primary_metric(problem_type)
    singles = [row for row in rows if len(row["modalities"]) == 1 and row[primary] is not None]
    if len(rows) < 2 or not singles or rows[0][primary] is None:
        return rows, None
    best = max(singles, key=lambda row: row[primary])
    return rows, {
        "metric": primary,
        "all_modalities": rows[0]["modalities"],
        "all_modalities_value": rows[0][primary],
        "best_single_modality": best["modalities"][0],
        "best_single_modality_value": best[primary],
        "gain": rows[0][primary] - best[primary],
    }


def _robustness(collected: _Collected, corruptions, clean_name, label_names, problem_type) -> dict[str, Any]:
    clean = _compact(quality_metrics(collected.logits[clean_name], collected.labels, label_names, problem_type),
                     problem_type)
    curves: dict[str, Any] = {}
    for corruption in corruptions:
        curve = curves.setdefault(corruption.kind, {
            "modality": USER_NAMES[CORRUPTION_MODALITY[corruption.kind]],
            "level_name": CORRUPTION_LEVEL_NAMES[corruption.kind],
            "points": [{"level": None, "condition": "clean", **clean}],
        })
        metrics = quality_metrics(collected.logits[corruption.name], collected.labels, label_names, problem_type)
        curve["points"].append({"level": corruption.level, "condition": corruption.name,
                                **_compact(metrics, problem_type)})
    return {"metric": _primary_metric(problem_type), "curves": curves}


def _calibration_view(logits: np.ndarray, labels: np.ndarray, problem_type: str, bins: int) -> dict[str, Any]:
    keep = ~np.isnan(logits).any(1)
    scores, labels = _scores(logits[keep], problem_type), labels[keep]
    if problem_type == MULTI_LABEL:
        confidences = np.maximum(scores, 1 - scores).ravel()
        correct = ((scores >= 0.5).astype(np.int64) == labels).ravel()
    else:
        confidences, correct = scores.max(1), scores.argmax(1) == labels
    return {**expected_calibration_error(confidences, correct, bins),
            "nll": negative_log_likelihood(logits[keep], labels, problem_type)}


def _calibration(logits, labels, problem_type, settings, validation: _Collected | None, full_name) -> dict[str, Any]:
    if problem_type == REGRESSION:
        return {"applicable": False, "reason": "regression has no class confidence"}
    result: dict[str, Any] = {"applicable": True, "bins": settings.calibration_bins,
                              "binning": f"{settings.calibration_bins} equal-width bins on "
                                         + ("each label's max(p, 1 - p)" if problem_type == MULTI_LABEL
                                            else "the top-class confidence"),
                              "uncalibrated": _calibration_view(logits, labels, problem_type,
                                                                settings.calibration_bins)}
    if validation is None:
        result["temperature_scaling"] = None
        result["temperature_scaling_note"] = ("not fitted: no validation data" if settings.temperature_scaling
                                              else "disabled (temperature_scaling=False)")
        return result
    validation_logits = validation.logits[full_name]
    keep = ~np.isnan(validation_logits).any(1)
    temperature = fit_temperature(validation_logits[keep], validation.labels[keep], problem_type)
    scaled = _calibration_view(logits / temperature, labels, problem_type, settings.calibration_bins)
    # at an edge of the range, the NLL still falls beyond it (e.g. logits that carry no confidence signal)
    at_edge = any(math.isclose(temperature, edge, rel_tol=1e-3) for edge in TEMPERATURE_RANGE)
    result["temperature_scaling"] = {
        "temperature": temperature,
        "fitted_on": f"validation data ({int(keep.sum())} samples), minimising NLL over T in "
                     f"[{TEMPERATURE_RANGE[0]:g}, {TEMPERATURE_RANGE[1]:g}]"
                     + ("; the minimum lies at the edge of that range" if at_edge else ""),
        "validation_nll_before": negative_log_likelihood(validation_logits[keep], validation.labels[keep],
                                                         problem_type),
        "validation_nll_after": negative_log_likelihood(validation_logits[keep] / temperature,
                                                        validation.labels[keep], problem_type),
        "test": scaled,
    }
    return result


def _interpretability(collected: _Collected, modalities, label_names, problem_type) -> tuple[dict, list[dict]]:
    """Mean per-sample contributions and cross-attention mass; the per-sample contributions for predictions.jsonl."""
    full = _subset_name(modalities)
    scores = _scores(collected.logits[full], problem_type)
    rows = len(scores)
    per_sample: list[dict[str, float]] = [{} for _ in range(rows)]
    summary: dict[str, Any] = {}
    if problem_type != REGRESSION:
        predicted = scores.argmax(1)
        chosen = scores[np.arange(rows), predicted]
        for j, modality in enumerate(modalities):
            others = tuple(m for m in modalities if m != modality)
            if others:
                without = _scores(collected.logits[_subset_name(others)], problem_type)[np.arange(rows), predicted]
            else:  # a one-modality model: withholding its only modality leaves the prior
                without = np.full(rows, 0.5 if problem_type == MULTI_LABEL else 1.0 / len(label_names))
            has = collected.presence[:, j] & ~np.isnan(collected.logits[full]).any(1)
            change = chosen - without
            for i in np.flatnonzero(has):
                per_sample[i][USER_NAMES[modality]] = float(change[i])
            summary[USER_NAMES[modality]] = {
                "mean": float(change[has].mean()) if has.any() else None,
                "mean_abs": float(np.abs(change[has]).mean()) if has.any() else None,
                "samples": int(has.sum()),
            }
    attention = {stream: {part: total / collected.attention_counts[stream] for part, total in parts.items()}
                 for stream, parts in collected.attention_sums.items() if collected.attention_counts.get(stream)}
    return {
        "contribution_definition": "p(predicted | all of the sample's modalities) - p(predicted | that modality "
                                   "withheld via its has_* mask); with that modality alone: minus 1 / num_labels",
        "contributions": summary if problem_type != REGRESSION else None,
        "cross_attention_definition": "attention mass of each stream's real query tokens on the tokens of each other "
                                      "stream and on the learned sink, averaged over heads, query tokens, fusion "
                                      "layers and the samples that have the stream",
        "cross_attention": attention,
        "per_sample": "predictions.jsonl",
    }, per_sample


# ---- efficiency ------------------------------------------------------------------------------------------------------

def parameter_counts(model: torch.nn.Module) -> dict[str, dict[str, int]]:
    """Total and trainable parameters of each part: each tower ("image_tower", "text_tower", "audio_tower"),
    "fusion" (input projections, fusion layers, final norms), "head" (classifier), and "total". LoRA weights count
    in their tower; of a peft `modules_to_save` module only the trained copy counts, not the frozen original.
    Trainable means `requires_grad` now: what mm-train trains in its final evaluation, none for a loaded folder."""
    parts = {**_parts(model), "total": [model]}

    def count(modules):
        parameters = [p for module in modules for name, p in module.named_parameters()
                      if "original_module." not in name]
        return {"total": sum(p.numel() for p in parameters),
                "trainable": sum(p.numel() for p in parameters if p.requires_grad)}

    return {name: count(modules) for name, modules in parts.items()}


def _parts(model: torch.nn.Module) -> dict[str, list[torch.nn.Module]]:
    """The modules of each part: "image_tower", "text_tower", "audio_tower" (those the model has), "fusion"
    (input projections, fusion layers, final norms) and "head" (classifier)."""
    base = _classifier(model)
    fusion = base.model
    parts = {f"{USER_NAMES[m]}_tower": [fusion.get_tower(m)] for m in fusion.modalities}
    parts["fusion"] = [fusion.input_projections, fusion.fusion_layers, fusion.final_norms]
    parts["head"] = [base.classifier]
    return parts


def _part_names(model: torch.nn.Module) -> dict[str, list[str]]:
    """Module names (as in model.named_modules()) of each part, to split FLOPs by part."""
    names = {id(module): name for name, module in model.named_modules()}
    return {part: [names[id(m)] for m in modules] for part, modules in _parts(model).items()}


def measure_efficiency(model: torch.nn.Module, single: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
                       runs: int = 20) -> dict[str, Any]:
    """Latency p50/p95 of `runs` forward passes on the one-sample batch `single` (after 3 warm-up passes), throughput
    on `batch`, peak memory, and FLOPs per sample (torch.utils.flop_counter.FlopCounterMode on `single`). Model
    forward only: decoding and the processor are not timed."""
    from torch.utils.flop_counter import FlopCounterMode

    device = _device(model)
    cuda = device.type == "cuda"
    single = {k: v.to(device) for k, v in single.items()}
    batch = {k: v.to(device) for k, v in batch.items()}
    batch_size = len(next(iter(batch.values())))

    def timed(inputs) -> float:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model(**inputs)
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    with _evaluation_mode(model), torch.no_grad():
        for _ in range(3):
            timed(single)
        latencies = [timed(single) for _ in tqdm(range(runs), desc="latency", leave=False)]
        timed(batch)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        rss_before = _peak_rss_bytes()
        batch_times = [timed(batch) for _ in tqdm(range(max(3, runs // 4)), desc="throughput", leave=False)]
        memory = ({"peak_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
                   "what": "torch.cuda.max_memory_allocated during the throughput runs"} if cuda else
                  {"peak_rss_bytes": _peak_rss_bytes(),
                   "peak_rss_growth_bytes": None if rss_before is None else _peak_rss_bytes() - rss_before,
                   "what": "the process's peak resident set size (resource.getrusage), and its growth during the "
                           "throughput runs (0 when an earlier peak was higher); None where the platform lacks it"})
        with FlopCounterMode(display=False) as counter:
            model(**single)
    flop_counts = {name.split(".", 1)[1] if "." in name else "": sum(ops.values())
                   for name, ops in counter.get_flop_counts().items() if name != "Global"}
    flops_by_part = {part: _flops_under(flop_counts, names) for part, names in _part_names(model).items()}
    latencies_ms = np.array(latencies) * 1000
    return {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "what": "model forward only (no decoding, no processor), eval mode, no_grad",
        "latency_batch_1_ms": {"p50": float(np.percentile(latencies_ms, 50)),
                               "p95": float(np.percentile(latencies_ms, 95)), "runs": runs},
        "throughput": {"batch_size": batch_size, "samples_per_second": float(batch_size / np.median(batch_times)),
                       "runs": len(batch_times)},
        "memory": memory,
        "flops_per_sample": int(counter.get_total_flops()),
        "flops_per_sample_by_part": flops_by_part,
    }


def _flops_under(flop_counts: dict[str, int], prefixes: Sequence[str]) -> int:
    """FLOPs of the modules under `prefixes`. Containers (ModuleDict, ModuleList) are never called, so the counter
    lists their children instead: sum the outermost counted modules under each prefix, never a child twice."""
    matching = [name for name in flop_counts for prefix in prefixes if name == prefix or name.startswith(prefix + ".")]
    outermost = [name for name in matching if not any(name.startswith(other + ".") for other in matching)]
    return int(sum(flop_counts[name] for name in outermost))


def _peak_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


def _efficiency_batches(dataset, processor, columns, label_names, problem_type, size: int):
    collator = _EvaluationCollator(processor, columns, label_names, problem_type, [], 0)
    rows = [(i % len(dataset), dataset[i % len(dataset)]) for i in range(size)]
    single, _, _ = collator(rows[:1])
    batch, _, _ = collator(rows)
    return single["clean"], batch["clean"]


# ---- plots (matplotlib's object API on the Agg canvas: no pyplot state, no display needed) --------------------------

def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=FIGURE_SIZE, dpi=FIGURE_DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> str:
    figure.tight_layout()
    figure.savefig(path, dpi=FIGURE_DPI)  # no bbox_inches="tight": every plot keeps FIGURE_SIZE
    return path.name


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], label_names: Sequence[str], path: Path) -> str:
    """Counts with scikit-learn's ConfusionMatrixDisplay; returns the file name."""
    figure = _figure()
    axes = figure.add_subplot()
    skm.ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(label_names)).plot(
        ax=axes, colorbar=False, values_format="d", cmap="Blues")
    axes.set_title("Confusion matrix (rows: true, columns: predicted)")
    return _save(figure, path)


def plot_reliability_diagram(calibration: dict[str, Any], path: Path) -> str:
    """Accuracy per confidence bin against the diagonal, with the temperature-scaled bins when fitted."""
    figure = _figure()
    axes = figure.add_subplot()
    views = [("uncalibrated", calibration["uncalibrated"])]
    if calibration.get("temperature_scaling"):
        scaling = calibration["temperature_scaling"]
        views.append((f"temperature {scaling['temperature']:.2f}", scaling["test"]))
    width = 1.0 / calibration["bins"]
    for offset, (name, view) in enumerate(views):
        filled = [b for b in view["bins"] if b["count"]]
        # each view's bar centred in its share of the bin: the middle for one view, quarters for two
        axes.bar([b["lower"] + width * (offset + 0.5) / len(views) for b in filled], [b["accuracy"] for b in filled],
                 width=width / len(views), alpha=0.7, label=f"{name} (ECE {view['ece']:.3f})")
    axes.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    axes.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
             title=f"Reliability diagram ({calibration['bins']} equal-width bins)")
    axes.legend(loc="upper left")
    return _save(figure, path)


def plot_robustness(robustness: dict[str, Any], path: Path) -> str:
    """One panel per corruption: the metric at clean input and each level."""
    curves = robustness["curves"]
    figure = _figure()
    columns = min(2, len(curves))
    for k, (kind, curve) in enumerate(curves.items()):
        axes = figure.add_subplot(math.ceil(len(curves) / columns), columns, k + 1)
        points = curve["points"]
        values = [p[robustness["metric"]] for p in points]
        axes.plot(range(len(points)), [np.nan if v is None else v for v in values], marker="o")
        axes.set_xticks(range(len(points)), ["clean"] + [f"{p['level']:g}" for p in points[1:]], fontsize=7)
        axes.set_title(f"{kind.replace('_', ' ')}: {curve['level_name']}", fontsize=8)
        axes.set_ylabel(robustness["metric"], fontsize=8)
        if robustness["metric"] == "accuracy":
            axes.set_ylim(0, 1.05)  # one scale for every panel, so the drops compare
    return _save(figure, path)


def plot_ablation(ablation: Sequence[dict[str, Any]], metric: str, path: Path) -> str:
    """Horizontal bars: the metric for each subset of modalities."""
    figure = _figure()
    axes = figure.add_subplot()
    names = [" + ".join(row["modalities"]) for row in ablation]
    values = [row[metric] if row[metric] is not None else 0.0 for row in ablation]
    axes.barh(range(len(names)), values, color="tab:blue")
    axes.set_yticks(range(len(names)), names)
    axes.invert_yaxis()
    for y, value in enumerate(values):
        axes.text(value, y, f" {value:.3f}", va="center", fontsize=8)
    axes.set(xlabel=metric, title="Modality ablation (others withheld via has_* masks)")
    if metric != "r2":
        axes.set_xlim(0, 1.1)
    return _save(figure, path)


# ---- report.md -------------------------------------------------------------------------------------------------------

def _format(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|")  # a label name with a pipe would split its table cell


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return lines + ["| " + " | ".join(_format(v) for v in row) + " |" for row in rows] + [""]


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: the tables a person reads (headline with CIs, per class, confusion matrix, ablation and fusion gain,
    robustness, calibration, efficiency, interpretability) with links to the plots."""
    lines = [f"# Evaluation of `{report['model']['path']}`", "",
             f"Data: `{report['data']['source']}`, split `{report['data']['split']}`, {report['data']['rows']} rows "
             f"({len(report['data'].get('skipped_rows', []))} skipped). Problem type: {report['problem_type']}. "
             f"Seed {report['seed']}.", "", "## Headline", ""]
    ci = report.get("headline_ci", {})
    level = round(100 * report["settings"]["confidence_level"])
    lines += _table(["metric", "value", f"{level}% CI (bootstrap, {report['settings']['bootstrap_rounds']} rounds)"],
                    [[name, value, "n/a" if not ci.get(name) else f"[{ci[name][0]:.4f}, {ci[name][1]:.4f}]"]
                     for name, value in report["headline"].items()])
    metrics = report["metrics"]
    scalar = [[name, value] for name, value in metrics.items() if isinstance(value, (int, float)) or value is None]
    lines += ["## All metrics", ""] + _table(["metric", "value"], scalar)
    if metrics.get("undefined"):
        lines += ["Undefined: " + "; ".join(f"{k}: {v}" for k, v in metrics["undefined"].items()), ""]
    if "per_class" in metrics:
        lines += ["## Per class", ""]
        auc = metrics.get("roc_auc_per_class", {})
        lines += _table(["class", "precision", "recall", "f1", "support"] + (["ROC-AUC (one-vs-rest)"] if auc else []),
                        [[name, m["precision"], m["recall"], m["f1"], m["support"]] + ([auc.get(name)] if auc else [])
                         for name, m in metrics["per_class"].items()])
    if "per_label" in metrics:
        lines += ["## Per label", ""] + _table(["label", "f1", "ROC-AUC", "support"], [
            [name, m["f1"], m["roc_auc"], m["support"]] for name, m in metrics["per_label"].items()])
    if "confusion_matrix" in metrics:
        names = report["model"]["labels"]
        lines += ["## Confusion matrix", "", "Rows: true class; columns: predicted class.", ""]
        lines += _table(["true \\ predicted", *names], [[name, *row] for name, row in
                                                       zip(names, metrics["confusion_matrix"])])
    plots = report.get("plots", {})
    if "confusion_matrix" in plots:
        lines += [f"![confusion matrix]({plots['confusion_matrix']})", ""]
    if report.get("ablation"):
        keys = [k for k in report["ablation"][0] if k != "modalities"]
        lines += ["## Modality ablation", "", "Modalities withheld through the has_* masks; a sample left with no "
                  "modality counts as wrong.", ""]
        lines += _table(["modalities", *keys], [[" + ".join(r["modalities"]), *[r[k] for k in keys]]
                                                for r in report["ablation"]])
        gain = report.get("fusion_gain")
        if gain:
            lines += [f"**Fusion gain**: {gain['metric']} with all modalities "
                      f"({' + '.join(gain['all_modalities'])}) {gain['all_modalities_value']:.4f} vs the best single "
                      f"modality ({gain['best_single_modality']}) {gain['best_single_modality_value']:.4f}: "
                      f"**{gain['gain']:+.4f}**.", ""]
        if "ablation" in plots:
            lines += [f"![ablation]({plots['ablation']})", ""]
    robustness = report.get("robustness")
    if robustness:
        lines += ["## Robustness", "", "Corruptions of the decoded media before the processor, all modalities given.",
                  ""]
        metric = robustness["metric"]
        for kind, curve in robustness["curves"].items():
            lines += [f"### {kind} ({curve['modality']}; level: {curve['level_name']})", ""]
            lines += _table(["level", metric], [["clean" if p["level"] is None else f"{p['level']:g}", p[metric]]
                                                for p in curve["points"]])
        if "robustness" in plots:
            lines += [f"![robustness]({plots['robustness']})", ""]
    calibration = report.get("calibration")
    if calibration and calibration.get("applicable"):
        lines += ["## Calibration", "", f"ECE with {calibration['binning']}.", ""]
        rows = [["uncalibrated", calibration["uncalibrated"]["ece"], calibration["uncalibrated"]["nll"], "n/a"]]
        scaling = calibration.get("temperature_scaling")
        if scaling:
            edge = ", at the edge of its search range" if "edge" in scaling["fitted_on"] else ""
            rows.append([f"temperature scaled (T = {scaling['temperature']:.4f}, fitted on validation{edge})",
                         scaling["test"]["ece"], scaling["test"]["nll"], scaling["validation_nll_after"]])
        lines += _table(["", "ECE", "NLL", "validation NLL"], rows)
        if not scaling:
            lines += [f"Temperature scaling: {calibration.get('temperature_scaling_note')}.", ""]
        if "reliability_diagram" in plots:
            lines += [f"![reliability diagram]({plots['reliability_diagram']})", ""]
    modes = report["model"].get("training_modes") or {}
    lines += ["## Parameters", "", "Trainable: requires_grad at evaluation time; trained as: from the model folder's "
              "training_args.json.", ""]
    lines += _table(["part", "total", "trainable", "trained as"], [
        [part, counts["total"], counts["trainable"], modes.get(part)]
        for part, counts in report["model"]["parameters"].items()])
    efficiency = report.get("efficiency")
    if efficiency:
        memory = efficiency["memory"]
        memory_value = memory.get("peak_allocated_bytes", memory.get("peak_rss_bytes"))
        lines += ["## Efficiency", "", f"On `{efficiency['device']}`, {efficiency['what']}.", ""]
        lines += _table(["measure", "value"], [
            ["latency p50, batch 1 (ms)", efficiency["latency_batch_1_ms"]["p50"]],
            ["latency p95, batch 1 (ms)", efficiency["latency_batch_1_ms"]["p95"]],
            [f"throughput, batch {efficiency['throughput']['batch_size']} (samples/s)",
             efficiency["throughput"]["samples_per_second"]],
            ["peak memory (MiB)", None if memory_value is None else memory_value / 2**20],
            ["FLOPs per sample (M)", efficiency["flops_per_sample"] / 1e6],
            *[[f"FLOPs per sample, {part} (M)", flops / 1e6]
              for part, flops in efficiency["flops_per_sample_by_part"].items()],
        ])
    interpretability = report.get("interpretability")
    if interpretability:
        lines += ["## Interpretability", ""]
        if interpretability.get("contributions"):
            lines += [f"Contribution: {interpretability['contribution_definition']}.", ""]
            lines += _table(["modality", "mean contribution", "mean absolute contribution", "samples"], [
                [m, c["mean"], c["mean_abs"], c["samples"]] for m, c in interpretability["contributions"].items()])
        if interpretability.get("cross_attention"):
            order = [*USER_NAMES.values(), "sink"]
            parts = [p for p in order if any(p in masses for masses in interpretability["cross_attention"].values())]
            lines += [f"Cross-attention mass: {interpretability['cross_attention_definition']}.", ""]
            lines += _table(["stream \\ attends to", *parts], [
                [stream, *[masses.get(p) for p in parts]]
                for stream, masses in interpretability["cross_attention"].items()])
        lines += [f"Per-sample view: `{interpretability['per_sample']}`.", ""]
    lines += ["## Conventions", "", *[f"- {c}" for c in report["conventions"]], "",
              "## Versions", "", *[f"- {k}: {v}" for k, v in report["versions"].items()], ""]
    return "\n".join(lines)


# ---- the report ------------------------------------------------------------------------------------------------------

def package_versions() -> dict[str, str | None]:
    """Versions of Python and the packages whose behaviour the numbers depend on."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("mm-fusion", "torch", "transformers", "peft", "accelerate", "datasets", "scikit-learn", "scipy",
                    "numpy", "pillow", "soundfile", "soxr", "matplotlib", "huggingface-hub"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _training_modes(model_path: str | None) -> dict[str, str] | None:
    """How mm-train trained each tower (full / lora / frozen), from the folder's training_args.json."""
    arguments = Path(model_path) / "training_args.json" if model_path else None
    if arguments is None or not arguments.is_file():
        return None
    lora = json.loads(arguments.read_text()).get("lora", {})
    return {f"{USER_NAMES[m]}_tower": lora[f"{m}_mode"] for m in USER_NAMES if f"{m}_mode" in lora} | {
        "fusion": "full", "head": "full"}


def _check_dataset(dataset: datasets.Dataset, columns: DataSettings, name: str) -> None:
    if not isinstance(dataset, datasets.Dataset):
        raise ValueError(f"{name}: expected a datasets.Dataset; got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError(f"{name}: the data set is empty")
    if columns.label_column not in dataset.column_names:
        raise ValueError(f"label_column: {columns.label_column!r} is not a column of the {name} "
                         f"(columns: {dataset.column_names})")
    media = [columns.text_column, columns.image_column, columns.audio_column]
    if not any(column in dataset.column_names for column in media):
        raise ValueError(f"text_column, image_column, audio_column: none of {media} is a column of the {name} "
                         f"(columns: {dataset.column_names})")


def _with_label_names(dataset: datasets.Dataset, label_column: str) -> datasets.Dataset:
    """ClassLabel integers -> their names, which the model's labels are matched against."""
    feature = dataset.features.get(label_column)
    if isinstance(feature, datasets.ClassLabel):
        return dataset.cast_column(label_column, datasets.Value("string")).map(
            lambda row: {label_column: feature.int2str(int(row[label_column]))})
    return dataset


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return _number(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def evaluate_model(model: torch.nn.Module, processor: MMFusionProcessor, dataset: datasets.Dataset,
                   output_dir: str | os.PathLike, settings: EvaluationSettings | None = None,
                   label_names: Sequence[str] | None = None, validation: datasets.Dataset | None = None, *,
                   data_settings: DataSettings | None = None, data_source: str | None = None, split: str = "test",
                   model_path: str | None = None, skipped_rows: Sequence[dict] | None = None) -> dict[str, Any]:
    """Evaluate `model` on `dataset` and write report.json, report.md, predictions.jsonl and the PNG plots into
    `output_dir`; returns the report (the content of report.json).

    `dataset` holds rows with text/image/audio/label columns as `training.data.prepare_splits` gives them (media
    cells are paths or bytes; column names from `data_settings`, default text/image/audio/label). `label_names`
    are the model's labels in id order (default: `config.id2label`). `validation`, when given (and
    `settings.temperature_scaling`), fits the temperature. The model may be a PeftModel; call this on an unwrapped
    model (on the main process under Accelerate). Its train/eval mode and attention implementation are restored.

    Raises `ValueError` naming the field for a data set without the label column or any media column, an empty
    data set, labels that are not the model's, or a model without a classification head.
    """
    settings = settings or EvaluationSettings()
    columns = data_settings or DataSettings()
    base = _classifier(model)
    problem_type = problem_type_of(model)
    num_labels = base.config.num_labels
    label_names = list(label_names) if label_names is not None else [base.config.id2label[i]
                                                                       for i in range(num_labels)]
    if len(label_names) != num_labels:
        raise ValueError(f"label_names: {len(label_names)} names for a model with num_labels={num_labels}")
    _check_dataset(dataset, columns, "dataset")
    dataset = _with_label_names(dataset, columns.label_column)
    if validation is not None:
        _check_dataset(validation, columns, "validation")
        validation = _with_label_names(validation, columns.label_column)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    modalities = tuple(base.model.modalities)
    full = tuple(modalities)
    subsets = [full]
    if not settings.skip_ablation:
        subsets = [s for n in range(len(modalities), 0, -1) for s in itertools.combinations(modalities, n)]
    elif not settings.skip_interpretability and len(modalities) > 1:  # contributions need the leave-one-out runs
        subsets += [tuple(m for m in modalities if m != left_out) for left_out in modalities]
    corruptions = [] if settings.skip_robustness else robustness_conditions(settings, modalities)

    started = time.perf_counter()
    with _timed(f"forward passes ({len(dataset)} rows x ({len(subsets)} modality subsets + {len(corruptions)} "
                "corruptions))"):
        collected = _collect(model, processor, dataset, columns, label_names, problem_type, settings, subsets,
                             corruptions, attention=not settings.skip_interpretability and len(modalities) > 1,
                             desc=f"evaluating {split}")
    full_name = _subset_name(full)
    logits, labels = collected.logits[full_name], collected.labels
    with _timed(f"metrics and bootstrap ({settings.bootstrap_rounds} rounds)"):
        metrics = quality_metrics(logits, labels, label_names, problem_type)
        headline = {key: metrics[key] for key in _headline_keys(problem_type)}
        samples, statistics = _headline_statistics(labels, logits, label_names, problem_type)
        with _quiet_warnings():
            intervals = bootstrap_intervals(statistics, samples, settings.bootstrap_rounds, settings.seed,
                                            settings.confidence_level)

    report: dict[str, Any] = {
        "model": {
            "path": str(model_path or getattr(base, "name_or_path", "") or "in-memory model"),
            "class": type(model).__name__,
            "modalities": [USER_NAMES[m] for m in modalities],
            "num_labels": num_labels,
            "labels": label_names,
            "parameters": parameter_counts(model),
            "training_modes": _training_modes(model_path),
        },
        "data": {"source": data_source or "in-memory dataset", "split": split, "rows": len(dataset),
                 "columns": {"text": columns.text_column, "image": columns.image_column,
                             "audio": columns.audio_column, "label": columns.label_column},
                 "skipped_rows": list(skipped_rows or []),
                 "validation_rows": None if validation is None else len(validation)},
        "seed": settings.seed,
        "settings": asdict(settings),
        "versions": package_versions(),
        "problem_type": problem_type,
        "conventions": CONVENTIONS,
        "headline": headline,
        "headline_ci": intervals,
        "headline_ci_method": f"{settings.confidence_level:.0%} percentile bootstrap (scipy.stats.bootstrap over "
                              f"resampled samples), {settings.bootstrap_rounds} rounds, seed {settings.seed}",
        "metrics": metrics,
    }
    if not settings.skip_ablation:
        with _timed("ablation"):
            report["ablation"], report["fusion_gain"] = _ablation(collected, subsets, label_names, problem_type)
    if corruptions:
        with _timed("robustness"):
            report["robustness"] = _robustness(collected, corruptions, full_name, label_names, problem_type)
    if not settings.skip_calibration:
        with _timed("calibration (with the validation pass)"):
            validation_pass = None
            if validation is not None and settings.temperature_scaling and problem_type != REGRESSION:
                validation_pass = _collect(model, processor, validation, columns, label_names, problem_type,
                                           settings, [full], [], attention=False, desc="evaluating validation")
            report["calibration"] = _calibration(logits, labels, problem_type, settings, validation_pass, full_name)
    per_sample: list[dict[str, float]] = [{} for _ in range(len(dataset))]
    if not settings.skip_interpretability:
        with _timed("interpretability"):
            report["interpretability"], per_sample = _interpretability(collected, modalities, label_names,
                                                                       problem_type)
    if not settings.skip_efficiency:
        with _timed(f"efficiency ({settings.latency_runs} latency runs)"):
            single, batch = _efficiency_batches(dataset, processor, columns, label_names, problem_type,
                                                settings.efficiency_batch_size)
            report["efficiency"] = measure_efficiency(model, single, batch, settings.latency_runs)
    if not settings.skip_plots:
        with _timed("plots"):
            report["plots"] = _write_plots(report, output_dir)
    with _timed("report files"):
        report = _json_safe(report)
        _write_predictions(output_dir / "predictions.jsonl", logits, labels, label_names, problem_type, per_sample)
        (output_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (output_dir / "report.md").write_text(render_markdown(report))
    logger.info("evaluation written to %s in %.1f s: %s", output_dir, time.perf_counter() - started,
                ", ".join(f"{k} {v:.4f}" for k, v in headline.items() if v is not None))
    return report


@contextlib.contextmanager
def _timed(section: str) -> Iterator[None]:
    """Log how long a section of the evaluation took (in the log only: the report holds no timing outside
    "efficiency")."""
    start = time.perf_counter()
    yield
    logger.info("evaluation section %s: %.1f s", section, time.perf_counter() - start)


def _write_plots(report: dict[str, Any], output_dir: Path) -> dict[str, str]:
    plots = {}
    if "confusion_matrix" in report["metrics"]:
        plots["confusion_matrix"] = plot_confusion_matrix(
            report["metrics"]["confusion_matrix"], report["model"]["labels"], output_dir / "confusion_matrix.png")
    calibration = report.get("calibration")
    if calibration and calibration.get("applicable"):
        plots["reliability_diagram"] = plot_reliability_diagram(calibration, output_dir / "reliability_diagram.png")
    if report.get("robustness"):
        plots["robustness"] = plot_robustness(report["robustness"], output_dir / "robustness.png")
    if report.get("ablation"):
        plots["ablation"] = plot_ablation(report["ablation"], _primary_metric(report["problem_type"]),
                                          output_dir / "ablation.png")
    return plots


def _write_predictions(path: Path, logits, labels, label_names, problem_type, contributions) -> None:
    scores = _scores(logits, problem_type)
    predicted = _predictions(logits, labels, problem_type)
    with open(path, "w") as file:
        for i in range(len(logits)):
            if problem_type == REGRESSION:
                row = {"index": i, "label": _json_safe(labels[i]), "prediction": _json_safe(scores[i].tolist())}
            elif problem_type == MULTI_LABEL:
                row = {"index": i, "labels": [n for n, y in zip(label_names, labels[i]) if y],
                       "predicted": [n for n, p in zip(label_names, predicted[i]) if p],
                       "probabilities": dict(zip(label_names, _json_safe(scores[i].tolist())))}
            else:
                row = {"index": i, "label": label_names[int(labels[i])],
                       "predicted": label_names[int(predicted[i])] if predicted[i] >= 0 else None,
                       "probabilities": dict(zip(label_names, _json_safe(scores[i].tolist())))}
            row["contributions"] = contributions[i]
            file.write(json.dumps(row) + "\n")


def model_index_results(report: dict[str, Any], dataset_name: str, dataset_type: str) -> list:
    """The headline metrics of `report` as `huggingface_hub.EvalResult`s for a model card's model-index.

    The Hub has no pipeline tag for a classifier over image + text + audio; task_type is "text-classification"
    when the model reads text (transformers' sequence-classification heads use it), else "image-classification" or
    "audio-classification", with task_name naming the modalities. Metric types are the Hub's metric ids
    ("accuracy", "f1" with its average in metric_args, "mse", "mae", "r_squared")."""
    from huggingface_hub import EvalResult

    modalities = report["model"]["modalities"]
    task_type = ("text-classification" if "text" in modalities else
                 "image-classification" if "image" in modalities else "audio-classification")
    metric_ids = {"accuracy": ("accuracy", "Accuracy", None), "macro_f1": ("f1", "Macro F1", {"average": "macro"}),
                  "micro_f1": ("f1", "Micro F1", {"average": "micro"}),
                  "balanced_accuracy": ("balanced_accuracy", "Balanced accuracy", None),
                  "mse": ("mse", "MSE", None), "mae": ("mae", "MAE", None), "r2": ("r_squared", "R²", None)}
    if report["problem_type"] == MULTI_LABEL:
        metric_ids["accuracy"] = ("accuracy", "Subset accuracy", None)
    results = []
    for key, value in report["headline"].items():
        if value is None or key not in metric_ids:
            continue
        metric_type, metric_name, metric_args = metric_ids[key]
        results.append(EvalResult(
            task_type=task_type, task_name=f"Multimodal classification ({' + '.join(modalities)})",
            dataset_type=dataset_type, dataset_name=dataset_name, dataset_split=report["data"]["split"],
            metric_type=metric_type, metric_name=metric_name, metric_value=round(float(value), 4),
            metric_args=metric_args))
    return results


# ---- command line ----------------------------------------------------------------------------------------------------

def load_split(source: str, split: str, columns: DataSettings) -> datasets.Dataset:
    """One split of `source` (any form `training.data.load_table` takes), media columns undecoded. A single table
    file is used whole, whatever `split` says. Raises `ValueError` naming `split` when the source lacks it."""
    table = load_table(source, (columns.image_column, columns.audio_column))
    if Path(source).is_file():
        return _undecoded(table["train"], columns)
    key = SPLIT_NAMES.get(split, split)
    if key not in table:
        raise ValueError(f"split: {split!r} is not a split of {source!r} (it has {sorted(table)})")
    return _undecoded(table[key], columns)


def run(arguments: EvaluationArguments, settings: EvaluationSettings) -> dict[str, Any]:
    """What `mm-eval` does: load the model folder, its processor and the data, drop bad rows (or refuse them with
    `strict`), and `evaluate_model`."""
    from training.lora import load_trained_model

    if not arguments.model:
        raise ValueError("model: required (a model folder written by mm-train)")
    if not arguments.data:
        raise ValueError("data: required (a table file, folder, save_to_disk folder or Hub data set name)")
    model_path = Path(arguments.model)
    if not model_path.is_dir():
        raise ValueError(f"model: {arguments.model!r} is not a folder")
    if not (model_path / "config.json").exists():
        raise ValueError(f"model: {arguments.model!r} holds no config.json (not a model folder written by mm-train)")
    columns = DataSettings(text_column=arguments.text_column, image_column=arguments.image_column,
                           audio_column=arguments.audio_column, label_column=arguments.label_column)
    dataset = load_split(arguments.data, arguments.split, columns)
    validation = None
    if arguments.validation_data:
        validation = load_split(arguments.validation_data, "validation", columns)
    elif settings.temperature_scaling and not Path(arguments.data).is_file():
        with contextlib.suppress(ValueError):
            validation = load_split(arguments.data, "validation", columns)

    model = load_trained_model(model_path)
    processor = MMFusionProcessor.from_pretrained(model_path)
    device = torch.device(arguments.device or ("cuda" if torch.cuda.is_available() and not arguments.quantize
                                               else "cpu"))
    if arguments.quantize:
        if device.type != "cpu":
            raise ValueError(f"quantize: dynamic int8 runs on the CPU only; got device {arguments.device!r}")
        from training.quantize import quantize_for_cpu

        model = quantize_for_cpu(model)  # merges a peft adapter first
    model.to(device)
    base = _classifier(model)
    problem_type = problem_type_of(model)
    label_names = [base.config.id2label[i] for i in range(base.config.num_labels)]
    skipped = []
    for name in ("dataset", "validation"):
        split = dataset if name == "dataset" else validation
        if split is None:
            continue
        _check_dataset(split, columns, name)
        split = _with_label_names(split, columns.label_column)
        collator = _EvaluationCollator(processor, columns, label_names, problem_type, [], settings.seed)
        bad = find_bad_rows(split, _RowChecker(collator), name, arguments.strict)
        if bad:
            split = split.select(sorted(set(range(len(split))) - {i for i, _ in bad}))
        if name == "dataset":
            dataset, skipped = split, [{"row": i, "reason": reason} for i, reason in bad]
        else:
            validation = split
    output_dir = Path(arguments.output_dir) if arguments.output_dir else model_path / "evaluation"
    return evaluate_model(model, processor, dataset, output_dir, settings, label_names, validation,
                          data_settings=columns, data_source=arguments.data, split=arguments.split,
                          model_path=str(model_path), skipped_rows=skipped)


class _RowChecker:
    """find_bad_rows calls a collator on single rows; ours takes (index, row) items."""

    def __init__(self, collator: _EvaluationCollator):
        self.collator = collator

    def __call__(self, rows):
        return self.collator([(0, row) for row in rows])


def main(argv: list[str] | None = None) -> int:
    """`mm-eval`: returns 0 on success; prints `mm-eval: error: ...` and returns 2 for bad input."""
    parser = HfArgumentParser((EvaluationArguments, EvaluationSettings), description=__doc__)
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
            arguments, settings = parser.parse_yaml_file(argv[0])
        elif len(argv) == 1 and argv[0].endswith(".json"):
            arguments, settings = parser.parse_json_file(argv[0])
        else:
            arguments, settings = parser.parse_args_into_dataclasses(argv)
        report = run(arguments, settings)
    except ValueError as error:
        print(f"mm-eval: error: {error}", file=sys.stderr)
        return 2
    headline = ", ".join(f"{k} {v:.4f}" for k, v in report["headline"].items() if v is not None)
    output_dir = arguments.output_dir or Path(arguments.model) / "evaluation"
    print(f"{report['data']['split']}: {headline}")
    print(f"report written to {Path(output_dir) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
