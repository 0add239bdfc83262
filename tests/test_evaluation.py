"""mm-eval (Evaluation acceptance 1-6): metrics equal scikit-learn's and scipy's, including edge cases; the modality
ablation and robustness curves of the trained sample model; calibration; plots and report.md; a byte-identical
report for the same seed; `mm-eval` in a fresh process on a folder written by mm-train; `explain_sample`."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import special, stats
from sklearn import metrics as skm

from conftest import make_batch, tiny_fusion_config
from modeling_mm import MMFusionForSequenceClassification
from modeling_mm.configuration_mm import MODALITY_NAMES
from processors import MMFusionProcessor
from training.corruptions import corrupt_audio, corrupt_text, robustness_conditions
from training.data import DataSettings
from training.evaluation import (EvaluationSettings, _collect, _EvaluationCollator, evaluate_model, evaluated_tasks,
                                 load_split, main)
from training.interpretability import explain_sample
from training.lora import load_trained_model
from training.metrics import (
    bootstrap_intervals,
    classification_metrics,
    expected_calibration_error,
    fit_temperature,
    headline_statistics,
    multilabel_metrics,
    negative_log_likelihood,
    quality_metrics,
    regression_metrics,
)
from training.report import FIGURE_DPI, FIGURE_SIZE, model_index_results
from training.sample_data import generate_sample
from training.scoring import classifier, encode_towers, forward_kept, scores, uniform_prior, withhold
from training.train import main as train_main

LABELS3 = ["cat", "dog", "owl"]


# ---- 1. every metric equals scikit-learn's / scipy's -----------------------------------------------------------------

def _probabilities_for(predictions: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """Random probabilities whose argmax is `predictions`."""
    scores = rng.random((len(predictions), num_classes))
    scores[np.arange(len(predictions)), predictions] += 1.0
    return scores / scores.sum(1, keepdims=True)


CASES = {
    "random": lambda y, rng: rng.integers(0, 3, len(y)),
    "class never predicted": lambda y, rng: np.where(y == 2, 0, y),
    "all correct": lambda y, rng: y.copy(),
    "all wrong": lambda y, rng: (y + 1) % 3,
}


@pytest.mark.parametrize("case", CASES)
def test_single_label_metrics_equal_sklearn(case, rng):
    y = np.array([0, 1, 2] * 10)
    predictions = CASES[case](y, rng)
    probabilities = _probabilities_for(predictions, 3, rng)
    result = classification_metrics(y, probabilities, LABELS3)

    assert result["accuracy"] == skm.accuracy_score(y, predictions)
    assert result["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, predictions))
    for average in ("macro", "weighted"):
        precision, recall, f1, _ = skm.precision_recall_fscore_support(y, predictions, average=average,
                                                                       zero_division=0)
        assert (result[f"{average}_precision"], result[f"{average}_recall"], result[f"{average}_f1"]) == \
            pytest.approx((precision, recall, f1))
    per_class = skm.precision_recall_fscore_support(y, predictions, labels=[0, 1, 2], zero_division=0)
    for k, name in enumerate(LABELS3):
        got = result["per_class"][name]
        assert [got["precision"], got["recall"], got["f1"], got["support"]] == pytest.approx(
            [per_class[0][k], per_class[1][k], per_class[2][k], per_class[3][k]])
    assert result["roc_auc"] == pytest.approx(skm.roc_auc_score(y, probabilities, multi_class="ovr"))
    assert result["pr_auc"] == pytest.approx(skm.average_precision_score(np.eye(3)[y], probabilities))
    assert result["log_loss"] == pytest.approx(skm.log_loss(y, probabilities))
    assert result["confusion_matrix"] == skm.confusion_matrix(y, predictions).tolist()
    if case == "class never predicted":
        assert result["per_class"]["owl"]["precision"] == 0.0 and result["per_class"]["owl"]["recall"] == 0.0
    if case == "all correct":
        assert result["accuracy"] == result["macro_f1"] == 1.0
    if case == "all wrong":
        assert result["accuracy"] == result["macro_f1"] == 0.0


def test_binary_metrics_equal_sklearn(rng):
    y = rng.integers(0, 2, 50)
    probabilities = _probabilities_for(rng.integers(0, 2, 50), 2, rng)
    result = classification_metrics(y, probabilities, ["no", "yes"])
    assert result["roc_auc"] == pytest.approx(skm.roc_auc_score(y, probabilities[:, 1]))
    assert result["pr_auc"] == pytest.approx(skm.average_precision_score(y, probabilities[:, 1]))
    assert result["macro_f1"] == pytest.approx(skm.f1_score(y, probabilities.argmax(1), average="macro"))


def test_a_single_class_in_the_labels_reports_auc_as_undefined(rng):
    y = np.zeros(12, dtype=int)
    predictions = np.array([0] * 9 + [1] * 3)
    probabilities = _probabilities_for(predictions, 2, rng)
    result = classification_metrics(y, probabilities, ["no", "yes"])
    assert result["roc_auc"] is None and result["pr_auc"] is None
    assert "one class" in result["undefined"]["roc_auc"]
    assert result["accuracy"] == skm.accuracy_score(y, predictions) == 0.75
    assert result["log_loss"] == pytest.approx(skm.log_loss(y, probabilities, labels=[0, 1]))
    assert result["confusion_matrix"] == [[9, 3], [0, 0]]


def test_a_class_missing_from_the_labels_averages_auc_over_the_others(rng):
    y = np.array([0, 1] * 10)  # no "owl" in the labels: scikit-learn's one-vs-rest refuses
    probabilities = _probabilities_for(rng.integers(0, 3, 20), 3, rng)
    result = classification_metrics(y, probabilities, LABELS3)
    per_class = [skm.roc_auc_score(y == k, probabilities[:, k]) for k in (0, 1)]
    assert result["roc_auc_per_class"]["owl"] is None
    assert result["roc_auc"] == pytest.approx(np.mean(per_class))


def test_a_sample_without_any_modality_counts_as_wrong():
    labels = np.array([0, 1, 1, 0])
    logits = np.array([[2.0, 0.0], [0.0, 2.0], [np.nan, np.nan], [np.nan, np.nan]])
    result = quality_metrics(logits, labels, ["a", "b"], "single_label_classification")
    assert result["accuracy"] == 0.5 and result["samples_without_prediction"] == 2
    assert result["confusion_matrix"] == [[1, 0], [0, 1]]  # samples without a prediction are left out
    uniform = special.softmax(np.nan_to_num(logits, nan=0.0), axis=1)
    assert result["log_loss"] == pytest.approx(skm.log_loss(labels, uniform))


def test_multi_label_metrics_equal_sklearn(rng):
    y = rng.integers(0, 2, (40, 3))
    y[:, 2] = 1  # a constant label: its AUC is undefined
    probabilities = rng.random((40, 3))
    predictions = (probabilities >= 0.5).astype(int)
    result = multilabel_metrics(y, probabilities, LABELS3)
    assert result["micro_f1"] == pytest.approx(skm.f1_score(y, predictions, average="micro"))
    assert result["macro_f1"] == pytest.approx(skm.f1_score(y, predictions, average="macro", zero_division=0))
    assert result["subset_accuracy"] == skm.accuracy_score(y, predictions)
    for k, name in enumerate(LABELS3[:2]):
        assert result["per_label"][name]["roc_auc"] == pytest.approx(skm.roc_auc_score(y[:, k], probabilities[:, k]))
    assert result["per_label"]["owl"]["roc_auc"] is None and "roc_auc[owl]" in result["undefined"]


def test_regression_metrics_equal_sklearn_and_scipy(rng):
    y = rng.normal(size=30)
    prediction = y + rng.normal(scale=0.5, size=30)
    result = regression_metrics(y, prediction)
    assert result["mse"] == pytest.approx(skm.mean_squared_error(y, prediction))
    assert result["mae"] == pytest.approx(skm.mean_absolute_error(y, prediction))
    assert result["r2"] == pytest.approx(skm.r2_score(y, prediction))
    assert result["pearson"] == pytest.approx(stats.pearsonr(y, prediction).statistic)
    assert result["spearman"] == pytest.approx(stats.spearmanr(y, prediction).statistic)
    constant = regression_metrics(y, np.zeros(30))
    assert constant["pearson"] is None and constant["spearman"] is None
    assert "constant" in constant["undefined"]["pearson"]


@pytest.mark.parametrize("case", ["random", "class never predicted", "with samples without prediction"])
def test_vectorised_bootstrap_statistics_equal_the_reported_metrics(case, rng):
    """The bootstrap computes accuracy, macro F1 and balanced accuracy with numpy over all resamples at once: on
    any resample they equal `classification_metrics` (scikit-learn) on that resample."""
    labels = rng.integers(0, 3, 60)
    logits = rng.normal(size=(60, 3))
    if case == "class never predicted":
        logits[:, 2] = -10.0
    if case == "with samples without prediction":
        logits[::7] = np.nan
    samples, statistics = headline_statistics(labels, logits, LABELS3, "single_label_classification")
    indices = rng.integers(0, samples, (20, samples))
    indices[0] = np.where(labels == 0)[0][0]  # one class only in this resample
    vectorised = {name: statistic(indices) for name, statistic in statistics.items()}
    for r, resample in enumerate(indices):
        expected = quality_metrics(logits[resample], labels[resample], LABELS3, "single_label_classification")
        for name in ("accuracy", "macro_f1", "balanced_accuracy"):
            assert vectorised[name][r] == pytest.approx(expected[name], abs=1e-12), (name, r)
    intervals = bootstrap_intervals(statistics, samples, 200, seed=0)
    assert all(low <= high for low, high in intervals.values())


# ---- 4. calibration ------------------------------------------------------------------------------------------------

def test_ece_is_near_zero_for_a_calibrated_predictor_and_large_for_an_overconfident_one(rng):
    confidence = rng.uniform(0.34, 1.0, 200_000)
    calibrated = expected_calibration_error(confidence, rng.random(200_000) < confidence)
    assert calibrated["ece"] < 0.005 and len(calibrated["bins"]) == 15
    overconfident = expected_calibration_error(rng.uniform(0.9, 1.0, 10_000), rng.random(10_000) < 0.6)
    assert overconfident["ece"] == pytest.approx(0.35, abs=0.02)


def test_ece_on_a_hand_made_example():
    # bin [0.2, 0.267): conf 0.25, acc 0   bin [0.933, 1]: conf 0.95 and 1.0, acc 1/2 -> ECE = (0.25 + 2 * 0.475) / 3
    result = expected_calibration_error([0.25, 0.95, 1.0], [False, True, False])
    assert result["ece"] == pytest.approx((0.25 + 2 * abs(0.5 - 0.975)) / 3)
    assert [b["count"] for b in result["bins"]] == [0, 0, 0, 1] + [0] * 10 + [2]


def test_temperature_scaling_lowers_nll_on_held_out_data(rng):
    true_logits = rng.normal(scale=2.0, size=(4000, 4))
    labels = np.array([rng.choice(4, p=p) for p in special.softmax(true_logits, axis=1)])
    overconfident = 3.0 * true_logits
    fit, held_out = slice(0, 2000), slice(2000, None)
    temperature = fit_temperature(overconfident[fit], labels[fit])
    assert temperature == pytest.approx(3.0, rel=0.15)
    before = negative_log_likelihood(overconfident[held_out], labels[held_out])
    after = negative_log_likelihood(overconfident[held_out] / temperature, labels[held_out])
    assert after < before - 0.1
    assert before == pytest.approx(skm.log_loss(labels[held_out], special.softmax(overconfident[held_out], axis=1)))


# ---- corruptions ------------------------------------------------------------------------------------------------

def test_audio_noise_has_the_requested_snr_and_is_seeded():
    tone = np.sin(np.linspace(0, 400 * np.pi, 16_000)).astype(np.float32)
    noisy = corrupt_audio(tone, 10.0, np.random.default_rng(1))
    snr = 10 * np.log10(np.mean(tone.astype(float) ** 2) / np.mean((noisy - tone).astype(float) ** 2))
    assert snr == pytest.approx(10.0, abs=0.2)
    assert np.array_equal(noisy, corrupt_audio(tone, 10.0, np.random.default_rng(1)))


def test_text_typos_are_seeded_and_scale_with_the_rate():
    text = "a red circle with a high tone " * 4
    assert corrupt_text(text, 0.0, np.random.default_rng(0)) == text
    light, heavy = (corrupt_text(text, rate, np.random.default_rng(0)) for rate in (0.05, 0.5))
    assert light == corrupt_text(text, 0.05, np.random.default_rng(0))
    distance = [sum(a != b for a, b in zip(text, t)) + abs(len(text) - len(t)) for t in (light, heavy)]
    assert 0 < distance[0] < distance[1]
    assert corrupt_text("a", 1.0, np.random.default_rng(0)).strip()


# ---- a tiny model trained by mm-train ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, vit_dir, bert_dir, wav2vec2_dir) -> dict:
    """A sample of 160 rows (16 test rows) and a model folder written by 4 steps of mm-train with the tiny towers."""
    root = tmp_path_factory.mktemp("evaluation")
    sample = generate_sample(root / "sample", rows=160, audio_seconds=0.25)
    settings = {
        "train_data": sample / "train.csv", "validation_data": sample / "validation.csv", "vision": vit_dir,
        "text": bert_dir, "audio": wav2vec2_dir, "fusion_hidden_size": 32, "fusion_num_heads": 4,
        "per_device_batch_size": 8, "num_workers": 0, "output_dir": root / "run", "report_to": "none",
        "max_steps": 4, "text_mode": "lora", "vision_mode": "full", "audio_mode": "frozen", "learning_rate": 1e-3,
    }
    assert train_main([item for key, value in settings.items() for item in (f"--{key}", str(value))]) == 0
    return {"root": root, "sample": sample, "model_dir": root / "run" / "model"}


FAST = dict(num_workers=0, batch_size=8, bootstrap_rounds=50, latency_runs=3, efficiency_batch_size=2,
            audio_snr_db=[10.0, -10.0], image_blur_radii=[2.0], image_noise_std=[0.2], text_typo_rates=[0.2])


@pytest.fixture(scope="module")
def tiny_reports(tiny_run) -> dict:
    """The same evaluation twice (same seed), into two folders."""
    model = load_trained_model(tiny_run["model_dir"])
    processor = MMFusionProcessor.from_pretrained(tiny_run["model_dir"])
    columns = DataSettings()
    test = load_split(str(tiny_run["sample"] / "test.csv"), "test", columns)
    validation = load_split(str(tiny_run["sample"] / "validation.csv"), "validation", columns)
    folders = [tiny_run["root"] / f"report-{i}" for i in range(2)]
    reports = [evaluate_model(model, processor, test, folder, EvaluationSettings(**FAST), validation=validation,
                              data_source="sample/test.csv", model_path=str(tiny_run["model_dir"]))
               for folder in folders]
    return {"reports": reports, "folders": folders, "model": model, "processor": processor}


def _without_timings(report: dict) -> dict:
    report = copy.deepcopy(report)
    report.pop("efficiency")
    return report


def test_same_seed_gives_the_same_report_apart_from_timings(tiny_reports):
    first, second = (json.loads((folder / "report.json").read_text()) for folder in tiny_reports["folders"])
    assert "efficiency" in first and first["efficiency"]["latency_batch_1_ms"]["p50"] > 0
    assert json.dumps(_without_timings(first)) == json.dumps(_without_timings(second))
    predictions = [(folder / "predictions.jsonl").read_bytes() for folder in tiny_reports["folders"]]
    assert predictions[0] == predictions[1]


def test_report_json_has_every_section(tiny_reports, tiny_run):
    report = json.loads((tiny_reports["folders"][0] / "report.json").read_text())
    # a classifier's report keeps the single-task layout: its one task's section at the top level, no "tasks"
    assert list(report) == ["model", "data", "seed", "settings", "versions", "problem_type", "conventions", "headline",
                            "headline_ci", "headline_ci_method", "metrics", "ablation", "fusion_gain", "robustness",
                            "calibration", "interpretability", "efficiency", "plots"]
    assert set(report["model"]) == {"path", "class", "modalities", "num_labels", "labels", "parameters",
                                    "training_modes"}
    assert report["data"]["columns"] == {"text": "text", "image": "image", "audio": "audio", "label": "label"}
    assert report["data"] == {**report["data"], "source": "sample/test.csv", "split": "test", "rows": 16}
    assert report["model"]["path"] == str(tiny_run["model_dir"])
    assert set(report["model"]["parameters"]) == {"image_tower", "text_tower", "audio_tower", "fusion", "head", "total"}
    assert report["model"]["parameters"]["total"]["total"] == sum(p.numel() for p in tiny_reports["model"].parameters())
    assert {"torch", "transformers", "mm-fusion", "scikit-learn"} <= set(report["versions"])
    assert report["seed"] == 42 and report["problem_type"] == "single_label_classification"
    assert set(report["headline"]) >= {"accuracy", "macro_f1"}
    low, high = report["headline_ci"]["accuracy"]
    assert low <= report["headline"]["accuracy"] <= high
    # every non-empty subset of the three modalities, all three first; the fusion gain against the best single one
    assert [row["modalities"] for row in report["ablation"]] == [
        ["image", "text", "audio"], ["image", "text"], ["image", "audio"], ["text", "audio"], ["image"], ["text"],
        ["audio"]]
    best_single = max(row["accuracy"] for row in report["ablation"][4:])
    assert report["fusion_gain"]["gain"] == pytest.approx(report["ablation"][0]["accuracy"] - best_single)
    assert set(report["robustness"]["curves"]) == {"audio_noise", "image_blur", "image_noise", "text_typos"}
    assert [p["level"] for p in report["robustness"]["curves"]["audio_noise"]["points"]] == [None, 10.0, -10.0]
    scaling = report["calibration"]["temperature_scaling"]
    assert scaling["validation_nll_after"] <= scaling["validation_nll_before"] + 1e-9
    attention = report["interpretability"]["cross_attention"]
    assert set(attention) == {"image", "text", "audio"}
    for stream, masses in attention.items():
        assert stream not in masses and sum(masses.values()) == pytest.approx(1.0, abs=1e-4)
    shapley = report["interpretability"]["shapley"]
    assert set(shapley) == {"image", "text", "audio"}
    assert all(entry["samples"] == 16 and entry["mean_abs"] >= abs(entry["mean"]) for entry in shapley.values())
    assert report["efficiency"]["flops_per_sample"] >= sum(report["efficiency"]["flops_per_sample_by_part"].values())
    assert report["efficiency"]["flops_per_sample_by_part"]["fusion"] > 0


def test_png_files_open_and_have_the_expected_size(tiny_reports):
    folder = tiny_reports["folders"][0]
    names = ["confusion_matrix.png", "reliability_diagram.png", "robustness.png", "ablation.png"]
    assert sorted(tiny_reports["reports"][0]["plots"].values()) == sorted(names)
    for name in names:
        with Image.open(folder / name) as image:
            image.verify()
        with Image.open(folder / name) as image:
            assert image.format == "PNG"
            assert image.size == (round(FIGURE_SIZE[0] * FIGURE_DPI), round(FIGURE_SIZE[1] * FIGURE_DPI))


def test_report_md_has_the_tables(tiny_reports):
    markdown = (tiny_reports["folders"][0] / "report.md").read_text()
    report = tiny_reports["reports"][0]
    accuracy = report["headline"]["accuracy"]
    for row in [
        f"| accuracy | {accuracy:.4f} | [",  # headline with its CI
        "| match | ", "| mismatch | ",  # per class and confusion matrix rows
        "| true \\ predicted | match | mismatch |",
        "| image + text + audio | ", "| image + text | ", "| audio | ",  # ablation
        "**Fusion gain**",
        "| clean | ", "| -10 | ",  # robustness
        "| uncalibrated | ", "| temperature scaled (T = ",
        "| image_tower | ", "| fusion | ", "| head | ",
        "| latency p50, batch 1 (ms) | ", "| FLOPs per sample (M) | ",
        "| modality | mean Shapley value | mean absolute Shapley value | samples |", "| text | ",
        "| stream \\ attends to | image | text | audio | sink |",
        "![confusion matrix](confusion_matrix.png)", "![reliability diagram](reliability_diagram.png)",
        "![robustness](robustness.png)", "![ablation](ablation.png)",
    ]:
        assert row in markdown, row
    assert markdown.count("|---|") >= 10


def test_model_index_results_carry_the_headline(tiny_reports):
    results = model_index_results(tiny_reports["reports"][0], "mm-fusion sample", "mm-fusion/sample")
    by_type = {(r.metric_type, r.metric_name): r for r in results}
    accuracy = tiny_reports["reports"][0]["headline"]["accuracy"]
    assert by_type[("accuracy", "Accuracy")].metric_value == round(accuracy, 4)
    assert by_type[("f1", "Macro F1")].metric_args == {"average": "macro"}
    assert all(r.dataset_split == "test" and r.task_type == "text-classification" for r in results)


@pytest.mark.parametrize("problem_type", ["multi_label_classification", "regression"])
def test_multi_label_and_regression_models_get_their_own_metrics(problem_type, tiny_run, vit_dir, wav2vec2_dir,
                                                                 tmp_path):
    labels = {"id2label": {0: "match", 1: "mismatch"}, "label2id": {"match": 0, "mismatch": 1}}
    model = MMFusionForSequenceClassification.from_towers(
        vision=vit_dir, audio=wav2vec2_dir, fusion_hidden_size=32, fusion_num_heads=4, problem_type=problem_type,
        **(labels if problem_type != "regression" else {"num_labels": 1}))
    processor = MMFusionProcessor.from_towers(vision=vit_dir, audio=wav2vec2_dir)
    test = load_split(str(tiny_run["sample"] / "test.csv"), "test", DataSettings())
    if problem_type == "regression":
        test = test.map(lambda row: {"label": 1.0 if row["label"] == "match" else 0.0})
    settings = EvaluationSettings(num_workers=0, bootstrap_rounds=20, skip_efficiency=True, audio_snr_db=[0.0],
                                  image_blur_radii=[], image_noise_std=[], text_typo_rates=[])
    report = evaluate_model(model, processor, test, tmp_path, settings)
    assert report["problem_type"] == problem_type
    expected = ({"mae", "rmse", "r2", "pearson", "spearman"} if problem_type == "regression" else
                {"accuracy", "micro_f1", "macro_f1", "hamming_loss"})
    assert set(report["headline"]) == expected and set(report["headline_ci"]) == expected
    assert [row["modalities"] for row in report["ablation"]] == [["image", "audio"], ["image"], ["audio"]]
    assert report["calibration"]["applicable"] is (problem_type != "regression")
    assert "| image + audio | " in (tmp_path / "report.md").read_text()


# ---- explain_sample (the demo's per-sample view) ---------------------------------------------------------------------

def test_explain_sample_matches_withholding_through_the_masks(tiny_reports, tiny_run):
    model, processor = tiny_reports["model"], tiny_reports["processor"]
    sample = tiny_run["sample"]
    row = datasets.load_dataset("csv", data_files=str(sample / "test.csv"))["train"][0]
    image, audio = str(sample / row["image"]), str(sample / row["audio"])
    view = explain_sample(model, processor, text=row["text"], image=image, audio=audio)
    assert set(view) == {"probabilities", "predicted", "contributions", "cross_attention"}
    assert sum(view["probabilities"].values()) == pytest.approx(1.0)
    assert view["predicted"] == max(view["probabilities"], key=view["probabilities"].get)

    batch = processor(text=row["text"], images=image, audio=audio)
    label = model.config.label2id[view["predicted"]]
    with torch.no_grad():
        for modality, key in (("image", "has_image"), ("text", "has_text"), ("audio", "has_audio")):
            withheld = {**batch, key: torch.tensor([False])}
            p_without = torch.softmax(model(**withheld).logits, -1)[0, label].item()
            p_all = view["probabilities"][view["predicted"]]
            assert view["contributions"][modality] == pytest.approx(p_all - p_without, abs=1e-5)
    assert set(view["cross_attention"]["text"]) == {"image", "audio"}

    alone = explain_sample(model, processor, text=row["text"])
    assert set(alone) == {"probabilities", "predicted", "contributions"}
    assert alone["contributions"]["text"] == pytest.approx(alone["probabilities"][alone["predicted"]] - 0.5)
    pair = explain_sample(model, processor, image=Image.open(image), audio=(16_000, np.zeros(8000, np.float32)))
    assert set(pair["contributions"]) == {"image", "audio"} and set(pair["cross_attention"]["image"]) == {"audio"}
    assert model.config._attn_implementation == "sdpa"  # switched to eager for the weights, then restored
    with pytest.raises(ValueError, match=r"text\[0\]: empty"):
        explain_sample(model, processor, text="   ")


def test_towers_run_once_per_batch_and_per_corruption_of_their_modality(tiny_reports, tiny_run):
    """One pass of mm-eval scores every modality subset and corruption from `encode_towers`' outputs: each tower runs
    once per batch plus once per corruption of its own modality, and the logits are exactly those of running the
    towers in every forward."""
    model, processor = tiny_reports["model"], tiny_reports["processor"]
    fusion = classifier(model).model
    modalities = tuple(fusion.modalities)
    test = load_split(str(tiny_run["sample"] / "test.csv"), "test", DataSettings()).select(range(4))
    settings = EvaluationSettings(num_workers=0, batch_size=4, audio_snr_db=[0.0], image_blur_radii=[2.0],
                                  image_noise_std=[], text_typo_rates=[0.3])
    corruptions = robustness_conditions(settings, modalities)
    subsets = [modalities, ("vision", "text"), ("audio",)]
    runs: dict[str, int] = {}
    hooks = [next(fusion.get_tower(m).children()).register_forward_hook(
        lambda *_, m=m: runs.__setitem__(m, runs.get(m, 0) + 1)) for m in modalities]
    try:
        collected = _collect(model, processor, test, DataSettings(), evaluated_tasks(model, DataSettings()), settings,
                             subsets, corruptions, attention=False, desc="")
    finally:
        for hook in hooks:
            hook.remove()
    assert runs == {m: 1 + 1 for m in modalities}  # the clean batch, and the one corruption of its own modality

    collator = _EvaluationCollator(processor, DataSettings(), evaluated_tasks(model, DataSettings()), corruptions,
                                   seed=settings.seed)
    batches, _, _ = collator([(i, test[i]) for i in range(4)])
    was_training = model.training
    model.eval()
    try:
        expected = {"+".join(MODALITY_NAMES[m].user for m in subset): forward_kept(
            model, batches["clean"], subset)[0] for subset in subsets}
        expected |= {c.name: forward_kept(model, batches[c.name], modalities)[0] for c in corruptions}
    finally:
        model.train(was_training)
    assert set(collected.logits) == set(expected)
    for name, logits in expected.items():
        torch.testing.assert_close(torch.from_numpy(collected.logits[name]), logits.double(), rtol=0, atol=0,
                                   equal_nan=True, msg=name)


# ---- the one definition of withholding and scoring (training.scoring) -------------------------------------------------

@pytest.fixture(scope="module")
def tiny_classifier():
    torch.manual_seed(0)
    return MMFusionForSequenceClassification(tiny_fusion_config(num_labels=3)).eval()


def _ragged_batch_with_presence():
    """Four samples with ragged text/audio padding; sample 1 lacks its image, sample 2 its text, sample 3 has audio
    only."""
    batch = make_batch(batch_size=4)
    batch["has_image"] = torch.tensor([True, False, True, False])
    batch["has_text"] = torch.tensor([True, True, False, False])
    batch["has_audio"] = torch.tensor([True, True, True, True])
    return batch


def test_withhold_sets_the_masks_of_the_other_modalities_to_false_and_nothing_else():
    batch = _ragged_batch_with_presence()
    kept = withhold(batch, ("text",))
    assert kept["has_image"].tolist() == [False] * 4 and kept["has_audio"].tolist() == [False] * 4
    assert kept["has_text"] is batch["has_text"]
    assert all(kept[key] is batch[key] for key in ("pixel_values", "input_ids", "input_values"))
    assert batch["has_image"].tolist() == [True, False, True, False]  # the caller's batch is unchanged
    unmasked = {key: value for key, value in batch.items() if not key.startswith("has_")}
    assert withhold(unmasked, ("vision", "text"))["has_audio"].tolist() == [False] * 4  # inputs without a mask


def test_forward_kept_gives_a_nan_row_to_a_sample_left_with_no_modality(tiny_classifier):
    batch = _ragged_batch_with_presence()
    logits, present, fusion_output = forward_kept(tiny_classifier, batch, ("vision", "text"))
    assert present.tolist() == [True, True, True, False]
    assert torch.isnan(logits[3]).all() and not torch.isnan(logits[:3]).any()
    assert fusion_output.has_audio.tolist() == [False] * 3
    rows = [0, 1, 2]
    with torch.no_grad():
        direct = tiny_classifier(**{**{k: v[rows] for k, v in batch.items()},
                                    "has_audio": torch.zeros(3, dtype=torch.bool)}).logits
    torch.testing.assert_close(logits[:3], direct, rtol=0, atol=0)
    nothing, present, output = forward_kept(tiny_classifier, batch, ())
    assert torch.isnan(nothing).all() and not present.any() and output is None


@pytest.mark.parametrize("keep", [("vision", "text", "audio"), ("vision", "audio"), ("text",), ("audio",)])
def test_tower_states_give_exactly_the_logits_of_raw_inputs(tiny_classifier, keep):
    """`encode_towers` runs each tower on the samples that have its modality, as the forward does: the logits from
    its outputs are bit for bit those from the raw inputs, with ragged padding and samples missing modalities."""
    batch = _ragged_batch_with_presence()
    states = encode_towers(tiny_classifier, batch)
    assert set(states) == {"vision", "text", "audio"}
    assert not states["vision"][1][[1, 3]].any()  # rows without the image: mask all False
    from_states = forward_kept(tiny_classifier, batch, keep, tower_states=states)[0]
    from_inputs = forward_kept(tiny_classifier, batch, keep)[0]
    torch.testing.assert_close(from_states, from_inputs, rtol=0, atol=0, equal_nan=True)


def test_scores_turn_nan_rows_into_the_uniform_prior():
    logits = np.array([[2.0, 0.0, -1.0], [np.nan, np.nan, np.nan]])
    single = scores(logits, "single_label_classification")
    np.testing.assert_allclose(single[0], special.softmax(logits[0]))
    assert single[1].tolist() == uniform_prior("single_label_classification", 3).tolist() == [1 / 3] * 3
    multi = scores(torch.tensor(logits), "multi_label_classification")
    np.testing.assert_allclose(multi[0], special.expit(logits[0]))
    assert multi[1].tolist() == [0.5] * 3
    regression = scores(np.array([[1.5], [np.nan]]), "regression")
    assert regression[0, 0] == 1.5 and np.isnan(regression[1, 0])
    with pytest.raises(ValueError, match="problem_type: .*'regression'"):
        uniform_prior("regression", 1)


# ---- 6. mm-eval in a fresh process, and its errors -------------------------------------------------------------------

def test_mm_eval_runs_in_a_fresh_process_on_a_folder_from_mm_train(tiny_run):
    output_dir = tiny_run["root"] / "cli"
    command = [sys.executable, "-m", "training.evaluation", "--model", str(tiny_run["model_dir"]),
               "--data", str(tiny_run["sample"] / "test.csv"), "--validation_data",
               str(tiny_run["sample"] / "validation.csv"), "--output_dir", str(output_dir), "--num_workers", "0",
               "--bootstrap_rounds", "50", "--latency_runs", "3", "--audio_snr_db", "0",
               "--image_blur_radii", "2", "--image_noise_std", "0.1", "--text_typo_rates", "0.1"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=tiny_run["root"], env=environment, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "test: accuracy" in result.stdout
    report = json.loads((output_dir / "report.json").read_text())
    assert report["data"]["rows"] == 16 and report["data"]["skipped_rows"] == []
    assert {p.name for p in output_dir.iterdir()} >= {"report.json", "report.md", "predictions.jsonl",
                                                      "confusion_matrix.png", "ablation.png"}


def test_mm_eval_refuses_bad_input_with_the_field_named(tiny_run, tmp_path, capsys):
    model, test_csv = str(tiny_run["model_dir"]), str(tiny_run["sample"] / "test.csv")
    assert main(["--model", str(tmp_path / "missing"), "--data", test_csv]) == 2
    assert "mm-eval: error: model:" in capsys.readouterr().err
    splits = datasets.DatasetDict(test=datasets.load_dataset("csv", data_files=test_csv)["train"])
    splits.save_to_disk(tmp_path / "saved")
    assert main(["--model", model, "--data", str(tmp_path / "saved"), "--split", "validation"]) == 2
    assert "mm-eval: error: split: 'validation'" in capsys.readouterr().err
    assert main(["--model", model, "--data", test_csv, "--label_column", "nope", "--skip_efficiency"]) == 2
    assert "mm-eval: error: label_column: 'nope'" in capsys.readouterr().err


# ---- 2 and 3. the trained sample model -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sample_report(sample_model_dir, sample_dir, tmp_path_factory) -> dict:
    """The sample model on its 300 test rows: ablation and audio noise only, to stay quick."""
    model = load_trained_model(sample_model_dir)
    processor = MMFusionProcessor.from_pretrained(sample_model_dir)
    test = load_split(str(sample_dir / "test.csv"), "test", DataSettings())
    settings = EvaluationSettings(num_workers=0, batch_size=50, bootstrap_rounds=100, skip_efficiency=True,
                                  skip_calibration=True, skip_interpretability=True, skip_plots=True,
                                  audio_snr_db=[-10.0, -20.0], image_blur_radii=[], image_noise_std=[],
                                  text_typo_rates=[])
    return evaluate_model(model, processor, test, tmp_path_factory.mktemp("sample-eval"), settings)


def test_ablation_on_the_sample_model_has_the_expected_shape(sample_report):
    """All three modalities clearly beat image+text, and any single modality is at chance (the sample is built so);
    the report states the fusion gain."""
    accuracy = {"+".join(row["modalities"]): row["accuracy"] for row in sample_report["ablation"]}
    assert sample_report["data"]["rows"] == 300
    assert accuracy["image+text"] <= accuracy["image+text+audio"] - 0.05
    for single in ("image", "text", "audio"):
        assert 0.40 <= accuracy[single] <= 0.60, (single, accuracy[single])
    gain = sample_report["fusion_gain"]
    assert gain["gain"] == pytest.approx(accuracy["image+text+audio"] - gain["best_single_modality_value"])
    assert gain["gain"] >= 0.2


def test_the_sample_model_reaches_95_percent_with_all_three_modalities(sample_report):
    accuracy = {"+".join(row["modalities"]): row["accuracy"] for row in sample_report["ablation"]}
    assert accuracy["image+text+audio"] >= 0.95


def test_strong_audio_noise_lowers_accuracy_on_the_sample_model(sample_report):
    points = sample_report["robustness"]["curves"]["audio_noise"]["points"]
    clean, noisiest = points[0], min(points[1:], key=lambda point: point["level"])
    assert clean["level"] is None and noisiest["level"] == -20.0
    assert noisiest["accuracy"] < clean["accuracy"]
