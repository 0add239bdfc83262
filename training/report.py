"""Rendering an mm-eval report: report.md, the PNG plots (matplotlib's object API on the Agg canvas: no pyplot
state, no display needed), predictions.jsonl, the JSON-safe form of report.json, and the model card's model-index
results. Pure functions of the report dict that `training.evaluation.evaluate_model` builds.

    >>> from training.report import render_markdown
    >>> markdown = render_markdown(report)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn import metrics as skm

from modeling_mm.configuration_mm import MODALITY_NAMES
from training.metrics import finite_or_none, predicted_labels, primary_metric
from training.scoring import MULTI_LABEL, REGRESSION, scores

# every plot has this size, so a reader (and the tests) can rely on it: 640 x 480 pixels
FIGURE_SIZE, FIGURE_DPI = (6.4, 4.8), 100


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
            order = [*(names.user for names in MODALITY_NAMES.values()), "sink"]
            parts = [p for p in order if any(p in masses for masses in interpretability["cross_attention"].values())]
            lines += [f"Cross-attention mass: {interpretability['cross_attention_definition']}.", ""]
            lines += _table(["stream \\ attends to", *parts], [
                [stream, *[masses.get(p) for p in parts]]
                for stream, masses in interpretability["cross_attention"].items()])
        lines += [f"Per-sample view: `{interpretability['per_sample']}`.", ""]
    lines += ["## Conventions", "", *[f"- {c}" for c in report["conventions"]], "",
              "## Versions", "", *[f"- {k}: {v}" for k, v in report["versions"].items()], ""]
    return "\n".join(lines)


def write_plots(report: dict[str, Any], output_dir: Path) -> dict[str, str]:
    """The plots the report has data for, written into `output_dir`: {plot: file name}."""
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
        plots["ablation"] = plot_ablation(report["ablation"], primary_metric(report["problem_type"]),
                                          output_dir / "ablation.png")
    return plots


def write_predictions(path: Path, logits: np.ndarray, labels: np.ndarray, label_names: Sequence[str],
                      problem_type: str, contributions: Sequence[dict[str, float]]) -> None:
    """predictions.jsonl: per sample, its label(s), the prediction, the probabilities (or the regression output) and
    its modality contributions."""
    outputs = scores(logits, problem_type)
    predicted = predicted_labels(logits, labels, problem_type)
    with open(path, "w") as file:
        for i in range(len(logits)):
            if problem_type == REGRESSION:
                row = {"index": i, "label": json_safe(labels[i]), "prediction": json_safe(outputs[i].tolist())}
            elif problem_type == MULTI_LABEL:
                row = {"index": i, "labels": [n for n, y in zip(label_names, labels[i]) if y],
                       "predicted": [n for n, p in zip(label_names, predicted[i]) if p],
                       "probabilities": dict(zip(label_names, json_safe(outputs[i].tolist())))}
            else:
                row = {"index": i, "label": label_names[int(labels[i])],
                       "predicted": label_names[int(predicted[i])] if predicted[i] >= 0 else None,
                       "probabilities": dict(zip(label_names, json_safe(outputs[i].tolist())))}
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


def json_safe(value: Any) -> Any:
    """`value` with numpy scalars as Python numbers, tuples as lists, and NaN/inf as None (valid JSON)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return finite_or_none(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value
