"""Rendering an mm-eval report: report.md, the PNG plots (matplotlib's object API on the Agg canvas: no pyplot
state, no display needed), predictions.jsonl, the JSON-safe form of report.json, and the model card's model-index
results. Pure functions of the report dict that `training.evaluation.evaluate_model` builds (the regression plots
also take the targets and predictions, which the report does not hold).

A classifier's report is one task's section at the top level; a multi-task model's holds one section per task under
"tasks". `report_sections` gives either as [(task name, section)], and everything here reads sections through it.
A joint embedding model's report (problem_type "contrastive") and a generation model's ("generation") have sections
of their own, rendered by `_contrastive_markdown` and `_generation_markdown`.

    >>> from training.report import render_markdown, report_sections
    >>> markdown = render_markdown(report)  # doctest: +SKIP
    >>> [name for name, _ in report_sections(report)]  # doctest: +SKIP
    ['label']
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn import metrics as skm

from modeling_mm.configuration_mm import MODALITY_NAMES
from training.data import GENERATION
from training.metrics import finite_or_none, label_thresholds, primary_metric
from training.retrieval import CONTRASTIVE
from training.scoring import MULTI_LABEL, REGRESSION, SINGLE_LABEL, SINGLE_TASK_NAME, scores

# every plot has this size, so a reader (and the tests) can rely on it: 640 x 480 pixels
FIGURE_SIZE, FIGURE_DPI = (6.4, 4.8), 100


def report_sections(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The task sections of an mm-eval report, as [(task name, section)]: a multi-task model's `report["tasks"]`
    in task order, or a classifier's one section, the report itself, named `SINGLE_TASK_NAME` ("label"). A section
    has "problem_type", "headline", "headline_ci", "metrics" and, as evaluated, "ablation", "fusion_gain",
    "robustness", "calibration", "interpretability", "plots"."""
    if "tasks" in report:
        return list(report["tasks"].items())
    return [(SINGLE_TASK_NAME, report)]


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


def plot_predicted_vs_true(y_true: np.ndarray, y_pred: np.ndarray, path: Path, title: str = "") -> str:
    """Regression: each sample's prediction against its target, with the line y = x of a perfect prediction."""
    y_true, y_pred = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    figure = _figure()
    axes = figure.add_subplot()
    axes.scatter(y_true, y_pred, s=14, alpha=0.7, color="tab:blue", label="samples")
    low, high = float(min(y_true.min(), y_pred.min())), float(max(y_true.max(), y_pred.max()))
    axes.plot([low, high], [low, high], "k--", linewidth=1, label="y = x (perfect prediction)")
    axes.set(xlabel="true", ylabel="predicted", title=f"Predicted vs true{f' ({title})' if title else ''}")
    axes.legend(loc="upper left")
    return _save(figure, path)


def plot_residuals(y_true: np.ndarray, y_pred: np.ndarray, path: Path, title: str = "") -> str:
    """Regression: each sample's residual (true - predicted) against its prediction, around the zero line."""
    y_true, y_pred = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    figure = _figure()
    axes = figure.add_subplot()
    axes.scatter(y_pred, y_true - y_pred, s=14, alpha=0.7, color="tab:blue")
    axes.axhline(0.0, color="k", linestyle="--", linewidth=1)
    axes.set(xlabel="predicted", ylabel="residual (true - predicted)",
             title=f"Residuals vs predicted{f' ({title})' if title else ''}")
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


def _section_labels(report: dict[str, Any], section: dict[str, Any]) -> list[str]:
    """A section's label names: a multi-task section's own, or the classifier's."""
    return section.get("labels") or report["model"]["labels"]


def _interval(ci: dict[str, Any], name: str) -> str:
    return "n/a" if not ci.get(name) else f"[{ci[name][0]:.4f}, {ci[name][1]:.4f}]"


def _section_markdown(report: dict[str, Any], section: dict[str, Any], h: str) -> list[str]:
    """One task's tables (headline with CIs, metrics, per class or label, confusion matrix, plots, ablation,
    robustness, calibration, interpretability) under headings of level `h` ("##" or "###")."""
    lines = [f"{h} Headline", ""]
    ci = section.get("headline_ci", {})
    level = round(100 * report["settings"]["confidence_level"])
    lines += _table(["metric", "value", f"{level}% CI (bootstrap, {report['settings']['bootstrap_rounds']} rounds)"],
                    [[name, value, _interval(ci, name)] for name, value in section["headline"].items()])
    metrics = section["metrics"]
    scalar = [[name, value] for name, value in metrics.items() if isinstance(value, (int, float)) or value is None]
    lines += [f"{h} All metrics", ""] + _table(["metric", "value"], scalar)
    if metrics.get("undefined"):
        lines += ["Undefined: " + "; ".join(f"{k}: {v}" for k, v in metrics["undefined"].items()), ""]
    if "per_class" in metrics:
        lines += [f"{h} Per class", ""]
        auc = metrics.get("roc_auc_per_class", {})
        lines += _table(["class", "precision", "recall", "f1", "support"] + (["ROC-AUC (one-vs-rest)"] if auc else []),
                        [[name, m["precision"], m["recall"], m["f1"], m["support"]] + ([auc.get(name)] if auc else [])
                         for name, m in metrics["per_class"].items()])
    if "per_label" in metrics:
        thresholds = metrics.get("thresholds", {})
        lines += [f"{h} Per label", ""]
        decision = section.get("decision_thresholds")
        if decision:
            lines += [("Thresholds tuned on " + decision["fitted_on"] if decision.get("fitted_on") else
                       f"Thresholds: {decision.get('note')}") + ".", ""]
        lines += _table(["label", "threshold", "f1", "ROC-AUC", "average precision", "support"], [
            [name, thresholds.get(name), m["f1"], m["roc_auc"], m.get("average_precision"), m["support"]]
            for name, m in metrics["per_label"].items()])
    if "confusion_matrix" in metrics:
        names = _section_labels(report, section)
        lines += [f"{h} Confusion matrix", "", "Rows: true class; columns: predicted class.", ""]
        lines += _table(["true \\ predicted", *names], [[name, *row] for name, row in
                                                       zip(names, metrics["confusion_matrix"])])
    plots = section.get("plots", {})
    if "confusion_matrix" in plots:
        lines += [f"![confusion matrix]({plots['confusion_matrix']})", ""]
    if "predicted_vs_true" in plots:
        lines += [f"![predicted vs true]({plots['predicted_vs_true']})", "",
                  f"![residuals vs predicted]({plots['residuals']})", ""]
    interpretability = section.get("interpretability") or {}
    if section.get("ablation"):
        keys = [k for k in section["ablation"][0] if k != "modalities"]
        lines += [f"{h} Modality ablation", "", "Modalities withheld through the has_* masks; a sample left with no "
                  "modality counts as wrong.", ""]
        if interpretability.get("modality_dropout_note"):
            lines += ["Trained without modality dropout (modality_dropout = 0): these subsets are inputs the model "
                      "never saw in training (see Interpretability).", ""]
        lines += _table(["modalities", *keys], [[" + ".join(r["modalities"]), *[r[k] for k in keys]]
                                                for r in section["ablation"]])
        gain = section.get("fusion_gain")
        if gain:
            lines += [f"**Fusion gain**: {gain['metric']} with all modalities "
                      f"({' + '.join(gain['all_modalities'])}) {gain['all_modalities_value']:.4f} vs the best single "
                      f"modality ({gain['best_single_modality']}) {gain['best_single_modality_value']:.4f}: "
                      f"**{gain['gain']:+.4f}**.", ""]
        if "ablation" in plots:
            lines += [f"![ablation]({plots['ablation']})", ""]
    robustness = section.get("robustness")
    if robustness:
        lines += [f"{h} Robustness", "", "Corruptions of the decoded media before the processor, all modalities "
                  "given.", ""]
        metric = robustness["metric"]
        for kind, curve in robustness["curves"].items():
            lines += [f"{h}# {kind} ({curve['modality']}; level: {curve['level_name']})", ""]
            lines += _table(["level", metric], [["clean" if p["level"] is None else f"{p['level']:g}", p[metric]]
                                                for p in curve["points"]])
        if "robustness" in plots:
            lines += [f"![robustness]({plots['robustness']})", ""]
    calibration = section.get("calibration")
    if calibration and calibration.get("applicable"):
        lines += [f"{h} Calibration", "", f"ECE with {calibration['binning']}.", ""]
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
    if interpretability:
        lines += [f"{h} Interpretability", ""] + _interpretability_markdown(interpretability)
    return lines


def _interpretability_markdown(interpretability: dict[str, Any]) -> list[str]:
    lines = []
    if interpretability.get("modality_dropout_note"):
        lines += [f"**Note**: {interpretability['modality_dropout_note']}.", ""]
    if "shapley_definition" in interpretability:
        lines += [f"Contribution of each modality: {interpretability['shapley_definition']}. Scale: "
                  f"{interpretability['shapley_scale']}.", ""]
        shapley = interpretability.get("shapley")
        if shapley:
            lines += _table(["modality", "mean Shapley value", "mean absolute Shapley value", "samples"], [
                [m, c["mean"], c["mean_abs"], c["samples"]] for m, c in shapley.items()])
            per_label = {m: c["mean_abs_per_label"] for m, c in shapley.items() if c.get("mean_abs_per_label")}
            if per_label:
                labels = list(next(iter(per_label.values())))
                lines += ["Mean absolute Shapley value per label:", ""]
                lines += _table(["modality", *labels], [[m, *values.values()] for m, values in per_label.items()])
        if interpretability.get("shapley_note"):
            lines += [f"Shapley values: {interpretability['shapley_note']}.", ""]
    if interpretability.get("cross_attention"):
        order = [*(names.user for names in MODALITY_NAMES.values()), "sink"]
        parts = [p for p in order if any(p in masses for masses in interpretability["cross_attention"].values())]
        lines += [f"Cross-attention mass: {interpretability['cross_attention_definition']}.", ""]
        lines += _table(["stream \\ attends to", *parts], [
            [stream, *[masses.get(p) for p in parts]]
            for stream, masses in interpretability["cross_attention"].items()])
    if interpretability.get("per_sample"):
        lines += [f"Per-sample view: `{interpretability['per_sample']}`.", ""]
    return lines


def _with_interval(value: Any, interval: Sequence[float] | None) -> str:
    """A value with its confidence interval in one table cell: "0.5000 [0.4000, 0.6000]"."""
    return _format(value) + ("" if not interval else f" [{interval[0]:.4f}, {interval[1]:.4f}]")


def _contrastive_markdown(report: dict[str, Any]) -> list[str]:
    """A joint embedding model's sections: retrieval per ordered pair of modalities, zero-shot classification."""
    pairs = report["retrieval"]["pairs"]
    level = round(100 * report["settings"]["confidence_level"])
    positives = report["retrieval"]["positives"]
    lines = ["## Retrieval", "", f"Each query's gallery is every item of the other modality. "
             f"{positives[0].upper() + positives[1:]}. Values with their {level}% confidence interval "
             f"({next(iter(pairs.values()))['ci_method']}).", ""]
    metrics = ["r@1", "r@5", "r@10", "median_rank", "mean_rank", "map"]
    headers = ["query -> gallery", "queries", "gallery", "R@1", "R@5", "R@10", "median rank", "mean rank", "mAP"]
    lines += _table(headers, [[name.replace("->", " -> "), pair["queries"], pair["gallery_size"],
                               *[_with_interval(pair["metrics"][m], pair["ci"].get(m)) for m in metrics]]
                              for name, pair in pairs.items()])
    left_out = {name: pair["queries_without_positive"] for name, pair in pairs.items()
                if pair["queries_without_positive"]}
    if left_out:
        lines += ["Queries without a positive in the gallery, left out: " + ", ".join(
            f"{name} {count}" for name, count in left_out.items()) + ".", ""]
    zero_shot = report.get("zero_shot")
    if zero_shot:
        lines += ["## Zero-shot classification", "", f"Each class is embedded as the text "
                  f"`{zero_shot['prompt_template']}` with the class name; an item gets the class of highest cosine "
                  "similarity.", ""]
        for column, entry in zero_shot["columns"].items():
            lines += [f"### `{column}` ({len(entry['classes'])} classes: {', '.join(entry['classes'])})", ""]
            methods = {result["ci_method"] for result in entry["modalities"].values() if result.get("ci_method")}
            if methods:
                lines += [f"Intervals: {level}% confidence, {methods.pop()}.", ""]
            rows = []
            for modality, result in entry["modalities"].items():
                ci = result.get("ci") or {}
                chance = result.get("chance") or {}
                rows.append([modality, result["samples"], result["rows_without_value"],
                             _with_interval(result.get("accuracy"), ci.get("accuracy")),
                             _with_interval(result.get("macro_f1"), ci.get("macro_f1")),
                             chance.get("uniform"), chance.get("majority")])
            lines += _table(["items", "samples", "without a value", "accuracy", "macro F1", "chance (uniform)",
                             "chance (majority class)"], rows)
    return lines


GENERATION_METRIC_NAMES = {"bleu": "BLEU", "chrf": "chrF", "rouge_l": "ROUGE-L", "exact_match": "exact match"}
EXAMPLE_CELL_CHARACTERS = 160  # longer prompts and generations are cut in report.md (report.json has them whole)


def _text_cell(value: Any) -> str:
    """A prompt, reference or generation as one table cell: a dialogue history as "role: content / ...", whitespace
    collapsed (a newline would end the table row), cut at EXAMPLE_CELL_CHARACTERS, "(empty)" for ""."""
    if value is None:
        return "n/a"
    if isinstance(value, list):
        value = " / ".join(f"{m.get('role')}: {m.get('content')}" if isinstance(m, dict) else str(m) for m in value)
    text = " ".join(str(value).split())
    if not text:
        return "(empty)"
    return text if len(text) <= EXAMPLE_CELL_CHARACTERS else text[:EXAMPLE_CELL_CHARACTERS - 1] + "…"


def _generation_markdown(report: dict[str, Any]) -> list[str]:
    """A generation model's sections: headline with intervals and the metrics' definitions, per group, the modality
    ablation (overall, and per metric as a subset x group table), and the sample generations."""
    names = GENERATION_METRIC_NAMES
    level = round(100 * report["settings"]["confidence_level"])
    lines = ["## Headline", "", f"All rows, every modality. Intervals: {level}% confidence, "
             f"{report['headline_ci_method']}.", ""]
    ci = report.get("headline_ci") or {}
    lines += _table(["metric", "value", f"{level}% CI"], [[names[key], value, _interval(ci, key)]
                                                         for key, value in report["headline"].items()])
    lines += [f"- {names[key]}: {definition}." for key, definition in report["metric_definitions"].items()] + [""]
    without = report["metrics"].get("rows_without_modality")
    if without:
        lines += [f"{without} rows have no modality: their generation is empty and counts as wrong.", ""]
    metric_keys = list(report["headline"])
    groups = report.get("groups")
    if groups:
        column = report["data"]["columns"].get("group")
        lines += [f"## Per group (column `{column}`)", "", f"Values with their {level}% confidence interval.", ""]
        lines += _table(["group", "rows", *[names[k] for k in metric_keys]], [
            [group, section["samples"], *[_with_interval(section["metrics"][k], (section["ci"] or {}).get(k))
                                          for k in metric_keys]] for group, section in groups.items()])
    ablation = report.get("ablation")
    if ablation:
        lines += ["## Modality ablation", "", "The same rows generated with only some modalities (the others "
                  "withheld through the has_* masks); a row left with no modality gets an empty generation, which "
                  "counts as wrong.", ""]
        lines += _table(["modalities", *[names[k] for k in metric_keys], "rows without modality"], [
            [" + ".join(row["modalities"]), *[row[k] for k in metric_keys], row["rows_without_modality"]]
            for row in ablation])
        gain = report.get("fusion_gain")
        if gain:
            lines += [f"**Fusion gain**: {names[gain['metric']]} with all modalities "
                      f"({' + '.join(gain['all_modalities'])}) {gain['all_modalities_value']:.4f} vs the best single "
                      f"modality ({gain['best_single_modality']}) {gain['best_single_modality_value']:.4f}: "
                      f"**{gain['gain']:+.4f}**.", ""]
        if groups and all(section.get("ablation") for section in groups.values()):
            for key in metric_keys:
                lines += [f"### Per group and modality subset: {names[key]}", ""]
                lines += _table(["modalities \\ group", *groups], [
                    [" + ".join(row["modalities"]), *[section["ablation"][i][key] for section in groups.values()]]
                    for i, row in enumerate(ablation)])
    examples = report.get("examples")
    if examples:
        lines += ["## Sample generations", "", "With every modality; `report.json` has each example's generations "
                  "under the other modality subsets, `predictions.jsonl` every row's.", ""]
        lines += _table(["row", "group", "prompt", "reference", "generation", "exact match"], [
            [example["row"], example["group"], _text_cell(example["prompt"]), _text_cell(example["reference"]),
             _text_cell(example["prediction"]), "yes" if example["exact_match"] else "no"] for example in examples])
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: the tables a person reads, per task (headline with CIs, per class or label, confusion matrix or
    regression plots, ablation and fusion gain, robustness, calibration, interpretability), then the model's
    parameters, efficiency and cross-attention, with links to the plots. A joint embedding model's report has
    retrieval and zero-shot sections instead of the tasks, a generation model's its metrics, ablation and sample
    generations."""
    if report.get("problem_type") == GENERATION:
        data, model = report["data"], report["model"]
        columns, decoding = data["columns"], report["decoding"]
        line = (f"Data: `{data['source']}`, split `{data['split']}`, {data['rows']} rows "
                f"({len(data.get('skipped_rows', []))} skipped, {data.get('rows_without_target', 0)} without a "
                f"reference). Generation model ({' + '.join(model['modalities'])} -> a "
                f"{model['decoder']['model_type']} decoder by {model['decoder_connection'].replace('_', '-')}). "
                f"References: column `{columns['target']}`"
                + (f"; prompts: column `{columns['prompt']}`" if columns.get("prompt") else "; no prompts")
                + (f"; groups: column `{columns['group']}`" if columns.get("group") else "")
                + f". Decoding: {decoding['strategy']}, at most {decoding['max_new_tokens']} new tokens. "
                f"Seed {report['seed']}.")
        lines = [f"# Evaluation of `{model['path']}`", "", line, ""]
        lines += _generation_markdown(report)
        lines += _parameters_markdown(report)
        efficiency = report.get("efficiency")
        if efficiency:
            lines += ["## Efficiency", "", f"On `{efficiency['device']}`: {efficiency['what']}; throughput: "
                      f"{efficiency['generation']['what']} (batch {efficiency['generation']['batch_size']}).", ""]
            lines += _table(["measure", "value"], [
                ["latency p50, one row (ms)", efficiency["latency_batch_1_ms"]["p50"]],
                ["latency p95, one row (ms)", efficiency["latency_batch_1_ms"]["p95"]],
                ["generations per second", efficiency["generation"]["generations_per_second"]]])
        return "\n".join(lines + _closing_markdown(report))
    if report.get("problem_type") == CONTRASTIVE:
        data = report["data"]
        rows_with = ", ".join(f"{count} with {modality}" for modality, count in data["rows_with"].items())
        lines = [f"# Evaluation of `{report['model']['path']}`", "",
                 f"Data: `{data['source']}`, split `{data['split']}`, {data['rows']} rows ({rows_with}; "
                 f"{len(data.get('skipped_rows', []))} skipped). Joint embedding model "
                 f"({', '.join(report['model']['modalities'])}, {report['model']['projection_dim']} dimensions). "
                 f"Seed {report['seed']}.", ""]
        lines += _contrastive_markdown(report)
        lines += _parameters_markdown(report)
        efficiency = report.get("efficiency")
        if efficiency:
            lines += ["## Efficiency", "", f"On `{efficiency['device']}`: {efficiency['what']}; throughput: "
                      f"{efficiency['embedding']['what']} (batch {efficiency['embedding']['batch_size']}).", ""]
            lines += _table(["modality", "latency p50, one item (ms)", "latency p95, one item (ms)", "items/s"], [
                [modality, latency["p50"], latency["p95"], efficiency["embedding"]["items_per_second"].get(modality)]
                for modality, latency in efficiency["latency_batch_1_ms"].items()])
        return "\n".join(lines + _closing_markdown(report))
    multi_task = "tasks" in report
    data = report["data"]
    line = (f"Data: `{data['source']}`, split `{data['split']}`, {data['rows']} rows "
            f"({len(data.get('skipped_rows', []))} skipped).")
    if multi_task:
        line += " Tasks: " + ", ".join(f"`{name}` ({section['problem_type']})"
                                       for name, section in report_sections(report)) + "."
    else:
        line += f" Problem type: {report['problem_type']}."
    lines = [f"# Evaluation of `{report['model']['path']}`", "", f"{line} Seed {report['seed']}.", ""]
    for name, section in report_sections(report):
        if multi_task:
            lines += [f"## Task `{name}` ({section['problem_type']}, column `{section.get('column')}`)", ""]
            if section.get("rows_without_target"):
                lines += [f"{section['rows_without_target']} of the {data['rows']} rows have no target for this "
                          "task and are left out of its metrics.", ""]
        lines += _section_markdown(report, section, "###" if multi_task else "##")
    if multi_task and report.get("interpretability", {}).get("cross_attention"):
        lines += ["## Cross-attention", ""] + _interpretability_markdown(report["interpretability"])
    lines += _parameters_markdown(report)
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
    return "\n".join(lines + _closing_markdown(report))


def _parameters_markdown(report: dict[str, Any]) -> list[str]:
    modes = report["model"].get("training_modes") or {}
    lines = ["## Parameters", "", "Trainable: requires_grad at evaluation time; trained as: from the model folder's "
             "training_args.json.", ""]
    return lines + _table(["part", "total", "trainable", "trained as"], [
        [part, counts["total"], counts["trainable"], modes.get(part)]
        for part, counts in report["model"]["parameters"].items()])


def _closing_markdown(report: dict[str, Any]) -> list[str]:
    return ["## Conventions", "", *[f"- {c}" for c in report["conventions"]], "",
            "## Versions", "", *[f"- {k}: {v}" for k, v in report["versions"].items()], ""]


def write_plots(report: dict[str, Any], output_dir: Path,
                regression: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> dict[str, dict[str, str]]:
    """The plots each task section has data for, written into `output_dir`: {task name: {plot: file name}}, task
    names as in `report_sections`. A multi-task model's files start with the task's name. `regression` gives a
    regression task's (targets, predictions), for its predicted-vs-true and residual plots."""
    regression = regression or {}
    multi_task = "tasks" in report
    plots: dict[str, dict[str, str]] = {}
    for name, section in report_sections(report):
        prefix = f"{name}_" if multi_task else ""
        files = {}
        if "confusion_matrix" in section["metrics"]:
            files["confusion_matrix"] = plot_confusion_matrix(section["metrics"]["confusion_matrix"],
                                                              _section_labels(report, section),
                                                              output_dir / f"{prefix}confusion_matrix.png")
        calibration = section.get("calibration")
        if calibration and calibration.get("applicable"):
            files["reliability_diagram"] = plot_reliability_diagram(calibration,
                                                                    output_dir / f"{prefix}reliability_diagram.png")
        if section.get("robustness"):
            files["robustness"] = plot_robustness(section["robustness"], output_dir / f"{prefix}robustness.png")
        if section.get("ablation"):
            files["ablation"] = plot_ablation(section["ablation"], primary_metric(section["problem_type"]),
                                              output_dir / f"{prefix}ablation.png")
        if name in regression and len(regression[name][0]):
            y_true, y_pred = regression[name]
            title = name if multi_task else ""
            files["predicted_vs_true"] = plot_predicted_vs_true(y_true, y_pred,
                                                                output_dir / f"{prefix}predicted_vs_true.png", title)
            files["residuals"] = plot_residuals(y_true, y_pred, output_dir / f"{prefix}residuals.png", title)
        plots[name] = files
    return plots


# ---- predictions.jsonl -----------------------------------------------------------------------------------------------

def task_predictions(logits: np.ndarray, targets: np.ndarray, label_names: Sequence[str], problem_type: str,
                     thresholds: np.ndarray | None = None,
                     shapley: Sequence[dict[str, Any] | None] | None = None) -> list[dict[str, Any]]:
    """One task's entry of predictions.jsonl per sample: its target ("label"; "labels" for multi-label; None where
    the row has none: -100 / NaN from `training.data.encode_targets`), the prediction ("predicted": a class, the
    labels with probability >= their `thresholds` (default 0.5), or None without a prediction; "prediction" for
    regression), the probabilities, and the sample's Shapley values (`shapley[i]`, or None)."""
    logits = np.asarray(logits, dtype=np.float64)
    outputs = scores(logits, problem_type)
    missing = np.isnan(logits).any(1)
    if problem_type == MULTI_LABEL:
        cut = label_thresholds(0.5 if thresholds is None else thresholds, logits.shape[1])
    rows = []
    for i in range(len(logits)):
        if problem_type == REGRESSION:
            row = {"label": json_safe(targets[i].tolist()), "prediction": json_safe(outputs[i].tolist())}
        elif problem_type == MULTI_LABEL:
            row = {"labels": None if np.isnan(targets[i]).any() else [n for n, y in zip(label_names, targets[i]) if y],
                   "predicted": None if missing[i] else [n for n, p, t in zip(label_names, outputs[i], cut) if p >= t],
                   "probabilities": dict(zip(label_names, json_safe(outputs[i].tolist())))}
        else:
            row = {"label": label_names[int(targets[i])] if targets[i] >= 0 else None,
                   "predicted": None if missing[i] else label_names[int(outputs[i].argmax())],
                   "probabilities": dict(zip(label_names, json_safe(outputs[i].tolist())))}
        row["shapley"] = json_safe(shapley[i]) if shapley is not None else None
        rows.append(row)
    return rows


def write_predictions(path: Path, predictions: Mapping[str, Sequence[dict[str, Any]]], multi_task: bool) -> None:
    """predictions.jsonl, one line per sample: a classifier's one task's entry (`task_predictions`) with the
    sample's "index", or for a multi-task model {"index", "tasks": {task name: entry}}."""
    rows = len(next(iter(predictions.values())))
    with open(path, "w") as file:
        for i in range(rows):
            if multi_task:
                row = {"index": i, "tasks": {name: entries[i] for name, entries in predictions.items()}}
            else:
                row = {"index": i, **next(iter(predictions.values()))[i]}
            file.write(json.dumps(row) + "\n")


# ---- the model card's model-index ------------------------------------------------------------------------------------

METRIC_IDS = {"accuracy": ("accuracy", "Accuracy", None), "macro_f1": ("f1", "Macro F1", {"average": "macro"}),
              "micro_f1": ("f1", "Micro F1", {"average": "micro"}),
              "balanced_accuracy": ("balanced_accuracy", "Balanced accuracy", None),
              "hamming_loss": ("hamming_loss", "Hamming loss", None),
              "mse": ("mse", "MSE", None), "rmse": ("rmse", "RMSE", None), "mae": ("mae", "MAE", None),
              "r2": ("r_squared", "R²", None), "pearson": ("pearsonr", "Pearson r", None),
              "spearman": ("spearmanr", "Spearman ρ", None)}


# a joint embedding model's retrieval metrics in the model-index: the metric ids MTEB's model cards use
RETRIEVAL_METRIC_IDS = {"r@1": ("recall_at_1", "R@1"), "r@5": ("recall_at_5", "R@5"), "r@10": ("recall_at_10", "R@10"),
                        "map": ("map", "mAP")}
# the Hub's task ids for zero-shot classification of each modality's items (no zero-shot audio id: audio-classification)
ZERO_SHOT_TASK_TYPES = {"image": "zero-shot-image-classification", "audio": "audio-classification"}


def _contrastive_model_index(report: dict[str, Any], dataset_name: str, dataset_type: str) -> list:
    """A joint embedding model's model-index: per ordered pair of modalities, R@1/5/10 and mAP under task type
    "retrieval" (as MTEB's cards have it; metric names "text->image R@1"), and per zero-shot column and modality,
    accuracy and macro F1 under the Hub's zero-shot task ids."""
    from huggingface_hub import EvalResult

    split = report["data"]["split"]
    results = []
    for pair, section in report["retrieval"]["pairs"].items():
        for key, (metric_type, label) in RETRIEVAL_METRIC_IDS.items():
            value = section["metrics"].get(key)
            if value is None:
                continue
            results.append(EvalResult(
                task_type="retrieval", task_name=f"Cross-modal retrieval ({pair})", dataset_type=dataset_type,
                dataset_name=dataset_name, dataset_split=split, metric_type=metric_type,
                metric_name=f"{pair} {label}", metric_value=round(float(value), 4)))
    for column, entry in (report.get("zero_shot") or {}).get("columns", {}).items():
        for modality, result in entry["modalities"].items():
            for key in ("accuracy", "macro_f1"):
                if result.get(key) is None:
                    continue
                metric_type, label, metric_args = METRIC_IDS[key]
                results.append(EvalResult(
                    task_type=ZERO_SHOT_TASK_TYPES[modality], task_name=f"Zero-shot {modality} classification: "
                    f"{column}", dataset_type=dataset_type, dataset_name=dataset_name, dataset_split=split,
                    metric_type=metric_type, metric_name=f"zero-shot {column} ({modality}) {label}",
                    metric_value=round(float(result[key]), 4), metric_args=metric_args))
    return results


# a generation model's metrics in the model-index: the metric ids of the Hub's `evaluate` metrics (rougeL: the key
# its rouge metric gives ROUGE-L under)
GENERATION_METRIC_IDS = {"exact_match": ("exact_match", "Exact match"), "bleu": ("bleu", "BLEU"),
                         "chrf": ("chrf", "chrF"), "rouge_l": ("rougeL", "ROUGE-L")}


def generation_task_type(modalities: Sequence[str], prompted: bool) -> str:
    """The Hub task id of a generation model's model-index entries, from what the evaluation was: "visual-question-
    answering" for a model that reads images evaluated with prompts (questions), "image-to-text" for one evaluated
    without prompts (captioning), "audio-text-to-text" for a model that reads audio and no images (as mm-publish's
    pipeline tag), else "text-generation". The first two are the Hub's tasks with VQA and captioning leaderboards;
    mm-publish's pipeline tag of an image model ("image-text-to-text") says what the pipeline takes instead."""
    if "image" in modalities:
        return "visual-question-answering" if prompted else "image-to-text"
    return "audio-text-to-text" if "audio" in modalities else "text-generation"


def _generation_model_index(report: dict[str, Any], dataset_name: str, dataset_type: str) -> list:
    """A generation model's model-index: its headline metrics over all rows (exact match, BLEU and chrF on
    sacrebleu's 0-100 scale, ROUGE-L) under `generation_task_type`."""
    from huggingface_hub import EvalResult

    modalities = report["model"]["modalities"]
    columns = report["data"]["columns"]
    task_type = generation_task_type(modalities, bool(columns.get("prompt")))
    results = []
    for key, (metric_type, metric_name) in GENERATION_METRIC_IDS.items():
        value = report["headline"].get(key)
        if value is None:
            continue
        results.append(EvalResult(
            task_type=task_type, task_name=f"Multimodal generation ({' + '.join(modalities)}): {columns['target']}",
            dataset_type=dataset_type, dataset_name=dataset_name, dataset_split=report["data"]["split"],
            metric_type=metric_type, metric_name=metric_name, metric_value=round(float(value), 4)))
    return results


def model_index_results(report: dict[str, Any], dataset_name: str, dataset_type: str) -> list:
    """The headline metrics of `report` as `huggingface_hub.EvalResult`s for a model card's model-index: one per
    task and headline metric (`report_sections`); for a joint embedding model, its retrieval and zero-shot metrics
    (`_contrastive_model_index`).

    The Hub has no pipeline tag for a classifier over image + text + audio; task_type is "text-classification"
    when the model reads text (transformers' sequence-classification heads use it), else "image-classification" or
    "audio-classification", with task_name naming the modalities. Metric types are the Hub's metric ids
    ("accuracy", "f1" with its average in metric_args, "mse", "mae", "r_squared", ...). A multi-task model's
    metric names carry the task's name ("pitch_hz/rmse") and its task names the task. A generation model's entries
    are its exact match, BLEU, chrF and ROUGE-L under `generation_task_type` (`_generation_model_index`)."""
    from huggingface_hub import EvalResult

    if report.get("problem_type") == CONTRASTIVE:
        return _contrastive_model_index(report, dataset_name, dataset_type)
    if report.get("problem_type") == GENERATION:
        return _generation_model_index(report, dataset_name, dataset_type)
    modalities = report["model"]["modalities"]
    task_type = ("text-classification" if "text" in modalities else
                 "image-classification" if "image" in modalities else "audio-classification")
    multi_task = "tasks" in report
    kinds = {SINGLE_LABEL: "classification", MULTI_LABEL: "multi-label classification", REGRESSION: "regression"}
    results = []
    for name, section in report_sections(report):
        task_name = (f"Multimodal {kinds.get(section['problem_type'], 'task')} ({' + '.join(modalities)}): {name}"
                     if multi_task else f"Multimodal classification ({' + '.join(modalities)})")
        for key, value in section["headline"].items():
            if value is None or key not in METRIC_IDS:
                continue
            metric_type, metric_name, metric_args = METRIC_IDS[key]
            if section["problem_type"] == MULTI_LABEL and key == "accuracy":
                metric_name = "Subset accuracy"
            results.append(EvalResult(
                task_type=task_type, task_name=task_name,
                dataset_type=dataset_type, dataset_name=dataset_name, dataset_split=report["data"]["split"],
                metric_type=metric_type, metric_name=f"{name}/{key}" if multi_task else metric_name,
                metric_value=round(float(value), 4), metric_args=metric_args))
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
