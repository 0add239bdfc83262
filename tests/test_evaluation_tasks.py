"""mm-eval on a multi-task model (#15 Part B): one report section per task (single-label, multi-label,
regression), each with its metrics and bootstrap CIs; multi-label thresholds tuned on the validation split; regression
metrics equal scikit-learn's and scipy's on the written predictions, with its two plots; rows without a task's target
left out of that task and counted; exact Shapley values that sum to v(all) - v(no modality) per sample; the note on
a model trained without modality dropout; and `mm-eval` on a saved multi-task folder."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image
from scipy import stats
from sklearn import metrics as skm

from conftest import IMAGE_SIZE, SAMPLING_RATE, tiny_fusion_config
from modeling_mm import MMFusionForMultiTask
from processors import MMFusionProcessor
from training.data import DataSettings
from training.evaluation import EvaluationSettings, evaluate_model, load_split, main
from training.metrics import tune_thresholds
from training.report import FIGURE_DPI, FIGURE_SIZE, model_index_results, report_sections

SHAPES = ["circle", "square", "triangle"]
COLOURS = ["blue", "green", "red"]
PITCH_MEAN = 500.0
TASKS = [
    {"name": "shape", "column": "shape", "problem_type": "single_label_classification", "labels": SHAPES},
    {"name": "colours", "column": "caption_colours", "problem_type": "multi_label_classification", "labels": COLOURS,
     "label_separator": "|"},
    {"name": "pitch_hz", "column": "pitch_hz", "problem_type": "regression", "target_mean": PITCH_MEAN,
     "target_std": 200.0},
]
# test rows without a task's target (empty cells), and without audio (an empty audio cell)
NO_TARGET = {"shape": [0, 1, 2, 3], "caption_colours": [4, 5], "pitch_hz": [6, 7, 8]}
NO_AUDIO = [10, 11]
FAST = dict(num_workers=0, batch_size=32, bootstrap_rounds=50, skip_efficiency=True, audio_snr_db=[0.0],
            image_blur_radii=[], image_noise_std=[], text_typo_rates=[0.2])


def _write_split(folder, name: str, rows: int, seed: int, no_target=None, no_audio=()) -> str:
    """`rows` rows of real PNG and WAV files and a CSV naming them, with the three tasks' target columns."""
    rng = np.random.default_rng(seed)
    (folder / "media").mkdir(parents=True, exist_ok=True)
    table = []
    for i in range(rows):
        shape, colours = SHAPES[i % 3], [COLOURS[i % 3]] + ([COLOURS[(i + 1) % 3]] if i % 2 else [])
        image, audio = f"media/{name}-{i}.png", f"media/{name}-{i}.wav"
        Image.fromarray(np.full((IMAGE_SIZE, IMAGE_SIZE, 3), rng.integers(0, 256, 3), dtype=np.uint8)).save(
            folder / image)
        pitch = round(float(rng.uniform(180.0, 1000.0)), 1)
        tone = 0.3 * np.sin(2 * np.pi * pitch * np.arange(SAMPLING_RATE // 4) / SAMPLING_RATE)
        soundfile.write(folder / audio, tone.astype(np.float32), SAMPLING_RATE)
        row = {"text": f"a {' and '.join(colours)} {shape} with a tone", "image": image,
               "audio": "" if i in no_audio else audio, "shape": shape, "caption_colours": "|".join(colours),
               "pitch_hz": pitch}
        for column, missing in (no_target or {}).items():
            if i in missing:
                row[column] = ""
        table.append(row)
    path = folder / f"{name}.csv"
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    return str(path)


@pytest.fixture(scope="module")
def multitask(tmp_path_factory, vit_dir, bert_dir, wav2vec2_dir) -> dict:
    """A random-init three-task model (no modality dropout) whose multi-label head's bias is shifted to -4, so every
    label's probability is about 0.02 and the F1-best threshold lies far below 0.5; 24 test rows and 12 validation
    rows; the evaluation's report."""
    root = tmp_path_factory.mktemp("multitask-evaluation")
    test_csv = _write_split(root, "test", 24, seed=0, no_target=NO_TARGET, no_audio=NO_AUDIO)
    validation_csv = _write_split(root, "validation", 12, seed=1)
    torch.manual_seed(0)
    model = MMFusionForMultiTask(tiny_fusion_config(tasks=TASKS)).eval()
    with torch.no_grad():
        model.heads["colours"].bias.fill_(-4.0)
    processor = MMFusionProcessor.from_towers(vision=vit_dir, text=bert_dir, audio=wav2vec2_dir)
    columns = DataSettings()
    test, validation = load_split(test_csv, "test", columns), load_split(validation_csv, "validation", columns)
    output_dir = root / "report"
    report = evaluate_model(model, processor, test, output_dir, EvaluationSettings(**FAST), validation=validation,
                            data_source="test.csv")
    predictions = [json.loads(line) for line in (output_dir / "predictions.jsonl").read_text().splitlines()]
    return {"root": root, "model": model, "processor": processor, "report": report, "output_dir": output_dir,
            "predictions": predictions, "test": test, "validation": validation, "test_csv": test_csv,
            "validation_csv": validation_csv}


def test_a_multi_task_report_has_the_common_parts_on_top_and_one_section_per_task(multitask):
    report = json.loads((multitask["output_dir"] / "report.json").read_text())
    assert set(report) == {"model", "data", "seed", "settings", "versions", "conventions", "tasks",
                           "interpretability"}  # efficiency skipped here
    assert [name for name, _ in report_sections(report)] == ["shape", "colours", "pitch_hz"]
    assert [t["problem_type"] for t in report["model"]["tasks"]] == [t["problem_type"] for t in TASKS]
    assert report["data"]["columns"]["targets"] == {"shape": "shape", "colours": "caption_colours",
                                                    "pitch_hz": "pitch_hz"}
    expected_headline = {"shape": {"accuracy", "macro_f1", "balanced_accuracy"},
                         "colours": {"accuracy", "micro_f1", "macro_f1", "hamming_loss"},
                         "pitch_hz": {"mae", "rmse", "r2", "pearson", "spearman"}}
    for name, section in report["tasks"].items():
        assert {"problem_type", "headline", "headline_ci", "metrics", "ablation", "fusion_gain", "robustness",
                "calibration", "interpretability", "plots"} <= set(section), name
        assert set(section["headline"]) == set(section["headline_ci"]) == expected_headline[name]
        for metric, interval in section["headline_ci"].items():
            assert len(interval) == 2 and interval[0] <= interval[1], (name, metric)
        assert len(section["ablation"]) == 7 and section["ablation"][0]["modalities"] == ["image", "text", "audio"]
    low, high = report["tasks"]["pitch_hz"]["headline_ci"]["mae"]
    assert low <= report["tasks"]["pitch_hz"]["headline"]["mae"] <= high
    assert report["tasks"]["shape"]["calibration"]["temperature_scaling"]["temperature"] > 0
    assert report["tasks"]["pitch_hz"]["calibration"] == {"applicable": False,
                                                          "reason": "regression has no class confidence"}
    markdown = (multitask["output_dir"] / "report.md").read_text()
    for line in ["## Task `shape` (single_label_classification, column `shape`)",
                 "## Task `colours` (multi_label_classification, column `caption_colours`)",
                 "## Task `pitch_hz` (regression, column `pitch_hz`)", "### Headline", "| mae | ",
                 "| true \\ predicted | circle | square | triangle |",
                 "![residuals vs predicted](pitch_hz_residuals.png)",
                 "| stream \\ attends to | image | text | audio | sink |"]:
        assert line in markdown, line


def test_rows_without_a_target_are_left_out_of_that_task_and_counted(multitask):
    report, predictions = multitask["report"], multitask["predictions"]
    for name, column in (("shape", "shape"), ("colours", "caption_colours"), ("pitch_hz", "pitch_hz")):
        section = report["tasks"][name]
        assert section["rows_without_target"] == len(NO_TARGET[column])
        assert section["metrics"]["samples"] == 24 - len(NO_TARGET[column])
        key = "labels" if name == "colours" else "label"
        assert [i for i, row in enumerate(predictions) if row["tasks"][name][key] is None] == NO_TARGET[column]
    assert "4 of the 24 rows have no target for this task" in (multitask["output_dir"] / "report.md").read_text()


def test_multi_label_thresholds_are_tuned_on_the_validation_split(multitask, tmp_path):
    section = multitask["report"]["tasks"]["colours"]
    rows = multitask["validation"].to_dict()
    batch = multitask["processor"](text=rows["text"], images=rows["image"], audio=rows["audio"])
    with torch.no_grad():
        probabilities = torch.sigmoid(multitask["model"](**batch).logits["colours"]).double().numpy()
    truth = np.array([[colour in cell.split("|") for colour in COLOURS] for cell in rows["caption_colours"]], int)
    expected = tune_thresholds(truth, probabilities)
    tuned = section["decision_thresholds"]["values"]
    assert list(tuned.values()) == pytest.approx(expected.tolist(), abs=1e-6)
    assert all(value < 0.1 for value in tuned.values())  # every probability is ~0.02: 0.5 would predict nothing
    assert section["metrics"]["thresholds"] == tuned
    assert "validation data (12 samples)" in section["decision_thresholds"]["fitted_on"]
    assert section["metrics"]["micro_f1"] > 0.3  # at 0.5 no label is predicted and micro F1 is 0
    assert {"mean_average_precision", "macro_roc_auc", "hamming_loss", "subset_accuracy"} <= set(section["metrics"])
    assert all(entry["roc_auc"] is not None for entry in section["metrics"]["per_label"].values())
    predicted = [row["tasks"]["colours"]["predicted"] for row in multitask["predictions"]]
    assert any(predicted)  # the written predictions use the tuned thresholds too

    # without validation data the thresholds stay 0.5, and the section says why
    settings = EvaluationSettings(**{**FAST, "skip_ablation": True, "skip_robustness": True,
                                     "skip_interpretability": True, "skip_plots": True, "bootstrap_rounds": 0})
    report = evaluate_model(multitask["model"], multitask["processor"], multitask["test"], tmp_path, settings)
    untuned = report["tasks"]["colours"]["decision_thresholds"]
    assert set(untuned["values"].values()) == {0.5} and "no validation data" in untuned["note"]
    assert report["tasks"]["colours"]["metrics"]["micro_f1"] == 0.0


def test_regression_metrics_equal_sklearn_and_scipy_on_the_written_predictions(multitask):
    section = multitask["report"]["tasks"]["pitch_hz"]
    rows = [row["tasks"]["pitch_hz"] for row in multitask["predictions"]
            if row["tasks"]["pitch_hz"]["label"] is not None]
    y = np.array([row["label"] for row in rows])
    p = np.array([row["prediction"][0] for row in rows])
    assert len(y) == 21
    metrics = section["metrics"]
    assert metrics["mae"] == pytest.approx(skm.mean_absolute_error(y, p), rel=1e-12)
    assert metrics["rmse"] == pytest.approx(math.sqrt(skm.mean_squared_error(y, p)), rel=1e-12)
    assert metrics["r2"] == pytest.approx(skm.r2_score(y, p), rel=1e-12)
    assert metrics["pearson"] == pytest.approx(stats.pearsonr(y, p).statistic, rel=1e-9)
    assert metrics["spearman"] == pytest.approx(stats.spearmanr(y, p).statistic, rel=1e-9)
    assert section["plots"] == {"ablation": "pitch_hz_ablation.png", "robustness": "pitch_hz_robustness.png",
                                "predicted_vs_true": "pitch_hz_predicted_vs_true.png",
                                "residuals": "pitch_hz_residuals.png"}
    for name in ("pitch_hz_predicted_vs_true.png", "pitch_hz_residuals.png", "shape_confusion_matrix.png",
                 "colours_reliability_diagram.png"):
        with Image.open(multitask["output_dir"] / name) as image:
            assert image.format == "PNG"
            assert image.size == (round(FIGURE_SIZE[0] * FIGURE_DPI), round(FIGURE_SIZE[1] * FIGURE_DPI))


def _log_odds(probability: float) -> float:
    return math.log(probability) - math.log1p(-probability)


def test_shapley_values_sum_to_the_change_from_no_modality_to_all_for_every_sample(multitask):
    """Efficiency, per sample and task: sum of phi = v(all) - v(no modality), with v(all) recomputed from the written
    probabilities (single-label: the predicted class's log-odds; multi-label: each label's log-odds) or prediction,
    and v(no modality) the uniform prior or the training mean. A modality the row lacks has no value."""
    for i, row in enumerate(multitask["predictions"]):
        modalities = {"image", "text"} | (set() if i in NO_AUDIO else {"audio"})
        shape = row["tasks"]["shape"]
        assert set(shape["shapley"]["phi"]) == modalities
        p = shape["probabilities"][shape["predicted"]]
        assert shape["shapley"]["v_all"] == pytest.approx(_log_odds(p), abs=1e-6)
        assert shape["shapley"]["v_empty"] == pytest.approx(math.log(1 / 2), abs=1e-12)  # 1/3 vs 2/3
        assert sum(shape["shapley"]["phi"].values()) == pytest.approx(
            shape["shapley"]["v_all"] - shape["shapley"]["v_empty"], abs=1e-6)
        colours = row["tasks"]["colours"]
        for label in COLOURS:
            assert colours["shapley"]["v_all"][label] == pytest.approx(_log_odds(colours["probabilities"][label]),
                                                                       abs=1e-6)
            assert colours["shapley"]["v_empty"][label] == 0.0
            assert sum(phi[label] for phi in colours["shapley"]["phi"].values()) == pytest.approx(
                colours["shapley"]["v_all"][label], abs=1e-6)
        pitch = row["tasks"]["pitch_hz"]
        assert pitch["shapley"]["v_all"] == pytest.approx(pitch["prediction"][0], abs=1e-9)
        assert pitch["shapley"]["v_empty"] == PITCH_MEAN
        assert sum(pitch["shapley"]["phi"].values()) == pytest.approx(pitch["prediction"][0] - PITCH_MEAN, abs=1e-6)
    summary = multitask["report"]["tasks"]["shape"]["interpretability"]["shapley"]
    assert summary["audio"]["samples"] == 22 and summary["image"]["samples"] == 24
    phi = np.array([row["tasks"]["shape"]["shapley"]["phi"]["image"] for row in multitask["predictions"]])
    assert summary["image"]["mean_abs"] == pytest.approx(np.abs(phi).mean(), abs=1e-12)
    per_label = multitask["report"]["tasks"]["colours"]["interpretability"]["shapley"]["text"]["mean_abs_per_label"]
    assert set(per_label) == set(COLOURS)


def test_the_report_says_when_the_model_was_trained_without_modality_dropout(multitask):
    for _, section in report_sections(multitask["report"]):
        interpretability = section["interpretability"]
        assert interpretability["modality_dropout"] == 0.0
        assert "modality_dropout = 0" in interpretability["modality_dropout_note"]
    markdown = (multitask["output_dir"] / "report.md").read_text()
    assert markdown.count("**Note**: the model was trained without modality dropout (modality_dropout = 0)") == 3


def test_without_the_ablation_shapley_values_are_unavailable_and_say_why(multitask, tmp_path):
    model = multitask["model"]
    model.config.modality_dropout = 0.1
    try:
        settings = EvaluationSettings(**{**FAST, "skip_ablation": True, "skip_robustness": True, "skip_plots": True,
                                         "skip_calibration": True, "bootstrap_rounds": 0})
        report = evaluate_model(model, multitask["processor"], multitask["test"], tmp_path, settings)
    finally:
        model.config.modality_dropout = 0.0
    for _, section in report_sections(report):
        interpretability = section["interpretability"]
        assert interpretability["shapley"] is None and "skip_ablation" in interpretability["shapley_note"]
        assert "modality_dropout_note" not in interpretability and interpretability["modality_dropout"] == 0.1
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert all(entry["shapley"] is None for row in rows for entry in row["tasks"].values())


def test_model_index_has_one_result_per_task_and_headline_metric(multitask):
    results = model_index_results(multitask["report"], "tiny", "tiny")
    names = {r.metric_name: r for r in results}
    assert {"shape/accuracy", "colours/micro_f1", "pitch_hz/rmse", "pitch_hz/r2"} <= set(names)
    assert len(results) == 3 + 4 + 5
    rmse = multitask["report"]["tasks"]["pitch_hz"]["headline"]["rmse"]
    assert names["pitch_hz/rmse"].metric_value == round(rmse, 4)
    assert names["pitch_hz/rmse"].metric_type == "rmse" and names["shape/accuracy"].metric_type == "accuracy"


def test_mm_eval_evaluates_a_saved_multi_task_folder(multitask, capsys):
    model_dir = multitask["root"] / "model"
    multitask["model"].save_pretrained(model_dir)
    multitask["processor"].save_pretrained(model_dir)
    output_dir = multitask["root"] / "cli"
    assert main(["--model", str(model_dir), "--data", multitask["test_csv"], "--validation_data",
                 multitask["validation_csv"], "--output_dir", str(output_dir), "--num_workers", "0",
                 "--bootstrap_rounds", "20", "--skip_efficiency", "--skip_robustness", "--skip_plots"]) == 0
    out = capsys.readouterr().out
    for name, metric in (("shape", "accuracy"), ("colours", "accuracy"), ("pitch_hz", "mae")):
        assert f"test {name}: {metric} " in out, out
    report = json.loads((output_dir / "report.json").read_text())
    assert list(report["tasks"]) == ["shape", "colours", "pitch_hz"]
    assert report["data"]["rows"] == 24 and report["data"]["skipped_rows"] == []
    assert report["tasks"]["pitch_hz"]["rows_without_target"] == 3
    # the same model, the same rows: the same numbers as evaluated in memory
    assert report["tasks"]["pitch_hz"]["headline"]["mae"] == pytest.approx(
        multitask["report"]["tasks"]["pitch_hz"]["headline"]["mae"], rel=1e-6)
    first = json.loads((output_dir / "predictions.jsonl").read_text().splitlines()[0])
    assert set(first["tasks"]) == {"shape", "colours", "pitch_hz"}
