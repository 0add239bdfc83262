"""`mm-eval`: one reproducible report of an mm-fusion model's quality, modality robustness, calibration,
efficiency and interpretability, one section per task.

    mm-eval --model outputs/sample/model --data ~/.cache/mm-fusion/sample/test.csv
    mm-eval --model outputs/run/model --data my_dataset_dir --split test --validation_data val.csv --batch_size 64

`evaluate_model` does the work (mm-train calls it for its final evaluation); `main` is the command line. This
module is the run: settings, one pass over the data, and the report's sections. The parts live apart, one concept
each: `training.scoring` (tasks, withholding modalities and logits -> scores), `training.data` (row cells ->
targets), `training.metrics` (metrics, decision thresholds, bootstrap, calibration), `training.corruptions`,
`training.efficiency`, `training.interpretability` (Shapley values, cross-attention, `explain_sample`) and
`training.report` (report.md, plots, predictions.jsonl, model-index). It writes into the output folder (default
`<model>/evaluation`):

- `report.json`: everything, machine-readable, with the model, data, seed and package versions. Every number that
  depends on timing or on the machine's load is under the key `"efficiency"` and nowhere else, so two runs with the
  same seed give the same file apart from that key.
- `report.md`: the tables a person reads, with links to the plots.
- `confusion_matrix.png`, `reliability_diagram.png`, `robustness.png`, `ablation.png`, and for regression
  `predicted_vs_true.png`, `residuals.png` (matplotlib, Agg canvas); a multi-task model's carry the task's name
  first (`shape_confusion_matrix.png`).
- `predictions.jsonl`: per sample and task, the target, prediction, probabilities and per-modality Shapley values.

Layout: a classifier (`MMFusionForSequenceClassification`) is one task, and its report has that task's section at
the top level ("problem_type", "headline", "headline_ci", "metrics", "ablation", "fusion_gain", "robustness",
"calibration", "interpretability"). A multi-task model (`MMFusionForMultiTask`) has the common parts at the top
("model", "data", "seed", "settings", "versions", "conventions", "efficiency", and the task-independent
cross-attention under "interpretability") and `"tasks": {task name: section}` with the same keys per section, plus
the task's "labels", "column" and "rows_without_target". `training.report.report_sections` reads both alike.

A joint embedding model (`MMFusionContrastiveModel`) has a report of its own, with "problem_type": "contrastive":
"retrieval" ({"positives": how matches are defined, "pairs": {"image->text": {"query", "gallery", "metrics": {"r@1",
"r@5", "r@10", "median_rank", "mean_rank", "map"}, "ci": the same keys, "ci_method", "queries",
"queries_without_positive", "gallery_size"}, ...}}, one pair per ordered pair of the modalities that model and data
share), "zero_shot" (with `--zero_shot_columns`: {"prompt_template", "columns": {column: {"classes", "prompts",
"modalities": {"image"/"audio": `training.retrieval.zero_shot_accuracy` + "rows_without_value"}}}}), "headline"
(each pair's R@1 and each zero-shot accuracy, for the model card) with "headline_ci", the common "model", "data",
"seed", "settings", "versions", "conventions" and "efficiency" (embedding latency per modality). It has report.json
and report.md only; its metrics are defined once in `training.retrieval`.

Conventions, also stated in every report (`report["conventions"]`):

- Modalities have user-facing names "image", "text", "audio" everywhere in reports and in `explain_sample`; the model
  calls its vision stream "vision" internally (`model.modalities`).
- A modality is withheld by setting its `has_image`/`has_text`/`has_audio` mask to False, never by zero-filling
  inputs, so the tower does not run for that sample and the fusion does not see it. A sample left with no modality
  has no prediction and counts as wrong (uniform probabilities for the probability-based metrics; for regression it
  is left out of the metrics and counted).
- A task's targets come from its data column through `training.data.encode_targets`; a row without a target for a
  task is left out of that task's section and counted there (a classifier's rows must all have the label).
- Multi-label decisions use one threshold per label, tuned for F1 on the validation data
  (`training.metrics.tune_thresholds`), else 0.5.
- ECE uses 15 equal-width bins (settable) on the top-class confidence (single-label) or on each label's
  max(p, 1 - p) (multi-label).
- A modality's contribution to a sample is its exact Shapley value over every subset of the modalities, on the
  log-odds scale (`training.interpretability.subset_value`: the predicted class's log-odds for single-label, each
  label's logit for multi-label, the output for regression); the empty subset's value is the uniform prior (the
  training mean for regression). Per sample, the values sum to v(all modalities) - v(no modality).
- Corruptions are applied to the decoded media before the processor, with a numpy Generator seeded per
  (seed, corruption, level, row), so results do not depend on batch size, order or workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from transformers import AutoConfig, HfArgumentParser

import modeling_mm  # noqa: F401  (registers the Auto classes)
from modeling_mm.configuration_mm import MODALITY_NAMES
from processors import MMFusionProcessor, MediaLimits, load_audio, load_image
from training.corruptions import CORRUPTION_LEVEL_NAMES, Corruption, corrupt, robustness_conditions
from training.data import (SPLIT_NAMES, DataSettings, MMFusionCollator, _undecoded, find_bad_rows, has_target,
                           load_table)
from training.efficiency import measure_efficiency, parameter_counts
from training.embeddings import column_items, contrastive_model, embed_items
from training.interpretability import cross_attention_mass, eager_fusion_attention, shapley_values, task_subset_values
from training.metrics import (TEMPERATURE_RANGE, bootstrap_intervals, calibration_metrics, fit_temperature,
                              headline_keys, headline_statistics, negative_log_likelihood, primary_metric,
                              quality_metrics, quiet_warnings, tune_thresholds)
from training.report import (json_safe, render_markdown, report_sections, task_predictions, write_plots,
                             write_predictions)
from training.retrieval import CONTRASTIVE, positive_keys, retrieval_report, zero_shot_accuracy
from training.scoring import (MULTI_LABEL, REGRESSION, SINGLE_LABEL, Task, classifier, encode_towers, eval_mode,
                              forward_kept, num_outputs, scores, tasks_of)

logger = logging.getLogger("mm_fusion.evaluation")

CONVENTIONS = [
    "Modality names: image, text, audio (the model's internal stream 'vision' is reported as 'image').",
    "A modality is withheld by setting its has_* mask to False (its tower does not run), never by zero-filling "
    "inputs. A sample left with no modality has no prediction and counts as wrong (uniform probabilities for "
    "probability-based metrics; for regression it is left out and counted).",
    "Targets: each task's data column through training.data.encode_targets; a row without a target for a task is "
    "left out of that task's metrics and counted in its section (a classifier's rows must all have the label).",
    "Multi-label decisions: one threshold per label, tuned for that label's F1 on the validation data "
    "(training.metrics.tune_thresholds); 0.5 when no validation data is given.",
    "ECE: 15 equal-width bins (settable) on the top-class confidence (single-label) or on each label's "
    "max(p, 1 - p) (multi-label); reported as is and, when validation data is given, separately after temperature "
    "scaling fitted on the validation data.",
    "Contribution of a modality to a sample: its exact Shapley value over all subsets of the model's modalities "
    "(each scored with the others withheld), on the log-odds scale: v(S) is the log-odds of the class predicted with "
    "all modalities (single-label), each label's logit (multi-label) or the output (regression); v(no modality) is "
    "the uniform prior (regression: the training targets' mean). A modality the sample lacks gets 0, and a sample's "
    "values sum to v(all) - v(no modality).",
    "Cross-attention mass: the attention weight each stream's real query tokens put on the tokens of each other "
    "stream (and on the learned sink), averaged over heads, query tokens, fusion layers and samples.",
    "Corruptions are applied to decoded media before the processor, seeded per (seed, corruption, level, row).",
    "Every timing- or load-dependent number is under 'efficiency'.",
]

SHAPLEY_DEFINITION = (
    "exact Shapley value phi_m = sum over subsets S of the other modalities of |S|! (n - |S| - 1)! / n! * "
    "(v(S + m) - v(S)), every subset scored with the other modalities withheld via their has_* masks; v on the "
    "log-odds scale (training.interpretability.subset_value); v(no modality) = the uniform prior (regression: the "
    "training mean); summarised as the mean (and mean absolute) phi over the samples that have the modality")

NO_MODALITY_DROPOUT_NOTE = (
    "the model was trained without modality dropout (modality_dropout = 0): it never saw a sample with a modality "
    "withheld, so the scores of modality subsets (the ablation, and the Shapley values built from them) describe "
    "inputs outside its training distribution, and the contributions are not meaningful")

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
    skip_ablation: bool = field(default=False, metadata={
        "help": "Skip the modality ablation (and the Shapley values, which need every modality subset)."})
    skip_robustness: bool = field(default=False, metadata={"help": "Skip the corruption curves."})
    skip_calibration: bool = field(default=False, metadata={"help": "Skip calibration."})
    skip_efficiency: bool = field(default=False, metadata={"help": "Skip parameter/latency/memory/FLOP measurement."})
    skip_interpretability: bool = field(default=False, metadata={
        "help": "Skip the Shapley values and cross-attention mass."})
    skip_plots: bool = field(default=False, metadata={"help": "Write no PNG files."})
    positive_columns: list[str] | None = field(default=None, metadata={
        "help": "Joint embedding models: columns whose values together are an item's attributes (e.g. colour shape "
                "pitch). In retrieval, a gallery item with the query's attributes counts as a match too, besides the "
                "same row, the identical caption text and the same image/audio file."})
    zero_shot_columns: list[str] | None = field(default=None, metadata={
        "help": "Joint embedding models: columns to classify zero-shot (e.g. shape). The classes are each column's "
                "distinct values; each image and audio item gets the class whose prompt (--prompt_template) its "
                "embedding is closest to."})
    prompt_template: str = field(default="a photo of {}", metadata={
        "help": "Joint embedding models: the text embedded for each zero-shot class; {} is replaced by the class "
                "name."})

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
        if "{}" not in self.prompt_template:
            raise ValueError(f"prompt_template: must contain {{}} where the class name goes; got "
                             f"{self.prompt_template!r}")
        try:
            self.prompt_template.format("class")
        except (IndexError, KeyError, ValueError) as error:
            raise ValueError(f"prompt_template: {self.prompt_template!r} must hold one {{}} and no other braces "
                             f"(double them: {{{{ }}}}): {error!r}") from None


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
    label_column: str = field(default="label", metadata={
        "help": "Column with the label of a classifier (a multi-task model reads each task's column from its "
                "config.tasks)."})
    label_separator: str = field(default="|", metadata={
        "help": "A multi-label classifier's string cells: the separator between tags, as for mm-train (a multi-task "
                "model's tasks keep the separator they were trained with)."})
    strict: bool = field(default=False, metadata={
        "help": "Fail on a bad row (missing/corrupt file, unknown label) instead of skipping it with a warning."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1, ... (default: cuda if available)."})
    quantize: bool = field(default=False, metadata={
        "help": "Evaluate on the CPU with dynamic int8 Linear layers, as mm-demo --quantize serves the model "
                "(training.quantize.quantize_for_cpu). Parameter counts and FLOPs then leave out the int8 Linears, "
                "which torch counts as neither; benchmarks/cpu_quantized.py puts float32 and int8 side by side."})


# ---- tasks and their targets -----------------------------------------------------------------------------------------

def evaluated_tasks(model: torch.nn.Module, columns: DataSettings,
                    label_names: Sequence[str] | None = None) -> list[Task]:
    """The tasks of `model` (`training.scoring.tasks_of`) with the data column and multi-label separator their
    targets are read from: a classifier's one task reads `columns.label_column` (split at `columns.label_separator`),
    with `label_names` (default the config's `id2label`) as its labels; a multi-task model's tasks read the column
    each was trained on (default its name) and keep their own separator (default "|"). Raises `ValueError` naming
    `label_names` when a classifier gets a different number of names than it has outputs."""
    tasks = tasks_of(model)
    if classifier(model).config.tasks:
        return [dataclasses.replace(task, column=task.column or task.name, label_separator=task.label_separator or "|")
                for task in tasks]
    task = tasks[0]
    if label_names is not None:
        if len(label_names) != task.num_outputs:
            raise ValueError(f"label_names: {len(label_names)} names for a model with num_labels={task.num_outputs}")
        task = dataclasses.replace(task, label_names=tuple(label_names))
    return [dataclasses.replace(task, column=columns.label_column, label_separator=columns.label_separator)]


def _task_dict(task: Task) -> dict[str, Any]:
    """A task in the `MMFusionConfig.tasks` layout that `encode_targets` reads."""
    return {"name": task.name, "column": task.column, "problem_type": task.problem_type,
            "labels": None if task.problem_type == REGRESSION else list(task.label_names),
            "label_separator": task.label_separator}


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
    """Rows -> {"clean": batch, corruption name: batch, ...}, {task name: targets}, row indices. Decodes each row's
    media once per corrupted modality and corrupts every level from it. Picklable, so it runs in DataLoader workers.
    Targets through mm-train's own `MMFusionCollator.targets`: with `require_targets` (a classifier) a row without the
    label is refused (`ValueError` naming the column), as mm-train refuses it; otherwise a missing target is encoded
    as missing."""

    def __init__(self, processor: MMFusionProcessor, columns: DataSettings, tasks: Sequence[Task],
                 corruptions: Sequence[Corruption], seed: int, require_targets: bool = True):
        self.tasks = [_task_dict(task) for task in tasks]
        self.rows_to_inputs = MMFusionCollator(processor, columns, self.tasks, multi_task=not require_targets)
        self.processor, self.columns = processor, columns
        self.corruptions, self.seed, self.require_targets = list(corruptions), seed, require_targets
        self.limits = MediaLimits(max_image_pixels=processor.max_image_pixels,
                                  max_audio_seconds=processor.max_audio_seconds)

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
        return batches, self.rows_to_inputs.targets(rows), torch.tensor(indices)

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

    targets: dict[str, np.ndarray]  # task name -> encode_targets of its column (-100 / NaN where a row has none)
    presence: np.ndarray  # (rows, modalities of the model), bool: what each row has
    logits: dict[str, np.ndarray]  # subset name or corruption name -> (rows, num_outputs), NaN = no prediction
    attention_sums: dict[str, dict[str, float]]
    attention_counts: dict[str, int]


def _collect(model: torch.nn.Module, processor: MMFusionProcessor, dataset: datasets.Dataset, columns: DataSettings,
             tasks: Sequence[Task], settings: EvaluationSettings, subsets: Sequence[tuple[str, ...]],
             corruptions: Sequence[Corruption], attention: bool, desc: str,
             require_targets: bool = True) -> _Collected:
    """Run every modality subset on the clean batches and the full model on every corrupted copy, in one pass over
    the data, keeping every task's outputs side by side (`forward_kept`) and every task's targets. Each row is
    decoded once per corrupted modality, whatever the number of levels; each tower runs once per batch
    (`encode_towers`), and once more per corruption of its own modality: a corruption changes one modality's
    inputs, so the other towers' outputs are reused."""
    modalities, width = classifier(model).model.modalities, num_outputs(model)
    collator = _EvaluationCollator(processor, columns, tasks, corruptions, settings.seed, require_targets)
    loader = DataLoader(_IndexedRows(dataset), batch_size=settings.batch_size, shuffle=False,
                        num_workers=settings.num_workers, collate_fn=collator)
    rows = len(dataset)
    logits = {name: np.full((rows, width), np.nan) for name in
              [_subset_name(s) for s in subsets] + [c.name for c in corruptions]}
    targets: dict[str, np.ndarray] = {}
    presence = np.zeros((rows, len(modalities)), dtype=bool)
    sums: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = {}
    with eval_mode(model), eager_fusion_attention(model) if attention else contextlib.nullcontext():
        for batches, batch_targets, indices in tqdm(loader, desc=desc, leave=False):
            rows_here = indices.numpy()
            for name, values in batch_targets.items():
                values = values.numpy()
                if name not in targets:
                    targets[name] = np.zeros((rows, *values.shape[1:]), dtype=np.float64 if values.dtype.kind == "f"
                                             else values.dtype)
                targets[name][rows_here] = values
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
    return _Collected(targets, presence, logits, sums, counts)


def _add_attention(sums: dict[str, dict[str, float]], counts: dict[str, int], masses) -> None:
    """Add one batch's `cross_attention_mass` to the running sums (per stream and part) and sample counts."""
    for stream, (parts, has_stream) in masses.items():
        stream_sums = sums.setdefault(MODALITY_NAMES[stream].user, {})
        for part, mass in parts.items():
            name = "sink" if part == "sink" else MODALITY_NAMES[part].user
            stream_sums[name] = stream_sums.get(name, 0.0) + float(mass[has_stream].double().sum())
        counts[MODALITY_NAMES[stream].user] = counts.get(MODALITY_NAMES[stream].user, 0) + int(has_stream.sum())


@dataclass
class _TaskRows:
    """One task's view of a pass: the rows that have its target, their targets, and its columns of every output."""

    task: Task
    rows: np.ndarray  # indices into the pass of the rows with a target
    labels: np.ndarray  # class ids (int64), 0/1 rows (int64) or values (float64) of those rows
    logits: dict[str, np.ndarray]  # subset or corruption name -> (len(rows), task.num_outputs)
    rows_without_target: int


def _task_rows(collected: _Collected, task: Task) -> _TaskRows:
    targets = collected.targets[task.name]
    rows = np.flatnonzero(has_target(targets, task.problem_type))
    labels = targets[rows].astype(np.float64 if task.problem_type == REGRESSION else np.int64)
    logits = {name: values[rows][:, task.outputs] for name, values in collected.logits.items()}
    return _TaskRows(task, rows, labels, logits, len(targets) - len(rows))


# ---- sections --------------------------------------------------------------------------------------------------------

def _compact(metrics: dict[str, Any], problem_type: str) -> dict[str, Any]:
    """The ablation/robustness view of a metrics dict: headline metrics, AUC and log loss, missing samples."""
    keys = list(headline_keys(problem_type)) + {SINGLE_LABEL: ["roc_auc", "log_loss"], MULTI_LABEL: [
        "macro_roc_auc"], REGRESSION: ["pearson", "spearman"]}[problem_type]
    return {**{key: metrics.get(key) for key in keys},
            "samples_without_modality": metrics.get("samples_without_prediction", 0)}


def _metrics(data: _TaskRows, name: str, thresholds: np.ndarray | None) -> dict[str, Any]:
    task = data.task
    return quality_metrics(data.logits[name], data.labels, task.label_names, task.problem_type, thresholds=thresholds)


def _ablation(data: _TaskRows, subsets, thresholds) -> tuple[list[dict], dict | None]:
    problem_type = data.task.problem_type
    rows = [{"modalities": [MODALITY_NAMES[m].user for m in subset],
             **_compact(_metrics(data, _subset_name(subset), thresholds), problem_type)} for subset in subsets]
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


def _robustness(data: _TaskRows, corruptions, clean_name, thresholds) -> dict[str, Any]:
    problem_type = data.task.problem_type
    clean = _compact(_metrics(data, clean_name, thresholds), problem_type)
    curves: dict[str, Any] = {}
    for corruption in corruptions:
        curve = curves.setdefault(corruption.kind, {
            "modality": MODALITY_NAMES[corruption.modality].user,
            "level_name": CORRUPTION_LEVEL_NAMES[corruption.kind],
            "points": [{"level": None, "condition": "clean", **clean}],
        })
        curve["points"].append({"level": corruption.level, "condition": corruption.name,
                                **_compact(_metrics(data, corruption.name, thresholds), problem_type)})
    return {"metric": primary_metric(problem_type), "curves": curves}


def _with_prediction(data: _TaskRows, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The logits and labels of the rows of `data` that have a prediction under `name`."""
    keep = ~np.isnan(data.logits[name]).any(1)
    return data.logits[name][keep], data.labels[keep]


def _decision_thresholds(data: _TaskRows, validation: _TaskRows | None, full_name: str
                         ) -> tuple[np.ndarray | None, dict[str, Any]]:
    """A multi-label task's per-label thresholds, tuned on the validation rows (`tune_thresholds`), or None (0.5)
    with the reason; and their report entry."""
    names = data.task.label_names
    logits, labels = _with_prediction(validation, full_name) if validation is not None else (None, None)
    if logits is None or len(logits) == 0:
        reason = "no validation data" if validation is None else "no validation row has this task's target"
        return None, {"values": {name: 0.5 for name in names}, "fitted_on": None,
                      "note": f"0.5 for every label: {reason} to tune them on"}
    thresholds = tune_thresholds(labels, scores(logits, MULTI_LABEL))
    return thresholds, {"values": dict(zip(names, thresholds.tolist())),
                        "fitted_on": f"validation data ({len(logits)} samples): per label, the threshold of "
                                     "sklearn's precision-recall curve with the highest F1"}


def _calibration(data: _TaskRows, settings, validation: _TaskRows | None, full_name) -> dict[str, Any]:
    problem_type = data.task.problem_type
    if problem_type == REGRESSION:
        return {"applicable": False, "reason": "regression has no class confidence"}
    logits, labels = data.logits[full_name], data.labels
    result: dict[str, Any] = {"applicable": True, "bins": settings.calibration_bins,
                              "binning": f"{settings.calibration_bins} equal-width bins on "
                                         + ("each label's max(p, 1 - p)" if problem_type == MULTI_LABEL
                                            else "the top-class confidence"),
                              "uncalibrated": calibration_metrics(logits, labels, problem_type,
                                                                settings.calibration_bins)}
    validation_logits, validation_labels = (_with_prediction(validation, full_name) if validation is not None
                                            else (None, None))
    if validation_logits is None or len(validation_logits) == 0:
        result["temperature_scaling"] = None
        result["temperature_scaling_note"] = (
            "disabled (temperature_scaling=False)" if not settings.temperature_scaling else
            "not fitted: no validation data" if validation is None else
            "not fitted: no validation row has this task's target")
        return result
    temperature = fit_temperature(validation_logits, validation_labels, problem_type)
    scaled = calibration_metrics(logits / temperature, labels, problem_type, settings.calibration_bins)
    # at an edge of the range, the NLL still falls beyond it (e.g. logits that carry no confidence signal)
    at_edge = any(math.isclose(temperature, edge, rel_tol=1e-3) for edge in TEMPERATURE_RANGE)
    result["temperature_scaling"] = {
        "temperature": temperature,
        "fitted_on": f"validation data ({len(validation_logits)} samples), minimising NLL over T in "
                     f"[{TEMPERATURE_RANGE[0]:g}, {TEMPERATURE_RANGE[1]:g}]"
                     + ("; the minimum lies at the edge of that range" if at_edge else ""),
        "validation_nll_before": negative_log_likelihood(validation_logits, validation_labels, problem_type),
        "validation_nll_after": negative_log_likelihood(validation_logits / temperature, validation_labels,
                                                        problem_type),
        "test": scaled,
    }
    return result


def _shapley(collected: _Collected, task: Task, subsets: Sequence[tuple[str, ...]], modalities: Sequence[str]
             ) -> tuple[dict[str, Any] | None, list[dict[str, Any] | None], str | None]:
    """Exact Shapley values of every modality for every row with a prediction, from the ablation's subset logits:
    (summary per modality, per-row {"phi", "v_all", "v_empty"} or None, why they are unavailable or None)."""
    full_name = _subset_name(modalities)
    rows = len(collected.logits[full_name])
    if {frozenset(s) for s in subsets} != {frozenset(s) for n in range(1, len(modalities) + 1)
                                           for s in itertools.combinations(modalities, n)}:
        return None, [None] * rows, ("not computed: the modality ablation was skipped (skip_ablation), and exact "
                                     f"Shapley values need all {2 ** len(modalities)} modality subsets")
    problem_type = task.problem_type
    full = collected.logits[full_name][:, task.outputs]
    values = task_subset_values({frozenset(s): collected.logits[_subset_name(s)] for s in subsets}, task)
    empty = values[frozenset()]
    phi = shapley_values(values, modalities)
    has_prediction = ~np.isnan(full).any(1)
    note = None
    if problem_type == REGRESSION and not task.target_mean:
        note = ("unknown: the model has no target_mean (the training targets' mean), the value of the empty "
                "modality subset")

    def per_output(array: np.ndarray, i: int) -> Any:  # one row's value: a number, or one per label / output
        value = array[i]
        if np.ndim(value) == 0:
            return float(value)
        if problem_type == MULTI_LABEL:
            return dict(zip(task.label_names, value.tolist()))
        return float(value[0]) if len(value) == 1 else value.tolist()

    per_row: list[dict[str, Any] | None] = [None] * rows
    for i in np.flatnonzero(has_prediction):
        per_row[i] = {"phi": {MODALITY_NAMES[m].user: per_output(phi[m], i)
                              for j, m in enumerate(modalities) if collected.presence[i, j]},
                      "v_all": per_output(values[frozenset(modalities)], i), "v_empty": per_output(empty, i)}
    summary = {}
    for j, modality in enumerate(modalities):
        has = collected.presence[:, j] & has_prediction
        magnitudes = np.abs(phi[modality][has]).reshape(int(has.sum()), -1)  # (samples, labels or outputs)
        entry = {"mean": float(phi[modality][has].mean()) if has.any() else None,
                 "mean_abs": float(magnitudes.mean()) if has.any() else None,
                 "samples": int(has.sum())}
        if problem_type == MULTI_LABEL:
            entry["mean_abs_per_label"] = (dict(zip(task.label_names, magnitudes.mean(0).tolist())) if has.any()
                                           else None)
        summary[MODALITY_NAMES[modality].user] = entry
    return summary, per_row, note


def _interpretability(collected: _Collected, task: Task, subsets, modalities, modality_dropout: float,
                      cross_attention: bool) -> tuple[dict, list[dict[str, Any] | None]]:
    """A task's interpretability section (Shapley values; the cross-attention mass too when `cross_attention`) and
    its per-row Shapley values for predictions.jsonl."""
    summary, per_row, note = _shapley(collected, task, subsets, modalities)
    section: dict[str, Any] = {
        "shapley_definition": SHAPLEY_DEFINITION,
        "shapley_scale": {SINGLE_LABEL: "log-odds of the class predicted with all modalities",
                          MULTI_LABEL: "each label's log-odds (logit)",
                          REGRESSION: "the output, in the targets' units"}[task.problem_type],
        "shapley": summary,
    }
    if note:
        section["shapley_note"] = note
    section["modality_dropout"] = modality_dropout
    if modality_dropout == 0:
        section["modality_dropout_note"] = NO_MODALITY_DROPOUT_NOTE
    if cross_attention:
        section.update(_cross_attention(collected))
    section["per_sample"] = "predictions.jsonl"
    return section, per_row


def _cross_attention(collected: _Collected) -> dict[str, Any]:
    return {
        "cross_attention_definition": "attention mass of each stream's real query tokens on the tokens of each other "
                                      "stream and on the learned sink, averaged over heads, query tokens, fusion "
                                      "layers and the samples that have the stream",
        "cross_attention": {stream: {part: total / collected.attention_counts[stream] for part, total in parts.items()}
                            for stream, parts in collected.attention_sums.items()
                            if collected.attention_counts.get(stream)},
    }


def _task_section(collected: _Collected, validation: _Collected | None, task: Task, settings: EvaluationSettings,
                  subsets, corruptions, modalities, modality_dropout: float, multi_task: bool
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """One task's section of the report (the single-task report's keys, in its order) and what its predictions
    need: {"thresholds": the multi-label decision thresholds or None, "shapley": per-row Shapley values}."""
    full_name = _subset_name(modalities)
    data = _task_rows(collected, task)
    validation_data = _task_rows(validation, task) if validation is not None else None
    problem_type = task.problem_type
    section: dict[str, Any] = {"problem_type": problem_type}
    if multi_task:
        section.update(labels=list(task.label_names), column=task.column, rows_without_target=data.rows_without_target)
    thresholds = None
    if problem_type == MULTI_LABEL:
        thresholds, section["decision_thresholds"] = _decision_thresholds(data, validation_data, full_name)
    with _timed(f"{task.name}: metrics and bootstrap ({settings.bootstrap_rounds} rounds)"):
        metrics = _metrics(data, full_name, thresholds)
        samples, statistics = headline_statistics(data.labels, data.logits[full_name], task.label_names, problem_type,
                                                  thresholds)
        with quiet_warnings():
            intervals = bootstrap_intervals(statistics, samples, settings.bootstrap_rounds, settings.seed,
                                            settings.confidence_level)
    section.update({
        "headline": {key: metrics[key] for key in headline_keys(problem_type)},
        "headline_ci": intervals,
        "headline_ci_method": f"{settings.confidence_level:.0%} percentile bootstrap (scipy.stats.bootstrap over "
                              f"resampled samples), {settings.bootstrap_rounds} rounds, seed {settings.seed}",
        "metrics": metrics,
    })
    if not settings.skip_ablation:
        with _timed(f"{task.name}: ablation"):
            section["ablation"], section["fusion_gain"] = _ablation(data, subsets, thresholds)
    if corruptions:
        with _timed(f"{task.name}: robustness"):
            section["robustness"] = _robustness(data, corruptions, full_name, thresholds)
    if not settings.skip_calibration:
        with _timed(f"{task.name}: calibration"):
            section["calibration"] = _calibration(data, settings, validation_data if settings.temperature_scaling
                                                  else None, full_name)
    shapley: list[dict[str, Any] | None] = [None] * len(collected.presence)
    if not settings.skip_interpretability:
        with _timed(f"{task.name}: interpretability"):
            # a classifier's section holds the cross-attention mass; a multi-task report has it once, at the top
            section["interpretability"], shapley = _interpretability(collected, task, subsets, modalities,
                                                                     modality_dropout, cross_attention=not multi_task)
    return section, {"thresholds": thresholds, "shapley": shapley}


def _efficiency_batches(dataset, processor, columns, tasks, size: int):
    collator = _EvaluationCollator(processor, columns, tasks, [], 0, require_targets=False)
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


def _check_dataset(dataset: datasets.Dataset, columns: DataSettings, tasks: Sequence[Task], multi_task: bool,
                   name: str) -> None:
    if not isinstance(dataset, datasets.Dataset):
        raise ValueError(f"{name}: expected a datasets.Dataset; got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError(f"{name}: the data set is empty")
    for task in tasks:
        if task.column not in dataset.column_names:
            field_name = f"tasks: the column {task.column!r} of task {task.name!r}" if multi_task else \
                f"label_column: {task.column!r}"
            raise ValueError(f"{field_name} is not a column of the {name} (columns: {dataset.column_names})")
    media = [columns.text_column, columns.image_column, columns.audio_column]
    if not any(column in dataset.column_names for column in media):
        raise ValueError(f"text_column, image_column, audio_column: none of {media} is a column of the {name} "
                         f"(columns: {dataset.column_names})")


def _with_label_names(dataset: datasets.Dataset, tasks: Sequence[Task]) -> datasets.Dataset:
    """ClassLabel integers -> their names, which the model's labels are matched against."""
    for task in tasks:
        feature = dataset.features.get(task.column)
        if isinstance(feature, datasets.ClassLabel):
            dataset = dataset.cast_column(task.column, datasets.Value("string")).map(
                lambda row, column=task.column, feature=feature: {column: feature.int2str(int(row[column]))})
    return dataset


def _checked(dataset: datasets.Dataset, columns: DataSettings, tasks: Sequence[Task], multi_task: bool,
             name: str) -> datasets.Dataset:
    _check_dataset(dataset, columns, tasks, multi_task, name)
    return _with_label_names(dataset, tasks)


def evaluate_model(model: torch.nn.Module, processor: MMFusionProcessor, dataset: datasets.Dataset,
                   output_dir: str | os.PathLike, settings: EvaluationSettings | None = None,
                   label_names: Sequence[str] | None = None, validation: datasets.Dataset | None = None, *,
                   data_settings: DataSettings | None = None, data_source: str | None = None, split: str = "test",
                   model_path: str | None = None, skipped_rows: Sequence[dict] | None = None) -> dict[str, Any]:
    """Evaluate every task of `model` on `dataset` and write report.json, report.md, predictions.jsonl and the PNG
    plots into `output_dir`; returns the report (the content of report.json; see the module docstring for its
    layout).

    `dataset` holds rows with text/image/audio columns and each task's target column as
    `training.data.prepare_splits` gives them (media cells are paths or bytes; column names from `data_settings`,
    default text/image/audio/label; a multi-task model's target columns from its `config.tasks`). `label_names` are a
    classifier's labels in id order (default: `config.id2label`); a multi-task model reads its labels from
    `config.tasks` and ignores them. `validation`, when given, tunes the multi-label thresholds and (with
    `settings.temperature_scaling`) fits the temperature. The model may be a PeftModel; call this on an unwrapped
    model (on the main process under Accelerate). Its train/eval mode and attention implementation are restored.

    A joint embedding model (`MMFusionContrastiveModel`, `is_contrastive`) gets the retrieval report instead
    (`_evaluate_contrastive`: report.json and report.md, no plots or predictions; `validation` and `label_names` are
    not used, and rows need no label).

    Raises `ValueError` naming the field for a data set without a target column or any media column, an empty
    data set, a classifier's row without the label, labels that are not the model's, or a model without a head.
    """
    settings = settings or EvaluationSettings()
    columns = data_settings or DataSettings()
    if is_contrastive(model):
        return _evaluate_contrastive(model, processor, dataset, Path(output_dir), settings, columns, data_source,
                                     split, model_path, skipped_rows)
    for flag in ("positive_columns", "zero_shot_columns"):
        if getattr(settings, flag):
            raise ValueError(f"{flag}: only for a joint embedding model (MMFusionContrastiveModel); this is "
                             f"{type(model).__name__}")
    base = classifier(model)
    multi_task = bool(base.config.tasks)
    if multi_task and label_names is not None:
        logger.debug("label_names: ignored for a multi-task model (its labels come from config.tasks)")
    tasks = evaluated_tasks(model, columns, None if multi_task else label_names)
    dataset = _checked(dataset, columns, tasks, multi_task, "dataset")
    if validation is not None:
        validation = _checked(validation, columns, tasks, multi_task, "validation")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    modalities = tuple(base.model.modalities)
    full = tuple(modalities)
    subsets = [full]
    if not settings.skip_ablation:
        subsets = [s for n in range(len(modalities), 0, -1) for s in itertools.combinations(modalities, n)]
    corruptions = [] if settings.skip_robustness else robustness_conditions(settings, modalities)

    started = time.perf_counter()
    with _timed(f"forward passes ({len(dataset)} rows x ({len(subsets)} modality subsets + {len(corruptions)} "
                "corruptions))"):
        collected = _collect(model, processor, dataset, columns, tasks, settings, subsets, corruptions,
                             attention=not settings.skip_interpretability and len(modalities) > 1,
                             desc=f"evaluating {split}", require_targets=not multi_task)
    # the validation pass tunes multi-label thresholds and fits temperatures
    wants_validation = any(task.problem_type == MULTI_LABEL for task in tasks) or (
        not settings.skip_calibration and settings.temperature_scaling
        and any(task.problem_type != REGRESSION for task in tasks))
    validation_pass = None
    if validation is not None and wants_validation:
        with _timed("the validation pass"):
            validation_pass = _collect(model, processor, validation, columns, tasks, settings, [full], [],
                                       attention=False, desc="evaluating validation", require_targets=not multi_task)
    sections, outputs = {}, {}
    for task in tasks:
        sections[task.name], outputs[task.name] = _task_section(
            collected, validation_pass, task, settings, subsets, corruptions, modalities,
            base.config.modality_dropout, multi_task)

    model_entry: dict[str, Any] = {
        "path": str(model_path or getattr(base, "name_or_path", "") or "in-memory model"),
        "class": type(model).__name__,
        "modalities": [MODALITY_NAMES[m].user for m in modalities],
    }
    if multi_task:
        model_entry["tasks"] = [{"name": t.name, "problem_type": t.problem_type, "labels": list(t.label_names),
                                 "num_outputs": t.num_outputs} for t in tasks]
    else:
        model_entry.update(num_labels=tasks[0].num_outputs, labels=list(tasks[0].label_names))
    model_entry.update(parameters=parameter_counts(model), training_modes=_training_modes(model_path))
    media_columns = {"text": columns.text_column, "image": columns.image_column, "audio": columns.audio_column}
    report: dict[str, Any] = {
        "model": model_entry,
        "data": {"source": data_source or "in-memory dataset", "split": split, "rows": len(dataset),
                 "columns": {**media_columns, **({"targets": {t.name: t.column for t in tasks}} if multi_task
                                                 else {"label": columns.label_column})},
                 "skipped_rows": list(skipped_rows or []),
                 "validation_rows": None if validation is None else len(validation)},
        "seed": settings.seed,
        "settings": asdict(settings),
        "versions": package_versions(),
    }
    if multi_task:
        report["conventions"] = CONVENTIONS
        report["tasks"] = sections
        if not settings.skip_interpretability:
            report["interpretability"] = {**_cross_attention(collected), "per_sample": "predictions.jsonl"}
    else:
        section = sections[tasks[0].name]
        report["problem_type"] = section.pop("problem_type")
        report["conventions"] = CONVENTIONS
        report.update(section)
    if not settings.skip_efficiency:
        with _timed(f"efficiency ({settings.latency_runs} latency runs)"):
            single, batch = _efficiency_batches(dataset, processor, columns, tasks, settings.efficiency_batch_size)
            report["efficiency"] = measure_efficiency(model, single, batch, settings.latency_runs)
    predictions = {}
    for task in tasks:
        task_output = outputs[task.name]
        predictions[task.name] = task_predictions(
            collected.logits[_subset_name(full)][:, task.outputs], collected.targets[task.name], task.label_names,
            task.problem_type, task_output["thresholds"], task_output["shapley"])
    if not settings.skip_plots:
        with _timed("plots"):
            regression = {task.name: _regression_points(collected, task, _subset_name(full)) for task in tasks
                          if task.problem_type == REGRESSION}
            plots = write_plots(report, output_dir, regression)
            for name, section in report_sections(report):
                section["plots"] = plots[name]
    with _timed("report files"):
        report = json_safe(report)
        write_predictions(output_dir / "predictions.jsonl", predictions, multi_task)
        (output_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        (output_dir / "report.md").write_text(render_markdown(report))
    logger.info("evaluation written to %s in %.1f s: %s", output_dir, time.perf_counter() - started,
                "; ".join(_headline_line(name, section, multi_task) for name, section in report_sections(report)))
    return report


def _regression_points(collected: _Collected, task: Task, full_name: str) -> tuple[np.ndarray, np.ndarray]:
    """(targets, predictions) of a regression task's rows that have both, for its plots."""
    data = _task_rows(collected, task)
    logits, labels = _with_prediction(data, full_name)
    return labels, logits[:, 0]


def _headline_line(name: str, section: dict[str, Any], multi_task: bool) -> str:
    line = ", ".join(f"{k} {v:.4f}" for k, v in section["headline"].items() if v is not None)
    return f"{name}: {line}" if multi_task else line


@contextlib.contextmanager
def _timed(section: str) -> Iterator[None]:
    """Log how long a section of the evaluation took (in the log only: the report holds no timing outside
    "efficiency")."""
    start = time.perf_counter()
    yield
    logger.info("evaluation section %s: %.1f s", section, time.perf_counter() - start)


# ---- joint embedding models ------------------------------------------------------------------------------------------

CONTRASTIVE_CONVENTIONS = [
    "Modality names: image, text, audio (the model's internal stream 'vision' is reported as 'image').",
    "Each item is embedded once per modality, from that modality alone (training.embeddings.embed_items, unit "
    "vectors); a pair's queries and its gallery are the rows that have the respective modality.",
    "Score: the dot product of the unit embeddings (cosine similarity), in float32.",
    "Positives of a query: the gallery items of the same row, with the identical caption text, the same image or "
    "audio file (path or bytes), or, with positive_columns, the same values of all those columns. A query without a "
    "positive in the gallery is left out of its pair's metrics and counted (queries_without_positive).",
    "Rank of a gallery item: 1 + the number of gallery items with a strictly higher score (tied items share the "
    "better rank). R@K: the share of queries whose best-scoring positive has rank <= K; median and mean rank: of that "
    "first-positive rank.",
    "AP: average precision over all of a query's positives with scikit-learn's tie rule (average_precision_score: "
    "tied scores enter the precision-recall curve together); mAP: its mean over the queries.",
    "Zero-shot: the classes are a column's distinct values, sorted; each is embedded as the text "
    "prompt_template.format(class); an image or audio item gets the class of highest cosine similarity (ties: the "
    "first class). Rows without a value in the column are left out and counted. Chance: 1 / classes (uniform) and "
    "the most frequent class's share of the items (majority).",
    "Confidence intervals: percentile bootstrap over the queries (retrieval; the gallery stays fixed) or the items "
    "(zero-shot).",
    "Every timing- or load-dependent number is under 'efficiency'.",
]

RETRIEVAL_CUTOFFS = (1, 5, 10)


def is_contrastive(model: torch.nn.Module) -> bool:
    """Whether `model` (maybe wrapped by peft, DDP or Accelerate) is a joint embedding model, which mm-eval
    evaluates by retrieval and zero-shot classification instead of the classifier's sections."""
    try:
        contrastive_model(model)
    except ValueError:
        return False
    return True


def _media_columns(columns: DataSettings) -> dict[str, str]:
    return {"image": columns.image_column, "text": columns.text_column, "audio": columns.audio_column}


def _zero_shot_classes(dataset: datasets.Dataset, column: str) -> tuple[list[str], np.ndarray]:
    """A zero-shot column's class names (its distinct values, sorted) and each row's class index (-1: no value).
    Raises `ValueError` naming `zero_shot_columns` for list cells or fewer than 2 classes."""
    values = dataset[column]
    feature = dataset.features.get(column)
    if isinstance(feature, datasets.ClassLabel):  # integers -> the names the prompts need
        values = [None if v is None or v < 0 else feature.int2str(int(v)) for v in values]
    empty = [v is None or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())
             for v in values]
    present = [v for v, missing in zip(values, empty) if not missing]
    if any(isinstance(v, (list, tuple, dict)) for v in present):
        raise ValueError(f"zero_shot_columns: {column!r} holds lists or dicts; zero-shot classes are single values")
    try:
        distinct = sorted(set(present))
    except TypeError:  # mixed types: order by their text
        distinct = sorted(set(present), key=str)
    if len(distinct) < 2:
        raise ValueError(f"zero_shot_columns: {column!r} has {len(distinct)} distinct value(s) "
                         f"({[str(v) for v in distinct]}); zero-shot classification needs at least 2 classes")
    index = {value: i for i, value in enumerate(distinct)}
    labels = np.array([-1 if missing else index[v] for v, missing in zip(values, empty)], dtype=np.int64)
    return [str(v) for v in distinct], labels


def _check_contrastive_input(dataset: datasets.Dataset, settings: EvaluationSettings, model_modalities: list[str],
                             rows: dict[str, np.ndarray], columns: DataSettings) -> None:
    """Refuse what the retrieval report cannot use, before any embedding, naming the flag."""
    for flag in ("positive_columns", "zero_shot_columns"):
        missing = [c for c in getattr(settings, flag) or [] if c not in dataset.column_names]
        if missing:
            raise ValueError(f"{flag}: {missing[0]!r} is not a column of the data (columns: {dataset.column_names})")
    media = _media_columns(columns)
    if len(rows) < 2:
        found = ", ".join(f"{m} ({media[m]!r})" for m in rows) or "none"
        raise ValueError(f"data: retrieval needs two modalities that both the model ({', '.join(model_modalities)}) "
                         f"and the data have; the data has {found} (columns: {dataset.column_names}; set "
                         "--text_column/--image_column/--audio_column)")
    for modality, present in rows.items():
        if len(present) < 2:
            raise ValueError(f"data: retrieval with {modality} needs at least 2 rows with {modality} (column "
                             f"{media[modality]!r}) for each pair's queries and gallery; got {len(present)}")
    if settings.zero_shot_columns:
        if "text" not in model_modalities:
            raise ValueError(f"zero_shot_columns: the class prompts are embedded as text, and this model has no text "
                             f"tower (it has {', '.join(model_modalities)})")
        if not any(m in rows for m in ("image", "audio")):
            raise ValueError("zero_shot_columns: no image or audio items to classify (the model and the data share "
                             f"only {', '.join(rows)})")


def _embedding_parameter_counts(model: torch.nn.Module) -> dict[str, dict[str, int]]:
    """Total and trainable parameters of each part of a joint embedding model: each tower, "fusion" (input
    projections, fusion layers, final norms), "head" (the projections, logit scale and bias) and "total", counted as
    `training.efficiency.parameter_counts` counts a classifier's."""
    base = contrastive_model(model)
    fusion = base.model
    parts = {f"{MODALITY_NAMES[m].user}_tower": list(fusion.get_tower(m).named_parameters()) for m in fusion.modalities}
    parts["fusion"] = [item for module in (fusion.input_projections, fusion.fusion_layers, fusion.final_norms)
                       for item in module.named_parameters()]
    parts["head"] = [(name, p) for name, p in base.named_parameters() if not name.startswith("model.")]
    parts["total"] = list(model.named_parameters())

    def count(named):
        parameters = [p for name, p in named if "original_module." not in name]
        return {"total": sum(p.numel() for p in parameters),
                "trainable": sum(p.numel() for p in parameters if p.requires_grad)}

    return {name: count(named) for name, named in parts.items()}


def _embedding_efficiency(model: torch.nn.Module, processor: MMFusionProcessor, examples: dict[str, Any],
                          items_per_second: dict[str, float], batch_size: int, runs: int) -> dict[str, Any]:
    """Latency of embedding one item of each modality (p50/p95 of `runs` calls after 3 warm-up calls), and the
    items per second of the report's own embedding pass."""
    latencies = {}
    for modality, item in examples.items():
        def embed_one():
            start = time.perf_counter()
            embed_items(model, processor, modality, [item], batch_size=1)
            return time.perf_counter() - start

        for _ in range(3):
            embed_one()
        times_ms = np.array([embed_one() for _ in tqdm(range(runs), desc=f"latency {modality}", leave=False)]) * 1000
        latencies[modality] = {"p50": float(np.percentile(times_ms, 50)), "p95": float(np.percentile(times_ms, 95)),
                               "runs": runs}
    return {
        "device": str(next(model.parameters()).device),
        "torch_threads": torch.get_num_threads(),
        "what": "embed_items on one item (decoding, processor and model), eval mode, no_grad",
        "latency_batch_1_ms": latencies,
        "embedding": {"batch_size": batch_size, "items_per_second": items_per_second,
                      "what": "the report's embedding pass over the data, decoding and processor included"},
    }


def _evaluate_contrastive(model: torch.nn.Module, processor: MMFusionProcessor, dataset: datasets.Dataset,
                          output_dir: Path, settings: EvaluationSettings, columns: DataSettings,
                          data_source: str | None, split: str, model_path: str | None,
                          skipped_rows: Sequence[dict] | None) -> dict[str, Any]:
    """`evaluate_model` for a joint embedding model: every row's items embedded once per modality; retrieval for
    every ordered pair of the modalities that the model and the data share (`training.retrieval.retrieval_report`,
    keys from `positive_keys` with `settings.positive_columns`); zero-shot classification of image and audio items
    for each of `settings.zero_shot_columns`; parameters and embedding latency. Writes report.json and report.md.

    Raises `ValueError` naming the flag for a model with one tower ("model"), fewer than two shared modalities or
    fewer than 2 rows with a modality ("data"), unknown `positive_columns`/`zero_shot_columns`, a zero-shot column
    with fewer than 2 classes, or zero-shot without a text tower."""
    base = contrastive_model(model)
    model_modalities = [MODALITY_NAMES[m].user for m in base.model.modalities]
    if len(model_modalities) < 2:
        raise ValueError(f"model: a joint embedding model with only the {model_modalities[0]} tower has no pair of "
                         "modalities to retrieve between")
    if not isinstance(dataset, datasets.Dataset):
        raise ValueError(f"dataset: expected a datasets.Dataset; got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError("dataset: the data set is empty")
    media = _media_columns(columns)
    cells, rows = {}, {}
    for modality in model_modalities:
        if media[modality] in dataset.column_names:
            values = column_items(dataset, media[modality], modality)
            present = np.array([i for i, value in enumerate(values) if value is not None], dtype=np.int64)
            if len(present):
                cells[modality], rows[modality] = values, present
    _check_contrastive_input(dataset, settings, model_modalities, rows, columns)
    zero_shot_classes = {column: _zero_shot_classes(dataset, column) for column in settings.zero_shot_columns or []}
    output_dir.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    embeds, items_per_second = {}, {}
    for modality, present in rows.items():
        start = time.perf_counter()
        with _timed(f"embedding {len(present)} {modality} items"):
            embeds[modality] = embed_items(model, processor, modality, [cells[modality][i] for i in present],
                                           settings.batch_size, progress=True)
        items_per_second[modality] = len(present) / max(time.perf_counter() - start, 1e-9)
    keys = positive_keys(dataset, {m: media[m] for m in rows}, settings.positive_columns)
    bootstrap = {"bootstrap_rounds": settings.bootstrap_rounds, "seed": settings.seed,
                 "confidence_level": settings.confidence_level}
    pairs = {}
    for query, gallery in itertools.permutations(rows, 2):
        with _timed(f"retrieval {query}->{gallery}"):
            pairs[f"{query}->{gallery}"] = {
                "query": query, "gallery": gallery,
                **retrieval_report(embeds[query], embeds[gallery], [k[rows[query]] for k in keys],
                                   [k[rows[gallery]] for k in keys], RETRIEVAL_CUTOFFS, progress=True, **bootstrap)}
    positives = ["comes from the same row"] + [
        f"has the identical caption (column {media[m]!r})" if m == "text" else
        f"has the same {m} file (column {media[m]!r})" for m in rows]
    if settings.positive_columns:
        positives.append(f"has the same {', '.join(settings.positive_columns)}")
    retrieval = {"positives": "a gallery item is a positive of a query when it " + ", or ".join(positives),
                 "pairs": pairs}

    zero_shot: dict[str, Any] | None = None
    if zero_shot_classes:
        zero_shot = {"prompt_template": settings.prompt_template, "columns": {}}
        for column, (names, labels) in zero_shot_classes.items():
            prompts = [settings.prompt_template.format(name) for name in names]
            with _timed(f"zero-shot {column}"):
                class_embeds = embed_items(model, processor, "text", prompts, settings.batch_size)
                entry: dict[str, Any] = {"classes": names, "prompts": prompts, "modalities": {}}
                for modality in (m for m in ("image", "audio") if m in rows):
                    row_labels = labels[rows[modality]]
                    labelled = row_labels >= 0
                    result = (zero_shot_accuracy(embeds[modality][torch.from_numpy(labelled)], class_embeds,
                                                 row_labels[labelled], class_names=names, **bootstrap)
                              if labelled.any() else {"samples": 0})
                    entry["modalities"][modality] = {**result, "rows_without_value": int((~labelled).sum())}
            zero_shot["columns"][column] = entry

    headline, headline_ci = {}, {}
    for name, pair in pairs.items():
        headline[f"{name} r@1"], headline_ci[f"{name} r@1"] = pair["metrics"]["r@1"], pair["ci"]["r@1"]
    for column, entry in (zero_shot or {"columns": {}})["columns"].items():
        for modality, result in entry["modalities"].items():
            key = f"zero-shot {column} ({modality}) accuracy"
            headline[key], headline_ci[key] = result.get("accuracy"), (result.get("ci") or {}).get("accuracy")
    model_entry = {
        "path": str(model_path or getattr(base, "name_or_path", "") or "in-memory model"),
        "class": type(model).__name__,
        "modalities": model_modalities,
        "projection_dim": base.config.projection_dim,
        "parameters": _embedding_parameter_counts(model),
        "training_modes": _training_modes(model_path),
    }
    report: dict[str, Any] = {
        "model": model_entry,
        "data": {"source": data_source or "in-memory dataset", "split": split, "rows": len(dataset),
                 "columns": {m: media[m] for m in ("text", "image", "audio")},
                 "rows_with": {m: len(present) for m, present in rows.items()},
                 "skipped_rows": list(skipped_rows or []), "validation_rows": None},
        "seed": settings.seed,
        "settings": asdict(settings),
        "versions": package_versions(),
        "problem_type": CONTRASTIVE,
        "headline": headline,
        "headline_ci": headline_ci,
        "headline_ci_method": f"{settings.confidence_level:.0%} percentile bootstrap (scipy.stats.bootstrap) over "
                              f"the queries or items, {settings.bootstrap_rounds} rounds, seed {settings.seed}",
        "conventions": CONTRASTIVE_CONVENTIONS,
        "retrieval": retrieval,
    }
    if zero_shot is not None:
        report["zero_shot"] = zero_shot
    if not settings.skip_efficiency:
        with _timed(f"efficiency ({settings.latency_runs} latency runs per modality)"):
            examples = {m: cells[m][int(rows[m][0])] for m in rows}
            report["efficiency"] = _embedding_efficiency(model, processor, examples, items_per_second,
                                                         settings.batch_size, settings.latency_runs)
    report = json_safe(report)
    (output_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (output_dir / "report.md").write_text(render_markdown(report))
    logger.info("evaluation written to %s in %.1f s: %s", output_dir, time.perf_counter() - started,
                _headline_line("", report, multi_task=False))
    return report


class _MediaRows:
    """A row check for `find_bad_rows` on a joint embedding model's data: the processor must take the row's media
    (no label is read)."""

    def __init__(self, processor: MMFusionProcessor, columns: DataSettings):
        self.processor = processor
        self.read = MMFusionCollator(processor, columns, [], multi_task=True)

    def __call__(self, rows):
        return self.processor(**self.read.inputs(rows))


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
                           audio_column=arguments.audio_column, label_column=arguments.label_column,
                           label_separator=arguments.label_separator)
    # a joint embedding model needs no label and no validation data (nothing is tuned or fitted on it)
    contrastive = bool(getattr(AutoConfig.from_pretrained(model_path), "is_contrastive", False))
    dataset = load_split(arguments.data, arguments.split, columns)
    validation = None
    if arguments.validation_data and not contrastive:
        validation = load_split(arguments.validation_data, "validation", columns)
    elif not Path(arguments.data).is_file() and not contrastive:  # thresholds and temperatures are fitted on it
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
    output_dir = Path(arguments.output_dir) if arguments.output_dir else model_path / "evaluation"
    if is_contrastive(model):
        bad = find_bad_rows(dataset, _MediaRows(processor, columns), "dataset", arguments.strict)
        if bad:
            dataset = dataset.select(sorted(set(range(len(dataset))) - {i for i, _ in bad}))
        return evaluate_model(model, processor, dataset, output_dir, settings, data_settings=columns,
                              data_source=arguments.data, split=arguments.split, model_path=str(model_path),
                              skipped_rows=[{"row": i, "reason": reason} for i, reason in bad])
    multi_task = bool(classifier(model).config.tasks)
    tasks = evaluated_tasks(model, columns)
    skipped = []
    for name in ("dataset", "validation"):
        split = dataset if name == "dataset" else validation
        if split is None:
            continue
        split = _checked(split, columns, tasks, multi_task, name)
        collator = _EvaluationCollator(processor, columns, tasks, [], settings.seed, require_targets=not multi_task)
        bad = find_bad_rows(split, _RowChecker(collator), name, arguments.strict)
        if bad:
            split = split.select(sorted(set(range(len(split))) - {i for i, _ in bad}))
        if name == "dataset":
            dataset, skipped = split, [{"row": i, "reason": reason} for i, reason in bad]
        else:
            validation = split
    return evaluate_model(model, processor, dataset, output_dir, settings, None, validation,
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
    output_dir = arguments.output_dir or Path(arguments.model) / "evaluation"
    sections = [] if report.get("problem_type") == CONTRASTIVE else report_sections(report)
    if not sections:  # a joint embedding model's report: one headline of every pair and zero-shot column
        print(f"{report['data']['split']}: {_headline_line('', report, multi_task=False)}")
    for name, section in sections:
        where = f"{report['data']['split']} {name}" if "tasks" in report else report["data"]["split"]
        print(f"{where}: {_headline_line(name, section, multi_task=False)}")
    print(f"report written to {Path(output_dir) / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
