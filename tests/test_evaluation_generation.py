"""Generation over data rows and its report (#17): `training.generation.generation_metrics` is sacrebleu's corpus BLEU
and chrF, rouge-score's ROUGE-L and a documented exact match, with bootstrap intervals that recompute corpus BLEU per
resample; `generate_texts` is the processor, `model.generate` and `batch_decode` by hand, with withheld modalities
reaching the model as has_* False; mm-eval on a generation model writes headline metrics with intervals, per group
metrics, every modality subset's ablation (per group too), sample generations and model-index entries; bad flags
are refused by name."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU, CHRF

from conftest import tiny_fusion_config, tiny_gpt2_decoder_config
from modeling_mm import MMFusionForConditionalGeneration, MMFusionForSequenceClassification
from processors import MMFusionProcessor
from training.data import DataSettings, prompt_of
from training.evaluation import EvaluationSettings, evaluate_model, load_split, main
from training.generation import (RowScores, generate_subsets, generate_texts, generation_intervals,
                                 generation_metrics, normalize_answer, rows_without_modality)
from training.report import generation_task_type, model_index_results

KINDS = ["colour", "describe", "match", "pitch", "shape"]
SUBSETS = [["image", "text", "audio"], ["image", "text"], ["image", "audio"], ["text", "audio"], ["image"], ["text"],
           ["audio"]]
METRICS = ["bleu", "chrf", "rouge_l", "exact_match"]
COLUMNS = DataSettings(task="generation", prompt_column="question", target_column="answer")
PREDICTIONS = ["A red circle.", "  yes ", "deep", "a blue square and a shrill tone", "", "a circle", "No!",
               "the cat sat on the mat"]
REFERENCES = ["a red circle", "Yes", "shrill", "a blue square and a deep tone", "a star", "a square", "no",
              "the cat is on the mat"]


# ---- generation_metrics ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, normal", [
    ("  A red   Circle. ", "a red circle"), ("Yes!", "yes"), ("no?!", "no"), ("deep\n", "deep"),
    ("a circle", "a circle"), ("u.s.a.", "u.s.a"), ("wait…", "wait"), ("", ""), ("...", ""),
    ("it's red, blue", "it's red, blue"),
])
def test_exact_match_normalisation_lowercases_collapses_whitespace_and_strips_final_punctuation(text, normal):
    assert normalize_answer(text) == normal


def test_generation_metrics_are_sacrebleu_and_rouge_score_called_directly():
    metrics = generation_metrics(PREDICTIONS, REFERENCES)
    assert set(metrics) == set(METRICS)
    assert metrics["bleu"] == pytest.approx(BLEU().corpus_score(PREDICTIONS, [REFERENCES]).score, abs=1e-9)
    assert metrics["chrf"] == pytest.approx(CHRF().corpus_score(PREDICTIONS, [REFERENCES]).score, abs=1e-9)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    assert metrics["rouge_l"] == pytest.approx(
        np.mean([scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(PREDICTIONS, REFERENCES)]), abs=1e-12)
    # by hand: rows 0 ("a red circle"), 1 ("yes") and 6 ("no") match after normalisation; "a circle" != "a square"
    assert metrics["exact_match"] == 3 / 8


def test_a_resample_is_scored_as_sacrebleu_scores_those_rows_and_intervals_contain_the_point():
    scores = RowScores.of(PREDICTIONS, REFERENCES)
    resamples = np.array([[0, 0, 3, 7, 7, 5, 2, 1], [4, 4, 4, 6, 1, 2, 3, 0]])
    statistics = scores.statistics()
    for name, metric in (("bleu", BLEU()), ("chrf", CHRF())):
        got = statistics[name](resamples)
        assert got.shape == (2,)
        for row, value in zip(resamples, got):  # corpus-level recomputation on the resampled rows, not a mean
            expected = metric.corpus_score([PREDICTIONS[i] for i in row], [[REFERENCES[i] for i in row]]).score
            assert value == pytest.approx(expected, abs=1e-9)
    point = generation_metrics(PREDICTIONS, REFERENCES)
    intervals = generation_intervals(PREDICTIONS, REFERENCES, rounds=300, seed=1)
    for name in METRICS:
        low, high = intervals[name]
        assert low <= point[name] <= high, name
    assert intervals == generation_intervals(PREDICTIONS, REFERENCES, rounds=300, seed=1)  # seeded
    assert generation_intervals(PREDICTIONS[:1], REFERENCES[:1]) == {name: None for name in METRICS}


@pytest.mark.parametrize("predictions, references, message", [
    (["a"], ["a", "b"], r"references: 2 references for 1 predictions"),
    (["a", None], ["a", "b"], r"predictions\[1\]: expected a str"),
    (["a"], [3], r"references\[0\]: expected a str"),
])
def test_generation_metrics_refuse_bad_input_by_name(predictions, references, message):
    with pytest.raises(ValueError, match=message):
        generation_metrics(predictions, references)


# ---- generate_texts --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_csv(sample_dir, tmp_path_factory) -> Path:
    """The first 20 rows of the sample's test split (every question kind), with absolute media paths; row 19 has no
    audio and no caption (only its image)."""
    with open(sample_dir / "test.csv", newline="") as file:
        rows = list(csv.DictReader(file))[:20]
    for row in rows:
        row["image"], row["audio"] = str(sample_dir / row["image"]), str(sample_dir / row["audio"])
    rows[19]["audio"] = rows[19]["text"] = ""
    path = tmp_path_factory.mktemp("generation_data") / "tiny.csv"
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def tiny_dataset(tiny_csv):
    return load_split(str(tiny_csv), "test", COLUMNS)


@pytest.fixture(scope="module")
def model_and_processor(generation_model_dir):
    return (MMFusionForConditionalGeneration.from_pretrained(generation_model_dir).eval(),
            MMFusionProcessor.from_pretrained(generation_model_dir))


def _by_hand(model, processor, rows, withhold_image=False, **generate_kwargs) -> list[str]:
    batch = processor(text=[row["text"] or None for row in rows], images=[row["image"] or None for row in rows],
                      audio=[row["audio"] or None for row in rows], prompt=[row["question"] for row in rows])
    if withhold_image:
        batch["has_image"] = torch.zeros_like(batch["has_image"])
    return processor.batch_decode(model.generate(**batch, **generate_kwargs))


@pytest.mark.parametrize("num_beams", [1, 2])
def test_generate_texts_is_the_processor_generate_and_batch_decode_by_hand(model_and_processor, tiny_dataset,
                                                                           num_beams):
    model, processor = model_and_processor
    rows = [tiny_dataset[i] for i in range(4)]
    texts = generate_texts(model, processor, rows, COLUMNS, batch_size=4, max_new_tokens=6, num_beams=num_beams)
    assert texts == _by_hand(model, processor, rows, max_new_tokens=6, num_beams=num_beams)
    assert all(isinstance(text, str) and text for text in texts)
    # a datasets.Dataset and a list of dicts are the same rows
    assert generate_texts(model, processor, tiny_dataset.select(range(4)), COLUMNS, batch_size=4, max_new_tokens=6,
                          num_beams=num_beams) == texts


def test_generate_texts_is_generate_by_hand_for_a_prefix_decoder_too(model_and_processor, tiny_dataset):
    _, processor = model_and_processor
    torch.manual_seed(0)
    model = MMFusionForConditionalGeneration(tiny_fusion_config(
        decoder_config=tiny_gpt2_decoder_config(), decoder_connection="prefix", num_query_tokens=4)).eval()
    rows = [tiny_dataset[i] for i in range(3)]
    texts = generate_texts(model, processor, rows, COLUMNS, batch_size=3, max_new_tokens=5)
    assert texts == _by_hand(model, processor, rows, max_new_tokens=5)


def test_withholding_the_image_reaches_the_model_as_has_image_false(model_and_processor, tiny_dataset, monkeypatch):
    model, processor = model_and_processor
    rows = [tiny_dataset[i] for i in range(4)]
    seen = []
    generate = model.generate

    def recording(**kwargs):
        seen.append(kwargs)
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", recording)
    texts = generate_texts(model, processor, rows, COLUMNS, keep=("text", "audio"), batch_size=4, max_new_tokens=6)
    (call,) = seen
    assert not call["has_image"].any() and call["has_text"].all() and call["has_audio"].all()
    assert "vision" not in (call["tower_states"] or {})  # the image tower did not run for the generation
    monkeypatch.undo()
    assert texts == _by_hand(model, processor, rows, withhold_image=True, max_new_tokens=6)
    # what the decoder reads changes when the image is withheld
    batch = processor(text=[r["text"] for r in rows], images=[r["image"] for r in rows],
                      audio=[r["audio"] for r in rows])
    with torch.no_grad():
        full, _ = model.get_decoder_context(**batch)
        without, _ = model.get_decoder_context(**{**batch, "has_image": torch.zeros(4, dtype=torch.bool)})
    assert full.shape != without.shape or not torch.allclose(full, without)


def test_a_row_left_without_a_modality_gets_an_empty_string_and_is_counted(model_and_processor, tiny_dataset):
    model, processor = model_and_processor
    rows = [tiny_dataset[i] for i in (0, 1, 19)]  # row 19 has only its image
    texts = generate_texts(model, processor, rows, COLUMNS, keep=("text", "audio"), max_new_tokens=4)
    assert texts[2] == "" and texts[:2] == generate_texts(model, processor, rows[:2], COLUMNS, keep=("text", "audio"),
                                                          max_new_tokens=4)
    assert rows_without_modality(processor, rows, COLUMNS, keep=("text", "audio")) == [2]
    assert rows_without_modality(processor, rows, COLUMNS) == []
    # one pass for several subsets gives what one call per subset gives
    both = generate_subsets(model, processor, rows, COLUMNS, [("vision", "text", "audio"), ("text", "audio")],
                            max_new_tokens=4)
    assert both[("text", "audio")] == texts
    assert both[("vision", "text", "audio")] == generate_texts(model, processor, rows, COLUMNS, max_new_tokens=4)


@pytest.mark.parametrize("arguments, message", [
    ({"keep": ("smell",)}, r"keep: modality: 'smell'"),
    ({"keep": ()}, r"keep: expected at least one modality"),
    ({"max_new_tokens": 0}, r"max_new_tokens: must be >= 1"),
    ({"num_beams": 0}, r"num_beams: must be >= 1"),
    ({"batch_size": 0}, r"batch_size: must be >= 1"),
])
def test_generate_texts_refuses_bad_arguments_by_name(model_and_processor, tiny_dataset, arguments, message):
    model, processor = model_and_processor
    with pytest.raises(ValueError, match=message):
        generate_texts(model, processor, [tiny_dataset[0]], COLUMNS, **arguments)


def test_generate_texts_refuses_a_model_that_generates_no_text(model_and_processor, tiny_dataset):
    _, processor = model_and_processor
    classifier = MMFusionForSequenceClassification(tiny_fusion_config(num_labels=2))
    with pytest.raises(ValueError, match=r"model: MMFusionForSequenceClassification generates no text"):
        generate_texts(classifier, processor, [tiny_dataset[0]], COLUMNS)


# ---- mm-eval ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def evaluated(generation_model_dir, tiny_csv, tmp_path_factory):
    """`mm-eval` run once on the saved generation model: (return code, stdout, report, report.md, output folder)."""
    output_dir = tmp_path_factory.mktemp("generation_eval")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["--model", str(generation_model_dir), "--data", str(tiny_csv), "--output_dir", str(output_dir),
                     "--target_column", "answer", "--prompt_column", "question", "--group_column", "question_kind",
                     "--max_new_tokens", "6", "--num_examples", "8", "--bootstrap_rounds", "200",
                     "--latency_runs", "2", "--batch_size", "8", "--num_workers", "0", "--device", "cpu"])
    report = json.loads((output_dir / "report.json").read_text())
    return code, stdout.getvalue(), report, (output_dir / "report.md").read_text(), output_dir


def test_mm_eval_reports_overall_metrics_with_intervals(evaluated):
    code, stdout, report, _, _ = evaluated
    assert code == 0 and "bleu" in stdout and "report written to" in stdout
    assert report["problem_type"] == "generation" and report["data"]["rows"] == 20
    assert report["model"]["modalities"] == ["image", "text", "audio"]
    assert report["data"]["columns"] == {"text": "text", "image": "image", "audio": "audio", "target": "answer",
                                         "prompt": "question", "group": "question_kind"}
    assert list(report["headline"]) == METRICS
    for name in METRICS:
        low, high = report["headline_ci"][name]
        assert low <= report["headline"][name] <= high
    assert report["metrics"]["samples"] == 20 and report["metrics"]["rows_without_modality"] == 0
    assert report["decoding"] == {"strategy": "greedy", "max_new_tokens": 6, "num_beams": 1, "do_sample": False}
    assert "tok:13a" in report["metric_definitions"]["bleu"]
    assert report["efficiency"]["latency_batch_1_ms"]["runs"] == 2


def test_the_report_scores_its_own_predictions_with_generation_metrics(evaluated, tiny_dataset):
    _, _, report, _, output_dir = evaluated
    lines = [json.loads(line) for line in (output_dir / "predictions.jsonl").read_text().splitlines()]
    assert [line["row"] for line in lines] == list(range(20))
    assert [line["reference"] for line in lines] == tiny_dataset["answer"]
    assert [line["prompt"] for line in lines] == [prompt_of(q) for q in tiny_dataset["question"]]
    point = generation_metrics([line["prediction"] for line in lines], [line["reference"] for line in lines])
    assert report["headline"] == pytest.approx(point)
    image_withheld = [line["ablation"]["text+audio"] for line in lines]
    assert image_withheld[19] == ""  # row 19 has only its image
    assert report["ablation"][3]["exact_match"] == pytest.approx(
        generation_metrics(image_withheld, [line["reference"] for line in lines])["exact_match"])


def test_mm_eval_reports_every_group_and_every_modality_subset(evaluated):
    _, _, report, _, _ = evaluated
    assert list(report["groups"]) == KINDS
    assert sum(section["samples"] for section in report["groups"].values()) == 20
    for section in report["groups"].values():
        assert set(section["metrics"]) == set(METRICS) and set(section["ci"]) == set(METRICS)
        assert [row["modalities"] for row in section["ablation"]] == SUBSETS
    assert [row["modalities"] for row in report["ablation"]] == SUBSETS
    assert all(set(METRICS) <= set(row) for row in report["ablation"])
    assert {row["modalities"][0]: row["rows_without_modality"] for row in report["ablation"][4:]} == {
        "image": 0, "text": 1, "audio": 1}
    assert report["ablation"][0] == {"modalities": SUBSETS[0], **report["headline"], "rows_without_modality": 0}
    assert report["fusion_gain"]["metric"] == "chrf"


def test_mm_eval_shows_sample_generations_next_to_their_references(evaluated):
    _, _, report, markdown, _ = evaluated
    examples = report["examples"]
    assert len(examples) == 8 and {example["group"] for example in examples} == set(KINDS)
    assert [example["group"] for example in examples] == sorted(example["group"] for example in examples)
    for example in examples:
        assert set(example) == {"row", "group", "prompt", "reference", "prediction", "exact_match", "ablation"}
        assert set(example["ablation"]) == {"image+text", "image+audio", "text+audio", "image", "text", "audio"}
    for heading in ("## Headline", "## Per group (column `question_kind`)", "## Modality ablation",
                    "### Per group and modality subset: exact match", "### Per group and modality subset: chrF",
                    "## Sample generations", "## Parameters", "## Efficiency"):
        assert heading in markdown
    assert "| modalities \\ group | colour | describe | match | pitch | shape |" in markdown
    assert "| image + text + audio |" in markdown and "| text + audio |" in markdown
    assert f"| {examples[0]['row']} | {examples[0]['group']} | {examples[0]['prompt']} |" in markdown


def test_model_index_has_the_generation_metrics(evaluated):
    _, _, report, _, _ = evaluated
    results = model_index_results(report, dataset_name="sample", dataset_type="csv")
    assert [r.metric_type for r in results] == ["exact_match", "bleu", "chrf", "rougeL"]
    assert {r.task_type for r in results} == {"visual-question-answering"}
    by_type = {r.metric_type: r.metric_value for r in results}
    assert by_type["bleu"] == round(report["headline"]["bleu"], 4)
    assert by_type["rougeL"] == round(report["headline"]["rouge_l"], 4)
    assert all(r.dataset_split == "test" for r in results)


@pytest.mark.parametrize("modalities, prompted, task_type", [
    (["image", "text", "audio"], True, "visual-question-answering"), (["image"], False, "image-to-text"),
    (["text", "audio"], True, "audio-text-to-text"), (["text"], False, "text-generation"),
])
def test_the_model_index_task_follows_the_modalities_and_the_prompts(modalities, prompted, task_type):
    assert generation_task_type(modalities, prompted) == task_type


def test_evaluate_model_takes_the_columns_from_data_settings(model_and_processor, tiny_dataset, tmp_path):
    """mm-train's write_report path: evaluate_model with data_settings (no flags)."""
    model, processor = model_and_processor
    settings = EvaluationSettings(bootstrap_rounds=0, skip_ablation=True, skip_efficiency=True, max_new_tokens=3,
                                  num_examples=2)
    data = tiny_dataset.select(range(6)).map(lambda row, i: {"answer": "" if i == 5 else row["answer"]},
                                             with_indices=True)
    report = evaluate_model(model, processor, data, tmp_path, settings, data_settings=COLUMNS)
    assert report["data"]["rows"] == 5 and report["data"]["rows_without_target"] == 1
    assert report["data"]["columns"]["prompt"] == "question" and "ablation" not in report
    assert [e["prompt"] for e in report["examples"]] == tiny_dataset["question"][:2]
    assert report["headline_ci"] == {name: None for name in METRICS}
    assert (tmp_path / "report.md").exists()


BAD_FLAGS = [
    ([], "target_column: required for a generation model"),
    (["--target_column", "nope"], "target_column: 'nope' is not a column of the dataset"),
    (["--target_column", "answer", "--prompt_column", "nope"], "prompt_column: 'nope' is not a column"),
    (["--target_column", "answer", "--group_column", "nope"], "group_column: 'nope' is not a column"),
    (["--target_column", "answer", "--max_new_tokens", "0"], "max_new_tokens: must be >= 1; got 0"),
    (["--target_column", "answer", "--num_beams", "0"], "num_beams: must be >= 1; got 0"),
    (["--target_column", "answer", "--num_examples", "-1"], "num_examples: must be >= 0; got -1"),
    (["--target_column", "answer", "--zero_shot_columns", "shape"], "zero_shot_columns: only for a joint embedding"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[m.split(":")[0] + str(i) for i, (_, m) in
                                                           enumerate(BAD_FLAGS)])
def test_mm_eval_refuses_bad_flags_by_name(generation_model_dir, tiny_csv, tmp_path, flags, message):
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(["--model", str(generation_model_dir), "--data", str(tiny_csv), "--output_dir", str(tmp_path),
                     "--device", "cpu", *flags])
    assert code == 2
    assert message in stderr.getvalue()


def test_group_column_is_refused_for_a_classifier(tiny_dataset, tmp_path):
    classifier = MMFusionForSequenceClassification(tiny_fusion_config(num_labels=2))
    with pytest.raises(ValueError, match=r"group_column: only for a generation model"):
        evaluate_model(classifier, None, tiny_dataset, tmp_path, EvaluationSettings(group_column="question_kind"))
