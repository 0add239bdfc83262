"""`mm-publish`: a trained mm-fusion model as a Hub-ready folder (weights, code, processor, pipeline, model card), and
a safe upload.

    mm-publish --model outputs/sample/model --repo-id ORG/NAME --dry-run
    mm-publish --model outputs/sample/model --repo-id ORG/NAME --private --revision v1 \\
        --base-model text=sentence-transformers/all-MiniLM-L6-v2
    mm-publish --model outputs/run/model --repo-id ORG/NAME-lora --adapter-only \\
        --base-model vision=google/vit-base-patch16-224-in21k --base-model audio=facebook/wav2vec2-base

The release folder is rebuilt from the model, never copied wholesale, and holds only files on `ALLOWED_FILES`:
`config.json` (with `auto_map` for AutoConfig, AutoModel, AutoModelForSequenceClassification and AutoProcessor, and
`custom_pipelines` for the `mm-fusion-classification` pipeline; a multi-task model maps AutoModel to
`MMFusionForMultiTask`, which the pipeline loads), safetensors weights (sharded above
`--max-shard-size`) or, with `--adapter-only`, the peft adapter, the processor and tokenizer files (a generation
model's decoder tokenizer in `decoder_tokenizer/`, and its `generation_config.json`), the flat code files
(`configuration_mm.py`, `modeling_mm.py`, `processing_mm.py`, `media.py`, `pipeline_mm.py`) and a `README.md`
model card. Everything else in the model folder (optimizer and RNG states, pickles, checkpoints, logs, the training
records) is left out, and the command lists what it left out. The upload names each file of the release, so nothing
else can travel with it.

A multi-task model (`config.tasks`) gets a card that names its tasks, shows each task's output in its usage
snippets, and has a model-index result per task and metric (from the report's `tasks` section); it is published
merged (`--adapter-only` is refused for it).

A joint embedding model (`MMFusionContrastiveModel`, `config.is_contrastive`) is published with `custom_pipelines`
for the `mm-fusion-zero-shot-classification` and `mm-fusion-feature-extraction` pipelines (AutoModel maps to its
class), the pipeline tag `zero-shot-image-classification` (`feature-extraction` without an image and a text tower),
and a card that shows both pipelines and the embeddings step by step; its report needs no classifier sections.

A generation model (`MMFusionForConditionalGeneration`, `config.decoder_config`) is published with its
`generation_config.json` and the processor's `decoder_tokenizer/` folder (the decoder LM's tokenizer and chat template),
`custom_pipelines` for the `mm-fusion-text-generation` pipeline (AutoModel maps to its class), the pipeline tag
`image-text-to-text` (an image tower: the Hub's tag for text generated from an image and optional text),
`audio-text-to-text` (an audio tower, no image tower) or `text-generation` (text only), and a card that names the task
(captioning, question answering, dialogue; what it was trained to write when the training record says), shows the
pipeline with no prompt, a question and a dialogue history, and generation step by step, with the report's sample
generations where it has them. `--base-model decoder=ORG/NAME` names the decoder LM's Hub id, which an adapter-only
release needs (it loads onto the towers and that decoder, or onto the published mm-fusion model it was trained from:
a generation model, or a model without a decoder whose encoder the decoder learnt to read, `from_encoder`).

Local paths stay local: a tower loaded from a local folder is named in the release only by the Hub id given with
`--base-model MODALITY=ORG/NAME`. An adapter-only release needs those ids for every tower (or `--base-model
model=ORG/NAME`, a published mm-fusion model it was fine-tuned from), since it loads onto them.

The token is found by huggingface_hub (`HF_TOKEN`, then the stored login of `hf auth login`), handed to `HfApi`, and
never printed, logged or written into any file.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import math
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.repocard_data import model_index_to_eval_results
from huggingface_hub.utils import validate_repo_id
from peft import PeftModel
from transformers import AutoConfig, AutoProcessor, PreTrainedConfig
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.utils.hub import convert_file_size_to_int

import modeling_mm.modeling_mm
import modeling_mm.pipeline_mm
import processors.processing_mm
from modeling_mm import MMFusionContrastiveModel, MMFusionForConditionalGeneration, MMFusionForMultiTask
from modeling_mm.configuration_mm import MODALITY_NAMES
from modeling_mm.pipeline_mm import (
    FEATURE_EXTRACTION_TASK,
    GENERATION_TASK,
    PIPELINE_TASK,
    ZERO_SHOT_TASK,
    MMFusionClassificationPipeline,
    MMFusionFeatureExtractionPipeline,
    MMFusionTextGenerationPipeline,
    MMFusionZeroShotClassificationPipeline,
)
from processors.processing_mm import DECODER_TOKENIZER_SUBFOLDER
from training.lora import checkpoint_has_decoder, load_trained_model
from training.sample_data import default_sample_dir

logger = logging.getLogger("mm_fusion.publish")

# The modules whose files travel with a model; the files they import relatively travel too.
CODE_MODULES = (modeling_mm.modeling_mm, processors.processing_mm, modeling_mm.pipeline_mm)


def _code_files() -> dict[str, Path]:
    files = {}
    for module in CODE_MODULES:
        for path in (module.__file__, *get_relative_import_files(module.__file__)):
            files[Path(path).name] = Path(path)
    return files


CODE_FILES = _code_files()

# A tokenizer's files, as transformers saves them (the chat template of a decoder tokenizer in chat_template.jinja)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "spm.model",
    "tokenizer.model",
)

# What a release may hold (fnmatch patterns on paths relative to the release; the one subfolder is a generation
# model's decoder tokenizer). The weights are safetensors only.
ALLOWED_FILES = (
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-?????-of-?????.safetensors",
    "model.safetensors.index.json",
    "adapter_config.json",
    "adapter_model.safetensors",
    "processor_config.json",
    "preprocessor_config.json",
    *TOKENIZER_FILES,
    *(f"{DECODER_TOKENIZER_SUBFOLDER}/{name}" for name in TOKENIZER_FILES),
    *sorted(CODE_FILES),
)

# Why a file of the model folder stays behind, first match wins (fnmatch on the name; a folder's name ends in "/").
_LEFT_OUT_REASONS = (
    ("checkpoint-*/", "training checkpoint"),
    ("optimizer*", "optimizer state"),
    ("scheduler*", "learning-rate scheduler state"),
    ("rng_state*", "RNG state"),
    ("random_states*", "RNG state"),
    ("training_args.bin", "pickled training arguments"),
    ("*.pkl", "pickle"),
    ("*.pickle", "pickle"),
    ("*.bin", "pickle (PyTorch .bin)"),
    ("*.pt", "pickle (PyTorch .pt)"),
    ("*.pth", "pickle (PyTorch .pth)"),
    ("*.ckpt", "pickle (checkpoint)"),
    ("*.log", "log"),
    ("logs/", "logs"),
    ("runs/", "logs"),
    ("events.out.tfevents*", "TensorBoard log"),
    ("training_args.json", "training record (summarised in the model card)"),
    ("metrics.json", "training record (summarised in the model card)"),
    ("evaluation/", "evaluation report (summarised in the model card)"),
)

BASE_KEYS = ("vision", "text", "audio", "decoder", "model")
_DATA_FILE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".arrow", ".txt")
LOCAL_SOURCE = "a local checkpoint"
CARD_QUESTION = "Question: what colour is it? Answer:"  # the generation cards' example prompt


@dataclass
class Release:
    """A release folder, built by `build_release`.

    `files` are the names of its files (all of them, sorted); `left_out` maps each file or folder of the model folder
    that was not carried over to the reason; `card` is the model card in `README.md`, and `card_for(revision)` the
    same card with its usage snippets pinned to `revision`.

    Example:

    ```python
    >>> release = build_release("outputs/sample/model", "outputs/release", "ORG/NAME")  # doctest: +SKIP
    >>> release.files  # doctest: +SKIP
    ['README.md', 'config.json', 'configuration_mm.py', 'media.py', 'model.safetensors', 'modeling_mm.py', ...]
    >>> commit = upload_release(release, "ORG/NAME", private=True)  # doctest: +SKIP
    ```
    """

    folder: Path
    files: list[str]
    left_out: dict[str, str]
    card: ModelCard
    card_for: Callable[[str], ModelCard]
    adapter_only: bool

    def describe(self) -> str:
        """The file list with sizes, and what was left out of the model folder."""
        lines = [f"release folder {self.folder} ({len(self.files)} files):"]
        sizes = {name: (self.folder / name).stat().st_size for name in self.files}
        width = max(len(name) for name in self.files)
        lines += [f"  {name:<{width}}  {_human_size(size):>9}" for name, size in sizes.items()]
        lines.append(f"  {'total':<{width}}  {_human_size(sum(sizes.values())):>9}")
        if self.left_out:
            lines.append(f"left out of the model folder ({len(self.left_out)}; not on the allow-list, never uploaded):")
            lines += [f"  {name}  ({reason})" for name, reason in self.left_out.items()]
        return "\n".join(lines)


# ---- building the release folder -----------------------------------------------------------------------------------

def build_release(
    model_dir: str | Path,
    out_dir: str | Path,
    repo_id: str,
    *,
    adapter_only: bool = False,
    report: str | Path | None = None,
    base_models: dict[str, str] | None = None,
    dataset: str | None = None,
    license: str = "apache-2.0",
    revision: str | None = None,
    max_shard_size: str | int = "5GB",
) -> Release:
    """Build the release folder of the model in `model_dir` (what `mm-train` writes: a merged model, or a peft
    adapter folder) in `out_dir`, which must not exist or be empty. Returns the `Release`.

    The model is loaded and saved again (so a broken folder fails here, not for the people who download it), merged
    when `model_dir` holds an adapter, unless `adapter_only` asks to publish the adapter itself. `report` is the
    `mm-eval` report.json for the card (default `<model_dir>/evaluation/report.json` when it exists; without one the
    card says the model was not evaluated). `base_models` maps "vision"/"text"/"audio" to the Hub id of that tower,
    "decoder" to that of a generation model's decoder LM, and "model" to the Hub id of an mm-fusion model it was
    fine-tuned from. `dataset` is the Hub id of the training data for the card. `revision` is the branch the card's
    snippets name until an upload pins them to its commit.

    Raises `ValueError` naming the argument for: a folder that is not a model or has no processor, `adapter_only`
    for a merged model or a multi-task model, an adapter whose base cannot be named by Hub ids,
    a bad repo id, base model, shard size or report, and a non-empty `out_dir`.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    _check_repo_id("repo_id", repo_id, namespaced=True)
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"model: {model_dir} is not a model folder (it has no config.json)")
    if not (model_dir / "processor_config.json").is_file():
        raise ValueError(f"model: {model_dir} has no processor_config.json; save the processor with the model")
    is_adapter = (model_dir / "adapter_config.json").is_file()
    if adapter_only and not is_adapter:
        raise ValueError(f"adapter_only: {model_dir} holds a merged model, not a peft adapter "
                         "(train with --merge_lora false to keep the adapter)")
    if adapter_only and not (model_dir / "adapter_model.safetensors").is_file():
        raise ValueError(f"adapter_only: {model_dir} has no adapter_model.safetensors (pickled adapters are refused)")
    try:
        convert_file_size_to_int(max_shard_size)
    except ValueError:
        raise ValueError(f"max_shard_size: {max_shard_size!r} is not a size such as '5GB' or '500MB'") from None
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"out: {out_dir} is not empty; give a new or empty folder")
    config = AutoConfig.from_pretrained(model_dir)
    report_path = Path(report) if report else model_dir / "evaluation" / "report.json"
    if report is not None and not report_path.is_file():
        raise ValueError(f"report: {report_path} does not exist")
    evaluation = read_report(report_path, classifier=_is_classifier(config)) if report_path.is_file() else None
    training_args = _read_json(model_dir / "training_args.json")
    metrics = _read_json(model_dir / "metrics.json")

    if adapter_only and config.tasks:
        # its snippets, auto_map and base loading are written for a classifier's adapter
        names = ", ".join(task["name"] for task in config.tasks)
        raise ValueError(f"adapter_only: {model_dir} holds a multi-task model ({names}); publish it merged "
                         "(without --adapter-only)")
    adapter_base = json.loads((model_dir / "adapter_config.json").read_text()).get("base_model_name_or_path") \
        if is_adapter else None
    trained_from = ((training_args or {}).get("model") or {}).get("model")
    bases = resolve_base_models(config, base_models or {}, adapter_base or trained_from)
    if adapter_only and bases["model"] is None and adapter_base:
        # its frozen weights are that model's, which the towers' own checkpoints need not match
        raise ValueError(f"base_model: the adapter was trained on the mm-fusion model in {adapter_base}, which others "
                         "cannot download; publish that model first and pass --base-model model=ORG/NAME, or "
                         "publish the merged model (without --adapter-only)")
    # a decoder trained on the encoder of a model without one (mm-train --task generation --model <classifier>)
    encoder_base = bool(adapter_only and _is_generation(config) and bases["model"] and _has_no_decoder(adapter_base))
    needs_decoder = bases["model"] is None or encoder_base
    if adapter_only and _is_generation(config) and needs_decoder and bases["decoder"] is None:
        source = config.decoder_config._name_or_path or "(unknown)"
        raise ValueError(f"base_model: the adapter loads onto its decoder LM, which came from {source}, which others "
                         "cannot download; pass --base-model decoder=ORG/NAME (its Hub id), or publish the merged "
                         "model (without --adapter-only)")
    if adapter_only and bases["model"] is None:
        for modality in config.modalities:
            if bases[modality] is None:
                source = config.tower_config(modality)._name_or_path or "(unknown)"
                raise ValueError(
                    f"base_model: the adapter loads onto its towers, but the {modality} tower came from {source}, "
                    f"which others cannot download; pass --base-model {modality}=ORG/NAME (its Hub id), or publish "
                    "the merged model (without --adapter-only)")

    card_for = functools.partial(
        render_card, repo_id=repo_id, config=config, adapter_only=adapter_only, bases=bases,
        training_args=training_args, metrics=metrics, report=evaluation, dataset=dataset, license=license,
        pipeline_tag=default_pipeline_tag(config), encoder_base=encoder_base,
    )
    card = card_for(revision or "main")
    check_card(card)

    logger.info("building the release of %s in %s", model_dir, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        if adapter_only:
            _save_adapter(model_dir, out_dir, config, bases)
        else:
            _save_merged(model_dir, out_dir, bases, max_shard_size)
        AutoProcessor.from_pretrained(model_dir).save_pretrained(out_dir)
        for name, path in CODE_FILES.items():  # the current code, also where save_pretrained copied none (adapters)
            shutil.copyfile(path, out_dir / name)
        card.save(out_dir / "README.md")
    except BaseException:
        # a half-built release must not be mistaken for a whole one (out_dir was empty or new)
        shutil.rmtree(out_dir, ignore_errors=True)
        raise

    files = sorted(p.relative_to(out_dir).as_posix() for p in out_dir.rglob("*") if p.is_file())
    for name in files:
        if not _allowed(name):
            raise ValueError(f"out: the release would hold {name}, which is not on the allow-list")
    left_out = _left_out(model_dir)
    if left_out:
        logger.warning("left out of the release (not on the allow-list): %s",
                       ", ".join(f"{name} ({reason})" for name, reason in left_out.items()))
    return Release(out_dir, files, left_out, card, card_for, adapter_only)


def resolve_base_models(config: PreTrainedConfig, given: dict[str, str], trained_from: str | None
                        ) -> dict[str, str | None]:
    """The Hub id of each tower ("vision", "text", "audio"), of a generation model's decoder LM ("decoder") and of
    the mm-fusion model the model was fine-tuned from ("model"), or None where none is known: `given` first, else the
    recorded source when it is a Hub id rather than a local path. Raises `ValueError` for an unknown key, a modality
    the model has no tower for, a decoder for a model without one, or a bad Hub id."""
    for key, repo_id in given.items():
        if key not in BASE_KEYS:
            raise ValueError(f"base_model: unknown key {key!r}; expected one of {BASE_KEYS}")
        if key == "decoder" and not _is_generation(config):
            raise ValueError("base_model: decoder: the model has no decoder LM (it is not a generation model)")
        if key not in ("model", "decoder") and key not in config.modalities:
            raise ValueError(f"base_model: {key}: the model has no {key} tower (towers: {list(config.modalities)})")
        _check_repo_id(f"base_model: {key}", repo_id)
    bases: dict[str, str | None] = {"model": given.get("model") or _hub_id(trained_from)}
    for modality in config.modalities:
        bases[modality] = given.get(modality) or _hub_id(config.tower_config(modality)._name_or_path)
    if _is_generation(config):
        bases["decoder"] = given.get("decoder") or _hub_id(config.decoder_config._name_or_path)
    return bases


def _save_merged(model_dir: Path, out_dir: Path, bases: dict[str, str | None], max_shard_size: str | int) -> None:
    config = AutoConfig.from_pretrained(model_dir)
    head_class = _head_class(config)
    if head_class is not None and not (model_dir / "adapter_config.json").is_file():
        # load_trained_model reads `architectures` for the base model or a classifier: a multi-task or joint
        # embedding folder would load as a classifier with a new head, without its own heads
        model = head_class.from_pretrained(model_dir)
    else:
        model = load_trained_model(model_dir)
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    if head_class is not None and not isinstance(model, head_class):
        raise ValueError(f"model: {model_dir} holds a {head_class.__name__} adapter that loaded as "
                         f"{type(model).__name__}; save the merged model (mm-train --merge_lora true) and publish that"
                         + (", or publish the adapter with --adapter-only" if config.is_contrastive else ""))
    _set_release_config(model.config, bases)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)


def _head_class(config: PreTrainedConfig) -> type | None:
    """The class a multi-task, joint embedding or generation checkpoint loads as; None for the base model and a
    classifier."""
    if config.tasks:
        return MMFusionForMultiTask
    if config.is_contrastive:
        return MMFusionContrastiveModel
    return MMFusionForConditionalGeneration if _is_generation(config) else None


def _is_generation(config: PreTrainedConfig) -> bool:
    return getattr(config, "decoder_config", None) is not None


def _is_classifier(config: PreTrainedConfig) -> bool:
    """Whether the model's report is a classifier's (a single- or multi-task one), with the sections that needs."""
    return not (config.is_contrastive or _is_generation(config))


def _has_no_decoder(model: str | None) -> bool:
    """Whether the mm-fusion model `model` (a folder, or a Hub id in the cache) is known to have no decoder LM."""
    try:
        return model is not None and not checkpoint_has_decoder(model)
    except (OSError, ValueError):  # gone, or not reachable offline: nothing known
        return False


def _save_adapter(model_dir: Path, out_dir: Path, config: PreTrainedConfig, bases: dict[str, str | None]) -> None:
    adapter_config = json.loads((model_dir / "adapter_config.json").read_text())
    # the base the adapter loads onto, as a Hub id; None means "rebuild it from the towers named in config.json"
    adapter_config["base_model_name_or_path"] = bases["model"]
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(model_dir / "adapter_model.safetensors", out_dir / "adapter_model.safetensors")
    config = copy.deepcopy(config)  # the card reads the caller's
    architecture = (config.architectures or ["MMFusionForSequenceClassification"])[0]
    _set_release_config(config, bases)
    # an adapter folder's config names only AutoConfig: the base has to be buildable from the code in the release
    if config.is_contrastive:  # as MMFusionPreTrainedModel.save_pretrained maps a contrastive checkpoint
        config.auto_map = {**(config.auto_map or {}), "AutoModel": "modeling_mm.MMFusionContrastiveModel"}
        config.auto_map.pop("AutoModelForSequenceClassification", None)
    elif _is_generation(config):  # and a generation checkpoint, whose decoding settings travel beside it
        config.auto_map = {**(config.auto_map or {}), "AutoModel": "modeling_mm.MMFusionForConditionalGeneration"}
        config.auto_map.pop("AutoModelForSequenceClassification", None)
        if (model_dir / "generation_config.json").is_file():
            shutil.copyfile(model_dir / "generation_config.json", out_dir / "generation_config.json")
    else:
        config.auto_map = {**(config.auto_map or {}), "AutoModel": "modeling_mm.MMFusionModel",
                           "AutoModelForSequenceClassification": "modeling_mm.MMFusionForSequenceClassification"}
    config.architectures = [architecture]
    config.save_pretrained(out_dir)


def _set_release_config(config: PreTrainedConfig, bases: dict[str, str | None]) -> None:
    """auto_map for the processor and the pipeline entries; towers and decoder named by Hub id, never by a local
    path."""
    for modality in config.modalities:
        config.tower_config(modality)._name_or_path = bases[modality] or ""
    if _is_generation(config):
        config.decoder_config._name_or_path = bases["decoder"] or ""
    config.auto_map = {**(config.auto_map or {}), "AutoProcessor": "processing_mm.MMFusionProcessor"}
    config.custom_pipelines = release_pipelines(config)


def release_pipelines(config: PreTrainedConfig) -> dict[str, dict[str, Any]]:
    """The `custom_pipelines` entry of a release's config.json, which `pipeline(task, model=REPO,
    trust_remote_code=True)` reads: per task, the pipeline class in the release's `pipeline_mm.py` and the Auto class
    it loads the model with. A joint embedding model gets zero-shot classification (when it has a text tower and an
    image or audio one) and feature extraction; a generation model text generation; any other model the
    classification pipeline. Each loads the model through AutoModel, which maps a multi-task, contrastive or
    generation checkpoint to its class, except a classifier's (AutoModelForSequenceClassification)."""
    if config.is_contrastive:
        pipelines = {ZERO_SHOT_TASK: MMFusionZeroShotClassificationPipeline,
                     FEATURE_EXTRACTION_TASK: MMFusionFeatureExtractionPipeline}
        if _zero_shot_example(config) is None:  # zero-shot compares an image or a clip with label texts
            del pipelines[ZERO_SHOT_TASK]
        auto_class = "AutoModel"
    elif _is_generation(config):
        pipelines = {GENERATION_TASK: MMFusionTextGenerationPipeline}
        auto_class = "AutoModel"
    else:
        pipelines = {PIPELINE_TASK: MMFusionClassificationPipeline}
        auto_class = "AutoModel" if config.tasks else "AutoModelForSequenceClassification"
    return {task: {"impl": f"{impl.__module__.rsplit('.', 1)[-1]}.{impl.__name__}", "pt": [auto_class],
                   "type": "multimodal"} for task, impl in pipelines.items()}


def _left_out(model_dir: Path) -> dict[str, str]:
    left_out = {}
    for path in sorted(model_dir.iterdir()):
        name = path.name + ("/" if path.is_dir() else "")
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
        if files and all(_allowed(p.relative_to(model_dir).as_posix()) for p in files):
            continue  # rebuilt in the release rather than copied (a folder: the decoder tokenizer's)
        left_out[name] = next((reason for pattern, reason in _LEFT_OUT_REASONS if fnmatch(name, pattern)),
                              "not on the allow-list")
    return left_out


# ---- the model card ------------------------------------------------------------------------------------------------

def read_report(path: str | Path, classifier: bool = True) -> dict[str, Any]:
    """Read an `mm-eval` report.json and check the fields the card reads: `headline` (metric -> number), `data.source`,
    `data.split`, `data.rows`, `model.modalities`, `problem_type`, and `ablation` rows with a `modalities` list. A
    multi-task model's report has, instead of `headline` and `problem_type`, a `tasks` section: per task name its
    `problem_type`, `headline`, and optional `metrics` (with a multi-label task's `thresholds`) and `ablation` rows.
    The report of a model that is no `classifier` (a joint embedding or a generation model) needs only `data` and
    `model` (its sections are its own, which `training.report` reads for the model-index); a `headline` it has is
    shown as for a classifier, with its `ablation` rows and `fusion_gain`, and a generation report's `examples`.
    Raises `ValueError` naming the file and the field."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"report: cannot read {path}: {error}") from None
    multi_task = "tasks" in report
    for section in ("data", "model") if multi_task or not classifier else ("headline", "data", "model"):
        if not isinstance(report.get(section), dict):
            raise ValueError(f"report: {path} has no '{section}' section; is it an mm-eval report.json?")
    for field in ("source", "split", "rows"):
        if field not in report["data"]:
            raise ValueError(f"report: data.{field} is missing in {path}")
    if not isinstance(report["model"].get("modalities"), list):
        raise ValueError(f"report: model.modalities is missing in {path}")
    if not classifier and not multi_task:
        if "headline" in report and not isinstance(report["headline"], dict):
            raise ValueError(f"report: headline in {path} is not a mapping of metric names to values")
        for index, row in enumerate(report.get("ablation") or []):
            if not isinstance(row, dict) or not isinstance(row.get("modalities"), list):
                raise ValueError(f"report: ablation[{index}] in {path} has no 'modalities' list")
        if "examples" in report and not (isinstance(report["examples"], list)
                                         and all(isinstance(row, dict) for row in report["examples"])):
            raise ValueError(f"report: examples in {path} is not a list of rows")
        return report
    sections = [(f"tasks.{name}.", section) for name, section in _task_sections(report, path)] if multi_task \
        else [("", report)]
    for where, section in sections:
        if not isinstance(section.get("problem_type"), str):
            raise ValueError(f"report: {where}problem_type is missing in {path}")
        if not isinstance(section.get("headline"), dict) or not any(
                _is_number(value) for value in section["headline"].values()):
            raise ValueError(f"report: {where}headline in {path} holds no metric values")
        for index, row in enumerate(section.get("ablation") or []):
            if not isinstance(row, dict) or not isinstance(row.get("modalities"), list):
                raise ValueError(f"report: {where}ablation[{index}] in {path} has no 'modalities' list")
    return report


def _task_sections(report: dict[str, Any], path: str | Path = "the report") -> list[tuple[str, dict[str, Any]]]:
    """A multi-task report's `(task name, section)` pairs in task order (`training.report.report_sections`).
    Raises `ValueError` naming `tasks` when it is not a non-empty mapping of task names to sections."""
    # imported here: it pulls in scipy and scikit-learn, which only a card with results needs
    from training.report import report_sections

    tasks = report.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        raise ValueError(f"report: tasks in {path} must map each task name to its section")
    for name, section in tasks.items():
        if not isinstance(section, dict):
            raise ValueError(f"report: tasks.{name} in {path} is not a section (a dict)")
    return report_sections(report)


def default_pipeline_tag(config: PreTrainedConfig) -> str:
    """The Hub has no tag for a classifier over image + text + audio: `text-classification` when the model reads text,
    else `image-classification` or `audio-classification` (the rule of `training.report.model_index_results`,
    so the tag and the model-index task agree). A multi-task model gets the same tag: its heads are those of
    sequence classification (single-label, multi-label, regression), and the Hub has no multi-task tag. A joint
    embedding model gets `zero-shot-image-classification` when it has an image and a text tower (its zero-shot
    pipeline's use the Hub knows), else `feature-extraction` (the Hub has no zero-shot audio tag). A generation model
    gets the Hub's tag for text generated from what it reads: `image-text-to-text` with an image tower (an image and
    optional text in, as BLIP-2 and LLaVA; the Hub has no tag that adds audio), else `audio-text-to-text` with an
    audio tower, else `text-generation`."""
    if config.is_contrastive:
        has_image_and_text = {"vision", "text"} <= set(config.modalities)
        return "zero-shot-image-classification" if has_image_and_text else "feature-extraction"
    if _is_generation(config):
        if "vision" in config.modalities:
            return "image-text-to-text"
        return "audio-text-to-text" if "audio" in config.modalities else "text-generation"
    for modality in ("text", "vision", "audio"):
        if modality in config.modalities:
            return f"{MODALITY_NAMES[modality].user}-classification"
    raise ValueError("config: the model has no tower")


def render_card(
    revision: str,
    *,
    repo_id: str,
    config: PreTrainedConfig,
    adapter_only: bool,
    bases: dict[str, str | None],
    training_args: dict[str, Any] | None,
    metrics: dict[str, Any] | None,
    report: dict[str, Any] | None,
    dataset: str | None,
    license: str,
    pipeline_tag: str,
    encoder_base: bool = False,
) -> ModelCard:
    """The model card: YAML metadata (license, library, pipeline tag, tags, base models, data sets, model-index from
    the evaluation report) and a body with usage snippets pinned to `revision`, the training settings, the evaluation
    tables and the modality ablation."""
    train_source = ((training_args or {}).get("data") or {}).get("train_data")
    datasets = [dataset] if dataset else [d for d in [_hub_id(train_source)] if d]
    parts = [*config.modalities, *(["decoder"] if _is_generation(config) else [])]
    base_model = [bases["model"]] if bases["model"] else [bases[part] for part in parts if bases[part]]
    modalities = [MODALITY_NAMES[m].user for m in config.modalities]
    data = ModelCardData(
        model_name=repo_id.split("/")[-1],
        license=license,
        library_name="peft" if adapter_only else "transformers",
        pipeline_tag=pipeline_tag,
        tags=["mm-fusion", "multimodal", *modalities, *(["multi-task"] if config.tasks else []),
              *(["joint-embedding", "zero-shot", "retrieval"] if config.is_contrastive else []),
              *(["text-generation", "captioning", "question-answering", "dialogue"] if _is_generation(config)
                else []),
              "custom_code", *(["peft", "lora"] if adapter_only else [])],
        base_model=base_model or None,
        datasets=datasets or None,
        # no model-index rather than an empty one, where the report has no metric the Hub knows
        eval_results=(_eval_results(report, dataset, _is_classifier(config)) if report else None) or None,
        # several base models read as a merge on the Hub unless the relation is stated
        base_model_relation=("adapter" if adapter_only else "finetune") if base_model else None,
    )
    sections = [
        _summary(repo_id, config, adapter_only, bases, training_args),
        _usage(repo_id, revision, config, adapter_only, bases, encoder_base),
        _training_section(config, training_args, metrics, bases),
        _evaluation_section(report),
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def check_card(card: ModelCard) -> None:
    """Check the card's metadata offline, for the fields mm-publish writes, as the Hub would (`ModelCard.validate`
    asks the Hub, which needs the network): a license id, `library_name`, a pipeline tag, tags, base models and data
    sets that are valid Hub ids, and a model-index whose every result parses and has a finite value.
    Raises `ValueError` naming the field."""
    metadata = card.data.to_dict()
    for field in ("license", "pipeline_tag"):
        value = metadata.get(field)
        if not isinstance(value, str) or not re.fullmatch(r"[a-z0-9][a-z0-9.\-]*", value):
            raise ValueError(f"card: {field} {value!r} is not a Hub id such as 'apache-2.0' / 'other'")
    if metadata.get("library_name") not in ("transformers", "peft"):
        raise ValueError(f"card: library_name {metadata.get('library_name')!r} is not 'transformers' or 'peft'")
    if not all(isinstance(tag, str) and tag for tag in metadata.get("tags") or []):
        raise ValueError(f"card: tags {metadata.get('tags')!r} must be non-empty strings")
    for field in ("base_model", "datasets"):
        values = metadata.get(field) or []
        for index, value in enumerate([values] if isinstance(values, str) else values):
            _check_repo_id(f"card: {field}[{index}]", value)
    if "model-index" in metadata:
        try:
            _, results = model_index_to_eval_results(metadata["model-index"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"card: model-index does not parse: {error!r}") from None
        for index, result in enumerate(results):
            if not _is_number(result.metric_value):
                raise ValueError(f"card: model-index result {index} ({result.metric_type}) has value "
                                 f"{result.metric_value!r}, not a finite number")


def _eval_results(report: dict[str, Any], dataset: str | None, classifier: bool = True) -> list[EvalResult]:
    """The model-index results: one per task and headline metric (`training.report.model_index_results`; a
    multi-task model's metric names carry the task's name, "intensity/mae"). For a model that is no `classifier` (a
    joint embedding or generation model), whatever that function gives for its report, and none where it reads a
    section the report does not have or cannot read it."""
    # imported here: it pulls in scipy and scikit-learn, which only a card with results needs
    from training.report import model_index_results

    name, kind = _source_name(str(report["data"]["source"]))
    try:
        return model_index_results(report, dataset_name=dataset or name, dataset_type=dataset or kind)
    except (KeyError, TypeError, ValueError) as error:
        if classifier:
            raise
        # a joint embedding or generation model's report has sections of its own, not a classifier's (read_report
        # checked no more)
        logger.warning("the card has no model-index: training.report cannot read this %s model's report (%r)",
                       "joint embedding" if report.get("problem_type") == "contrastive" else "generation", error)
        return []


_PROBLEM_TYPE_NAMES = {"single_label_classification": "single-label classification",
                       "multi_label_classification": "multi-label classification", "regression": "regression"}


def _describe_task(task: dict[str, Any]) -> str:
    """A task of `config.tasks` for the card: "`name` (single-label classification over 3 labels: `a`, `b`, `c`)"."""
    if task["problem_type"] == "regression":
        outputs = "one output" if task["num_outputs"] == 1 else f"{task['num_outputs']} outputs"
        return f"`{task['name']}` (regression, {outputs}, in the targets' units)"
    labels = ", ".join(f"`{label}`" for label in task["labels"])
    return (f"`{task['name']}` ({_PROBLEM_TYPE_NAMES[task['problem_type']]} over {len(task['labels'])} labels: "
            f"{labels})")


def _summary(repo_id: str, config: PreTrainedConfig, adapter_only: bool, bases: dict[str, str | None],
             training_args: dict[str, Any] | None = None) -> str:
    towers = "; ".join(
        f"{MODALITY_NAMES[m].user}: `{bases[m]}`" if bases[m] else f"{MODALITY_NAMES[m].user}: {LOCAL_SOURCE} "
        f"({config.tower_config(m).model_type})" for m in config.modalities)
    fusion = (f"{config.fusion_num_layers} cross-attention fusion layers (width {config.fusion_hidden_size}, "
              f"{config.fusion_num_heads} heads)")
    if config.is_contrastive:
        loss = ("SigLIP's sigmoid loss" if config.contrastive_loss == "sigmoid"
                else "a symmetric InfoNCE loss (as CLIP)")
        what = (f"A multimodal joint embedding model made with mm-fusion: pretrained towers ({towers}) joined by "
                f"{fusion}, and a projection per modality into one {config.projection_dim}-dimensional space, trained "
                f"with {loss} so that the modalities of one item land close together. Each modality of an item is "
                "embedded alone (unit vectors), so any two can be compared: retrieval across modalities and zero-shot "
                "classification against label texts; a sample's modalities can also be embedded fused.")
    elif _is_generation(config):
        what = (f"A multimodal text generation model made with mm-fusion: pretrained towers ({towers}) joined by "
                f"{fusion}, and {_describe_decoder(config, bases)}, which writes text conditioned on the fused "
                "inputs. It serves captioning (no prompt: a caption or description), question answering (a question "
                "as the prompt) and dialogue (a dialogue history as the prompt; the assistant's next turn is "
                f"generated). {_trained_to_write(training_args)}")
    elif config.tasks:
        heads = "; ".join(_describe_task(task) for task in config.tasks)
        what = (f"A multimodal multi-task model made with mm-fusion: pretrained towers ({towers}) joined by {fusion} "
                f"and one head per task, {len(config.tasks)} tasks: {heads}.")
    else:
        labels = ", ".join(f"`{config.id2label[i]}`" for i in sorted(config.id2label))
        what = (f"A multimodal classifier made with mm-fusion: pretrained towers ({towers}) joined by {fusion} and a "
                f"classification head over {config.num_labels} labels: {labels}.")
    text = (f"# {repo_id.split('/')[-1]}\n\n{what} "
            f"Each sample may have any subset of {', '.join(MODALITY_NAMES[m].user for m in config.modalities)}.")
    if adapter_only:
        base = f"the mm-fusion model `{bases['model']}`" if bases["model"] else "the pretrained towers above"
        if _is_generation(config) and bases.get("decoder"):
            base += f" and the decoder LM `{bases['decoder']}`"
        text += (f"\n\nThis repository holds a peft LoRA adapter, with the fusion layers, the head and any tower "
                 f"trained in full saved alongside it. It loads onto {base}, as shown below.")
    return text


def _describe_decoder(config: PreTrainedConfig, bases: dict[str, str | None]) -> str:
    """A generation model's decoder for the card: "the decoder LM `gpt2` (gpt2), reading the fused token states by
    cross-attention"."""
    decoder = config.decoder_config
    source = f"`{bases['decoder']}` ({decoder.model_type})" if bases.get("decoder") else \
        f"{LOCAL_SOURCE} ({decoder.model_type})"
    reads = "the fused token states" if not config.num_query_tokens else \
        f"{config.num_query_tokens} learned queries over the fused token states"
    how = "by cross-attention" if config.decoder_connection == "cross_attention" else \
        "as a prefix before the prompt's token embeddings"
    return f"the decoder LM {source}, reading {reads} {how}"


def _trained_to_write(training_args: dict[str, Any] | None) -> str:
    """What a generation model was trained to write, from its training record (mm-train's data settings)."""
    data = (training_args or {}).get("data") or {}
    target, prompt = data.get("target_column"), data.get("prompt_column")
    if not target:
        return "What it was trained to write was not recorded with it."
    if not prompt:
        return f"It was trained to write the `{target}` column without a prompt (captioning)."
    return (f"It was trained to write the `{target}` column prompted by the `{prompt}` column (question answering; "
            "dialogue where a prompt cell holds a history).")


def _usage(repo_id: str, revision: str, config: PreTrainedConfig, adapter_only: bool,
           bases: dict[str, str | None], encoder_base: bool = False) -> str:
    examples = {"vision": ("image", '"image.png"'), "text": ("text", '"a caption"'), "audio": ("audio", '"audio.wav"')}
    # the pipeline takes one sample per keyword (`image=`), the processor a batch (`images=[...]`)
    pipe_call = ", ".join(f"{examples[m][0]}={examples[m][1]}" for m in config.modalities)
    call = ", ".join(f"{examples[m][0] + ('s' if m == 'vision' else '')}=[{examples[m][1]}]" for m in config.modalities)
    if adapter_only:
        # the adapter's own class, for a joint embedding or generation model also on a published base (whose code
        # may predate it)
        generation = _is_generation(config)
        class_name = ("MMFusionContrastiveModel" if config.is_contrastive else
                      "MMFusionForConditionalGeneration" if generation else "MMFusionForSequenceClassification")
        auto = "AutoConfig, AutoProcessor" + (", GenerationConfig" if generation else "")
        remote_class = (f"from peft import PeftModel\nfrom transformers import {auto}\n"
                        "from transformers.dynamic_module_utils import get_class_from_dynamic_module")
        if bases["model"] and not (config.is_contrastive or generation):
            load_base = (f'base = AutoModelForSequenceClassification.from_pretrained(\n'
                         f'    "{bases["model"]}", config=config, ignore_mismatched_sizes=True, trust_remote_code=True)')
            imports = ("from peft import PeftModel\n"
                       "from transformers import AutoConfig, AutoModelForSequenceClassification, AutoProcessor")
        elif bases["model"] and encoder_base:
            load_base = (
                f'model_class = get_class_from_dynamic_module("modeling_mm.{class_name}", repo_id, revision=revision)\n'
                "# the towers and fusion of that model, under the decoder LM named in the config (as before training)\n"
                f'base = model_class.from_encoder("{bases["model"]}", decoder=config.decoder_config._name_or_path,\n'
                "                                decoder_connection=config.decoder_connection,\n"
                "                                num_query_tokens=config.num_query_tokens)")
            imports = remote_class
        elif bases["model"]:
            load_base = (
                f'model_class = get_class_from_dynamic_module("modeling_mm.{class_name}", repo_id, revision=revision)\n'
                f'base = model_class.from_pretrained("{bases["model"]}", config=config, ignore_mismatched_sizes=True)')
            imports = remote_class
        else:
            decoder = ("towers[\"decoder\"] = modeling.load_decoder(config.decoder_config._name_or_path, "
                       "config.decoder_connection, {})\n" if generation else "")
            load_base = (
                'model_class = get_class_from_dynamic_module(\n'
                f'    "modeling_mm.{class_name}", repo_id, revision=revision)\n'
                "# the base: the pretrained towers named in the config (fusion layers and head come from the adapter)\n"
                "modeling = sys.modules[model_class.__module__]\n"
                "towers = {f\"{m}_model\": modeling.load_tower(m, getattr(config, f\"{m}_config\")._name_or_path, {})\n"
                "          for m in config.modalities}\n"
                f"{decoder}"
                "base = model_class(config, **towers)")
            imports = "import sys\n\n" + remote_class
        if generation:  # how the model decodes, as it was trained to
            load_base += "\nbase.generation_config = GenerationConfig.from_pretrained(repo_id, revision=revision)"
        loading = (
            "## Usage\n\nThe adapter loads with `transformers` and `peft` (the model code comes from this repository, "
            "hence `trust_remote_code=True`):\n\n"
            f"```python\n{imports}\n\n"
            f'repo_id = "{repo_id}"\nrevision = "{revision}"\n'
            "config = AutoConfig.from_pretrained(repo_id, revision=revision, trust_remote_code=True)\n"
            f"{load_base}\n"
            "model = PeftModel.from_pretrained(base, repo_id, revision=revision).eval()\n"
            "processor = AutoProcessor.from_pretrained(repo_id, revision=revision, trust_remote_code=True)\n```\n\n")
        if config.is_contrastive:
            return loading + _joint_embedding_adapter_usage(config, pipe_call)
        if generation:
            return (
                loading + "Then, for a batch (one prompt per sample, None for none; `generate()` returns only the new "
                "tokens):\n\n"
                f'```python\ninputs = processor({call},\n                   prompt=["{CARD_QUESTION}"])\n'
                "texts = processor.batch_decode(model.generate(**inputs, max_new_tokens=16))\n```\n\n"
                f"`model.merge_and_unload()` gives a plain transformers model, which the `{GENERATION_TASK}` pipeline "
                "takes too.")
        return (
            loading + "Then, for a batch (leave out a modality a sample lacks, or pass `None` in its place):\n\n"
            f"```python\ninputs = processor({call})\n"
            "labels = [model.config.id2label[i] for i in model(**inputs).logits.argmax(-1).tolist()]\n```\n\n"
            "`model.merge_and_unload()` gives a plain transformers model."
        )
    if config.tasks:
        return _multi_task_usage(repo_id, revision, config, pipe_call, call)
    if config.is_contrastive:
        return _joint_embedding_usage(repo_id, revision, config, pipe_call)
    if _is_generation(config):
        return _generation_usage(repo_id, revision, config, pipe_call, call)
    return (
        "## Usage\n\nWith only `transformers` installed (the model code comes from this repository, hence "
        "`trust_remote_code=True`; the revision pins the exact files):\n\n"
        f"```python\nfrom transformers import pipeline\n\n"
        f'classifier = pipeline("{PIPELINE_TASK}", model="{repo_id}", revision="{revision}",\n'
        "                      trust_remote_code=True)\n"
        f"classifier({pipe_call})  # any subset; paths, PIL images, arrays\n"
        f"# [{{'label': '{config.id2label[0]}', 'score': ...}}, ...]\n```\n\n"
        "Or step by step:\n\n"
        "```python\nfrom transformers import AutoModelForSequenceClassification, AutoProcessor\n\n"
        f'processor = AutoProcessor.from_pretrained("{repo_id}", revision="{revision}", trust_remote_code=True)\n'
        f'model = AutoModelForSequenceClassification.from_pretrained("{repo_id}", revision="{revision}",\n'
        "                                                           trust_remote_code=True)\n"
        f"inputs = processor({call})\n"
        "labels = [model.config.id2label[i] for i in model(**inputs).logits.argmax(-1).tolist()]\n```"
    )


def _generation_usage(repo_id: str, revision: str, config: PreTrainedConfig, pipe_call: str, call: str) -> str:
    """The usage snippets of a generation model: the pipeline without a prompt, with a question and with a dialogue
    history, then generation step by step."""
    # the question and the history are about the one item the model reads first: an image, else a clip, else a text
    item = next(example for modality, example in (("vision", 'image="image.png"'), ("audio", 'audio="audio.wav"'),
                                                  ("text", 'text="a caption"')) if modality in config.modalities)
    return (
        "## Usage\n\nWith only `transformers` installed (the model code comes from this repository, hence "
        "`trust_remote_code=True`; the revision pins the exact files). The pipeline returns only the new text, a list "
        "of `{'generated_text': ...}` per sample; `generate()`'s parameters pass through (`max_new_tokens`, "
        "`num_beams`, `do_sample`, ...), on top of the model's `generation_config`. A prompt is a string or a dialogue "
        "history:\n\n"
        "```python\nfrom transformers import pipeline\n\n"
        f'generator = pipeline("{GENERATION_TASK}", model="{repo_id}", revision="{revision}",\n'
        "                     trust_remote_code=True)\n"
        f"caption = generator({pipe_call})  # any subset; paths, PIL images, arrays\n"
        "# [{'generated_text': ...}]\n"
        f'answer = generator({item}, prompt="{CARD_QUESTION}", max_new_tokens=16)\n'
        'history = [{"role": "user", "content": "What shape is it?"}, {"role": "assistant", "content": "A circle."},\n'
        '           {"role": "user", "content": "And its colour?"}]\n'
        f"reply = generator({item}, prompt=history, num_beams=3)  # the assistant's next turn\n```\n\n"
        "Or step by step (the processor left-pads the prompts for `generate()`, which returns only the new "
        "tokens):\n\n"
        "```python\nfrom transformers import AutoModel, AutoProcessor\n\n"
        f'processor = AutoProcessor.from_pretrained("{repo_id}", revision="{revision}", trust_remote_code=True)\n'
        f'model = AutoModel.from_pretrained("{repo_id}", revision="{revision}", trust_remote_code=True)\n'
        "# a batch: one prompt per sample (None for none)\n"
        f'inputs = processor({call},\n                   prompt=["{CARD_QUESTION}"])\n'
        "new_tokens = model.generate(**inputs, max_new_tokens=16)\n"
        "texts = processor.batch_decode(new_tokens)\n```"
    )


def _zero_shot_example(config: PreTrainedConfig) -> tuple[str, str] | None:
    """The zero-shot pipeline's call for the card (`image=` where the model has an image tower, else `audio=`) and its
    labels; None for a model without a text tower or without anything to classify."""
    if "text" not in config.modalities:
        return None
    if "vision" in config.modalities:
        return 'image="image.png"', '["a red circle", "a blue square"]'
    if "audio" in config.modalities:
        return 'audio="audio.wav"', '["a high tone", "a deep tone"]'
    return None


def _joint_embedding_pipelines(config: PreTrainedConfig, zero_shot: str, features: str, pipe_call: str) -> str:
    """The card's lines that call the two pipelines, built as `zero_shot` and `features` (code that makes them)."""
    example = _zero_shot_example(config)
    lines = []
    if example:
        item, labels = example
        lines += [f"classifier = {zero_shot}", f"classifier({item}, candidate_labels={labels})",
                  "# [{'label': ..., 'score': ...}, ...]: best first; " + (
                      "a sigmoid per label" if config.contrastive_loss == "sigmoid" else "a softmax over the labels"),
                  ""]
    keys = ", ".join(f"'{MODALITY_NAMES[m].user}_embeds': [...]" for m in config.modalities)
    lines += [f"extractor = {features}", f"embeddings = extractor({pipe_call})",
              f"# {{{keys}}}",
              "# unit vectors, compared by dot product; return_fused=True adds the modalities fused, 'fused_embeds'"]
    return "\n".join(lines)


def _joint_embedding_usage(repo_id: str, revision: str, config: PreTrainedConfig, pipe_call: str) -> str:
    """The usage snippets of a joint embedding model: its two pipelines, then the embeddings step by step."""
    def remote_pipeline(task: str) -> str:
        return f'pipeline("{task}", model="{repo_id}", revision="{revision}",\n    trust_remote_code=True)'

    pipelines = _joint_embedding_pipelines(config, remote_pipeline(ZERO_SHOT_TASK),
                                           remote_pipeline(FEATURE_EXTRACTION_TASK), pipe_call)
    embed = {
        "text": ['texts = processor(text=["a red circle", "a blue square"])',
                 'text_embeds = model.get_text_features(texts["input_ids"], texts["attention_mask"], '
                 'texts.get("token_type_ids"))'],
        "vision": ['image_embeds = model.get_image_features(processor(images=["image.png"])["pixel_values"])'],
        "audio": ['clips = processor(audio=["audio.wav"])',
                  'audio_embeds = model.get_audio_features(clips["input_values"], clips["audio_attention_mask"])'],
    }
    users = [MODALITY_NAMES[m].user for m in config.modalities]
    # an item compared with label texts where the model reads text, else the two other modalities
    pair = [user for user in users if user != "text"][:1] + ["text"] if "text" in users else users[:2]
    compare = (f"similarity = {pair[0]}_embeds @ {pair[1]}_embeds.T  # cosines: the embeddings are unit vectors"
               if len(pair) == 2 else "")
    return (
        "## Usage\n\nWith only `transformers` installed (the model code comes from this repository, hence "
        "`trust_remote_code=True`; the revision pins the exact files):\n\n"
        f"```python\nfrom transformers import pipeline\n\n{pipelines}\n```\n\n"
        "Or step by step (each modality is embedded alone, so items and texts can be embedded apart, e.g. once for a "
        "search index):\n\n"
        "```python\nimport torch\nfrom transformers import AutoModel, AutoProcessor\n\n"
        f'processor = AutoProcessor.from_pretrained("{repo_id}", revision="{revision}", trust_remote_code=True)\n'
        f'model = AutoModel.from_pretrained("{repo_id}", revision="{revision}", trust_remote_code=True)\n'
        "with torch.no_grad():\n"
        + "".join(f"    {line}\n" for m in config.modalities for line in embed[m])
        + f"{compare}\n```"
    )


def _joint_embedding_adapter_usage(config: PreTrainedConfig, pipe_call: str) -> str:
    """After the adapter's loading snippet: the pipelines on the merged model, their classes from the repository."""
    pipelines = _joint_embedding_pipelines(config, 'remote_pipeline("MMFusionZeroShotClassificationPipeline")',
                                           'remote_pipeline("MMFusionFeatureExtractionPipeline")', pipe_call)
    return ("Then the pipelines, on the merged model (their classes come from this repository's `pipeline_mm.py`):"
            "\n\n```python\nfrom transformers.dynamic_module_utils import get_class_from_dynamic_module\n\n"
            "model = model.merge_and_unload()  # a plain transformers model\n\n\n"
            "def remote_pipeline(name):\n"
            '    pipeline_class = get_class_from_dynamic_module(f"pipeline_mm.{name}", repo_id, revision=revision)\n'
            "    return pipeline_class(model=model, processor=processor)\n\n\n"
            f"{pipelines}\n```")


def _multi_task_usage(repo_id: str, revision: str, config: PreTrainedConfig, pipe_call: str, call: str) -> str:
    """The usage snippets of a multi-task model: the pipeline's answer per task, and each task's output read from
    the model's logits (a dict by task name)."""
    def pipeline_answer(task: dict[str, Any]) -> str:
        if task["problem_type"] == "single_label_classification":
            return f"[{{'label': '{task['labels'][0]}', 'score': ...}}, ...]"
        if task["problem_type"] == "multi_label_classification":
            return f"{{'labels': [...], 'scores': {{'{task['labels'][0]}': ..., ...}}}}"
        return "..." if task["num_outputs"] == 1 else "[...]"

    def read_logits(task: dict[str, Any]) -> str:
        name = task["name"]
        if task["problem_type"] == "single_label_classification":
            return f'answers["{name}"] = [tasks["{name}"]["labels"][i] for i in logits["{name}"].argmax(-1).tolist()]'
        if task["problem_type"] == "multi_label_classification":
            start = f'answers["{name}"] = ['
            return (f'{start}[label for label, given in zip(tasks["{name}"]["labels"], row) if given]\n'
                    f'{" " * len(start)}for row in (logits["{name}"].sigmoid() >= 0.5).tolist()]  # tags at 0.5')
        values = f'logits["{name}"][:, 0]' if task["num_outputs"] == 1 else f'logits["{name}"]'
        return f'answers["{name}"] = {values}.tolist()  # in the targets\' units'

    answers = ",\n#  ".join(f"'{task['name']}': {pipeline_answer(task)}" for task in config.tasks)
    return (
        "## Usage\n\nWith only `transformers` installed (the model code comes from this repository, hence "
        "`trust_remote_code=True`; the revision pins the exact files). The answer holds every task's output under "
        "the task's name: the ranked labels (single-label), the labels whose probability reaches 0.5 with every "
        "label's probability (multi-label), the value in the targets' units (regression):\n\n"
        f"```python\nfrom transformers import pipeline\n\n"
        f'predictor = pipeline("{PIPELINE_TASK}", model="{repo_id}", revision="{revision}",\n'
        "                     trust_remote_code=True)\n"
        f"predictor({pipe_call})  # any subset; paths, PIL images, arrays\n"
        f"# {{{answers}}}\n```\n\n"
        "Or step by step (the model's logits are a dict by task name):\n\n"
        "```python\nfrom transformers import AutoModel, AutoProcessor\n\n"
        f'processor = AutoProcessor.from_pretrained("{repo_id}", revision="{revision}", trust_remote_code=True)\n'
        f'model = AutoModel.from_pretrained("{repo_id}", revision="{revision}", trust_remote_code=True)\n'
        f"inputs = processor({call})\n"
        "logits = model(**inputs).logits\n"
        'tasks = {task["name"]: task for task in model.config.tasks}\n'
        "answers = {}\n"
        + "\n".join(read_logits(task) for task in config.tasks) + "\n```"
    )


def _training_section(config: PreTrainedConfig, training_args: dict[str, Any] | None,
                      metrics: dict[str, Any] | None, bases: dict[str, str | None] | None = None) -> str:
    rows = [("fusion", f"{config.fusion_num_layers} layers, width {config.fusion_hidden_size}, "
                       f"{config.fusion_num_heads} heads, pooling {config.fusion_pooling}")]
    if _is_generation(config):
        rows.append(("decoder", _describe_decoder(config, bases or {}).removeprefix("the decoder LM ")))
    if not training_args:
        return "## Training\n\n" + _table(("setting", "value"), rows) + \
            "\n\nThe training settings were not recorded with this model."
    data, lora, training = (training_args.get(k) or {} for k in ("data", "lora", "training"))
    model = training_args.get("model") or {}
    rows.append(("training data", _public_source(str(data.get("train_data"))) if data.get("train_data")
                 else "the built-in mm-fusion sample"))
    modes = ", ".join(f"{MODALITY_NAMES[m].user} {lora.get(f'{m}_mode')}" for m in config.modalities)
    if _is_generation(config) and lora.get("decoder_mode"):
        modes += f", decoder {lora['decoder_mode']}"
    rows.append(("towers", modes))
    if any(lora.get(f"{m}_mode") == "lora" for m in config.modalities):
        rows.append(("LoRA", f"r={lora.get('lora_r')}, alpha={lora.get('lora_alpha')}, "
                             f"dropout={lora.get('lora_dropout')}"))
    steps = (metrics or {}).get("global_step")
    rows += [
        ("epochs / max steps", f"{training.get('num_train_epochs')} / {training.get('max_steps')}"
                               + (f" ({steps} steps run)" if steps is not None else "")),
        ("batch", f"{training.get('per_device_batch_size')} per device x {training.get('gradient_accumulation_steps')}"
                  f" accumulation x {(metrics or {}).get('num_processes', 1)} processes"),
        ("learning rate", f"{training.get('learning_rate')} ({training.get('lr_scheduler')}, warmup ratio "
                          f"{training.get('warmup_ratio')}), weight decay {training.get('weight_decay')}"),
        ("dropout", f"fusion {model.get('fusion_dropout')}, classifier {model.get('classifier_dropout')}, "
                    f"modality {model.get('modality_dropout')}"),
        ("mixed precision", str(training.get("mixed_precision"))),
        ("seed", str(training.get("seed"))),
    ]
    return "## Training\n\n" + _table(("setting", "value"), rows)


def _evaluation_section(report: dict[str, Any] | None) -> str:
    if report is None:
        return ("## Evaluation\n\nNot evaluated: no evaluation report was published with this model "
                "(`mm-eval --model MODEL` writes one, `mm-publish --report` takes it).")
    data = report["data"]
    intro = (f"## Evaluation\n\nOn {data['rows']} rows of the `{data['split']}` split of "
             f"{_public_source(str(data['source']))}")
    if "tasks" not in report and "headline" not in report:  # a joint embedding model's report may lack one
        return f"{intro}. The report has no headline metrics." + _examples_text(report)
    if "tasks" not in report:
        return f"{intro}:\n\n" + _section_results(report, "###", thresholds=False) + _examples_text(report)
    parts = [f"{intro}, per task:"]
    for name, section in _task_sections(report):
        parts.append(f"### {name} ({_PROBLEM_TYPE_NAMES.get(section['problem_type'], section['problem_type'])})\n\n"
                     + _section_results(section, "####", thresholds=True))
    if report.get("ablation"):  # over every task at once, where the evaluation reports one
        parts.append(_ablation_text(report, "###"))
    return "\n\n".join(parts)


def _section_results(section: dict[str, Any], heading: str, thresholds: bool) -> str:
    """A report section's headline table, with `thresholds` a multi-label task's decision thresholds, then its
    modality ablation and fusion gain."""
    rows = [(key, _format(value)) for key, value in section["headline"].items() if _is_number(value)]
    text = _table(("metric", "value"), rows)
    tuned = (section.get("metrics") or {}).get("thresholds") if thresholds else None
    if isinstance(tuned, dict) and tuned and section.get("problem_type") == "multi_label_classification":
        text += ("\n\nDecision thresholds (a label is given at or above its own; tuned on validation): "
                 + ", ".join(f"`{label}` {_format(float(value))}" for label, value in tuned.items()) + ".")
    if section.get("ablation"):
        text += "\n\n" + _ablation_text(section, heading)
    gain = section.get("fusion_gain")
    if isinstance(gain, dict) and {"metric", "gain", "best_single_modality"} <= gain.keys():
        text += (f"\n\nFusion gain: {gain['metric']} with all modalities {_format(gain.get('all_modalities_value'))} "
                 f"vs the best single modality ({gain['best_single_modality']}) "
                 f"{_format(gain.get('best_single_modality_value'))}: {gain['gain']:+.4f}.")
    return text


CARD_EXAMPLES = 5
"""Sample generations a generation model's card shows from its report's `examples` (the first ones)."""


def _examples_text(report: dict[str, Any]) -> str:
    """A generation report's first `examples` as a table of prompt, reference and generation ("" without any)."""
    examples = [row for row in report.get("examples") or [] if "prediction" in row][:CARD_EXAMPLES]
    if not examples:
        return ""

    def cell(value: Any) -> str:
        if isinstance(value, list):  # a dialogue history
            value = " / ".join(f"{m.get('role')}: {m.get('content')}" for m in value if isinstance(m, dict))
        text = "" if value is None else str(value)
        return text.replace("|", "\\|").replace("\n", " ").strip() or "(none)"

    rows = [(cell(row.get("prompt")), cell(row.get("reference")), cell(row.get("prediction"))) for row in examples]
    return ("\n\n### Sample generations\n\nThe first rows of the report's examples, with every modality given:\n\n"
            + _table(("prompt", "reference", "generated"), rows))


def _ablation_text(section: dict[str, Any], heading: str) -> str:
    ablation = section["ablation"]
    columns = [key for key in ablation[0] if key != "modalities"]
    table = [(" + ".join(row["modalities"]), *(_format(row.get(key)) for key in columns)) for row in ablation]
    return (f"{heading} Modality ablation\n\nThe same rows with only some modalities given (the others withheld; "
            "a sample left with none counts as wrong):\n\n" + _table(("modalities", *columns), table))


# ---- the upload ----------------------------------------------------------------------------------------------------

def upload_release(release: Release, repo_id: str, *, private: bool = False, revision: str | None = None) -> str:
    """Upload the release folder to the model repo `repo_id` (created if needed, `private` when new) on branch
    `revision` (created from main if needed; default main), then pin the card's snippets to the uploaded commit.
    Returns that commit's id. Only the release's files are uploaded; files of the kinds a release holds that the
    repo has from an earlier upload (stale shards, an adapter) are deleted in the same commit.
    Raises `ValueError` when no token is found, or when `private` is asked for a repo that exists and is public."""
    _check_repo_id("repo_id", repo_id, namespaced=True)
    token = get_token()
    if not token:
        raise ValueError("token: no Hugging Face token found; set HF_TOKEN or log in with `hf auth login`")
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if private and not api.repo_info(repo_id, repo_type="model").private:
        # create_repo leaves an existing repo as it is: never put weights meant to be private into a public repo
        raise ValueError(f"private: {repo_id} already exists and is public; make it private on the Hub first, "
                         "or publish without --private")
    if revision:
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    logger.info("uploading %d files to %s (%s)", len(release.files), repo_id, revision or "main")
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=release.folder, repo_type="model", revision=revision,
        allow_patterns=list(release.files), delete_patterns=list(ALLOWED_FILES),
        commit_message=f"Upload {'adapter' if release.adapter_only else 'model'} with mm-publish",
    )
    # the card cannot name the commit it is part of: pin its snippets to the commit that holds the weights
    card = release.card_for(commit.oid)
    api.create_commit(
        repo_id, repo_type="model", revision=revision,
        operations=[CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode())],
        commit_message=f"Model card: pin the usage snippets to {commit.oid[:12]}",
    )
    return commit.oid


# ---- small helpers -------------------------------------------------------------------------------------------------

def _check_repo_id(field: str, repo_id: Any, namespaced: bool = False) -> None:
    if not isinstance(repo_id, str) or (namespaced and repo_id.count("/") != 1):
        raise ValueError(f"{field}: expected a Hub id ORG/NAME, got {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except ValueError as error:
        raise ValueError(f"{field}: {repo_id!r} is not a valid Hub id ({error})") from None


def _hub_id(source: str | None) -> str | None:
    """`source` when it names a Hub repo, None when it is empty or a local path (which others cannot download)."""
    if not source or Path(source).expanduser().exists() or source.startswith(("/", ".", "~")):
        return None
    if Path(source).suffix.lower() in _DATA_FILE_SUFFIXES:  # "data/test.csv" is a relative path, not a repo
        return None
    try:
        validate_repo_id(source)
    except ValueError:
        return None
    return source


def _source_name(source: str) -> tuple[str, str]:
    """The name and the model-index type of a data source: a Hub id as is, the built-in sample by name, a local file
    by its name only (a full path would publish the author's folder layout)."""
    if _hub_id(source):
        return source, source
    path = Path(source).expanduser().resolve()
    if default_sample_dir().resolve() in (path, path.parent):
        return "mm-fusion built-in sample", "mm-fusion-sample"
    return path.name, "local"


def _public_source(source: str) -> str:
    """`_source_name` as the card's text says it."""
    name, kind = _source_name(source)
    return {"mm-fusion-sample": "the built-in mm-fusion sample", "local": f"local data (`{name}`)"}.get(kind,
                                                                                                     f"`{name}`")


def _allowed(name: str) -> bool:
    """Whether a path relative to the release is on the allow-list."""
    return any(fnmatch(name, pattern) for pattern in ALLOWED_FILES)


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def _human_size(size: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size} B"


# ---- command line --------------------------------------------------------------------------------------------------

def _base_model_argument(value: str) -> tuple[str, str]:
    key, separator, repo_id = value.partition("=")
    if not separator:
        raise argparse.ArgumentTypeError(f"expected MODALITY=ORG/NAME (vision, text, audio, decoder or model), "
                                         f"got {value!r}")
    return key.strip(), repo_id.strip()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mm-publish", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="The model folder mm-train wrote (OUTPUT_DIR/model).")
    parser.add_argument("--repo-id", required=True, help="The Hub model repo to upload to, ORG/NAME.")
    parser.add_argument("--private", action="store_true", help="Create the repo private (an existing repo keeps its "
                                                                "visibility).")
    parser.add_argument("--revision", help="The branch to upload to (created from main if needed); default main.")
    parser.add_argument("--adapter-only", action="store_true",
                        help="Publish the peft adapter (with fusion and head weights) instead of the merged model.")
    parser.add_argument("--dry-run", action="store_true",
                        help="Build the release, print its files, sizes and model card; upload nothing.")
    parser.add_argument("--out", help="Write the release folder here (new or empty) and keep it; default: a "
                                      "temporary folder.")
    parser.add_argument("--report", help="The mm-eval report.json for the card; default MODEL/evaluation/report.json "
                                         "when it exists.")
    parser.add_argument("--base-model", action="append", type=_base_model_argument, default=[],
                        metavar="MODALITY=ORG/NAME",
                        help="The Hub id of a tower (vision, text, audio), of a generation model's decoder LM "
                             "(decoder=ORG/NAME), or of the mm-fusion model it was fine-tuned from (model=ORG/NAME), "
                             "where the model folder records a local path. Repeat for several.")
    parser.add_argument("--dataset", help="The Hub id of the training data set, for the card's metadata.")
    parser.add_argument("--license", default="apache-2.0", help="The license id for the card (default apache-2.0; "
                                                                "mind the towers' licenses).")
    parser.add_argument("--max-shard-size", default="5GB", help="Largest weights file before sharding (default 5GB).")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    base_models = dict(args.base_model)
    try:
        with tempfile.TemporaryDirectory(prefix="mm-publish-") as temporary:
            out = Path(args.out) if args.out else Path(temporary) / "release"
            release = build_release(
                args.model, out, args.repo_id, adapter_only=args.adapter_only, report=args.report,
                base_models=base_models, dataset=args.dataset, license=args.license,
                revision=args.revision, max_shard_size=args.max_shard_size,
            )
            print(release.describe())
            if args.dry_run:
                print(f"\nREADME.md:\n{release.card}")
                print(f"dry run: nothing uploaded to {args.repo_id}")
                return 0
            commit = upload_release(release, args.repo_id, private=args.private, revision=args.revision)
    except ValueError as error:
        print(f"mm-publish: error: {error}", file=sys.stderr)
        return 2
    except HfHubHTTPError as error:
        print(f"mm-publish: error: the Hub refused the upload: {error}", file=sys.stderr)
        return 1
    print(f"uploaded to https://huggingface.co/{args.repo_id}/tree/{args.revision or 'main'} (commit {commit})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
