"""`mm-eval`: one reproducible report of an mm-fusion classifier's quality, modality robustness, calibration,
efficiency and interpretability.

    mm-eval --model outputs/sample/model --data ~/.cache/mm-fusion/sample/test.csv
    mm-eval --model outputs/run/model --data my_dataset_dir --split test --validation_data val.csv --batch_size 64

`evaluate_model` does the work (mm-train calls it for its final evaluation); `main` is the command line. This
module is the run: settings, one pass over the data, and the report's sections. The parts live apart, one concept
each: `training.scoring` (withholding modalities and logits -> scores), `training.metrics` (metrics, bootstrap,
calibration), `training.corruptions`, `training.efficiency`, `training.interpretability` (contributions,
cross-attention, `explain_sample`) and `training.report` (report.md, plots, predictions.jsonl, model-index).
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
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import HfArgumentParser

import modeling_mm  # noqa: F401  (registers the Auto classes)
from modeling_mm.configuration_mm import MODALITY_NAMES
from processors import MMFusionProcessor, MediaLimits, load_audio, load_image
from training.corruptions import CORRUPTION_LEVEL_NAMES, Corruption, corrupt, robustness_conditions
from training.data import SPLIT_NAMES, DataSettings, MMFusionCollator, _undecoded, find_bad_rows, load_table
from training.efficiency import measure_efficiency, parameter_counts
from training.interpretability import contributions, cross_attention_mass, eager_fusion_attention
from training.metrics import (TEMPERATURE_RANGE, bootstrap_intervals, calibration_metrics, fit_temperature,
                              headline_keys, headline_statistics, negative_log_likelihood, primary_metric,
                              quality_metrics, quiet_warnings)
from training.report import json_safe, render_markdown, write_plots, write_predictions
from training.scoring import (MULTI_LABEL, REGRESSION, SINGLE_LABEL, classifier, encode_towers, eval_mode,
                              forward_kept, problem_type_of, scores, uniform_prior)

logger = logging.getLogger("mm_fusion.evaluation")

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
            key = corruption.processor_argument
            if key not in inputs:
                continue
            if key not in decoded:
                decoded[key] = self._decode(key, inputs[key])
            corrupted = dict(inputs)
            corrupted[key] = [None if value is None else corrupt(corruption, value, self.seed, row_index)
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


# ---- one pass over a data set ----------------------------------------------------------------------------------------

def _subset_name(subset: Sequence[str]) -> str:
    return "+".join(MODALITY_NAMES[m].user for m in subset)


@dataclass
class _Collected:
    """Everything one pass over a data set produced, indexed by row."""

    labels: np.ndarray
    presence: np.ndarray  # (rows, modalities of the model), bool: what each row has
    logits: dict[str, np.ndarray]  # subset name or corruption name -> (rows, num_labels), NaN = no prediction
    attention_sums: dict[str, dict[str, float]]
    attention_counts: dict[str, int]


def _collect(model: torch.nn.Module, processor: MMFusionProcessor, dataset: datasets.Dataset, columns: DataSettings,
             label_names: Sequence[str], problem_type: str, settings: EvaluationSettings,
             subsets: Sequence[tuple[str, ...]], corruptions: Sequence[Corruption], attention: bool,
             desc: str) -> _Collected:
    """Run every modality subset on the clean batches and the full model on every corrupted copy, in one pass over
    the data. Each row is decoded once per corrupted modality, whatever the number of levels; each tower runs once
    per batch (`encode_towers`), and once more per corruption of its own modality: a corruption changes one
    modality's inputs, so the other towers' outputs are reused."""
    base = classifier(model)
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
    with eval_mode(model), eager_fusion_attention(model) if attention else contextlib.nullcontext():
        for batches, batch_labels, indices in tqdm(loader, desc=desc, leave=False):
            rows_here = indices.numpy()
            if labels is None:
                labels = np.zeros((rows, *batch_labels.shape[1:]), dtype=batch_labels.numpy().dtype)
            labels[rows_here] = batch_labels.numpy()
            clean = batches["clean"]
            for j, modality in enumerate(modalities):
                key = MODALITY_NAMES[modality].presence
                presence[rows_here, j] = clean[key].numpy() if key in clean else False
            states = encode_towers(model, clean)
            for subset in subsets:
                wants_attention = attention and tuple(subset) == tuple(modalities)
                out, _, fusion_output = forward_kept(model, clean, subset, tower_states=states,
                                                     output_attentions=wants_attention)
                logits[_subset_name(subset)][rows_here] = out.cpu().double().numpy()
                if wants_attention and fusion_output is not None:
                    _add_attention(sums, counts, cross_attention_mass(fusion_output, modalities))
            for corruption in corruptions:
                batch = batches.get(corruption.name, clean)  # rows of a batch without that modality stay clean
                corrupted = states if batch is clean else {
                    **states, **encode_towers(model, batch, [corruption.modality])}
                out, _, _ = forward_kept(model, batch, modalities, tower_states=corrupted)
                logits[corruption.name][rows_here] = out.cpu().double().numpy()
    return _Collected(labels, presence, logits, sums, counts)


def _add_attention(sums: dict[str, dict[str, float]], counts: dict[str, int], masses) -> None:
    """Add one batch's `cross_attention_mass` to the running sums (per stream and part) and sample counts."""
    for stream, (parts, has_stream) in masses.items():
        stream_sums = sums.setdefault(MODALITY_NAMES[stream].user, {})
        for part, mass in parts.items():
            name = "sink" if part == "sink" else MODALITY_NAMES[part].user
            stream_sums[name] = stream_sums.get(name, 0.0) + float(mass[has_stream].double().sum())
        counts[MODALITY_NAMES[stream].user] = counts.get(MODALITY_NAMES[stream].user, 0) + int(has_stream.sum())


# ---- sections --------------------------------------------------------------------------------------------------------

def _compact(metrics: dict[str, Any], problem_type: str) -> dict[str, Any]:
    """The ablation/robustness view of a metrics dict: headline metrics, AUC and log loss, missing samples."""
    keys = list(headline_keys(problem_type)) + {SINGLE_LABEL: ["roc_auc", "log_loss"], MULTI_LABEL: [
        "macro_roc_auc"], REGRESSION: ["pearson", "spearman"]}[problem_type]
    return {**{key: metrics.get(key) for key in keys},
            "samples_without_modality": metrics.get("samples_without_prediction", 0)}


# ---- sections --------------------------------------------------------------------------------------------------------

def _ablation(collected: _Collected, subsets, label_names, problem_type) -> tuple[list[dict], dict | None]:
    rows = []
    for subset in subsets:
        metrics = quality_metrics(collected.logits[_subset_name(subset)], collected.labels, label_names, problem_type)
        rows.append({"modalities": [MODALITY_NAMES[m].user for m in subset], **_compact(metrics, problem_type)})
    primary = primary_metric(problem_type)
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
            "modality": MODALITY_NAMES[corruption.modality].user,
            "level_name": CORRUPTION_LEVEL_NAMES[corruption.kind],
            "points": [{"level": None, "condition": "clean", **clean}],
        })
        metrics = quality_metrics(collected.logits[corruption.name], collected.labels, label_names, problem_type)
        curve["points"].append({"level": corruption.level, "condition": corruption.name,
                                **_compact(metrics, problem_type)})
    return {"metric": primary_metric(problem_type), "curves": curves}


def _calibration(logits, labels, problem_type, settings, validation: _Collected | None, full_name) -> dict[str, Any]:
    if problem_type == REGRESSION:
        return {"applicable": False, "reason": "regression has no class confidence"}
    result: dict[str, Any] = {"applicable": True, "bins": settings.calibration_bins,
                              "binning": f"{settings.calibration_bins} equal-width bins on "
                                         + ("each label's max(p, 1 - p)" if problem_type == MULTI_LABEL
                                            else "the top-class confidence"),
                              "uncalibrated": calibration_metrics(logits, labels, problem_type,
                                                                settings.calibration_bins)}
    if validation is None:
        result["temperature_scaling"] = None
        result["temperature_scaling_note"] = ("not fitted: no validation data" if settings.temperature_scaling
                                              else "disabled (temperature_scaling=False)")
        return result
    validation_logits = validation.logits[full_name]
    keep = ~np.isnan(validation_logits).any(1)
    temperature = fit_temperature(validation_logits[keep], validation.labels[keep], problem_type)
    scaled = calibration_metrics(logits / temperature, labels, problem_type, settings.calibration_bins)
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
    rows = len(collected.logits[full])
    per_sample: list[dict[str, float]] = [{} for _ in range(rows)]
    summary: dict[str, Any] = {}
    if problem_type != REGRESSION:
        with_all = scores(collected.logits[full], problem_type)
        without = {}
        for modality in modalities:
            others = tuple(m for m in modalities if m != modality)
            # a one-modality model: withholding its only modality leaves the prior
            without[modality] = (scores(collected.logits[_subset_name(others)], problem_type) if others else
                                 np.broadcast_to(uniform_prior(problem_type, len(label_names)), with_all.shape))
        change = contributions(with_all, without)
        for j, modality in enumerate(modalities):
            has = collected.presence[:, j] & ~np.isnan(collected.logits[full]).any(1)
            name = MODALITY_NAMES[modality].user
            for i in np.flatnonzero(has):
                per_sample[i][name] = float(change[modality][i])
            summary[name] = {
                "mean": float(change[modality][has].mean()) if has.any() else None,
                "mean_abs": float(np.abs(change[modality][has]).mean()) if has.any() else None,
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


def _efficiency_batches(dataset, processor, columns, label_names, problem_type, size: int):
    collator = _EvaluationCollator(processor, columns, label_names, problem_type, [], 0)
    rows = [(i % len(dataset), dataset[i % len(dataset)]) for i in range(size)]
    single, _, _ = collator(rows[:1])
    batch, _, _ = collator(rows)
    return single["clean"], batch["clean"]


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
    return {f"{MODALITY_NAMES[m].user}_tower": lora[f"{m}_mode"] for m in MODALITY_NAMES if f"{m}_mode" in lora} | {
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
    base = classifier(model)
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
        headline = {key: metrics[key] for key in headline_keys(problem_type)}
        samples, statistics = headline_statistics(labels, logits, label_names, problem_type)
        with quiet_warnings():
            intervals = bootstrap_intervals(statistics, samples, settings.bootstrap_rounds, settings.seed,
                                            settings.confidence_level)

    report: dict[str, Any] = {
        "model": {
            "path": str(model_path or getattr(base, "name_or_path", "") or "in-memory model"),
            "class": type(model).__name__,
            "modalities": [MODALITY_NAMES[m].user for m in modalities],
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
            report["plots"] = write_plots(report, output_dir)
    with _timed("report files"):
        report = json_safe(report)
        write_predictions(output_dir / "predictions.jsonl", logits, labels, label_names, problem_type, per_sample)
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
    base = classifier(model)
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
