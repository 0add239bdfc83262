"""`mm-demo`: a Gradio web app for any mm-fusion classifier, multi-task, joint embedding or generation model.

    mm-demo                                         # the README's sample model (outputs/sample/model)
    mm-demo --model outputs/my-run/model            # a folder written by mm-train (merged model or peft adapter)
    mm-demo --model user/repo --trust_remote_code   # a Hub model that carries its own code
    mm-demo --model outputs/clip/model --index outputs/clip/index   # a joint embedding model: search an index
    mm-demo --model outputs/vqa/model               # a generation model: chat about an image and a sound
    python demo/app.py ...                          # the same, from a checkout without installing

The page shows one input per modality the model has (image: upload, webcam, clipboard; text; audio: upload,
microphone), every one optional, and answers, for each task of the model (a classifier has one), with its output and
a chart of what each given input added to it, then the latency. The output follows the task's problem type: the
labels' probabilities (single-label), the tags whose probability reaches their threshold, with their probabilities
(multi-label; thresholds tuned on validation by mm-eval, read from `<model>/evaluation/report.json`, else the
config's, else 0.5), or the number in the targets' units (regression). What an input added is its exact Shapley value
over every subset of the sample's given inputs (each subset scored with the others withheld through the `has_*`
masks): on the log-odds of the predicted label (single-label) or of each tag (multi-label), in the output's units
(regression); the values sum to the output with every given input minus the output with none (the prior).

A joint embedding model (mm-train --task contrastive) has a Search tab instead: the query is a text, an image or an
audio clip (upload or microphone); the answer is the top-k items of an index (`mm-index build`, given with `--index`;
without one, an index of the examples folder's rows built on start), those whose embeddings of the ticked modalities
are nearest to the query's: a gallery of their images captioned "score · text", audio players, the texts with their
scores, and a table (rank, score, modality, id, text). The results' media are served from copies in the upload folder.

A generation model (mm-train --task generation) has a Chat tab instead. What the answers are about, the fusion's
inputs, sits in a Conditioning panel: an image, an audio clip (upload or microphone) and a context text (e.g. a
caption), of the inputs the model has, at least one. An image or clip attached to a chat message replaces the panel's
and stays there for the following turns until replaced or cleared. The conversation is the decoder's prompt: the
earlier turns and the latest message as a dialogue history, the oldest turns left out when it outgrows the decoder.
The answer streams into the chat; max new tokens and sampling (temperature) are set beside it.

Requests are queued (bounded, with a concurrency limit) and run in batches; each request of a batch is decoded and
checked on its own (`processors.media` limits), so a bad file gives that request a readable error and leaves the
others, and the server, alone. Uploads live in a temporary folder that is swept while the server runs
(`--delete_cache`) and removed when it stops. The server binds to 127.0.0.1 unless `--host` (or
GRADIO_SERVER_NAME) says otherwise, refuses uploads over `--max_file_size`, and serves no files besides the
uploads, its copies of the examples and of search results (no `allowed_paths`).

As a Hugging Face Space: set the Space's `app_file` to `demo/app.py` and the variable `MM_FUSION_MODEL` to a model
folder in the Space or a Hub id (`MM_FUSION_TRUST_REMOTE_CODE=1` to run a Hub model's own code,
`MM_FUSION_EXAMPLES` for an examples folder, `MM_FUSION_INDEX` for a joint embedding model's index folder). Spaces set
GRADIO_SERVER_NAME=0.0.0.0 themselves.
"""

from __future__ import annotations

import argparse
import html
import itertools
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if not __package__:
    # `python demo/app.py` (how Spaces start an app) puts demo/ first on sys.path, not the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import PIL.Image
import torch

import gradio as gr
from gradio.utils import get_upload_folder
from transformers import StoppingCriteria, StoppingCriteriaList
from modeling_mm.configuration_mm import MODALITY_NAMES
from modeling_mm.pipeline_mm import DEFAULT_THRESHOLD, task_thresholds
from processors.media import MediaLimits, load_audio, load_image
from training.embeddings import contrastive_model
from training.interpretability import shapley_values, task_subset_values
from training.scoring import (MULTI_LABEL, REGRESSION, SINGLE_LABEL, Task, classifier, encode_towers, forward_kept,
                              presence, scores, tasks_of)

logger = logging.getLogger("mm_fusion.demo")

DEFAULT_MODEL = "outputs/sample/model"  # what the README's main job writes
EXAMPLES_FILE = "examples.csv"
MAX_EXAMPLES = 12
MAX_TEXT_CHARACTERS = 10_000
"""Longer text is refused before tokenizing: the tokenizer would read all of it only to truncate."""
MAX_DESCRIPTION_CHARACTERS = 400
# the model config names the vision modality "vision"; the page and the per-sample view call its input "image"
INPUT_NAMES = {modality: names.user for modality, names in MODALITY_NAMES.items()}
IMAGE_INPUT_HEIGHT = 300
"""Pixels: without a fixed height, Gradio 6 shrinks the image input to a thin strip once an example fills it."""
OUTPUT_DECIMALS = 4
"""A regression output is shown rounded to this many decimals."""
NO_TAGS = "no tag reaches its threshold"
PAGE_CSS = "#mm-image img, #mm-search-image img, #mm-chat-image img { object-fit: contain; }"
"""Gradio shows an image with `object-fit: scale-down`, which never enlarges: a 32-pixel sample image stayed a
32-pixel thumbnail in the input. `contain` scales it to the input's height (larger images still shrink to fit).
Passed to `launch()` (Gradio 6 takes CSS there only); a host that launches `demo` itself passes `css=PAGE_CSS`."""


# ---- the model -------------------------------------------------------------------------------------------------------


def load_model(model_path: str, trust_remote_code: bool = False, device: str | None = None):
    """Load an mm-fusion model with task heads (a classifier, or a multi-task model), a joint embedding model
    (`MMFusionContrastiveModel`, `config.is_contrastive`) or a generation model (`MMFusionForConditionalGeneration`,
    `config.decoder_config`) and its processor for inference: `model_path` is a folder
    written by mm-train (a merged model, or a peft adapter folder, which is merged here) or a Hub id. The model goes
    to `device` (default: CUDA when available, else CPU), in eval mode, in bf16 on a GPU that supports it.

    `trust_remote_code` runs the code a Hub model carries (its `auto_map`); without it the classes come from this
    package. Returns `(model, processor)`. Raises `ValueError` for a missing folder, a model that is not mm-fusion,
    a model with neither task heads nor embedding projections nor a decoder, and a generation model whose processor
    has no decoder tokenizer.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoProcessor

    # a Hub id is "name" or "owner/name"; anything else is a folder, and a missing one deserves a plain message
    if not Path(model_path).exists() and (model_path.startswith((".", "/", "~")) or model_path.count("/") > 1):
        hint = " (run ./run.sh to train the sample model)" if model_path == DEFAULT_MODEL else ""
        raise ValueError(f"model: no folder {model_path!r}{hint}; pass --model with a model folder or Hub id")
    if not trust_remote_code:
        import modeling_mm  # noqa: F401  (registers mm_fusion with the Auto classes)
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if getattr(config, "model_type", None) != "mm_fusion":
        raise ValueError(f"model: {model_path!r} is a {config.model_type!r} model, not an mm-fusion model")
    is_contrastive = bool(getattr(config, "is_contrastive", False))
    is_generation = is_generation_config(config)
    if (Path(model_path) / "adapter_config.json").exists():
        from training.lora import load_trained_model

        model = load_trained_model(model_path).merge_and_unload()
    elif getattr(config, "tasks", None) or is_contrastive or is_generation:
        # a multi-task, contrastive or generation folder's auto_map names its class under AutoModel, but this package
        # registers AutoModel for several classes, and transformers prefers a registered class to remote code: name
        # the class
        if trust_remote_code:
            from transformers.dynamic_module_utils import get_class_from_dynamic_module

            model_class = get_class_from_dynamic_module(config.auto_map["AutoModel"], model_path)
            model = model_class.from_pretrained(model_path)
        else:
            import modeling_mm

            model_class = (modeling_mm.MMFusionForConditionalGeneration if is_generation else
                           modeling_mm.MMFusionContrastiveModel if is_contrastive else modeling_mm.MMFusionForMultiTask)
            model = model_class.from_pretrained(model_path)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if is_generation:
        if not hasattr(model, "decoder"):
            raise ValueError(f"model: {model_path!r} has a decoder_config but loaded as {type(model).__name__}, "
                             "without a decoder")
        if getattr(processor, "decoder_tokenizer", None) is None:
            raise ValueError(f"model: {model_path!r} is a generation model but its processor has no decoder_tokenizer "
                             "to write its prompts and read its answers")
    elif is_contrastive:
        contrastive_model(model)  # refuses a model without the embedding projections
    else:
        if getattr(config, "tasks", None) and not hasattr(classifier(model), "heads"):
            raise ValueError(f"model: {model_path!r} is a multi-task model but loaded as {type(model).__name__}")
        classifier(model)  # refuses a model without task heads
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # Loading straight into bf16 can leave composite towers in float32 (DESIGN.md); casting after loading cannot
    dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    return model.to(device=device, dtype=dtype).eval(), processor


def is_generation_config(config) -> bool:
    """Whether `config` is a generation model's (`MMFusionForConditionalGeneration`): it has a decoder LM's config."""
    return getattr(config, "decoder_config", None) is not None


def decision_thresholds(model, report_path: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Per multi-label task of `model` (by task name), its decision thresholds, one per label in label order: those
    mm-eval tuned on validation, from the report.json at `report_path` (`report["tasks"][name]["metrics"]
    ["thresholds"]` for a multi-task model, `report["metrics"]["thresholds"]` for a classifier, {label: value}); else
    those the task carries in the config (`pipeline_mm.task_thresholds`); else `DEFAULT_THRESHOLD`. A label the report
    leaves out keeps the fallback; a report that cannot be read is logged and ignored."""
    report: dict[str, Any] = {}
    if report_path is not None and Path(report_path).is_file():
        try:
            report = json.loads(Path(report_path).read_text())
        except (OSError, ValueError) as error:
            logger.warning("cannot read %s (%s); multi-label thresholds come from the config or are %s",
                           report_path, error, DEFAULT_THRESHOLD)
    config_tasks = {task["name"]: task for task in getattr(classifier(model).config, "tasks", None) or []}
    result = {}
    for task in tasks_of(model):
        if task.problem_type != MULTI_LABEL:
            continue
        fallback = (task_thresholds(config_tasks[task.name]) if task.name in config_tasks
                    else np.full(len(task.label_names), DEFAULT_THRESHOLD))
        section = (report.get("tasks") or {}).get(task.name) if config_tasks else report
        tuned = ((section or {}).get("metrics") or {}).get("thresholds") or {}
        result[task.name] = np.array([float(tuned.get(label, fallback[i])) for i, label in enumerate(task.label_names)])
    return result


@dataclass
class Sample:
    """One request's inputs, decoded and checked: an RGB image, text, a mono waveform at the model's rate."""

    image: PIL.Image.Image | None = None
    text: str | None = None
    audio: np.ndarray | None = None


def decode_sample(
    image: Any = None, text: str | None = None, audio: Any = None, *, sampling_rate: int = 16_000,
    limits: MediaLimits = MediaLimits(),
) -> Sample:
    """Decode one request's inputs through `processors.media`: `image` and `audio` are what Gradio sends (a file
    dict with a `path`, a path, PIL images and arrays of any mode, `(rate, int16 array)` microphone tuples of any
    rate and channel count) or None; empty or whitespace-only text counts as no text.

    Raises `ValueError` naming the input and the limit for anything `load_image`/`load_audio` refuse, for text over
    `MAX_TEXT_CHARACTERS` or not valid Unicode, and when no input is given at all.
    """
    text = _checked_text(text, "text")
    sample = Sample(
        image=None if image is None else load_image(image, limits, name="image"),
        text=text,
        audio=None if audio is None else load_audio(audio, sampling_rate, limits=limits, name="audio"),
    )
    if sample.image is None and sample.text is None and sample.audio is None:
        raise ValueError("no input: give an image, a text or an audio clip (any one of them is enough)")
    return sample


@torch.inference_mode()
def classify(model, processor, samples: list[Sample], thresholds: dict[str, np.ndarray] | None = None
             ) -> list[dict[str, dict[str, Any]] | Exception]:
    """Run `samples` through the model in one batch and say, per task, what each given input added.

    Returns, per sample, `{task name: answer}` for every task of `tasks_of(model)` (a classifier's one task is named
    "label"), where the answer is:

    - single-label: `{"probabilities": {label: p}, "predicted": label, "contributions": {input: value}}`, an input's
      value being its Shapley value on the log-odds of the predicted label;
    - multi-label: `{"probabilities": {label: p}, "thresholds": {label: t}, "tags": [labels with p >= t, most probable
      first], "contributions": {input: {label: value}}}` (Shapley values on each label's log-odds); `thresholds` per
      task name (see `decision_thresholds`), `DEFAULT_THRESHOLD` where not given;
    - regression: `{"values": {output name: value}, "contributions": {input: {output name: value}}}`, in the
      targets' units (Shapley values of the output; with no input the output is the training mean, or 0 where the
      model does not know it).

    Shapley values are exact, over every subset of the sample's given inputs ("image", "text", "audio"), each scored
    with the others withheld through the `has_*` masks (`training.interpretability.shapley_values`); the towers run
    once. Where the batch fails, each sample runs alone, so a failing sample returns its exception and the others
    a result.
    """
    if not samples:
        return []
    try:
        return _classify_batch(model, processor, samples, thresholds or {})
    except Exception as err:
        if len(samples) == 1:
            return [err]
        return [result for sample in samples for result in classify(model, processor, [sample], thresholds)]


def _classify_batch(model, processor, samples: list[Sample], thresholds: dict[str, np.ndarray]
                    ) -> list[dict[str, dict[str, Any]]]:
    config = classifier(model).config
    modalities = list(config.modalities)
    sampling_rate = processor.feature_extractor.sampling_rate if processor.feature_extractor is not None else None
    batch = processor(
        text=[s.text for s in samples] if processor.tokenizer is not None else None,
        images=[s.image for s in samples] if processor.image_processor is not None else None,
        audio=[s.audio for s in samples] if processor.feature_extractor is not None else None,
        sampling_rate=sampling_rate,
    )
    # the towers once, then the fusion under every subset of the model's modalities: a sample's output for a subset
    # of its own inputs is the output with that subset kept (what it lacks is withheld anyway)
    states = encode_towers(model, batch)
    subsets = [frozenset(keep) for size in range(len(modalities) + 1)
               for keep in itertools.combinations(modalities, size)]
    outputs = {subset: forward_kept(model, batch, sorted(subset), tower_states=states)[0].cpu().double().numpy()
               for subset in subsets}
    given = presence(batch)
    inputs = [[m for m in modalities if m in given and bool(given[m][index])] for index in range(len(samples))]

    results: list[dict[str, dict[str, Any]]] = [{} for _ in samples]
    for task in tasks_of(model):
        full = outputs[frozenset(modalities)][:, task.outputs]
        probabilities = scores(full, task.problem_type)
        reference = probabilities.argmax(1) if task.problem_type == SINGLE_LABEL else None
        # no input: the output a model that saw nothing gives, its training mean (0 where the model does not know it)
        values = task_subset_values(outputs, task, regression_prior=0.0)
        contributions = _shapley_per_sample(values, inputs)
        names = list(task.label_names)
        for index, result in enumerate(results):
            change = {MODALITY_NAMES[m].user: value for m, value in contributions[index].items()}
            if task.problem_type == SINGLE_LABEL:
                result[task.name] = {
                    "probabilities": dict(zip(names, map(float, probabilities[index]))),
                    "predicted": names[int(reference[index])],
                    "contributions": {name: float(value) for name, value in change.items()},
                }
            elif task.problem_type == MULTI_LABEL:
                limits = thresholds.get(task.name, np.full(len(names), DEFAULT_THRESHOLD))
                row = probabilities[index]
                result[task.name] = {
                    "probabilities": dict(zip(names, map(float, row))),
                    "thresholds": dict(zip(names, map(float, limits))),
                    "tags": [names[i] for i in np.argsort(-row, kind="stable") if row[i] >= limits[i]],
                    "contributions": {name: dict(zip(names, map(float, value))) for name, value in change.items()},
                }
            else:
                result[task.name] = {
                    "values": dict(zip(names, map(float, full[index]))),
                    "contributions": {name: dict(zip(names, map(float, value))) for name, value in change.items()},
                }
    return results


def _shapley_per_sample(values: dict[frozenset, np.ndarray], inputs: list[list[str]]) -> list[dict[str, np.ndarray]]:
    """Each sample's Shapley values over the subsets of its own inputs, `{modality: value}` in model order, from
    `values` {subset of the model's modalities: (samples, ...)}; samples with the same inputs are computed together."""
    per_sample: list[dict[str, np.ndarray]] = [{} for _ in inputs]
    for own in {tuple(modalities) for modalities in inputs}:
        rows = [index for index, modalities in enumerate(inputs) if tuple(modalities) == own]
        subsets = {frozenset(keep): values[frozenset(keep)][rows]
                   for size in range(len(own) + 1) for keep in itertools.combinations(own, size)}
        phi = shapley_values(subsets, own)
        for position, index in enumerate(rows):
            per_sample[index] = {m: phi[m][position] for m in own}
    return per_sample


# ---- the page --------------------------------------------------------------------------------------------------------


def describe_model(model_path: str, config) -> tuple[str, str]:
    """The header's model name and a short, link-free description: the model card's first paragraph (from
    `README.md` in a local folder, or the Hub card), else one written from the config."""
    folder = Path(model_path)
    # mm-train writes <output_dir>/model: the run's folder names it better than "model"
    name = (folder.parent.name if folder.name == "model" else folder.name) if folder.exists() else model_path
    text = ""
    try:
        from huggingface_hub import ModelCard

        if (folder / "README.md").is_file():
            card = ModelCard.load(folder / "README.md")
        elif not folder.exists():
            card = ModelCard.load(model_path)
        else:
            card = None
        if card is not None:
            name = card.data.to_dict().get("model_name") or name
            text = _first_paragraph(card.text)
    except Exception as err:  # offline, no card on the Hub, a malformed card: the config still describes the model
        logger.info("no model card for %s (%s); describing the model from its config", model_path, err)
    if not text:
        inputs = ", ".join(INPUT_NAMES[m] for m in config.modalities)
        if getattr(config, "is_contrastive", False):
            text = f"An mm-fusion joint embedding model that embeds {inputs} into one space, each on its own."
        elif is_generation_config(config):
            decoder = config.decoder_config.model_type
            text = (f"An mm-fusion generation model: a {decoder} decoder answers in words about the {inputs} it is "
                    "given, fused with cross-attention.")
        else:
            kind = (f"multi-task model ({', '.join(task['name'] for task in config.tasks)})"
                    if getattr(config, "tasks", None) else "classifier")
            text = f"An mm-fusion {kind} that reads {inputs} and fuses them with cross-attention."
    return name, text


def _first_paragraph(markdown: str) -> str:
    """The first prose paragraph of a card with links, images, HTML and URLs removed, cut at a word boundary."""
    for block in re.split(r"\n\s*\n", markdown):
        block = re.sub(r"<!--.*?-->|<[^>]+>", "", block, flags=re.S).strip()
        if not block or block.startswith(("#", "|", "```", "-", "*", ">")):
            continue
        block = re.sub(r"!\[[^\]]*\]\([^)]*\)", "", block)  # images
        block = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", block)  # links keep their text
        block = re.sub(r"\b(?:https?|ftp)://\S+|\bwww\.\S+", "", block)
        block = " ".join(block.replace("`", "").split())
        if len(block) > MAX_DESCRIPTION_CHARACTERS:
            block = block[:MAX_DESCRIPTION_CHARACTERS].rsplit(" ", 1)[0] + " ..."
        if block:
            return block
    return ""


def _escape_markdown(text: str) -> str:
    """Show `text` literally in gr.Markdown (labels, card text and error messages are not markup): escapes the
    characters that can start emphasis, code, links or HTML inside a line."""
    return re.sub(r"([\\`*_\[\]<>])", r"\\\1", text)


def load_examples(examples_dir: str | os.PathLike, modalities: tuple[str, ...],
                  limit: int | None = MAX_EXAMPLES) -> list[list[Any]]:
    """Rows of `<examples_dir>/examples.csv` (columns text, image, audio[, label]; file paths relative to the
    folder; empty cells allowed) as gr.Examples values, in the order of the page's inputs, for the model's
    modalities only. At most `limit` rows (None: all); rows left with no input for this model are skipped."""
    import csv

    folder = Path(examples_dir).resolve()
    rows = []
    with open(folder / EXAMPLES_FILE, newline="", encoding="utf-8") as file:
        for record in csv.DictReader(file):
            row = []
            for modality in modalities:
                value = (record.get(INPUT_NAMES[modality]) or "").strip() or None
                if value is not None and modality != "text":
                    path = (folder / value).resolve()
                    if not path.is_relative_to(folder):  # the server may serve this folder and nothing else
                        raise ValueError(f"examples: {value!r} lies outside the examples folder {str(folder)!r}")
                    value = str(path)
                row.append(value)
            if any(value is not None for value in row):
                rows.append(row)
            if len(rows) == limit:
                break
    return rows


def default_examples_dir(model_path: str) -> str | None:
    """`<model>/examples` when the model folder ships one (mm-train writes it for the built-in sample)."""
    folder = Path(model_path) / "examples"
    return str(folder) if (folder / EXAMPLES_FILE).is_file() else None


def build_demo(
    model_path: str,
    *,
    trust_remote_code: bool = False,
    examples_dir: str | None = None,
    device: str | None = None,
    max_batch_size: int = 8,
    concurrency_limit: int = 1,
    max_queue_size: int = 64,
    delete_cache: tuple[int, int] = (600, 3600),
    limits: MediaLimits = MediaLimits(),
    quantize: bool = False,
    index_path: str | None = None,
) -> gr.Blocks:
    """Build the page for the mm-fusion classifier at `model_path` (see `load_model`), with its queue set up; for a
    joint embedding model, its Search tab (`build_search_demo`) over the `EmbeddingIndex` saved at `index_path`,
    else over one built now from the examples folder's rows, else with a note on how to build one; for a generation
    model, its Chat tab (`build_chat_demo`). `index_path` with a model that is not a joint embedding model is a
    `ValueError`.

    `examples_dir` holds `examples.csv` (see `load_examples`); by default the model folder's `examples/`.
    Requests run in batches of up to `max_batch_size`, `concurrency_limit` batches at a time, with at most
    `max_queue_size` requests waiting (more are refused with "queue is full"). Every `delete_cache[0]` seconds,
    uploads older than `delete_cache[1]` seconds are deleted; all of them when the server stops. Requests may name
    only files in Gradio's upload folder (uploads, and Gradio's copies of the examples), and media over `limits`
    are refused before decoding. With `quantize`, the model runs on the CPU with dynamic int8 Linears
    (`training.quantize.quantize_for_cpu`). Multi-label tags use the thresholds of `decision_thresholds`, read from
    `<model_path>/evaluation/report.json` where mm-eval wrote one. The returned Blocks also carries `examples_dir`,
    `model`, `processor` and `thresholds`.
    """
    model, processor = load_model(model_path, trust_remote_code=trust_remote_code,
                                  device="cpu" if quantize and device is None else device)
    if quantize:
        from training.quantize import quantize_for_cpu

        model = quantize_for_cpu(model)
    config = model.config
    if getattr(config, "is_contrastive", False):
        index, source = search_index(model_path, model, processor, index_path,
                                     examples_dir or default_examples_dir(model_path))
        return build_search_demo(model_path, model, processor, index, index_source=source,
                                 concurrency_limit=concurrency_limit, max_queue_size=max_queue_size,
                                 delete_cache=delete_cache, limits=limits)
    if index_path:
        raise ValueError(f"index: {model_path!r} is not a joint embedding model, so it has no index to search "
                         "(--index needs a model trained with mm-train --task contrastive)")
    if is_generation_config(config):
        return build_chat_demo(model_path, model, processor, concurrency_limit=concurrency_limit,
                               max_queue_size=max_queue_size, delete_cache=delete_cache, limits=limits)
    modalities = tuple(m for m in ("vision", "text", "audio") if m in config.modalities)
    sampling_rate = processor.feature_extractor.sampling_rate if processor.feature_extractor is not None else 16_000
    tasks = tasks_of(model)
    thresholds = decision_thresholds(model, Path(model_path) / "evaluation" / "report.json")
    name, description = describe_model(model_path, config)
    examples_dir = examples_dir or default_examples_dir(model_path)
    # where Gradio keeps uploads and its copies of the examples: the only files a request may name
    upload_folder = os.path.realpath(get_upload_folder())

    def predict(image: list | None = None, text: list | None = None, audio: list | None = None) -> tuple[list, ...]:
        """Batched: a list per input the model has (the others stay None); a list per output."""
        start = time.perf_counter()
        columns = {key: values for key, values in (("image", image), ("text", text), ("audio", audio))
                   if values is not None}
        batch_size = len(next(iter(columns.values())))
        decoded: list[Sample | Exception] = []
        for values in zip(*columns.values()):
            given = dict(zip(columns, values))
            try:
                files = {key: _uploaded_path(given.get(key), key, upload_folder) for key in ("image", "audio")}
                decoded.append(decode_sample(**{**given, **files}, sampling_rate=sampling_rate, limits=limits))
            except Exception as err:
                decoded.append(err)
        results = iter(classify(model, processor, [s for s in decoded if isinstance(s, Sample)], thresholds))
        outcomes = [next(results) if isinstance(s, Sample) else s for s in decoded]
        latency = f"{(time.perf_counter() - start) * 1000:.0f} ms (decoding and model, batch of {batch_size})"
        rows, errors = [], []  # rows: one value per task output component, per item
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                rows.append([None] * len(task_components))
                errors.append(_error_message(outcome))
            else:
                rows.append([value for task in tasks for value in _task_values(task, outcome[task.name])])
                errors.append("")
        return (*(list(column) for column in zip(*rows)), [latency] * batch_size, errors)

    with gr.Blocks(title=f"{name} · mm-demo", analytics_enabled=False, delete_cache=delete_cache) as demo:
        gr.Markdown(
            f"# {_escape_markdown(name)}\n\n{_escape_markdown(description)}\n\n{_outputs_line(tasks)}  \n"
            f"**Inputs:** {', '.join(INPUT_NAMES[m] for m in modalities)}; each one is optional.",
            elem_id="mm-header",
        )
        with gr.Row():
            with gr.Column():
                inputs = {}  # keyed by predict's parameter names, which the API shows
                if "vision" in modalities:
                    inputs["image"] = gr.Image(
                        label="Image", type="filepath", sources=["upload", "webcam", "clipboard"],
                        height=IMAGE_INPUT_HEIGHT, elem_id="mm-image",
                    )
                if "text" in modalities:
                    inputs["text"] = gr.Textbox(
                        label="Text", lines=2, max_length=MAX_TEXT_CHARACTERS, elem_id="mm-text",
                    )
                if "audio" in modalities:
                    inputs["audio"] = gr.Audio(
                        label="Audio", type="filepath", sources=["upload", "microphone"], elem_id="mm-audio",
                    )
                with gr.Row():
                    clear = gr.ClearButton(list(inputs.values()), value="Clear", elem_id="mm-clear")
                    verb = "Predict" if any(task.problem_type == REGRESSION for task in tasks) else "Classify"
                    submit = gr.Button(verb, variant="primary", elem_id="mm-submit")
            with gr.Column():
                # each task's output components, then its chart, in task order; a classifier's one task keeps the
                # ids mm-label and mm-contributions
                task_components = [component for task in tasks for component in _task_components(task, len(tasks))]
                latency_output = gr.Textbox(label="Latency", interactive=False, elem_id="mm-latency")
                error_output = gr.Markdown(elem_id="mm-error")
        if examples_dir:
            gr.Examples(
                load_examples(examples_dir, modalities), inputs=list(inputs.values()), cache_examples=False,
                label=f"Examples (click one, then {verb})", examples_per_page=MAX_EXAMPLES,
            )
        outputs = [*task_components, latency_output, error_output]
        clear.add(outputs)
        # preprocess=False: Gradio's own preprocessing would open images with PIL, without our limits, and an
        # exception there fails the whole batch; predict decodes each item itself, from the upload folder only
        event = submit.click(
            predict, inputs_kwargs=inputs, outputs=outputs, api_name="predict", batch=True,
            max_batch_size=max_batch_size, preprocess=False, concurrency_limit=concurrency_limit,
        )
        # queued (a gr.Error outside the queue reaches the page as a bare HTTP 500), but never waiting for a batch
        event.then(_show_error, error_output, None, api_visibility="private", show_progress="hidden",
                   concurrency_limit=None)
    demo.queue(max_size=max_queue_size, default_concurrency_limit=concurrency_limit)
    demo.examples_dir = examples_dir
    demo.model, demo.processor, demo.thresholds = model, processor, thresholds
    return demo


# ---- one task's output: components, values, chart --------------------------------------------------------------------
# Each problem type has its output components (`_output_components`) and their values (`_output_values`); the chart
# of contributions is common, with one bar per input, or per input and output where a task has several.


def _outputs_line(tasks: list[Task]) -> str:
    """The header's line about the outputs: a classifier's labels, or each task with what it answers."""
    def labels(task: Task) -> str:
        return ", ".join(_escape_markdown(label) for label in task.label_names)

    def answer(task: Task) -> str:
        if task.problem_type == REGRESSION:
            return "a number" if task.num_outputs == 1 else f"{task.num_outputs} numbers"
        return ("one of " if task.problem_type == SINGLE_LABEL else "tags from ") + labels(task)

    if len(tasks) == 1 and tasks[0].problem_type != REGRESSION:
        return f"**Labels:** {labels(tasks[0])}"
    return "**Tasks:** " + "; ".join(f"{_escape_markdown(task.name)} ({answer(task)})" for task in tasks)


def _elem_id(task: Task, num_tasks: int, part: str = "") -> str:
    if num_tasks == 1:  # a classifier's page, as it always was
        return "mm-contributions" if part == "contributions" else "mm-label"
    return f"mm-task-{task.name}" + (f"-{part}" if part else "")


def _charts_each_output(task: Task) -> bool:
    """Whether the task's chart has a bar per input and output (multi-label, several regression outputs), rather
    than per input (single-label: the predicted label only)."""
    return task.problem_type == MULTI_LABEL or (task.problem_type == REGRESSION and task.num_outputs > 1)


def _output_components(task: Task, num_tasks: int) -> list:
    elem_id = _elem_id(task, num_tasks)
    title = "Prediction" if num_tasks == 1 else task.name
    if task.problem_type == SINGLE_LABEL:
        return [gr.Label(label=title, num_top_classes=min(10, len(task.label_names)), elem_id=elem_id)]
    if task.problem_type == MULTI_LABEL:
        return [gr.Label(label=f"{title}: tags that reach their thresholds", show_heading=False, elem_id=elem_id)]
    # a regression task's outputs are named after it ("pitch", or "pitch[0]", "pitch[1]", ...)
    return [gr.Number(label=output, precision=OUTPUT_DECIMALS, interactive=False,
                      elem_id=elem_id if task.num_outputs == 1 else f"{elem_id}-{i}")
            for i, output in enumerate(task.label_names)]


def _output_values(task: Task, answer: dict[str, Any]) -> list:
    if task.problem_type == SINGLE_LABEL:
        return [answer["probabilities"]]
    if task.problem_type == MULTI_LABEL:
        return [{tag: answer["probabilities"][tag] for tag in answer["tags"]} or NO_TAGS]
    return list(answer["values"].values())


def _task_components(task: Task, num_tasks: int) -> list:
    """The task's output components, then its contribution chart (created in that order, which is the page's)."""
    outputs = _output_components(task, num_tasks)
    # single-label: the predicted label's log-odds; multi-label: each tag's; regression: the output in its units
    unit = "output's units" if task.problem_type == REGRESSION else "log-odds"
    chart = gr.BarPlot(
        x="bar" if _charts_each_output(task) else "input", y="contribution",
        label="What each input added" if num_tasks == 1 else f"{task.name}: what each input added",
        y_title=f"Shapley value ({unit})", sort=None, height=220, elem_id=_elem_id(task, num_tasks, "contributions"),
    )
    return [*outputs, chart]


def _task_values(task: Task, answer: dict[str, Any]) -> list:
    """The values of `_task_components(task)` for one answer of `classify`."""
    contributions = answer["contributions"]
    if task.problem_type == SINGLE_LABEL:
        frame = _contribution_frame(contributions)
    else:
        # a multi-label chart shows the tags given, or the most probable label where none is
        shown = (answer["tags"] or [max(answer["probabilities"], key=answer["probabilities"].get)]
                 if task.problem_type == MULTI_LABEL else list(task.label_names))
        frame = (_contribution_frame(contributions, shown) if _charts_each_output(task)
                 else _contribution_frame({name: value[shown[0]] for name, value in contributions.items()}))
    # Gradio's bar plots start the axis at the smallest value, which makes all-positive bars look unequal: from zero
    low, high = min(0.0, float(frame["contribution"].min())), max(0.0, float(frame["contribution"].max()))
    return [*_output_values(task, answer), gr.update(value=frame, y_lim=[low, high])]


def _uploaded_path(value: Any, name: str, upload_folder: str) -> str | None:
    """The path of a file the server received (Gradio sends `{"path": ..., ...}`), or None when there is none.

    Gradio checks the files it knows as files (`meta._type` set) against its upload folder, and not a bare path or
    a dict without `meta`, so this refuses, with a `ValueError`, any path outside `upload_folder`."""
    if value is None:
        return None
    path = value.get("path") if isinstance(value, dict) else value
    if not isinstance(path, str):
        raise ValueError(f"{name}: expected an uploaded file; got {type(value).__name__} without a file path")
    if os.path.commonpath([os.path.realpath(path), upload_folder]) != upload_folder:
        raise ValueError(f"{name}: not a file uploaded to this server")
    return path


def _contribution_frame(contributions: dict[str, float] | dict[str, dict[str, float]],
                        outputs: list[str] | None = None):
    """The chart's rows: `input`, `contribution` per input; with `outputs`, one row per input and output, labelled
    `bar` ("image · tag")."""
    import pandas as pd

    if outputs is None:
        return pd.DataFrame({"input": list(contributions), "contribution": list(contributions.values())})
    rows = [(f"{name} · {output}", name, output, values[output]) for name, values in contributions.items()
            for output in outputs]
    return pd.DataFrame(rows, columns=["bar", "input", "output", "contribution"])


def _error_message(error: Exception) -> str:
    """The error output (Markdown): the message of a refused input, which names the input and the limit; for any
    other failure only its type (the server log has the traceback), so no stack trace reaches the page."""
    if isinstance(error, ValueError):
        return _escape_markdown(str(error))
    logger.error("request failed", exc_info=error)
    return f"the model failed on this input ({type(error).__name__}); try another input"


def _show_error(message: str, title: str = "Could not classify") -> None:
    """Also raise the request's error as a gr.Error, which the page shows as an alert (its message is HTML)."""
    if message:
        unescaped = re.sub(r"\\(.)", r"\1", message)
        raise gr.Error(html.escape(unescaped), title=title, print_exception=False)


def _show_search_error(message: str) -> None:
    """`_show_error` for the Search tab: the alert's title says what could not be done."""
    _show_error(message, title="Could not search")


# ---- search: the page of a joint embedding model ---------------------------------------------------------------------
# A joint embedding model (`config.is_contrastive`) has no labels to show: its page is a Search tab over an
# `EmbeddingIndex` (training/index.py). The query is one text, image or audio clip, embedded alone; the results are the
# index's items whose embeddings (of the modalities ticked) are nearest to it, best first.

DEFAULT_TOP_K = 5
MAX_TOP_K = 20
"""The top-k slider's range; the page holds this many audio players, one per result that has audio."""
SCORE_DECIMALS = 4
"""A result's score (the cosine similarity of the query and the item's embedding) is shown to this many decimals."""
SEARCH_COLUMNS = ["rank", "score", "modality", "id", "text"]
MAX_SERVED_RESULT_BYTES = 50 * 1024 * 1024
"""A result's image or audio file larger than this is not copied into the served folder (the result shows without
it): copies live in the upload folder until swept, and an index may point at large files."""
INDEX_HELP = (
    "No index to search. Build one from a data set with the same model, "
    "`mm-index build --model MODEL --data DATA.csv --output INDEX`, then start `mm-demo --model MODEL --index INDEX` "
    "(or give `--examples DIR` with an examples.csv: the demo indexes its rows when it starts)."
)


def decode_query(
    text: str | None = None, image: Any = None, audio: Any = None, *, sampling_rate: int = 16_000,
    limits: MediaLimits = MediaLimits(),
) -> tuple[str, Any]:
    """The one query of a search request, decoded and checked like a classifier's inputs (`decode_sample`):
    `("text", str)`, `("image", RGB PIL image)` or `("audio", (sampling_rate, mono float32 waveform))`, the form
    `EmbeddingIndex.query` takes. Empty or whitespace-only text counts as none.

    Raises `ValueError` when no query or more than one is given (naming those given), and for anything
    `decode_sample` refuses (the message names the input and the limit).
    """
    if text is not None and not isinstance(text, str):
        raise ValueError(f"text: expected a string; got {type(text).__name__}")
    given = [name for name, value in (("text", text if text and text.strip() else None), ("image", image),
                                      ("audio", audio)) if value is not None]
    if not given:
        raise ValueError("no query: give a text, an image or an audio clip to search with")
    if len(given) > 1:
        raise ValueError(f"query: give one of text, image or audio, not {len(given)} ({', '.join(given)}); "
                         "clear the others")
    sample = decode_sample(image=image, text=text, audio=audio, sampling_rate=sampling_rate, limits=limits)
    if sample.text is not None:
        return "text", sample.text
    if sample.image is not None:
        return "image", sample.image
    return "audio", (sampling_rate, sample.audio)


def examples_index(model, processor, examples_dir: str | os.PathLike, model_path: str | None = None):
    """An `EmbeddingIndex` of every row of `<examples_dir>/examples.csv` (see `load_examples`), built with `model`,
    for the modalities the model has: the small index a page searches when it is given none."""
    import datasets

    from training.index import EmbeddingIndex

    modalities = tuple(m for m in ("vision", "text", "audio") if m in model.config.modalities)
    rows = load_examples(examples_dir, modalities, limit=None)
    columns = {INPUT_NAMES[m]: [row[i] for row in rows] for i, m in enumerate(modalities)}
    if not rows:
        raise ValueError(f"examples: {str(Path(examples_dir) / EXAMPLES_FILE)!r} has no row to index")
    # a column of missing cells only would be typed null: such a column is no column to index
    dataset = datasets.Dataset.from_dict(
        {name: values for name, values in columns.items() if any(v is not None for v in values)})
    return EmbeddingIndex.build(model, processor, dataset, model_path=model_path, progress=False)


def search_index(model_path: str, model, processor, index_path: str | os.PathLike | None = None,
                 examples_dir: str | os.PathLike | None = None) -> tuple[Any, str]:
    """The index a joint embedding model's page searches, and a few words on where it comes from: the index saved at
    `index_path` (`EmbeddingIndex.load`), else one built now from `examples_dir` (`examples_index`), else
    `(None, "")`. Raises `ValueError` for a folder that is not an index and for an index built with another model
    (`EmbeddingIndex.check_model`: another projection size or config)."""
    if index_path:
        from training.index import EmbeddingIndex

        index = EmbeddingIndex.load(index_path)
        index.check_model(model)  # refuses an index of another model now, rather than at the first search
        return index, f"loaded from {Path(index_path).resolve().name}"
    if examples_dir:
        return (examples_index(model, processor, examples_dir, model_path),
                f"indexed on start from the examples folder {Path(examples_dir).resolve().name}")
    return None, ""


def _served_copy(path: Any, upload_folder: str) -> str | None:
    """A copy of a result's media file in the upload folder, the one folder Gradio serves (one copy per content, so
    repeated results share it), or None when there is none to show: no path, a missing or unreadable file, or one
    over `MAX_SERVED_RESULT_BYTES`."""
    if not isinstance(path, str) or not path:
        return None
    from gradio.processing_utils import save_file_to_cache

    try:
        if not Path(path).is_file() or Path(path).stat().st_size > MAX_SERVED_RESULT_BYTES:
            logger.warning("search result file %s is missing or over %d bytes; shown without it", path,
                           MAX_SERVED_RESULT_BYTES)
            return None
        return save_file_to_cache(path, cache_dir=upload_folder)
    except OSError as error:
        logger.warning("cannot copy search result file %s (%s); shown without it", path, error)
        return None


def search_values(hits: list, upload_folder: str) -> tuple[list, str, dict, list]:
    """The page's values for `hits` (SearchHits, best first): the gallery (each result with an image, captioned
    "score · text"), the texts (Markdown, a numbered line per result), the table (a Dataframe value: a row of
    `SEARCH_COLUMNS` per result, its score shown to `SCORE_DECIMALS`) and `MAX_TOP_K` audio players (those of the
    results with audio, labelled "rank. score · text", then hidden ones). Media are served from copies in
    `upload_folder` (`_served_copy`)."""
    gallery, lines, table, players = [], [], [], []
    for rank, hit in enumerate(hits, start=1):
        score = f"{hit.score:.{SCORE_DECIMALS}f}"
        text = hit.row.get("text") or None
        caption = f"{score} · {text}" if text else score
        image = _served_copy(hit.row.get("image"), upload_folder)
        if image is not None:
            gallery.append((image, caption))
        audio = _served_copy(hit.row.get("audio"), upload_folder)
        if audio is not None and len(players) < MAX_TOP_K:
            players.append(gr.update(value=audio, label=f"{rank}. {caption}", visible=True))
        shown = _escape_markdown(" ".join(text.split())) if text else "*(no text)*"
        lines.append(f"{rank}. **{score}** · {shown} ({hit.modality} match, item {hit.id})")
        table.append([rank, float(hit.score), hit.modality, int(hit.id), text or ""])
    players += [gr.update(value=None, label="Audio", visible=False)] * (MAX_TOP_K - len(players))
    # the table keeps each score's full value (the API returns it) and shows it to SCORE_DECIMALS, as the captions do
    shown = [[str(rank), f"{score:.{SCORE_DECIMALS}f}", modality, str(item), text]
             for rank, score, modality, item, text in table]
    frame = {"headers": SEARCH_COLUMNS, "data": table,
             "metadata": {"display_value": shown, "styling": [[""] * len(SEARCH_COLUMNS) for _ in table]}}
    return gallery, "\n".join(lines), frame, players


def _search_modalities(chosen: Any, available: tuple[str, ...]) -> list[str]:
    """The ticked modalities, checked: a list of names of the index's modalities, at least one."""
    if isinstance(chosen, str):
        chosen = [chosen]
    if not isinstance(chosen, (list, tuple)) or not chosen:
        raise ValueError(f"modalities: tick at least one of {', '.join(available)} to search among")
    unknown = [name for name in chosen if name not in available]
    if unknown:
        raise ValueError(f"modalities: {unknown[0]!r} is not one of the index's modalities ({', '.join(available)})")
    return [name for name in available if name in chosen]


def _whole_number(name: str, value: Any, limit: int) -> int:
    """A slider's value, checked: a whole number from 1 to `limit` (`ValueError` naming the slider otherwise)."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a whole number from 1 to {limit}; got {value!r}") from None
    if number != value or not 1 <= number <= limit:
        raise ValueError(f"{name}: expected a whole number from 1 to {limit}; got {value!r}")
    return number


def _index_line(index, source: str) -> str:
    """The header's line about the index: its size, the modalities of its items, and where it comes from."""
    size = len(index)
    return (f"**Index:** {size} item{'s' if size != 1 else ''} ({', '.join(index.modalities)}), "
            f"{_escape_markdown(source)}")


def build_search_demo(
    model_path: str,
    model,
    processor,
    index=None,
    *,
    index_source: str = "",
    concurrency_limit: int = 1,
    max_queue_size: int = 64,
    delete_cache: tuple[int, int] = (600, 3600),
    limits: MediaLimits = MediaLimits(),
) -> gr.Blocks:
    """Build the page of a joint embedding model: a header and a Search tab over `index` (an `EmbeddingIndex` built
    with this model; `index_source` says where it comes from), or, without one, the tab says how to build one.

    The query is one of text, an image (upload, webcam, clipboard) or audio (upload, microphone), of the modalities
    the model has; the user ticks which of the index's modalities to search among and the top-k. The answer: a
    gallery of the results with an image (captioned "score · text"), an audio player per result with audio, the
    texts with their scores, best first, and a table (`SEARCH_COLUMNS`). No query, more than one, or a file the
    decoder refuses gives a readable error in the page. Requests may name only files in Gradio's upload folder, and
    the results' media are served from copies there (`_served_copy`), so the server still serves no other files.
    The returned Blocks also carries `model`, `processor` and `index`.
    """
    model_modalities = tuple(m for m in ("vision", "text", "audio") if m in model.config.modalities)
    sampling_rate = processor.feature_extractor.sampling_rate if processor.feature_extractor is not None else 16_000
    name, description = describe_model(model_path, model.config)
    upload_folder = os.path.realpath(get_upload_folder())

    def search(text: str | None = None, image: Any = None, audio: Any = None, modalities: Any = None,
               top_k: Any = DEFAULT_TOP_K) -> tuple:
        """One request, not batched (a query is one pass of one tower); a modality the model lacks stays None."""
        start = time.perf_counter()
        try:
            files = {key: _uploaded_path(value, key, upload_folder) for key, value in (("image", image),
                                                                                          ("audio", audio))}
            modality, item = decode_query(text=text, **files, sampling_rate=sampling_rate, limits=limits)
            chosen = _search_modalities(modalities, index.modalities)
            hits = index.query(model, processor, **{modality: item}, top_k=_whole_number("top_k", top_k, MAX_TOP_K), modalities=chosen)
        except Exception as error:
            gallery, texts, table, players = search_values([], upload_folder)
            return ("", _error_message(error), gallery, texts, table, *players)
        gallery, texts, table, players = search_values(hits, upload_folder)
        status = (f"{len(hits)} result{'s' if len(hits) != 1 else ''} for the {modality} query among the items' "
                  f"{', '.join(chosen)}, best first ({(time.perf_counter() - start) * 1000:.0f} ms)")
        return (status, "", gallery, texts, table, *players)

    with gr.Blocks(title=f"{name} · mm-demo", analytics_enabled=False, delete_cache=delete_cache) as demo:
        header = f"# {_escape_markdown(name)}\n\n{_escape_markdown(description)}\n\n"
        if index is not None:
            header += (f"{_index_line(index, index_source)}  \n**Query:** one of "
                       f"{', '.join(INPUT_NAMES[m] for m in model_modalities)}.")
        gr.Markdown(header, elem_id="mm-header")
        with gr.Tabs():
            with gr.Tab("Search", elem_id="mm-search-tab"):
                if index is None:
                    gr.Markdown(INDEX_HELP, elem_id="mm-search-status")
                else:
                    _search_tab(search, model_modalities, index, concurrency_limit)
    demo.queue(max_size=max_queue_size, default_concurrency_limit=concurrency_limit)
    demo.examples_dir = None
    demo.model, demo.processor, demo.index = model, processor, index
    return demo


def _search_tab(search, modalities: tuple[str, ...], index, concurrency_limit: int) -> None:
    """The Search tab's components and events, inside the page's Blocks."""
    with gr.Row():
        with gr.Column():
            inputs = {}  # keyed by search's parameter names, which the API shows
            if "text" in modalities:
                inputs["text"] = gr.Textbox(label="Text", lines=2, max_length=MAX_TEXT_CHARACTERS,
                                            elem_id="mm-search-text")
            if "vision" in modalities:
                inputs["image"] = gr.Image(label="Image", type="filepath", sources=["upload", "webcam", "clipboard"],
                                           height=IMAGE_INPUT_HEIGHT, elem_id="mm-search-image")
            if "audio" in modalities:
                inputs["audio"] = gr.Audio(label="Audio", type="filepath", sources=["upload", "microphone"],
                                           elem_id="mm-search-audio")
            searched = gr.CheckboxGroup(list(index.modalities), value=list(index.modalities),
                                        label="Search the items' embeddings of", elem_id="mm-search-modalities")
            top_k = gr.Slider(1, MAX_TOP_K, value=min(DEFAULT_TOP_K, MAX_TOP_K), step=1, label="Results (top-k)",
                              elem_id="mm-search-top-k")
            with gr.Row():
                clear = gr.ClearButton(list(inputs.values()), value="Clear", elem_id="mm-search-clear")
                submit = gr.Button("Search", variant="primary", elem_id="mm-search-submit")
        with gr.Column():
            status = gr.Markdown(elem_id="mm-search-status")
            error = gr.Markdown(elem_id="mm-search-error")
            gallery = gr.Gallery(label="Results with an image", columns=4, height="auto", object_fit="contain",
                                 interactive=False, elem_id="mm-search-gallery")
            texts = gr.Markdown(elem_id="mm-search-texts")
            table = gr.Dataframe(headers=SEARCH_COLUMNS, datatype=["number", "number", "str", "number", "str"],
                                 interactive=False, label="Results", elem_id="mm-search-table")
            players = [gr.Audio(label="Audio", type="filepath", interactive=False, visible=False,
                                elem_id=f"mm-search-audio-{i}") for i in range(MAX_TOP_K)]
    outputs = [status, error, gallery, texts, table, *players]
    clear.add([status, error, gallery, texts, table])
    # clearing empties a player but leaves it shown: hide them, as a search with fewer audio results does
    clear.click(lambda: [gr.update(value=None, visible=False)] * len(players), None, players,
                api_visibility="private", queue=False, show_progress="hidden")
    # preprocess=False: Gradio's own preprocessing would open images with PIL, without our limits; the search
    # decodes the query itself, from the upload folder only
    event = submit.click(search, inputs_kwargs={**inputs, "modalities": searched, "top_k": top_k}, outputs=outputs,
                         api_name="search", preprocess=False, concurrency_limit=concurrency_limit)
    event.then(_show_search_error, error, None, api_visibility="private", show_progress="hidden",
               concurrency_limit=None)


# ---- chat: the page of a generation model ----------------------------------------------------------------------------
# A generation model (`config.decoder_config`, MMFusionForConditionalGeneration) answers in words: its page is a Chat
# tab. The two things an answer depends on are kept apart on the page, as they are in the model: the Conditioning
# panel holds the fusion's inputs (an image, an audio clip, a context text), what the answer is about; the chat holds
# the conversation, which is the decoder's prompt (a dialogue history ending with the user's latest message).

DEFAULT_MAX_NEW_TOKENS = 64
"""The max-new-tokens slider's start, unless the model's generation_config sets `max_new_tokens`."""
MAX_NEW_TOKENS = 512
"""The slider's top, lowered for a decoder with fewer positions."""
DEFAULT_TEMPERATURE = 1.0
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 2.0
PENDING_ANSWER = "…"
"""The answer's bubble before its first words arrive."""
EMPTY_ANSWER = "(the model answered with no text)"
"""Shown for an answer whose tokens are all special tokens, so the turn does not look lost; the dialogue keeps ""."""
_NO_TOKEN_LIMIT = 1_000_000
"""A tokenizer `model_max_length` above this means "not set" (transformers' default is a huge integer)."""


@dataclass
class ChatTurn:
    """One exchange of a conversation: the user's message, the model's answer, and the files attached to that message
    (upload-folder paths; shown in the chat, and from then on the conditioning, until replaced)."""

    question: str
    answer: str
    image: str | None = None
    audio: str | None = None


@dataclass
class ChatRequest:
    """One chat message, checked: the question (None when the message only attaches files), the conditioning the
    answer is about, decoded (`sample`), and the files the message attached ({"image"/"audio": upload-folder path}),
    which replace the panel's."""

    question: str | None
    sample: Sample
    attached: dict[str, str]


class _StopWhenSet(StoppingCriteria):
    """Stops generation once any of `events` is set: the page's stop button, or a request that went away (which
    frees the model instead of decoding to max_new_tokens for nobody)."""

    def __init__(self, *events: threading.Event):
        self.events = events

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        stop = any(event.is_set() for event in self.events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def conditioning_names(modalities: tuple[str, ...]) -> str:
    """The conditioning inputs a model takes, as the page names them: "an image, an audio clip or a context text"."""
    names = {"vision": "an image", "audio": "an audio clip", "text": "a context text"}
    parts = [names[m] for m in ("vision", "audio", "text") if m in modalities]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def decoder_positions(model) -> int | None:
    """How many positions the decoder LM has (prompt, prefix and new tokens together), or None where its config does
    not say (`max_position_embeddings`, GPT-2's `n_positions`)."""
    config = model.config.decoder_config
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _max_new_tokens_limit(model) -> int:
    positions = decoder_positions(model)
    # at least the start token and one token of the message must fit beside the answer
    return max(1, min(MAX_NEW_TOKENS, positions - 2)) if positions else MAX_NEW_TOKENS


def _attachments(files: Any, modalities: tuple[str, ...], upload_folder: str) -> dict[str, str]:
    """The files attached to a chat message, by input ("image", "audio"), as upload-folder paths: at most one of each,
    and only of an input the model has. Raises `ValueError` naming the file otherwise."""
    import mimetypes

    if files is None:
        return {}
    if not isinstance(files, (list, tuple)):
        raise ValueError(f"message: expected a list of attached files; got {type(files).__name__}")
    found: dict[str, str] = {}
    for index, file in enumerate(files):
        path = _uploaded_path(file, f"attachment {index + 1}", upload_folder)
        name = (file.get("orig_name") if isinstance(file, dict) else None) or Path(path).name
        mime = ((file.get("mime_type") if isinstance(file, dict) else None) or mimetypes.guess_type(name)[0]
                or mimetypes.guess_type(path)[0] or "")
        kind = mime.split("/")[0]
        if kind not in ("image", "audio"):
            raise ValueError(f"attachment {name!r}: not an image or an audio clip ({mime or 'unknown type'})")
        if ("vision" if kind == "image" else "audio") not in modalities:
            raise ValueError(f"attachment {name!r}: this model reads no {kind}; it is conditioned on "
                             f"{conditioning_names(modalities)}")
        if kind in found:
            raise ValueError(f"attachments: more than one {kind}; attach one (it replaces the conversation's {kind})")
        found[kind] = path
    return found


def chat_request(
    message: Any, image: Any = None, audio: Any = None, context: str | None = None, *,
    modalities: tuple[str, ...], upload_folder: str, sampling_rate: int = 16_000, limits: MediaLimits = MediaLimits(),
) -> ChatRequest:
    """Check one chat message against the conditioning panel: `message` is the MultimodalTextbox's value
    (`{"text": str, "files": [file]}`, or a plain string), `image` and `audio` the panel's files (Gradio file dicts
    or upload-folder paths) and `context` its text. Attached files replace the panel's of their kind.

    Raises `ValueError`, naming the input and the limit, for: a message with neither text nor files, text over
    `MAX_TEXT_CHARACTERS`, a file that is not an upload or not an image/audio clip the model reads, no conditioning
    input at all, and anything `decode_sample` refuses (a corrupt or oversized file, a too-long clip or context).
    """
    if isinstance(message, str):
        message = {"text": message, "files": []}
    if not isinstance(message, dict):
        raise ValueError(f"message: expected text and files; got {type(message).__name__}")
    question = _checked_text(message.get("text"), "message")
    question = question.strip() if question else None  # the decoder's user turn, without the box's stray newlines
    context = _checked_text(context, "context text")
    attached = _attachments(message.get("files"), modalities, upload_folder)
    if question is None and not attached:
        raise ValueError("message: write a question or an instruction (attach an image or audio clip to change what "
                         "the answers are about)")
    image_path = attached.get("image") or _uploaded_path(image, "image", upload_folder)
    audio_path = attached.get("audio") or _uploaded_path(audio, "audio", upload_folder)
    if image_path is None and audio_path is None and context is None:
        raise ValueError(f"no conditioning input: the answers are about {conditioning_names(modalities)}; attach "
                         "or add one under Conditioning (the message is the question, not what it is about)")
    # the panel only shows the inputs the model has: anything else a request names is not read
    sample = decode_sample(image=image_path if "vision" in modalities else None,
                           text=context if "text" in modalities else None,
                           audio=audio_path if "audio" in modalities else None,
                           sampling_rate=sampling_rate, limits=limits)
    return ChatRequest(question, sample, attached)


def _checked_text(text: Any, name: str) -> str | None:
    """A text field's value, checked: None when empty or blank; a `ValueError` naming the field (as the page
    does) for a non-string, text over `MAX_TEXT_CHARACTERS` or text that is not valid Unicode."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValueError(f"{name}: expected a string; got {type(text).__name__}")
    if not text.strip():
        return None
    if len(text) > MAX_TEXT_CHARACTERS:
        raise ValueError(f"{name}: {len(text)} characters is more than {MAX_TEXT_CHARACTERS}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{name}: not valid Unicode at position {err.start}") from None
    return text


def _prompt_length(processor, dialogue: list[dict[str, str]]) -> int | None:
    """The decoder prompt's length for `dialogue` (start token and chat template included), or None when it is longer
    than the decoder tokenizer's `model_max_length` (the processor refuses it)."""
    try:
        return int(processor.decoder_inputs([dialogue])["decoder_attention_mask"].sum())
    except ValueError:
        return None


def fit_dialogue(processor, dialogue: list[dict[str, str]], limit: int) -> tuple[list[dict[str, str]], int]:
    """The latest part of `dialogue` (user and assistant messages in turn, ending with a user message) whose prompt
    fits in `limit` decoder tokens: the oldest turns are left out, whole, first. Returns the kept messages and how
    many turns were left out. Raises `ValueError` when the latest message alone does not fit."""
    limit = min(limit, _token_limit(processor))
    for start in range(0, len(dialogue), 2):
        length = _prompt_length(processor, dialogue[start:])
        if length is not None and length <= limit:
            return dialogue[start:], start // 2
    length = _prompt_length(processor, dialogue[-1:])
    size = f"{length} tokens" if length is not None else "too many tokens"
    raise ValueError(f"message: {size} with the chat template, more than the {limit} the decoder can read beside the "
                     "answer; shorten it (or lower max new tokens)")


def _token_limit(processor) -> int:
    limit = processor.decoder_tokenizer.model_max_length
    return limit if limit <= _NO_TOKEN_LIMIT else _NO_TOKEN_LIMIT


def _temperature(value: Any) -> float:
    """The temperature slider's value, checked: a number from `MIN_TEMPERATURE` to `MAX_TEMPERATURE`."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not MIN_TEMPERATURE <= number <= MAX_TEMPERATURE:
        raise ValueError(f"temperature: expected a number from {MIN_TEMPERATURE} to {MAX_TEMPERATURE}; got {value!r}")
    return number


def dialogue_of(turns: list[ChatTurn], question: str) -> list[dict[str, str]]:
    """The decoder's prompt for `question` after `turns`: a dialogue history, as `MMFusionProcessor` takes it."""
    messages = []
    for turn in turns:
        messages += [{"role": "user", "content": turn.question}, {"role": "assistant", "content": turn.answer}]
    return [*messages, {"role": "user", "content": question}]


def chat_messages(turns: list[ChatTurn], pending: ChatTurn | None = None) -> list[dict[str, Any]]:
    """The chatbot's value for `turns` (and the turn being answered): per turn the attached files, the message and
    the answer, in Gradio's messages format. Text goes as `{"type": "text"}` content, which Gradio shows as it is
    (a plain string would be dedented and stripped)."""
    messages: list[dict[str, Any]] = []
    for turn in [*turns, *([pending] if pending else [])]:
        for path in (turn.image, turn.audio):
            if path:
                messages.append({"role": "user", "content": {"path": path}})
        messages.append({"role": "user", "content": {"type": "text", "text": turn.question}})
        answer = turn.answer or (PENDING_ANSWER if turn is pending else EMPTY_ANSWER)
        messages.append({"role": "assistant", "content": {"type": "text", "text": answer}})
    return messages


def conditioning_line(sample: Sample) -> str:
    """What an answer was conditioned on, as the status line says it: "image + audio + context text"."""
    given = [name for name, value in (("image", sample.image), ("audio", sample.audio), ("context text", sample.text))
             if value is not None]
    return " + ".join(given)


def stream_answer(model, processor, sample: Sample, dialogue: list[dict[str, str]], *, max_new_tokens: int,
                  do_sample: bool = False, temperature: float = DEFAULT_TEMPERATURE, sampling_rate: int = 16_000,
                  stop: threading.Event | None = None):
    """Generate the answer to `dialogue` (ending with the user's message) about `sample`, streaming: yields the
    answer's text so far as it grows (transformers' `TextIteratorStreamer`, generation on its own thread), and
    returns, as the generator's value, `(answer, new_token_count, turns_left_out)`, the answer being the processor's
    `batch_decode` of the generated tokens (what the model gives in-process).

    The oldest turns are left out where the prompt would not fit beside `max_new_tokens` (`fit_dialogue`). Setting
    `stop` ends generation where it is (the answer is what it got to); closing the generator ends it too and waits
    for the thread. Raises what `fit_dialogue` and the model raise.
    """
    from transformers import TextIteratorStreamer

    batch = processor(text=sample.text, images=sample.image, audio=sample.audio, sampling_rate=sampling_rate)
    fusion_inputs = {key: value.to(model.device, dtype=model.dtype) if value.is_floating_point()
                     else value.to(model.device) for key, value in batch.items()}
    with torch.no_grad():
        # the towers and the fusion once, here: in prefix mode their tokens take decoder positions too
        context = model.get_decoder_context(**fusion_inputs)
    positions = decoder_positions(model)
    prefix_length = context[0].shape[1] if model.config.decoder_connection == "prefix" else 0
    limit = positions - max_new_tokens - prefix_length if positions else _NO_TOKEN_LIMIT
    if limit < 2:
        raise ValueError(f"max_new_tokens: {max_new_tokens} leaves no room for the message among the decoder's "
                         f"{positions} positions; choose fewer")
    kept, left_out = fit_dialogue(processor, dialogue, limit)
    prompt = {key: value.to(model.device) for key, value in processor.decoder_inputs([kept]).items()}
    settings: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
    if do_sample:
        settings["temperature"] = temperature
    stop, closed = stop or threading.Event(), threading.Event()
    streamer = TextIteratorStreamer(processor.decoder_tokenizer, skip_prompt=True, skip_special_tokens=True)
    result: dict[str, Any] = {}

    def generate() -> None:
        try:
            result["ids"] = model.generate(encoder_outputs=context, **prompt, **settings, streamer=streamer,
                                           stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop, closed)]))
        except Exception as error:  # raised again on the request's thread, where the page's error handling is
            result["error"] = error
            streamer.end()  # else the loop below waits for text that never comes

    thread = threading.Thread(target=generate, name="mm-demo-generate", daemon=True)
    thread.start()
    try:
        text = ""
        for piece in streamer:
            if piece:
                text += piece
                yield text
    finally:
        closed.set()
        thread.join()
    if "error" in result:
        raise result["error"]
    ids = result["ids"]
    new_tokens = int((ids[0] != processor.decoder_tokenizer.pad_token_id).sum()) if ids.numel() else 0
    return processor.batch_decode(ids)[0], new_tokens, left_out


def build_chat_demo(
    model_path: str,
    model,
    processor,
    *,
    concurrency_limit: int = 1,
    max_queue_size: int = 64,
    delete_cache: tuple[int, int] = (600, 3600),
    limits: MediaLimits = MediaLimits(),
) -> gr.Blocks:
    """Build the page of a generation model: a header and a Chat tab.

    The Conditioning panel holds what the answers are about, the fusion's inputs of the model: an image (upload,
    webcam, clipboard), an audio clip (upload, microphone) and a context text, at least one. The chat's message box
    takes the question and, optionally, an image and/or audio clip (upload, microphone), which replace the panel's
    and stay for the following turns. Each answer is generated for the dialogue so far (earlier messages and answers,
    then the new message; the oldest turns left out when it would not fit the decoder) and streams into the chat;
    max new tokens and sampling with a temperature are set in the Generation settings (greedy by default). A status
    line says, per turn, what the answer was conditioned on. No conditioning, an empty message, a file the decoder
    refuses or that is not an upload, and a too-long input give a readable error in the page and change nothing.
    The message box's stop button ends the answer where it is (it stays in the conversation as far as it got).
    "New conversation" empties the chat and keeps the conditioning. The returned Blocks also carries `model` and
    `processor`.
    """
    modalities = tuple(m for m in ("vision", "text", "audio") if m in model.config.modalities)
    sampling_rate = processor.feature_extractor.sampling_rate if processor.feature_extractor is not None else 16_000
    name, description = describe_model(model_path, model.config)
    upload_folder = os.path.realpath(get_upload_folder())
    token_limit = _max_new_tokens_limit(model)
    configured = getattr(model.generation_config, "max_new_tokens", None)
    default_tokens = min(configured or DEFAULT_MAX_NEW_TOKENS, token_limit)

    # the chat event's outputs, by name; a page without an image or audio input has no such output
    output_names = ["chatbot", "turns", "message", *(kind for m, kind in (("vision", "image"), ("audio", "audio"))
                                                    if m in modalities), "status", "error"]

    stops: dict[str, threading.Event] = {}  # per page session, the answer being generated: what its stop button ends

    def stop_answer(request: gr.Request) -> None:
        """The stop button: ends the session's answer where it is."""
        stop = stops.get(request.session_hash)
        if stop is not None:
            stop.set()

    def chat(message: Any, image: Any = None, audio: Any = None, context: str | None = None,
             turns: list[ChatTurn] | None = None, max_new_tokens: Any = DEFAULT_MAX_NEW_TOKENS,
             sample: bool = False, temperature: Any = DEFAULT_TEMPERATURE, request: gr.Request | None = None):
        """One chat message; yields the outputs (`output_names`) as the answer grows, `gr.skip()` for those it has
        not set. A modality the model lacks stays None."""
        turns = list(turns or [])
        shown: dict[str, Any] = {}

        def outputs(**values: Any) -> tuple:
            # Gradio sends each yield after the first as a diff against the one before, and diffs a gr.skip() after
            # a value as a change of that value (the page's image became {"__type__": "update", "url": ...}): once
            # set, an output repeats its value, which diffs to nothing
            shown.update(values)
            return tuple(shown.get(name, gr.skip()) for name in output_names)

        try:
            asked = chat_request(message, image, audio, context, modalities=modalities, upload_folder=upload_folder,
                                 sampling_rate=sampling_rate, limits=limits)
            settings = {"max_new_tokens": _whole_number("max_new_tokens", max_new_tokens, token_limit), "do_sample": bool(sample)}
            if sample:
                settings["temperature"] = _temperature(temperature)
        except Exception as error:
            # the message stays in its box, to be fixed; the conversation and the panel are as they were
            yield outputs(error=_error_message(error))
            return
        if asked.question is None:  # files only: they become the conditioning, and nothing is asked yet
            status = f"Now about: {conditioning_line(asked.sample)}. Ask your question."
            yield outputs(message=None, **asked.attached, status=status, error="")
            return
        number = len(turns) + 1
        pending = ChatTurn(asked.question, "", asked.attached.get("image"), asked.attached.get("audio"))
        about = conditioning_line(asked.sample)
        start = time.perf_counter()
        yield outputs(chatbot=chat_messages(turns, pending), message=None, **asked.attached,
                      status=f"Turn {number} · answering about {about} …", error="")
        stop = threading.Event()
        session = request.session_hash if request is not None else None
        if session:
            stops[session] = stop
        answers = stream_answer(model, processor, asked.sample, dialogue_of(turns, asked.question),
                                sampling_rate=sampling_rate, stop=stop, **settings)
        try:
            while True:
                pending.answer = next(answers)
                yield outputs(chatbot=chat_messages(turns, pending))
        except StopIteration as done:
            answer, new_tokens, left_out = done.value
        except Exception as error:
            # the conversation as it was, and the question back in its box to send again
            yield outputs(chatbot=chat_messages(turns), message={"text": asked.question, "files": []}, status="",
                          error=_error_message(error))
            return
        finally:
            answers.close()  # a request that went away stops the generation thread too
            if session and stops.get(session) is stop:
                del stops[session]
        pending.answer = answer
        turns.append(pending)
        verb = "stopped" if stop.is_set() else "answered"
        status = (f"Turn {number} · {verb} about {about} · {new_tokens} new token{'s' if new_tokens != 1 else ''} "
                  f"in {(time.perf_counter() - start) * 1000:.0f} ms")
        if left_out:
            status += (f" · the {left_out} oldest turn{'s were' if left_out != 1 else ' was'} left out of the prompt "
                       "(the decoder reads a limited number of tokens)")
        yield outputs(chatbot=chat_messages(turns), turns=turns, status=status, error="")

    with gr.Blocks(title=f"{name} · mm-demo", analytics_enabled=False, delete_cache=delete_cache) as demo:
        gr.Markdown(
            f"# {_escape_markdown(name)}\n\n{_escape_markdown(description)}\n\n"
            f"**What the answers are about:** {conditioning_names(modalities)}, under *Conditioning* (at least one; "
            "an image or audio clip attached to a message replaces it there).  \n"
            "**What they answer:** your latest message, after the conversation so far.",
            elem_id="mm-header",
        )
        with gr.Tabs():
            with gr.Tab("Chat", elem_id="mm-chat-tab"):
                _chat_tab(chat, stop_answer, output_names, modalities, default_tokens, token_limit,
                          concurrency_limit)
    demo.queue(max_size=max_queue_size, default_concurrency_limit=concurrency_limit)
    demo.examples_dir = None
    demo.model, demo.processor = model, processor
    return demo


def _chat_tab(chat, stop_answer, output_names: list[str], modalities: tuple[str, ...], default_tokens: int,
              token_limit: int, concurrency_limit: int) -> None:
    """The Chat tab's components and events, inside the page's Blocks."""
    with gr.Row():
        with gr.Column(scale=1):
            gr.Markdown("### Conditioning\nWhat the answers are about: the model reads these with every message. "
                        "They stay for the following turns until you replace or clear them.")
            panel = {}  # keyed by chat's parameter names, which the API shows
            if "vision" in modalities:
                panel["image"] = gr.Image(label="Image", type="filepath", sources=["upload", "webcam", "clipboard"],
                                          height=IMAGE_INPUT_HEIGHT, elem_id="mm-chat-image")
            if "audio" in modalities:
                panel["audio"] = gr.Audio(label="Audio", type="filepath", sources=["upload", "microphone"],
                                          elem_id="mm-chat-audio")
            if "text" in modalities:
                panel["context"] = gr.Textbox(
                    label="Context text", lines=2, max_length=MAX_TEXT_CHARACTERS, elem_id="mm-chat-context",
                    info="Read with the image and audio, e.g. a caption; not the question (that goes in the chat)")
            with gr.Accordion("Generation", open=True):
                max_new_tokens = gr.Slider(1, token_limit, value=default_tokens, step=1, label="Max new tokens",
                                           elem_id="mm-chat-max-new-tokens")
                sample = gr.Checkbox(False, label="Sample (off: greedy, the most likely token each step)",
                                     elem_id="mm-chat-sample")
                temperature = gr.Slider(MIN_TEMPERATURE, MAX_TEMPERATURE, value=DEFAULT_TEMPERATURE, step=0.05,
                                        label="Temperature (when sampling)", interactive=False,
                                        elem_id="mm-chat-temperature")
        with gr.Column(scale=2):
            chatbot = gr.Chatbot(label="Conversation", height=420, render_markdown=False, buttons=["copy"],
                                 feedback_options=None, elem_id="mm-chat")
            attachable = [kind for m, kind in (("vision", "image"), ("audio", "audio")) if m in modalities]
            message = gr.MultimodalTextbox(
                label="Message", file_count="multiple", file_types=attachable or None,
                sources=["upload", "microphone"] if "audio" in modalities else ["upload"],
                placeholder="Ask about the conditioning" + (f"; attach {' or '.join(attachable)} to replace it"
                                                            if attachable else ""),
                stop_btn=True, max_plain_text_length=MAX_TEXT_CHARACTERS, elem_id="mm-chat-message",
            )
            status = gr.Markdown(elem_id="mm-chat-status")
            error = gr.Markdown(elem_id="mm-chat-error")
            new_conversation = gr.Button("New conversation", elem_id="mm-chat-clear")
    turns = gr.State([])
    # preprocess=False: Gradio's own preprocessing would open images with PIL, without our limits; chat decodes the
    # files itself, from the upload folder only
    event = message.submit(
        chat, inputs_kwargs={"message": message, **panel, "turns": turns, "max_new_tokens": max_new_tokens,
                             "sample": sample, "temperature": temperature},
        outputs=[{"chatbot": chatbot, "turns": turns, "message": message, "status": status, "error": error,
                  **panel}[name] for name in output_names],
        api_name="chat", preprocess=False, concurrency_limit=concurrency_limit, show_progress="minimal",
        show_progress_on=[chatbot],  # a timer over the status and error lines would hide what they say
    )
    event.then(_show_chat_error, error, None, api_visibility="private", show_progress="hidden",
               concurrency_limit=None)
    # not `cancels`: the answer ends where it is and stays in the conversation (a cancelled event keeps no turn)
    message.stop(stop_answer, None, None, api_visibility="private", queue=False, show_progress="hidden")
    sample.change(lambda on: gr.update(interactive=bool(on)), sample, temperature, api_visibility="private",
                  queue=False, show_progress="hidden")
    reset = (lambda: ([], [], "", ""))
    new_conversation.click(reset, None, [chatbot, turns, status, error], api_visibility="private", queue=False,
                           show_progress="hidden")
    chatbot.clear(reset, None, [chatbot, turns, status, error], api_visibility="private", queue=False,
                  show_progress="hidden")


def _show_chat_error(message: str) -> None:
    """`_show_error` for the Chat tab: the alert's title says what could not be done."""
    _show_error(message, title="Could not answer")


# ---- the command line ------------------------------------------------------------------------------------------------


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    environ = os.environ
    parser = argparse.ArgumentParser(prog="mm-demo", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", default=environ.get("MM_FUSION_MODEL", DEFAULT_MODEL),
                        help="Model folder (merged model or peft adapter) or Hub id. Env: MM_FUSION_MODEL. "
                             f"Default: {DEFAULT_MODEL}, the README's sample model.")
    parser.add_argument("--trust_remote_code", action="store_true",
                        default=_env_flag("MM_FUSION_TRUST_REMOTE_CODE"),
                        help="Run the code a Hub model carries. Env: MM_FUSION_TRUST_REMOTE_CODE=1.")
    parser.add_argument("--examples", default=environ.get("MM_FUSION_EXAMPLES"),
                        help="Examples folder with examples.csv (text, image, audio[, label]; paths relative to it). "
                             "Default: the model folder's examples/. Env: MM_FUSION_EXAMPLES.")
    parser.add_argument("--index", default=environ.get("MM_FUSION_INDEX"),
                        help="A joint embedding model's search index, a folder written by `mm-index build` with the "
                             "same model. Default: an index of the examples folder's rows, built on start. "
                             "Env: MM_FUSION_INDEX.")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... Default: cuda when available.")
    parser.add_argument("--quantize", action="store_true", default=_env_flag("MM_FUSION_QUANTIZE"),
                        help="Run on the CPU with dynamic int8 Linear layers (faster on CPU; see "
                             "benchmarks/cpu_quantized.py). Env: MM_FUSION_QUANTIZE=1.")
    parser.add_argument("--host", default=environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="Address to bind; 0.0.0.0 serves the network. Env: GRADIO_SERVER_NAME.")
    parser.add_argument("--port", type=int, default=int(environ.get("GRADIO_SERVER_PORT", 7860)),
                        help="Port. Env: GRADIO_SERVER_PORT.")
    parser.add_argument("--share", action="store_true", help="Also open a public gradio.live link (off by default).")
    parser.add_argument("--max_file_size", default="20mb", help="Largest upload, e.g. 20mb; larger ones get 413.")
    parser.add_argument("--max_batch_size", type=int, default=8, help="Requests run together in one batch.")
    parser.add_argument("--concurrency_limit", type=int, default=1, help="Batches running at the same time.")
    parser.add_argument("--max_queue_size", type=int, default=64,
                        help="Requests waiting at most; more are refused with 'queue is full'.")
    parser.add_argument("--delete_cache", type=int, nargs=2, default=(600, 3600), metavar=("EVERY", "AGE"),
                        help="Every EVERY seconds delete uploads older than AGE seconds.")
    return parser.parse_args(argv)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # Gradio reads its upload folder from GRADIO_TEMP_DIR when the page is built: give this server its own, and
    # remove it on the way out (Gradio deletes the uploads, not its copies of the examples or the folders)
    own_temp_dir = None
    if not os.environ.get("GRADIO_TEMP_DIR"):
        own_temp_dir = tempfile.mkdtemp(prefix="mm-demo-")
        os.environ["GRADIO_TEMP_DIR"] = own_temp_dir
    # SIGTERM (docker stop, Spaces) takes Ctrl-C's way out, through Gradio's shutdown
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        demo = build_demo(
            args.model, trust_remote_code=args.trust_remote_code, examples_dir=args.examples, device=args.device,
            max_batch_size=args.max_batch_size, concurrency_limit=args.concurrency_limit,
            max_queue_size=args.max_queue_size, delete_cache=tuple(args.delete_cache), quantize=args.quantize,
            index_path=args.index,
        )
        # no allowed_paths: Gradio serves the examples from its own copies in the upload folder
        demo.launch(
            server_name=args.host, server_port=args.port, share=args.share, max_file_size=args.max_file_size,
            show_error=False, enable_monitoring=False, mcp_server=False, ssr_mode=False, css=PAGE_CSS,
        )
    except (OSError, ValueError) as error:  # no model or index there, not an mm-fusion model, the port is taken, ...
        print(f"mm-demo: error: {error}", file=sys.stderr)
        return 2
    finally:
        if own_temp_dir:
            shutil.rmtree(own_temp_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
elif os.environ.get("MM_FUSION_MODEL"):
    # hosts that import the app and launch `demo` themselves (`gradio demo/app.py`); the queue limits come with it,
    # the page's CSS does not (Gradio 6 takes CSS in launch() only): such a host passes css=PAGE_CSS
    demo = build_demo(
        os.environ["MM_FUSION_MODEL"],
        trust_remote_code=_env_flag("MM_FUSION_TRUST_REMOTE_CODE"),
        examples_dir=os.environ.get("MM_FUSION_EXAMPLES"),
        quantize=_env_flag("MM_FUSION_QUANTIZE"),
        index_path=os.environ.get("MM_FUSION_INDEX"),
    )
