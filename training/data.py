"""Training data: load a table of text / image / audio / label with `datasets`, check every row once, and turn
batches of rows into model inputs through the processor (in DataLoader workers).

Sources (`load_table`):
- a CSV, JSON, JSONL or Parquet file (columns named by `DataSettings`; image/audio cells are paths, relative to the
  file's folder or absolute, or raw bytes; any of them may be empty for a row);
- an `imagefolder`/`audiofolder`-style folder: one sub-folder per label holding image and/or audio files, with an
  optional `metadata.csv` (`file_name` plus more columns, e.g. text) as in `datasets`;
- a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`;
- otherwise a Hub data set name (`datasets.load_dataset(name)`).

Decoding always goes through `processors.media` (via the processor), so its limits and errors apply to training
data exactly as to user input. Image/Audio features of a loaded data set are cast to `decode=False`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import yaml

from modeling_mm.configuration_mm import PROBLEM_TYPES, normalised_tasks
from processors import MMFusionProcessor

logger = logging.getLogger(__name__)

TABLE_FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".mp3"}
SPLIT_NAMES = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
               "dev": "validation", "test": "test"}


# what mm-train can train: a head on the fused vector (classification, regression, multi-label, several tasks), or
# a joint embedding space of the modalities (MMFusionContrastiveModel; rows need no label)
TASK_FAMILIES = ("classification", "contrastive", "generation")
CONTRASTIVE = "contrastive"
GENERATION = "generation"


@dataclass
class DataSettings:
    train_data: str | None = field(default=None, metadata={
        "help": "Training data: a CSV/JSON/JSONL/Parquet file, an imagefolder/audiofolder-style folder, a folder saved "
                "with save_to_disk (may hold train/validation/test splits), or a Hub data set name. Default: the "
                "built-in sample."})
    validation_data: str | None = field(default=None, metadata={
        "help": "Validation data in the same forms. Default: the source's validation split, else validation_split "
                "of the training data."})
    test_data: str | None = field(default=None, metadata={"help": "Test data, evaluated once after training."})
    text_column: str = field(default="text", metadata={"help": "Column with the text (may be empty per row)."})
    image_column: str = field(default="image", metadata={"help": "Column with image paths or bytes."})
    audio_column: str = field(default="audio", metadata={"help": "Column with audio paths or bytes."})
    label_column: str = field(default="label", metadata={"help": "Column with the label (name or integer)."})
    problem_type: str = field(default="single_label_classification", metadata={
        "help": "What the label column holds: single_label_classification (one class per row; digit strings such as "
                "'0'..'9' are class names too), multi_label_classification (a list of tags per row: JSON/Parquet lists, "
                "or strings split at --label_separator) or regression (numbers; standardised for training, predicted in "
                "the original units). Short forms: single, multi, regression."})
    label_separator: str = field(default="|", metadata={
        "help": "For multi-label string cells (CSV): the separator between tags, e.g. 'a|b'."})
    tasks: list[str] | None = field(default=None, metadata={
        "help": "Multi-task training: one spec per task, 'column:problem_type[:loss_weight]' (e.g. "
                "'severity:regression:0.5 findings:multi diagnosis:single'), or one YAML/JSON file holding a list of "
                "{name, column, problem_type, loss_weight, label_separator}. Replaces label_column/problem_type. A row "
                "may lack some tasks' targets: they are masked out of those tasks' losses."})
    task: str = field(default="classification", metadata={
        "help": "What to train: classification (a head on the fused vector for the label column or --tasks: "
                "single-label, multi-label, regression, several tasks), contrastive (a joint embedding space, "
                "MMFusionContrastiveModel: no label column; each row needs at least two of text, image and audio, "
                "and the row's modalities are pulled together against the batch's other rows) or generation (text "
                "from a decoder LM conditioned on the fused inputs, MMFusionForConditionalGeneration: --target_column "
                "and optionally --prompt_column)."})
    target_column: str | None = field(default=None, metadata={
        "help": "generation: the column of the text to generate (an answer, a caption); required with --task "
                "generation."})
    prompt_column: str | None = field(default=None, metadata={
        "help": "generation: the column of each row's prompt or question (may be empty per row). A cell holding a JSON "
                "list of {role, content} messages is a dialogue history, rendered by the decoder tokenizer's chat "
                "template."})
    group_column: str | None = field(default=None, metadata={
        "help": "generation: the test report scores the generated text per value of this column too (e.g. the kind "
                "of question), with and without each modality."})
    positive_columns: list[str] | None = field(default=None, metadata={
        "help": "contrastive: rows equal in all of these columns are the same item (positives of each other) in the "
                "retrieval metrics of validation and the test report, e.g. 'colour shape pitch'. Rows with the same "
                "caption, image file or audio file always are."})
    zero_shot_columns: list[str] | None = field(default=None, metadata={
        "help": "contrastive: the test report's zero-shot classification: for each column, its values are the "
                "classes, scored against text prompts made with --prompt_template (images and audio)."})
    prompt_template: str = field(default="a photo of {}", metadata={
        "help": "contrastive: the zero-shot prompt of a class name ('{}' stands for it)."})
    sample: str = field(default="classification", metadata={
        "help": "Without train_data, which recipe of the built-in sample to train: classification (match / mismatch, "
                "the main job), multitask (shape from the image, pitch in Hz from the audio, the caption's colours "
                "from the text and match from all three, as one multi-task model) or retrieval (a joint embedding of "
                "the aligned sample, trained on image-text and audio-text pairs only, so that image<->audio retrieval "
                "is emergent, as in ImageBind)."})
    validation_split: float = field(default=0.1, metadata={
        "help": "Fraction of the training data held out for validation when no validation data is given."})
    strict: bool = field(default=False, metadata={
        "help": "Fail on the first bad row (missing/corrupt file, missing label) instead of skipping it with a "
                "warning."})
    num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes that run the processor."})


# ---- loading -------------------------------------------------------------------------------------------------------

def load_table(source: str, media_columns: Sequence[str] = ("image", "audio")) -> datasets.DatasetDict:
    """Load `source` as a DatasetDict of its splits (see the module docstring for the forms it takes); relative
    paths in `media_columns` of a table file are resolved against the file's folder."""
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in TABLE_FORMATS:
            raise ValueError(f"data: {source!r} has suffix {suffix!r}; supported are {sorted(TABLE_FORMATS)}")
        table = datasets.load_dataset(TABLE_FORMATS[suffix], data_files={"train": str(path)})
        return _resolve_relative_paths(table, path.parent, media_columns)
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists():
            loaded = datasets.load_from_disk(str(path))
            table = loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
        else:
            table = _load_folder(path)
        return datasets.DatasetDict({SPLIT_NAMES.get(name, name): split for name, split in table.items()})
    if path.suffix.lower() in TABLE_FORMATS or "/" in source and path.parent.exists():
        raise ValueError(f"data: {source!r} does not exist")
    return datasets.load_dataset(source)  # a Hub data set


def _load_folder(root: Path) -> datasets.DatasetDict:
    """imagefolder/audiofolder layout: `root/[split/]label/file`, media matched to rows by file stem, so an image
    and a clip with the same stem in one label folder form one row; `metadata.csv` adds columns by `file_name`."""
    split_dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and d.name in SPLIT_NAMES]
    splits = {SPLIT_NAMES[d.name]: d for d in split_dirs} or {"train": root}
    result = {}
    for split, folder in splits.items():
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for label_dir in sorted(d for d in folder.iterdir() if d.is_dir()):
            for file in sorted(label_dir.iterdir()):
                kind = "image" if file.suffix.lower() in IMAGE_SUFFIXES else "audio" if file.suffix.lower() in AUDIO_SUFFIXES else None
                if kind is None:
                    continue
                row = rows.setdefault((label_dir.name, file.stem), {"label": label_dir.name, "image": None,
                                                                    "audio": None, "file_name": f"{label_dir.name}/{file.name}"})
                row[kind] = str(file)
        if not rows:
            raise ValueError(f"data: folder {folder} has no label sub-folders with image or audio files")
        table = datasets.Dataset.from_list(list(rows.values()))
        metadata = folder / "metadata.csv"
        if metadata.exists():
            extra = datasets.load_dataset("csv", data_files=str(metadata))["train"].to_pandas().set_index("file_name")
            frame = table.to_pandas()
            for column in extra.columns:
                frame[column] = frame["file_name"].map(extra[column])
            table = datasets.Dataset.from_pandas(frame, preserve_index=False)
        result[split] = table
    return datasets.DatasetDict(result)


def _resolve_relative_paths(table: datasets.DatasetDict, base: Path,
                            media_columns: Sequence[str]) -> datasets.DatasetDict:
    def resolve(row):
        for column in media_columns:
            value = row.get(column)
            if isinstance(value, str) and value.strip() and not Path(value).is_absolute():
                row[column] = str(base / value)
        return row

    return table.map(resolve, desc="resolving file paths")


# ---- targets: one definition per problem type, for training and evaluation alike ------------------------------------

PROBLEM_TYPE_SHORT_NAMES = {"single": PROBLEM_TYPES[0], "multi": PROBLEM_TYPES[1], "regression": PROBLEM_TYPES[2],
                            **{name: name for name in PROBLEM_TYPES}}


def problem_type_named(value: str, field_name: str = "problem_type") -> str:
    """The full problem type for `value` (a full name or a short form); `ValueError` naming `field_name`."""
    if value not in PROBLEM_TYPE_SHORT_NAMES:
        raise ValueError(f"{field_name}: {value!r} is not one of {sorted(PROBLEM_TYPE_SHORT_NAMES)}")
    return PROBLEM_TYPE_SHORT_NAMES[value]


def is_missing(value: Any) -> bool:
    """An empty target cell: None, NaN, or a blank string (an empty list is a real multi-label target: no tag)."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and not value.strip()


def tags(value: Any, separator: str | None) -> list[str]:
    """A multi-label cell as its tags: a list/tuple/array as is, a string split at `separator` (blank parts dropped)."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return [str(v).strip() for v in value if not is_missing(v)]
    if separator:
        return [part.strip() for part in str(value).split(separator) if part.strip()]
    return [str(value).strip()]


def encode_targets(values: Sequence[Any], task: dict[str, Any]) -> torch.Tensor:
    """A column of target cells as a task's targets (`MMFusionConfig.tasks` layout): class ids `(rows,)` long with
    -100 where a cell is empty (single-label); 0/1 `(rows, labels)` float with a NaN row where a cell is empty
    (multi-label; an empty list is a row of zeros); values `(rows,)` float with NaN where empty (regression).
    Raises `ValueError` naming the task's column for a class it does not know or a value that is not a number."""
    column = task.get("column") or task["name"]
    problem_type = task["problem_type"]
    if problem_type == "regression":
        result = []
        for value in values:
            if is_missing(value):
                result.append(math.nan)
                continue
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{column}: {value!r} is not a number (a regression target)") from None
            if not math.isfinite(number):
                raise ValueError(f"{column}: {value!r} is not a finite number (a regression target)")
            result.append(number)
        return torch.tensor(result, dtype=torch.float32)
    ids = {name: i for i, name in enumerate(task["labels"])}
    if problem_type == "multi_label_classification":
        encoded = torch.zeros(len(values), len(ids))
        for row, value in enumerate(values):
            if is_missing(value):
                encoded[row] = math.nan
                continue
            for tag in tags(value, task.get("label_separator")):
                if tag not in ids:
                    raise ValueError(f"{column}: tag {tag!r} is not one of the training tags {list(ids)}")
                encoded[row, ids[tag]] = 1.0
        return encoded
    result = []
    for value in values:
        if is_missing(value):
            result.append(-100)
            continue
        key = str(value).strip()
        if key not in ids:
            raise ValueError(f"{column}: label {value!r} is not one of the training labels {list(ids)}")
        result.append(ids[key])
    return torch.tensor(result, dtype=torch.long)


def has_target(targets: np.ndarray | torch.Tensor, problem_type: str) -> np.ndarray:
    """Which rows of `encode_targets`' output hold a target: not -100 (a class id), not a NaN row (otherwise)."""
    targets = targets.numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets)
    if problem_type == PROBLEM_TYPES[0]:
        return targets != -100
    return ~np.isnan(targets.astype(np.float64)).reshape(len(targets), -1).all(1)


def task_specs(settings: DataSettings) -> list[dict[str, Any]]:
    """The tasks `settings` asks for, before the data fills in their labels and scales: from `tasks` (specs or a
    YAML/JSON file) or else the one task of `label_column`/`problem_type`. Raises `ValueError` naming `tasks`."""
    if not settings.tasks:
        return [{"name": "label", "column": settings.label_column,
                 "problem_type": problem_type_named(settings.problem_type),
                 "label_separator": settings.label_separator}]
    entries: list[Any] = list(settings.tasks) if isinstance(settings.tasks, (list, tuple)) else [settings.tasks]
    if len(entries) == 1 and isinstance(entries[0], str) and entries[0].endswith((".yaml", ".yml", ".json")):
        path = Path(entries[0])
        if not path.is_file():
            raise ValueError(f"tasks: {entries[0]!r} does not exist")
        text = path.read_text(encoding="utf-8")
        entries = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        if not isinstance(entries, list):
            raise ValueError(f"tasks: {path} must hold a list of tasks, got {type(entries).__name__}")
    specs = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            parts = entry.split(":")
            if len(parts) not in (2, 3) or not parts[0]:
                raise ValueError(f"tasks[{i}]: {entry!r} is not 'column:problem_type[:loss_weight]'")
            entry = {"column": parts[0], "problem_type": parts[1]}
            if len(parts) == 3:
                try:
                    entry["loss_weight"] = float(parts[2])
                except ValueError:
                    raise ValueError(f"tasks[{i}]: loss weight {parts[2]!r} is not a number") from None
        if not isinstance(entry, dict) or not entry.get("column") and not entry.get("name"):
            raise ValueError(f"tasks[{i}]: need a column (and a problem_type), got {entry!r}")
        entry = dict(entry)
        entry.setdefault("column", entry.get("name"))
        entry.setdefault("name", entry["column"])
        entry["problem_type"] = problem_type_named(entry.get("problem_type", ""), f"tasks[{i}].problem_type")
        if entry["problem_type"] == "multi_label_classification":
            entry.setdefault("label_separator", settings.label_separator)
        if any(spec["name"] == entry["name"] for spec in specs):
            raise ValueError(f"tasks[{i}].name: {entry['name']!r} is used by two tasks (name one with a dict's 'name')")
        specs.append(entry)
    return specs


def resolve_tasks(train: datasets.Dataset, specs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """`specs` completed from the training split, in `MMFusionConfig.tasks` layout: the sorted class names (digit
    strings are names too, sorted by value) or tags of a classification task, the mean and std of a regression
    task's targets. Raises `ValueError` naming the column when it is missing, has too few classes, or a regression
    target is constant or not a number."""
    tasks = []
    for spec in specs:
        column = spec["column"]
        if column not in train.column_names:
            raise ValueError(f"{'label_column' if spec['name'] == 'label' else 'tasks'}: {column!r} is not a column of "
                             f"the training data (columns: {train.column_names})")
        values = [v for v in train[column] if not is_missing(v)]
        task = {key: value for key, value in spec.items() if key != "labels"}
        feature = train.features[column]
        if spec["problem_type"] == "regression":
            targets = encode_targets(values, {**task, "labels": None}).double().numpy()
            if len(targets) < 2 or float(np.std(targets)) == 0.0:
                raise ValueError(f"{column}: a regression target needs >= 2 different values in the training data")
            task.update(target_mean=float(targets.mean()), target_std=float(targets.std()))
        elif spec["problem_type"] == "multi_label_classification":
            task["labels"] = sorted({tag for value in values for tag in tags(value, spec.get("label_separator"))})
            if not task["labels"]:
                raise ValueError(f"{column}: the training data has no tags")
        else:
            if isinstance(feature, datasets.ClassLabel):
                task["labels"] = list(feature.names)
            else:
                names = {str(v).strip() for v in values}
                task["labels"] = sorted(names, key=lambda v: (len(v), v) if v.lstrip("-").isdigit() else (0, v))
            if len(task["labels"]) < 2:
                raise ValueError(f"{'label_column' if spec['name'] == 'label' else column}: the training data has "
                                 f"{len(task['labels'])} distinct label(s); need >= 2")
        tasks.append(task)
    return normalised_tasks(tasks)


def prepare_splits(settings: DataSettings, seed: int) -> tuple[datasets.DatasetDict, list[dict[str, Any]]]:
    """Train/validation/(test) splits with media columns undecoded, and the tasks (`resolve_tasks`: label names,
    regression scales) from the training split. Splits the training data when no validation data exists."""
    media_columns = (settings.image_column, settings.audio_column)
    table = load_table(settings.train_data, media_columns)
    if "train" not in table:
        raise ValueError(f"train_data: {settings.train_data!r} has no train split (it has {list(table)})")
    splits = {"train": table["train"]}
    if settings.validation_data:
        splits["validation"] = load_table(settings.validation_data, media_columns)["train"]
    elif "validation" in table:
        splits["validation"] = table["validation"]
    elif settings.validation_split > 0:
        held_out = table["train"].train_test_split(test_size=settings.validation_split, seed=seed)
        splits["train"], splits["validation"] = held_out["train"], held_out["test"]
    if settings.test_data:
        splits["test"] = load_table(settings.test_data, media_columns)["train"]
    elif "test" in table:
        splits["test"] = table["test"]
    splits = {name: _undecoded(split, settings) for name, split in splits.items()}
    if settings.task in (CONTRASTIVE, GENERATION):  # no heads: pairs of modalities, or texts to generate
        for column in [settings.target_column, settings.prompt_column] if settings.task == GENERATION else []:
            if column is not None and column not in splits["train"].column_names:
                name = "target_column" if column == settings.target_column else "prompt_column"
                raise ValueError(f"{name}: {column!r} is not a column of the training data (it has "
                                 f"{', '.join(splits['train'].column_names)})")
        return datasets.DatasetDict(splits), []
    return datasets.DatasetDict(splits), resolve_tasks(splits["train"], task_specs(settings))


def _undecoded(split: datasets.Dataset, settings: DataSettings) -> datasets.Dataset:
    for column, feature in split.features.items():
        if isinstance(feature, datasets.Image):
            split = split.cast_column(column, datasets.Image(decode=False))
        elif isinstance(feature, datasets.Audio):
            split = split.cast_column(column, datasets.Audio(decode=False))
    return split


# ---- rows -> model inputs -------------------------------------------------------------------------------------------

def _media(value: Any) -> Any:
    """A cell of an image/audio column as the processor takes it: a path, bytes, or None when empty."""
    if isinstance(value, dict):  # an undecoded datasets Image/Audio cell
        value = value.get("bytes") or value.get("path")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return value


def _text(value: Any) -> str | None:
    return None if value is None or (isinstance(value, str) and not value.strip()) else str(value)


def prompt_of(cell: Any) -> str | list[dict[str, str]] | None:
    """A prompt cell as the processor takes it: None when empty, a dialogue history (a list of {role, content}
    messages, from a JSON/Parquet list or a CSV cell holding JSON) or the text itself. One definition for mm-train,
    mm-eval and the demo."""
    if cell is None or (isinstance(cell, float) and math.isnan(cell)):
        return None
    if isinstance(cell, (list, tuple)):
        return [dict(message) for message in cell]
    text = str(cell)
    if text.lstrip().startswith("[{"):
        try:
            messages = json.loads(text)
        except ValueError:
            return text
        if isinstance(messages, list) and all(isinstance(m, dict) for m in messages):
            return messages
    return text if text.strip() else None


class MMFusionCollator:
    """Turns a list of rows into a model batch with the processor. Picklable, so it runs in DataLoader workers.

    `restricted_to(modalities)` gives a collator that reads only those modalities' columns; rows that have none of
    them get zeros and `has_*` False there (their other modalities come from elsewhere, e.g. cached tower states)."""

    def __init__(self, processor: MMFusionProcessor, settings: DataSettings, tasks: Sequence[dict[str, Any] | str],
                 modalities: Sequence[str] | None = None, multi_task: bool | None = None):
        """`tasks` in `MMFusionConfig.tasks` layout (`prepare_splits` gives them), or just the label names of one
        single-label task read from `settings.label_column`. Batches carry "labels": a dict by task name when
        `multi_task` (default: whether `settings.tasks` asks for multi-task training), else the one task's tensor
        (`encode_targets`)."""
        self.processor = processor
        self.settings = settings
        self.contrastive = settings.task == CONTRASTIVE
        self.generation = settings.task == GENERATION
        if self.contrastive or self.generation:
            tasks = []
        elif all(isinstance(task, str) for task in tasks):
            tasks = [{"name": "label", "column": settings.label_column, "problem_type": PROBLEM_TYPES[0],
                      "labels": list(tasks)}]
        self.tasks = [dict(task) for task in tasks]
        self.multi_task = bool(settings.tasks) if multi_task is None else multi_task
        available = {"vision": processor.image_processor is not None, "text": processor.tokenizer is not None,
                     "audio": processor.feature_extractor is not None}
        self.model_modalities = tuple(m for m, present in available.items() if present)
        self.only = None if modalities is None else tuple(m for m in modalities if m in self.model_modalities)

    def restricted_to(self, modalities: Sequence[str]) -> MMFusionCollator:
        return MMFusionCollator(self.processor, self.settings, self.tasks, modalities, self.multi_task)

    def targets(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Each task's targets for `rows` (`encode_targets`). Without multi-task training a row must have the
        label (`ValueError` naming the column); with it, a row must have at least one task's target."""
        result = {task["name"]: encode_targets([row.get(task["column"]) for row in rows], task) for task in self.tasks}
        for index, row in enumerate(rows):
            missing = [task["column"] for task in self.tasks if is_missing(row.get(task["column"]))]
            if not self.multi_task and missing:
                raise ValueError(f"{missing[0]}: the row has no label")
            if len(missing) == len(self.tasks):
                raise ValueError(f"tasks: the row has no target of any task (columns {missing})")
        return result

    def inputs(self, rows: Sequence[dict[str, Any]]) -> dict[str, list]:
        s = self.settings
        read = self.model_modalities if self.only is None else self.only
        inputs = {}
        if "text" in read:
            inputs["text"] = [_text(row.get(s.text_column)) for row in rows]
        if "vision" in read:
            inputs["images"] = [_media(row.get(s.image_column)) for row in rows]
        if "audio" in read:
            inputs["audio"] = [_media(row.get(s.audio_column)) for row in rows]
        # a modality column that is empty for the whole batch is left out, as the processor expects
        return {key: values for key, values in inputs.items() if any(v is not None for v in values)}

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        inputs = self.inputs(rows)
        if self.generation:  # the decoder's prompt and target come with the towers' inputs, from one processor call
            inputs.update(self.generation_inputs(rows))
        if self.only is None:
            batch = dict(self.processor(**inputs))
        else:
            batch = {}
            towers = {key: values for key, values in inputs.items() if key in ("text", "images", "audio")}
            present = [i for i in range(len(rows)) if any(values[i] is not None for values in towers.values())]
            if present:
                part = self.processor(**{key: [values[i] for i in present] for key, values in towers.items()})
                for key, value in part.items():
                    batch[key] = value.new_zeros((len(rows), *value.shape[1:])).index_put_(
                        (torch.tensor(present),), value)
            if self.generation:  # every row has a target, also those whose towers are all cached
                batch.update(self.processor.decoder_inputs(inputs["prompt"], inputs["target"]))
        if self.generation:  # the processor made the decoder's inputs and labels
            return batch
        if self.contrastive:
            if self.only is None:
                self._check_pairs(inputs, len(rows))
            # the contrastive model's loss needs no targets: the rows themselves are the pairs (as run_clip.py does)
            batch["return_loss"] = True
            return batch
        targets = self.targets(rows)
        batch["labels"] = targets if self.multi_task else targets[self.tasks[0]["name"]]
        return batch

    def generation_inputs(self, rows: Sequence[dict[str, Any]]) -> dict[str, list]:
        """The processor's `prompt` and `target` of `rows` (`prompt_of` each prompt cell). A row without a target is a
        `ValueError` naming the target column."""
        s = self.settings
        targets = [_text(row.get(s.target_column)) for row in rows]
        for index, target in enumerate(targets):
            if target is None:
                raise ValueError(f"{s.target_column}: row {index} has no target text")
        prompts = [prompt_of(row.get(s.prompt_column)) if s.prompt_column else None for row in rows]
        return {"prompt": prompts, "target": targets}

    def _check_pairs(self, inputs: dict[str, list], count: int) -> None:
        """A contrastive row needs two modalities: with one it has nothing to be pulled towards."""
        for index in range(count):
            present = [name for name, values in inputs.items() if values[index] is not None]
            if len(present) < 2:
                s = self.settings
                columns = {"text": s.text_column, "images": s.image_column, "audio": s.audio_column}
                has = " and ".join(columns[name] for name in present) or "nothing"
                raise ValueError(f"{s.text_column}, {s.image_column}, {s.audio_column}: a contrastive row needs at "
                                 f"least two of text, image and audio; row {index} has only {has}")


AUDIO_FRAMES_PER_SECOND = 50  # wav2vec2-family towers: one frame per 20 ms


def row_lengths(split: datasets.Dataset, collator: MMFusionCollator) -> list[int]:
    """What each row costs the towers, in tokens: its text's tokens plus its audio's frames (50 per second; read from
    the file header, nothing is decoded). Images cost the same for every row, so they do not count. For
    `--group_by_length`: batches of rows of similar length waste less compute on padding."""
    import io

    import soundfile

    s = collator.settings
    texts = [_text(t) for t in split[s.text_column]] if s.text_column in split.column_names else [None] * len(split)
    lengths = [0] * len(split)
    tokenizer = collator.processor.tokenizer
    if tokenizer is not None and any(t is not None for t in texts):
        encoded = tokenizer([t or "" for t in texts], add_special_tokens=True, truncation=True)["input_ids"]
        lengths = [len(ids) if t is not None else 0 for ids, t in zip(encoded, texts)]
    if collator.processor.feature_extractor is not None and s.audio_column in split.column_names:
        for index, cell in enumerate(split[s.audio_column]):
            source = _media(cell)
            if source is None:
                continue
            try:
                info = soundfile.info(io.BytesIO(source) if isinstance(source, bytes) else source)
                lengths[index] += int(info.frames / info.samplerate * AUDIO_FRAMES_PER_SECOND)
            except (RuntimeError, OSError, TypeError, ValueError):  # a format soundfile cannot read: length unknown
                pass
    return lengths


def find_bad_rows(split: datasets.Dataset, collator: MMFusionCollator, split_name: str,
                  strict: bool) -> list[tuple[int, str]]:
    """Check every row once (decode its media, map its label). Returns (row index, reason) for each bad row; with
    `strict`, raises ValueError naming the first. Done before training so that every process sees the same rows and
    a run never stops half-way on a bad file."""
    from tqdm.auto import tqdm

    bad = []
    for index in tqdm(range(len(split)), desc=f"checking {split_name} rows", leave=False):
        row = split[index]
        try:
            collator([row])
        except ValueError as error:
            reason = str(error)
            if strict:
                raise ValueError(f"{split_name} row {index}: {reason}") from None
            bad.append((index, reason))
    for index, reason in bad[:20]:
        logger.warning("skipping %s row %d: %s", split_name, index, reason)
    if len(bad) > 20:
        logger.warning("... and %d more bad %s rows", len(bad) - 20, split_name)
    return bad
