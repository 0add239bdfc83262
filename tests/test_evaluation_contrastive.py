"""mm-eval on a joint embedding model (#16): report.json has retrieval for every ordered pair of modalities with
R@1/5/10, median and mean rank and mAP, each with a bootstrap interval, the numbers of `training.retrieval` on
embeddings of each item once per modality; zero-shot classification with chance levels; report.md and the card's
model-index show them; bad flags are refused by name."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest

from conftest import FUSION_KWARGS, tiny_fusion_config
from modeling_mm import MMFusionContrastiveModel, MMFusionForSequenceClassification
from processors import MMFusionProcessor
from training import evaluation
from training.data import DataSettings
from training.embeddings import column_items, embed_items
from training.evaluation import EvaluationSettings, evaluate_model, is_contrastive, load_split, main
from training.report import model_index_results
from training.retrieval import positive_keys, retrieval_metrics

PAIRS = ["image->text", "image->audio", "text->image", "text->audio", "audio->image", "audio->text"]
METRICS = ["r@1", "r@5", "r@10", "median_rank", "mean_rank", "map"]
BATCH_SIZE = 8


@pytest.fixture(scope="module")
def tiny_csv(sample_dir, tmp_path_factory) -> Path:
    """24 rows of the sample's test split, without the label column, with absolute media paths; row 23 repeats row
    0's caption, row 22 shows row 1's image file, and row 21 has no audio."""
    with open(sample_dir / "test.csv", newline="") as file:
        rows = list(csv.DictReader(file))[:24]
    for row in rows:
        row.pop("label")
        row["image"], row["audio"] = str(sample_dir / row["image"]), str(sample_dir / row["audio"])
    rows[23]["text"] = rows[0]["text"]
    rows[22]["image"] = rows[1]["image"]
    rows[21]["audio"] = ""
    path = tmp_path_factory.mktemp("contrastive_data") / "tiny.csv"
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def evaluated(contrastive_model_dir, tiny_csv, tmp_path_factory):
    """`mm-eval` run once on the saved contrastive model: (return code, stdout, report, report.md text)."""
    output_dir = tmp_path_factory.mktemp("contrastive_eval")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["--model", str(contrastive_model_dir), "--data", str(tiny_csv), "--output_dir", str(output_dir),
                     "--positive_columns", "colour", "shape", "pitch", "--zero_shot_columns", "shape", "pitch",
                     "--prompt_template", "a {} thing", "--bootstrap_rounds", "100", "--latency_runs", "2",
                     "--batch_size", str(BATCH_SIZE), "--num_workers", "0", "--device", "cpu"])
    report = json.loads((output_dir / "report.json").read_text())
    return code, stdout.getvalue(), report, (output_dir / "report.md").read_text(), output_dir


@pytest.fixture(scope="module")
def model_and_processor(contrastive_model_dir):
    return (MMFusionContrastiveModel.from_pretrained(contrastive_model_dir).eval(),
            MMFusionProcessor.from_pretrained(contrastive_model_dir))


@pytest.fixture(scope="module")
def tiny_dataset(tiny_csv) -> datasets.Dataset:
    return load_split(str(tiny_csv), "test", DataSettings())


def test_mm_eval_detects_the_joint_embedding_model_and_prints_its_headline(evaluated, model_and_processor):
    code, stdout, report, _, output_dir = evaluated
    assert code == 0
    assert report["problem_type"] == "contrastive" and is_contrastive(model_and_processor[0])
    assert "text->image r@1" in stdout and "report written to" in stdout
    assert sorted(path.name for path in output_dir.iterdir()) == ["report.json", "report.md"]


def test_report_has_every_ordered_pair_with_each_metric_and_its_interval(evaluated):
    _, _, report, _, _ = evaluated
    pairs = report["retrieval"]["pairs"]
    assert list(pairs) == PAIRS
    rows_with = {"image": 24, "text": 24, "audio": 23}  # row 21 has no audio
    assert report["data"]["rows_with"] == rows_with
    for name, pair in pairs.items():
        query, gallery = name.split("->")
        assert (pair["query"], pair["gallery"]) == (query, gallery)
        assert pair["queries"] == rows_with[query] and pair["gallery_size"] == rows_with[gallery]
        assert pair["queries_without_positive"] == 0  # every row's own item is in the other gallery
        assert list(pair["metrics"]) == METRICS and list(pair["ci"]) == METRICS
        for metric in METRICS:
            low, high = pair["ci"][metric]
            assert low <= pair["metrics"][metric] <= high, (name, metric)
        assert pair["metrics"]["r@1"] <= pair["metrics"]["r@5"] <= pair["metrics"]["r@10"] <= 1
        assert 1 <= pair["metrics"]["median_rank"] <= pair["gallery_size"]
    assert "colour, shape, pitch" in report["retrieval"]["positives"]
    assert set(report["headline"]) >= {f"{pair} r@1" for pair in PAIRS}
    assert report["headline_ci"]["text->image r@1"] == pairs["text->image"]["ci"]["r@1"]
    assert set(report["efficiency"]["latency_batch_1_ms"]) == {"image", "text", "audio"}


def test_retrieval_numbers_are_those_of_training_retrieval(evaluated, model_and_processor, tiny_dataset):
    """The report's text->audio numbers equal `retrieval_metrics` on `embed_items` of the same rows, with the keys
    of `positive_keys`: one definition for mm-eval and mm-train."""
    _, _, report, _, _ = evaluated
    model, processor = model_and_processor
    columns = {"image": "image", "text": "text", "audio": "audio"}
    embeds, rows = {}, {}
    for modality in ("text", "audio"):
        cells = column_items(tiny_dataset, modality, modality)
        rows[modality] = np.array([i for i, cell in enumerate(cells) if cell is not None])
        embeds[modality] = embed_items(model, processor, modality, [cells[i] for i in rows[modality]], BATCH_SIZE)
    keys = positive_keys(tiny_dataset, columns, ["colour", "shape", "pitch"])
    expected = retrieval_metrics(embeds["text"], embeds["audio"], [k[rows["text"]] for k in keys],
                                 [k[rows["audio"]] for k in keys])
    for metric in METRICS:
        assert report["retrieval"]["pairs"]["text->audio"]["metrics"][metric] == pytest.approx(expected[metric],
                                                                                               abs=1e-9)


def test_zero_shot_section_has_accuracy_macro_f1_intervals_and_chance(evaluated, tiny_csv):
    _, _, report, _, _ = evaluated
    with open(tiny_csv, newline="") as file:
        rows = list(csv.DictReader(file))
    zero_shot = report["zero_shot"]
    assert zero_shot["prompt_template"] == "a {} thing" and list(zero_shot["columns"]) == ["shape", "pitch"]
    for column in ("shape", "pitch"):
        entry = zero_shot["columns"][column]
        classes = sorted({row[column] for row in rows})
        assert entry["classes"] == classes and entry["prompts"] == [f"a {name} thing" for name in classes]
        for modality, samples in (("image", 24), ("audio", 23)):
            result = entry["modalities"][modality]
            assert result["samples"] == samples and result["rows_without_value"] == 0
            values = [row[column] for row in rows if row[modality]]
            assert result["chance"] == pytest.approx({
                "uniform": 1 / len(classes), "majority": Counter(values).most_common(1)[0][1] / len(values)})
            for metric in ("accuracy", "macro_f1"):
                low, high = result["ci"][metric]
                assert low <= result[metric] <= high
            assert report["headline"][f"zero-shot {column} ({modality}) accuracy"] == result["accuracy"]


def test_report_md_and_model_index_show_retrieval_and_zero_shot(evaluated):
    _, _, report, markdown, output_dir = evaluated
    assert "## Retrieval" in markdown and "## Zero-shot classification" in markdown
    for pair in PAIRS:
        assert f"| {pair.replace('->', ' -> ')} |" in markdown
    assert "### `shape` (3 classes: circle, square, triangle)" in markdown
    assert "chance (uniform)" in markdown and "## Parameters" in markdown and "## Efficiency" in markdown

    results = model_index_results(report, dataset_name="tiny", dataset_type="csv")
    names = {(result.task_type, result.metric_type, result.metric_name): result.metric_value for result in results}
    assert names[("retrieval", "recall_at_1", "text->image R@1")] == round(
        report["retrieval"]["pairs"]["text->image"]["metrics"]["r@1"], 4)
    assert ("retrieval", "map", "audio->text mAP") in names
    assert ("zero-shot-image-classification", "accuracy", "zero-shot shape (image) Accuracy") in names
    assert ("audio-classification", "f1", "zero-shot pitch (audio) Macro F1") in names
    assert len(results) == 6 * 4 + 2 * 2 * 2  # pairs x (R@1, R@5, R@10, mAP) + columns x modalities x 2

    from training.publish import read_report  # the model card reads the report through it

    assert read_report(output_dir / "report.json")["problem_type"] == "contrastive"


def test_each_item_is_embedded_once_per_modality(model_and_processor, tiny_dataset, tmp_path, monkeypatch):
    calls = []

    def counting_embed_items(model, processor, modality, items, *args, **kwargs):
        calls.append((modality, len(items)))
        return embed_items(model, processor, modality, items, *args, **kwargs)

    monkeypatch.setattr(evaluation, "embed_items", counting_embed_items)
    model, processor = model_and_processor
    evaluate_model(model, processor, tiny_dataset, tmp_path, EvaluationSettings(
        bootstrap_rounds=0, skip_efficiency=True, zero_shot_columns=["shape"]))
    # one call per modality over the rows that have it, and one for the three class prompts
    assert calls == [("image", 24), ("text", 24), ("audio", 23), ("text", 3)]


def _text_only_model(request):
    return MMFusionContrastiveModel.from_towers(text=request.getfixturevalue("bert_dir"), projection_dim=16,
                                                **FUSION_KWARGS).eval()


def _model_without_text(request):
    return MMFusionContrastiveModel.from_towers(vision=request.getfixturevalue("vit_dir"),
                                                audio=request.getfixturevalue("wav2vec2_dir"), projection_dim=16,
                                                **FUSION_KWARGS).eval()


def _classifier(request):
    return MMFusionForSequenceClassification(tiny_fusion_config(num_labels=2)).eval()


BAD_INPUT = [  # (id, settings, change to the data, model, the flag the error names)
    ("unknown positive column", {"positive_columns": ["colour", "size"]}, None, None, "positive_columns"),
    ("unknown zero-shot column", {"zero_shot_columns": ["size"]}, None, None, "zero_shot_columns"),
    ("one zero-shot class", {"zero_shot_columns": ["one_class"]}, None, None, "zero_shot_columns"),
    ("prompt without {}", {"prompt_template": "a photo"}, None, None, "prompt_template"),
    ("prompt with two {}", {"prompt_template": "a {} {}"}, None, None, "prompt_template"),
    ("one row with audio", {}, "one_audio", None, "data"),
    ("one modality in the data", {}, "text_only", None, "data"),
    ("one-tower model", {}, None, _text_only_model, "model"),
    ("zero-shot without a text tower", {"zero_shot_columns": ["shape"]}, None, _model_without_text,
     "zero_shot_columns"),
    ("retrieval flags on a classifier", {"positive_columns": ["shape"]}, None, _classifier, "positive_columns"),
]


def _changed(dataset: datasets.Dataset, change: str | None) -> datasets.Dataset:
    dataset = dataset.add_column("one_class", ["same"] * len(dataset))
    if change == "one_audio":
        return dataset.map(lambda row, i: {"audio": row["audio"] if i == 0 else None}, with_indices=True)
    if change == "text_only":
        return dataset.select_columns(["text", "shape"])
    return dataset


@pytest.mark.parametrize("settings, change, model, flag", [case[1:] for case in BAD_INPUT],
                         ids=[case[0] for case in BAD_INPUT])
def test_bad_input_is_refused_naming_the_flag(settings, change, model, flag, model_and_processor, tiny_dataset,
                                              request, tmp_path):
    base_model, processor = model_and_processor
    with pytest.raises(ValueError, match=f"^{flag}:"):
        evaluate_model(model(request) if model else base_model, processor, _changed(tiny_dataset, change), tmp_path,
                       EvaluationSettings(bootstrap_rounds=0, skip_efficiency=True, **settings))


def test_data_without_text_still_retrieves_between_image_and_audio(model_and_processor, tiny_dataset, tmp_path):
    """The pairs are those of the modalities that both the model and the data have."""
    model, processor = model_and_processor
    report = evaluate_model(model, processor, tiny_dataset.remove_columns("text"), tmp_path,
                            EvaluationSettings(bootstrap_rounds=0, skip_efficiency=True))
    assert list(report["retrieval"]["pairs"]) == ["image->audio", "audio->image"]
    assert report["retrieval"]["pairs"]["image->audio"]["ci"]["r@1"] is None  # no bootstrap rounds


def test_mm_eval_reports_a_bad_flag_by_name(contrastive_model_dir, tiny_csv, tmp_path, capsys):
    code = main(["--model", str(contrastive_model_dir), "--data", str(tiny_csv), "--output_dir", str(tmp_path),
                 "--zero_shot_columns", "size", "--skip_efficiency", "--num_workers", "0"])
    assert code == 2
    assert "mm-eval: error: zero_shot_columns: 'size' is not a column" in capsys.readouterr().err
