"""Scoring a model with some modalities withheld: the one definition of "withhold modalities and score" and of
"logits -> scores", shared by mm-train's validation, mm-eval and the demo.

    >>> from training.scoring import encode_towers, forward_kept, scores
    >>> states = encode_towers(model, batch)  # doctest: +SKIP
    >>> for keep in [("vision", "text", "audio"), ("vision", "text")]:  # doctest: +SKIP
    ...     logits, present, _ = forward_kept(model, batch, keep, tower_states=states)
    ...     probabilities = scores(logits, model.config.problem_type)

Conventions:

- A modality is withheld by setting its `has_*` mask (`MODALITY_NAMES[m].presence`) to False, never by zero-filling
  its inputs: its tower does not run for that sample and the fusion does not see it.
- A sample left with no modality gets no forward pass: its logits are a NaN row, and `scores` turns a NaN row into
  the uniform prior (1 / num_labels per class, or 0.5 per label; regression keeps the NaN).
- Modalities are the model's internal stream names ("vision", "text", "audio"), as in `model.modalities`.
- Tasks (`tasks_of`): a classifier is one task, an `MMFusionForMultiTask` one per head. `forward_kept` gives every
  task's outputs side by side, `(batch, sum of num_outputs)`, in `tasks_of` order; `Task.outputs` is a task's slice of
  those columns, so whatever handles an array of outputs handles any task. Regression outputs are in the targets'
  original units (the model undoes its standardisation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import special

from modeling_mm.configuration_mm import MODALITY_NAMES

SINGLE_LABEL, MULTI_LABEL, REGRESSION = "single_label_classification", "multi_label_classification", "regression"
PROBLEM_TYPES = (SINGLE_LABEL, MULTI_LABEL, REGRESSION)

TowerStates = dict[str, tuple[torch.Tensor, torch.Tensor]]


# ---- the model behind wrappers ---------------------------------------------------------------------------------------

def classifier(model: torch.nn.Module) -> torch.nn.Module:
    """The head model inside `model` (a PeftModel or an Accelerate wrapper may wrap it): an
    MMFusionForSequenceClassification or MMFusionForMultiTask. Raises `ValueError` naming `model` for a model
    without a head."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base = getattr(base, "module", base)  # DDP
    if not (hasattr(base, "classifier") or hasattr(base, "heads")) or not hasattr(base, "model"):
        raise ValueError(f"model: {type(base).__name__} has no task head; mm-eval evaluates "
                         "MMFusionForSequenceClassification and MMFusionForMultiTask models")
    return base


@dataclass(frozen=True)
class Task:
    """One task of a model: its name, problem type, label names (classification; for regression one name per
    output), its columns of `forward_kept`'s outputs, and its data column (where mm-train read its targets)."""

    name: str
    problem_type: str
    label_names: tuple[str, ...]
    outputs: slice
    column: str | None = None
    label_separator: str | None = None
    target_mean: tuple[float, ...] | None = None  # regression: the training targets' mean, per output

    @property
    def num_outputs(self) -> int:
        return self.outputs.stop - self.outputs.start


SINGLE_TASK_NAME = "label"  # the one task of a classifier, named after mm-train's default label column


def tasks_of(model: torch.nn.Module) -> list[Task]:
    """The tasks of `model` (any wrapper), in output order: one per head of an MMFusionForMultiTask, or the one
    task of a classifier (named `SINGLE_TASK_NAME`)."""
    config = classifier(model).config
    tasks, start = [], 0
    if config.tasks:
        for task in config.tasks:
            names = task["labels"] or tuple(task["name"] if task["num_outputs"] == 1 else f"{task['name']}[{i}]"
                                            for i in range(task["num_outputs"]))
            tasks.append(Task(task["name"], task["problem_type"], tuple(names), slice(start, start + task["num_outputs"]),
                              task["column"], task["label_separator"],
                              tuple(task["target_mean"]) if task["target_mean"] else None))
            start += task["num_outputs"]
        return tasks
    problem_type = problem_type_of(model)
    names = tuple(config.id2label[i] for i in range(config.num_labels))
    return [Task(SINGLE_TASK_NAME, problem_type, names, slice(0, config.num_labels),
                 target_mean=tuple(config.target_mean) if config.target_mean else None)]


def num_outputs(model: torch.nn.Module) -> int:
    """Columns of `forward_kept`'s outputs: every task's outputs side by side."""
    return tasks_of(model)[-1].outputs.stop


def output_logits(output: Any) -> torch.Tensor:
    """A model output's logits as one `(batch, outputs)` tensor: a classifier's own, or every task's of a
    multi-task output concatenated in task order."""
    logits = output.logits
    return torch.cat(list(logits.values()), dim=1) if isinstance(logits, dict) else logits


def fusion_model(model: torch.nn.Module) -> torch.nn.Module:
    """The MMFusionModel inside `model`: the model itself, the base of a head class, or either behind a PeftModel or
    an Accelerate-prepared (DDP) wrapper. Found by what it has, not its class, so a model loaded with
    `trust_remote_code` (its classes come from the folder's own files) is found too."""
    return next(module for module in model.modules() if hasattr(module, "fusion_layers") and hasattr(module, "encode_tower"))


def problem_type_of(model: torch.nn.Module) -> str:
    """The model's `config.problem_type`, or what transformers infers at loss time when it is unset: regression
    for one output, else single-label classification."""
    config = classifier(model).config
    if config.tasks:
        raise ValueError("model: a multi-task model has a problem type per task; read it from tasks_of(model)")
    if config.problem_type:
        return config.problem_type
    return REGRESSION if config.num_labels == 1 else SINGLE_LABEL


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """`model` in eval mode for the block; its train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ---- withholding -----------------------------------------------------------------------------------------------------

def _batch_size(batch: Mapping[str, Any]) -> int:
    return len(next(value for value in batch.values() if isinstance(value, torch.Tensor)))


def presence(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per modality whose inputs (or mask) the batch holds, its per-sample presence, bool `(batch,)`: the `has_*`
    mask, or all True where inputs come without one (the model reads them so too)."""
    result = {}
    for modality, names in MODALITY_NAMES.items():
        if names.presence in batch:
            result[modality] = batch[names.presence].bool()
        elif batch.get(names.inputs[0]) is not None:
            result[modality] = torch.ones(_batch_size(batch), dtype=torch.bool, device=batch[names.inputs[0]].device)
    return result


def withhold(batch: Mapping[str, torch.Tensor], keep: Sequence[str]) -> dict[str, torch.Tensor]:
    """A shallow copy of `batch` in which every modality not in `keep` is withheld: its `has_*` mask is all False
    (added where the batch had inputs but no mask). Inputs are left as they are; `batch` is not changed."""
    batch = dict(batch)
    for modality, given in presence(batch).items():
        if modality not in keep:
            batch[MODALITY_NAMES[modality].presence] = torch.zeros_like(given)
    return batch


# ---- running the model -----------------------------------------------------------------------------------------------

def _model_device_and_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype | None]:
    device = next(model.parameters()).device
    return device, getattr(model, "dtype", None)


def _to_model(value: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    # floating inputs follow the model's dtype (a bf16 model refuses float32 pixels); masks and ids keep theirs
    if dtype is not None and value.is_floating_point():
        return value.to(device, dtype=dtype)
    return value.to(device)


def encode_towers(model: torch.nn.Module, batch: Mapping[str, torch.Tensor],
                  modalities: Sequence[str] | None = None) -> TowerStates:
    """Each tower's outputs for `batch`, once, to be scored under several modality subsets or corruptions through
    `forward_kept(..., tower_states=...)` without running the towers again.

    Returns `{modality: (states, token_mask)}` as `MMFusionModel.encode_tower` gives them, on the model's device,
    for every modality of `modalities` (default: all of the model's) that some sample of the batch has. Each tower
    runs on the samples that have its modality only, as in the model's own forward, so the scores are exactly those
    of running the towers in the forward; rows of the other samples are zeros with a False mask (the model ignores
    them). Without gradients."""
    fusion = fusion_model(model)
    device, dtype = _model_device_and_dtype(model)
    given = presence(batch)
    result: TowerStates = {}
    for modality in fusion.modalities if modalities is None else modalities:
        if modality not in given or not bool(given[modality].any()):
            continue
        rows = given[modality].nonzero().squeeze(1)
        inputs = {name: _to_model(batch[name][rows], device, dtype)
                  for name in MODALITY_NAMES[modality].inputs if batch.get(name) is not None}
        states, token_mask = fusion.encode_tower(modality, **inputs)
        rows = rows.to(device)
        all_states = states.new_zeros(len(given[modality]), *states.shape[1:])  # (batch, tokens, tower_width)
        all_masks = token_mask.new_zeros(len(given[modality]), token_mask.shape[1])  # (batch, tokens), bool
        result[modality] = (all_states.index_put((rows,), states), all_masks.index_put((rows,), token_mask))
    return result


def forward_kept(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], keep: Sequence[str], *,
                 tower_states: TowerStates | None = None, output_attentions: bool = False,
                 num_labels: int | None = None) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Run `model` on `batch` with only the modalities in `keep`, the others withheld (`withhold`), without
    gradients and without changing the model's mode.

    `batch` is what the processor (or mm-train's collator) gives; a "labels" entry is not passed on.
    `tower_states` (from `encode_towers` on the same batch) stands in for the raw inputs of its modalities.
    Returns:

    - logits `(batch, outputs)` (every task's, side by side: `tasks_of`), float32 on the model's device, a NaN row for
      each sample left with no modality (it has no forward pass);
    - the bool mask `(batch,)` of the samples that kept a modality (on the model's device);
    - the fusion output (`MMFusionModelOutput`) of those samples, with attention weights when `output_attentions`,
      or None when no sample kept a modality.
    """
    tower_states = tower_states or {}
    device, dtype = _model_device_and_dtype(model)
    num_labels = num_outputs(model) if num_labels is None else num_labels
    batch = withhold(batch, keep)
    given = presence(batch)
    present = (torch.stack(list(given.values()), 1).any(1) if given
               else torch.zeros(_batch_size(batch), dtype=torch.bool)).to(device)
    logits = torch.full((len(present), num_labels), float("nan"), device=device)
    if not bool(present.any()):
        return logits, present, None
    replaced = {name for modality in tower_states for name in MODALITY_NAMES[modality].inputs}
    inputs = {key: _to_model(value.to(device)[present], device, dtype) for key, value in batch.items()
              if key != "labels" and key not in replaced and value is not None}
    states = {modality: (s[present], mask[present]) for modality, (s, mask) in tower_states.items()}
    with torch.no_grad():
        output = model(**inputs, tower_states=states or None, output_attentions=True if output_attentions else None)
    logits[present] = output_logits(output).detach().float()
    return logits, present, output.fusion_output


# ---- logits -> scores ------------------------------------------------------------------------------------------------

def uniform_prior(problem_type: str, num_labels: int) -> np.ndarray:
    """The scores of a model that knows nothing, `(num_labels,)`: 1 / num_labels per class (single-label) or 0.5
    per label (multi-label). Regression has none: `ValueError` naming `problem_type`."""
    if problem_type == REGRESSION or problem_type not in PROBLEM_TYPES:
        raise ValueError(f"problem_type: the uniform prior is defined for {SINGLE_LABEL!r} and {MULTI_LABEL!r}; "
                         f"got {problem_type!r}")
    return np.full(num_labels, 0.5 if problem_type == MULTI_LABEL else 1.0 / num_labels)


def scores(logits: np.ndarray | torch.Tensor, problem_type: str) -> np.ndarray:
    """Probabilities from `logits` `(samples, num_labels)` (a numpy array or a tensor on any device), float64 numpy:
    softmax (single-label) or sigmoid per label (multi-label); raw outputs for regression. NaN rows (no prediction)
    become the uniform prior (`uniform_prior`), or stay NaN for regression."""
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().cpu().double().numpy()
    logits = np.asarray(logits, dtype=np.float64)
    if problem_type == REGRESSION:
        return logits
    missing = np.isnan(logits).any(1)
    safe = np.where(missing[:, None], 0.0, logits)  # no NaN through softmax/sigmoid
    probabilities = special.expit(safe) if problem_type == MULTI_LABEL else special.softmax(safe, axis=1)
    probabilities[missing] = uniform_prior(problem_type, logits.shape[1])
    return probabilities
