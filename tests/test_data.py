"""training.data: every source form loads into the same rows; bad rows are found once, reported and skipped (or
refused with --strict); the collator turns rows into model batches."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from processors import MMFusionProcessor
from training.data import DataSettings, MMFusionCollator, find_bad_rows, load_table, prepare_splits


def write_media(folder: Path, count: int = 6) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        image, clip = folder / f"img{i}.png", folder / f"clip{i}.wav"
        Image.new("RGB", (32, 32), ("red", "blue")[i % 2]).save(image)
        sf.write(clip, (0.3 * np.sin(np.arange(8000) * (0.05 + 0.1 * (i % 2)))).astype(np.float32), 16_000)
        rows.append({"text": f"sample {i}", "image": image.name, "audio": clip.name, "label": ("red", "blue")[i % 2]})
    return rows


@pytest.fixture
def processor(vit_dir, bert_dir, wav2vec2_dir):
    return MMFusionProcessor.from_towers(vision=vit_dir, text=bert_dir, audio=wav2vec2_dir)


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl", ".parquet"])
def test_table_files_load_with_paths_relative_to_the_file(tmp_path, suffix):
    rows = write_media(tmp_path / "data")
    rows[0]["text"] = "see photo.png"  # text that looks like a file name stays text
    path = tmp_path / "data" / f"table{suffix}"
    frame = datasets.Dataset.from_list(rows)
    {".csv": frame.to_csv, ".json": lambda p: frame.to_json(p, lines=False), ".jsonl": frame.to_json,
     ".parquet": frame.to_parquet}[suffix](str(path))
    table = load_table(str(path))["train"]
    assert len(table) == 6
    assert Path(table[0]["image"]).is_absolute() and Path(table[0]["image"]).exists()
    assert Path(table[3]["audio"]) == tmp_path / "data" / "clip3.wav"
    assert table[0]["text"] == "see photo.png"


def test_imagefolder_style_folder_with_metadata(tmp_path):
    for label in ("cat", "dog"):
        (tmp_path / "train" / label).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16)).save(tmp_path / "train" / label / f"{i}.png")
            sf.write(tmp_path / "train" / label / f"{i}.wav", np.zeros(800, dtype=np.float32), 16_000)
    (tmp_path / "train" / "metadata.csv").write_text("file_name,text\ncat/0.png,a cat\ndog/1.png,a dog\n")
    table = load_table(str(tmp_path))
    assert list(table) == ["train"]
    rows = sorted(table["train"], key=lambda r: r["file_name"])
    assert [r["label"] for r in rows] == ["cat", "cat", "dog", "dog"]
    assert all(r["image"].endswith(".png") and r["audio"].endswith(".wav") for r in rows)
    assert rows[0]["text"] == "a cat" and rows[3]["text"] == "a dog" and rows[1]["text"] is None


def test_saved_dataset_folder_keeps_its_splits(tmp_path):
    rows = write_media(tmp_path / "media")
    for row in rows:
        row["image"] = str(tmp_path / "media" / row["image"])
    datasets.DatasetDict(train=datasets.Dataset.from_list(rows[:4]), test=datasets.Dataset.from_list(rows[4:])) \
        .save_to_disk(str(tmp_path / "saved"))
    table = load_table(str(tmp_path / "saved"))
    assert set(table) == {"train", "test"} and len(table["test"]) == 2


def test_splits_and_label_names(tmp_path):
    rows = write_media(tmp_path / "data", count=10)
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "data" / "all.csv"))
    splits, tasks = prepare_splits(DataSettings(train_data=str(tmp_path / "data" / "all.csv"),
                                                validation_split=0.2), seed=0)
    assert [(task["name"], task["problem_type"], task["labels"]) for task in tasks] == [
        ("label", "single_label_classification", ["blue", "red"])]
    assert len(splits["train"]) == 8 and len(splits["validation"]) == 2
    with pytest.raises(ValueError, match="label_column: 'target' is not a column"):
        prepare_splits(DataSettings(train_data=str(tmp_path / "data" / "all.csv"), label_column="target"), seed=0)
    with pytest.raises(ValueError, match="does not exist"):
        load_table(str(tmp_path / "missing.csv"))


def test_bad_rows_are_reported_and_skipped_or_refused_with_strict(tmp_path, processor):
    rows = write_media(tmp_path / "data")
    (tmp_path / "data" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    rows[1]["image"] = "missing.png"
    rows[2]["image"] = "corrupt.png"
    rows[4]["label"] = ""
    rows[5].update(text="", image="", audio="")  # nothing at all
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "data" / "bad.csv"))
    settings = DataSettings(train_data=str(tmp_path / "data" / "bad.csv"), validation_split=0)
    splits, labels = prepare_splits(settings, seed=0)
    collator = MMFusionCollator(processor, settings, labels)
    bad = find_bad_rows(splits["train"], collator, "train", strict=False)
    assert [index for index, _ in bad] == [1, 2, 4, 5]
    assert "images[0]" in bad[0][1] and "missing.png" in bad[0][1]
    assert "label" in bad[2][1]
    with pytest.raises(ValueError, match=r"^train row 1: images\[0\]"):
        find_bad_rows(splits["train"], collator, "train", strict=True)


def test_collator_makes_a_model_batch_with_labels_and_absent_modalities(tmp_path, processor):
    rows = write_media(tmp_path / "data", count=3)
    for row in rows:
        row["image"], row["audio"] = str(tmp_path / "data" / row["image"]), str(tmp_path / "data" / row["audio"])
    rows[1]["audio"] = None
    rows[2]["text"] = "  "
    collator = MMFusionCollator(processor, DataSettings(), ["blue", "red"])
    batch = collator(rows)
    assert batch["labels"].tolist() == [1, 0, 1]
    assert batch["has_audio"].tolist() == [True, False, True]
    assert batch["has_text"].tolist() == [True, True, False]
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    text_only = collator([{"text": "only words", "label": "red"}])
    assert set(text_only) >= {"input_ids", "labels"} and "pixel_values" not in text_only
