"""The built-in sample: deterministic real files, balanced labels, no single modality tells the label, and the
multi-task targets (shape, pitch_hz, caption_colours) are true to the media and the caption."""

from __future__ import annotations

import csv
import hashlib
import wave
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from training.sample_data import (
    COLOURS,
    COLUMNS,
    COMPLETE_MARKER,
    MULTITASK_TASKS,
    PITCH_WORDS,
    default_sample_dir,
    generate_sample,
    write_examples,
)

SPLITS = ("train", "validation", "test")


def read_split(root: Path, split: str) -> list[dict]:
    with open(root / f"{split}.csv", newline="") as file:
        return list(csv.DictReader(file))


def all_rows(root: Path) -> list[dict]:
    return [row for split in SPLITS for row in read_split(root, split)]


def folder_hashes(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    """Enough rows for label rates per attribute value to be measured to about +-0.03."""
    return generate_sample(tmp_path_factory.mktemp("sample") / "sample", rows=1200, seed=0)


def test_same_parameters_give_byte_identical_files(tmp_path):
    first = generate_sample(tmp_path / "a", rows=40, seed=3)
    second = generate_sample(tmp_path / "b", rows=40, seed=3)
    hashes = folder_hashes(first)
    assert len([name for name in hashes if name.endswith(".png")]) == 40
    assert len([name for name in hashes if name.endswith(".wav")]) == 40
    assert hashes == folder_hashes(second)
    assert folder_hashes(generate_sample(tmp_path / "c", rows=40, seed=4)) != hashes


def test_labels_are_balanced_in_every_split(sample):
    for split in SPLITS:
        counts = Counter(row["label"] for row in read_split(sample, split))
        assert abs(counts["match"] - counts["mismatch"]) <= 1, (split, counts)


def test_label_is_match_iff_the_caption_names_colour_shape_and_pitch(sample):
    for row in all_rows(sample):
        wrong = [key for key in ("colour", "shape", "pitch") if row[f"caption_{key}"] != row[key]]
        assert row["label"] == ("match" if not wrong else "mismatch"), row
        assert len(wrong) <= 1, row  # a mismatch perturbs exactly one attribute
        assert row["mismatch"] == (wrong[0] if wrong else "none"), row
        for key in ("colour", "shape", "pitch"):
            assert _caption_word(row, key) in row["text"].replace(",", " ").split(), row


def test_each_mismatch_kind_is_a_third_of_the_mismatches(sample):
    """So the best image+text accuracy is 5/6 (pitch mismatches are invisible to it), text+audio's 2/3."""
    rows = all_rows(sample)
    kinds = Counter(row["mismatch"] for row in rows if row["label"] == "mismatch")
    assert set(kinds) == {"colour", "shape", "pitch"}
    for count in kinds.values():
        assert abs(count / sum(kinds.values()) - 1 / 3) < 0.01, kinds
    undetectable_by_image_text = sum(row["mismatch"] == "pitch" for row in rows) / len(rows)
    undetectable_by_text_audio = sum(row["mismatch"] in ("colour", "shape") for row in rows) / len(rows)
    assert 1 - undetectable_by_image_text == pytest.approx(5 / 6, abs=0.01)
    assert 1 - undetectable_by_text_audio == pytest.approx(2 / 3, abs=0.01)


@pytest.mark.parametrize("column", ["colour", "shape", "pitch", "caption_colour", "caption_shape", "caption_pitch"])
def test_no_single_attribute_tells_the_label(sample, column):
    rows = all_rows(sample)
    values = Counter(row[column] for row in rows)
    assert len(values) == {"colour": 4, "shape": 3, "pitch": 2}[column.removeprefix("caption_")]
    for value in values:
        labels = [row["label"] for row in rows if row[column] == value]
        assert abs(labels.count("match") / len(labels) - 0.5) < 0.1, (column, value, len(labels))


def test_caption_template_does_not_tell_the_label(sample):
    rows = all_rows(sample)
    templates = Counter(_template(row) for row in rows)
    assert len(templates) >= 3
    for template in templates:
        labels = [row["label"] for row in rows if _template(row) == template]
        assert abs(labels.count("match") / len(labels) - 0.5) < 0.1, template


def _template(row: dict) -> str:
    text = row["text"]
    for key in ("colour", "shape", "pitch"):
        text = text.replace(_caption_word(row, key), "{" + key + "}")
    return text


def _caption_word(row: dict, key: str) -> str:
    """The word the caption uses for an attribute (pitches are named "deep"/"shrill", not "low"/"high")."""
    value = row[f"caption_{key}"]
    return PITCH_WORDS[value] if key == "pitch" else value


def test_split_sizes_and_no_row_in_two_splits(sample):
    sizes = {split: len(read_split(sample, split)) for split in SPLITS}
    assert sizes == {"train": 960, "validation": 120, "test": 120}
    files = [set(row["image"] for row in read_split(sample, split)) for split in SPLITS]
    assert not (files[0] & files[1] or files[0] & files[2] or files[1] & files[2])
    audio = [row["audio"] for row in all_rows(sample)]
    assert len(set(audio)) == len(audio) == 1200


def test_media_decode_with_the_requested_size_rate_and_duration(tmp_path, monkeypatch):
    root = generate_sample(tmp_path / "sample", rows=20, image_size=24, audio_seconds=0.5, sampling_rate=8000)
    monkeypatch.chdir(tmp_path.parent)  # paths in the CSV are relative to the CSV's folder, not the cwd
    for row in all_rows(root):
        assert not Path(row["image"]).is_absolute()
        with Image.open(root / row["image"]) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (24, 24)
            pixels = np.asarray(image)
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) >= 2  # a shape on a background
        samples, rate = soundfile.read(root / row["audio"])
        assert rate == 8000 and samples.shape == (4000,)
        assert np.isfinite(samples).all() and 0.2 < np.abs(samples).max() <= 1.0


@pytest.fixture(scope="module")
def small_sample(tmp_path_factory) -> Path:
    return generate_sample(tmp_path_factory.mktemp("small") / "sample", rows=60, seed=0)


def test_pitch_hz_lies_in_its_pitch_range_and_varies(small_sample):
    rows = all_rows(small_sample)
    ranges = {"low": (180.0, 300.0), "high": (660.0, 1000.0)}
    for row in rows:
        low, high = ranges[row["pitch"]]
        assert low <= float(row["pitch_hz"]) <= high, row
        assert round(float(row["pitch_hz"]), 1) == float(row["pitch_hz"]), row  # rounded to 0.1 Hz
    for pitch, (low, high) in ranges.items():
        values = [float(row["pitch_hz"]) for row in rows if row["pitch"] == pitch]
        # continuous, not a handful of values: nearly all distinct (0.1 Hz steps) and spread over most of the range
        assert len(values) >= 15 and len(set(values)) >= 0.9 * len(values), (pitch, values)
        assert max(values) - min(values) > 0.7 * (high - low), (pitch, min(values), max(values))


def test_tone_frequency_is_the_pitch_hz_in_the_metadata(small_sample):
    """The dominant FFT bin (1 Hz wide for the default 1 s tones) is pitch_hz within 2 Hz."""
    rows = all_rows(small_sample)
    chosen = [row for row in rows if row["pitch"] == "low"][:4] + [row for row in rows if row["pitch"] == "high"][:4]
    for row in chosen:
        with wave.open(str(small_sample / row["audio"])) as file:
            samples = np.frombuffer(file.readframes(file.getnframes()), dtype="<i2").astype(float)
            rate = file.getframerate()
        peak = np.fft.rfftfreq(len(samples), 1 / rate)[np.abs(np.fft.rfft(samples)).argmax()]
        assert abs(peak - float(row["pitch_hz"])) <= 2.0, row


def _colour_words(text: str) -> list[str]:
    """The colour words of a caption, in the order it names them."""
    return [word for word in text.replace(",", " ").split() if word in (*COLOURS, "grey")]


@pytest.mark.parametrize("fixture", ["small_sample", "sample"])
def test_caption_colours_are_the_colour_words_of_the_caption(request, fixture):
    rows = all_rows(request.getfixturevalue(fixture))
    for row in rows:
        assert row["caption_colours"] == "|".join(_colour_words(row["text"])), row
        assert row["caption_colours"].split("|")[0] == row["caption_colour"], row
    two = [row for row in rows if len(row["caption_colours"].split("|")) == 2]
    assert 0.2 <= len(two) / len(rows) <= 0.4, len(two)
    assert all(row["caption_colours"].split("|")[1] == "grey" for row in two)
    assert {len(row["caption_colours"].split("|")) for row in rows} == {1, 2}


def test_grey_is_never_the_mismatch_and_is_the_real_background(small_sample, sample):
    for row in all_rows(sample):
        assert "grey" not in (row["colour"], row["caption_colour"]), row
        assert row["mismatch"] in ("none", "colour", "shape", "pitch"), row
    grey_rows = [row for row in all_rows(sample) if "grey" in row["caption_colours"]]
    kinds = Counter(row["mismatch"] for row in grey_rows)
    assert set(kinds) == {"none", "colour", "shape", "pitch"}, kinds  # grey captions mismatch like any other
    assert abs(kinds["none"] / len(grey_rows) - 0.5) < 0.1, kinds
    for row in all_rows(small_sample):
        if "grey" in row["caption_colours"]:
            with Image.open(small_sample / row["image"]) as image:
                pixels = np.asarray(image).reshape(-1, 3).astype(int)
            grey = (pixels[:, 0] == pixels[:, 1]) & (pixels[:, 1] == pixels[:, 2]) & (pixels[:, 0] >= 200)
            assert grey.sum() >= 8, row  # the background pixels around the shape are a light grey


def test_multitask_tasks_name_columns_that_hold_their_targets(small_sample):
    assert [task["name"] for task in MULTITASK_TASKS] == ["shape", "pitch_hz", "caption_colours", "match"]
    assert MULTITASK_TASKS[2]["label_separator"] == "|"
    with open(small_sample / "train.csv", newline="") as file:
        header = next(csv.reader(file))
    assert tuple(header) == COLUMNS
    rows = all_rows(small_sample)
    for task in MULTITASK_TASKS:
        assert task["column"] in header and task["loss_weight"] == 1.0, task
        values = [row[task["column"]] for row in rows]
        if task["problem_type"] == "regression":
            assert np.isfinite([float(value) for value in values]).all()
        elif task["problem_type"] == "multi_label_classification":
            labels = {label for value in values for label in value.split(task["label_separator"])}
            assert labels == {*COLOURS, "grey"}, labels
        else:
            assert task["problem_type"] == "single_label_classification"
            assert len(set(values)) == {"shape": 3, "label": 2}[task["column"]], task


def test_write_examples_keeps_each_kind_and_the_four_columns(sample, tmp_path):
    folder = write_examples(sample, tmp_path / "examples", per_kind=2)
    with open(folder / "examples.csv", newline="") as file:
        reader = csv.DictReader(file)
        examples = list(reader)
    assert reader.fieldnames == ["text", "image", "audio", "label"]
    by_image = {row["image"]: row for row in read_split(sample, "test")}
    kinds = Counter(by_image[row["image"]]["mismatch"] for row in examples)
    assert kinds == {"none": 2, "colour": 2, "shape": 2, "pitch": 2}
    for row in examples:
        assert row["text"] == by_image[row["image"]]["text"] and row["label"] == by_image[row["image"]]["label"]
        assert (folder / row["image"]).read_bytes() == (sample / row["image"]).read_bytes()
        assert (folder / row["audio"]).read_bytes() == (sample / row["audio"]).read_bytes()


def test_existing_sample_is_reused_and_regenerated_when_parameters_change(tmp_path):
    root = generate_sample(tmp_path / "sample", rows=20, seed=0)
    marker = (root / COMPLETE_MARKER).stat().st_mtime_ns
    (root / "extra.txt").write_text("left alone by reuse")
    assert generate_sample(root, rows=20, seed=0) == root
    assert (root / COMPLETE_MARKER).stat().st_mtime_ns == marker and (root / "extra.txt").exists()

    generate_sample(root, rows=30, seed=0)
    assert sum(len(read_split(root, split)) for split in SPLITS) == 30
    assert not (root / "extra.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["sample"]  # no temporary or old folders left behind


def test_a_folder_without_marker_is_refused_and_an_empty_one_filled(tmp_path):
    root = tmp_path / "sample"
    generate_sample(root, rows=20)
    (root / COMPLETE_MARKER).unlink()  # as if something else had written there
    with pytest.raises(ValueError, match="root"):
        generate_sample(root, rows=20)
    assert (root / "train.csv").exists()  # never deleted

    empty = tmp_path / "empty"
    empty.mkdir()
    assert (generate_sample(empty, rows=20) / COMPLETE_MARKER).exists()


@pytest.mark.parametrize("argument, value", [("rows", 5), ("image_size", 8), ("audio_seconds", 0.0),
                                             ("sampling_rate", 2000)])
def test_out_of_range_parameters_are_refused(tmp_path, argument, value):
    with pytest.raises(ValueError, match=argument):
        generate_sample(tmp_path / "sample", **{argument: value})


def test_default_dir_follows_the_cache_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("MM_FUSION_CACHE", str(tmp_path))
    assert default_sample_dir() == tmp_path / "sample"
    monkeypatch.delenv("MM_FUSION_CACHE")
    assert default_sample_dir() == Path.home() / ".cache" / "mm-fusion" / "sample"
