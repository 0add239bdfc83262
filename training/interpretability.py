"""Interpretability of a fused prediction: what each modality contributes (the prediction with it, minus the
prediction with it withheld through its `has_*` mask; or exactly, as Shapley values over every modality subset,
`shapley_values` of `subset_value`s), where each stream's cross-attention goes, and `explain_sample`, the
per-sample view the demo shows.

    >>> from training.interpretability import explain_sample
    >>> view = explain_sample(model, processor, text="a red circle, high tone", image="circle.png")  # doctest: +SKIP
    >>> view["predicted"], sorted(view["contributions"])  # doctest: +SKIP
    ('match', ['image', 'text'])

Modalities have their user-facing names ("image", "text", "audio") in what `explain_sample` returns, and the
model's stream names ("vision", "text", "audio") in the functions over batches.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy import special
from transformers.utils import logging as hf_logging

from modeling_mm.configuration_mm import MODALITY_NAMES
from processors import MMFusionProcessor
from training.scoring import (MULTI_LABEL, REGRESSION, SINGLE_LABEL, classifier, encode_towers, eval_mode,
                              forward_kept, presence, problem_type_of, scores)


# ---- attention weights -----------------------------------------------------------------------------------------------

def _fusion_configs(model: torch.nn.Module) -> list:
    """Every distinct config object the fusion reads its attention implementation from. Usually one; but peft's
    `modules_to_save` deep-copies the fusion layers, and each copy carries its own copy of the config, which
    `set_attn_implementation` on the model never reaches."""
    found = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "fusion_hidden_size"):
            found.setdefault(id(config), config)
    return list(found.values())


def _set_fusion_attention(config, implementation: str) -> None:
    # setting it on the composite config also sets it on the towers' sub-configs: keep theirs
    towers = [sub for key in config.sub_configs if (sub := getattr(config, key, None)) is not None]
    kept = [tower._attn_implementation for tower in towers]
    config._attn_implementation = implementation
    for tower, implementation in zip(towers, kept):
        tower._attn_implementation = implementation


@contextlib.contextmanager
def eager_fusion_attention(model: torch.nn.Module) -> Iterator[None]:
    """The fusion layers' attention switched to eager, the only implementation that returns weights, for the block;
    the towers stay on theirs, and everything is restored afterwards."""
    configs = _fusion_configs(model)
    previous = [config._attn_implementation for config in configs]
    verbosity = hf_logging.get_verbosity()
    try:
        # output_attentions also reaches a tower that runs in the forward, and a tower on sdpa warns that it returns
        # no weights: we only read the fusion's, so that warning would only confuse
        hf_logging.set_verbosity_error()
        for config in configs:
            _set_fusion_attention(config, "eager")
        yield
    finally:
        for config, implementation in zip(configs, previous):
            _set_fusion_attention(config, implementation)
        hf_logging.set_verbosity(verbosity)


def cross_attention_mass(fusion_output, modalities: Sequence[str]) -> dict[str, tuple[dict[str, torch.Tensor],
                                                                                   torch.Tensor]]:
    """Per stream: ({"sink" | other stream: mass per sample (batch,)}, samples that have the stream), from a fusion
    output with attention weights (`output_attentions` under `eager_fusion_attention`). Each
    `{m}_cross_attentions` layer is (batch, heads, queries, 1 + tokens of the other active streams): the learned
    sink first, then the others in model order, each as wide as its (padded) token mask. Raises `ValueError`
    naming `output_attentions` when the output holds no weights."""
    active = [m for m in modalities if getattr(fusion_output, f"{m}_cross_attentions", None)]
    result = {}
    for stream in active:
        layers = getattr(fusion_output, f"{stream}_cross_attentions")
        if layers[0] is None:
            raise ValueError("output_attentions: the fusion returned no attention weights (not eager attention)")
        others = [m for m in active if m != stream]
        widths = [1] + [getattr(fusion_output, f"{m}_token_mask").shape[1] for m in others]
        weights = torch.stack(layers).float().mean(dim=(0, 2))  # mean over layers and heads: (batch, queries, keys)
        parts = torch.stack([part.sum(-1) for part in weights.split(widths, dim=-1)], -1)  # (batch, queries, parts)
        query_mask = getattr(fusion_output, f"{stream}_token_mask").unsqueeze(-1).float()  # (batch, queries, 1)
        per_sample = (parts * query_mask).sum(1) / query_mask.sum(1).clamp(min=1.0)  # (batch, parts)
        masses = {name: per_sample[:, j].cpu() for j, name in enumerate(["sink", *others])}
        result[stream] = (masses, query_mask.squeeze(-1).any(1).cpu())
    return result


# ---- contributions ---------------------------------------------------------------------------------------------------

def contributions(with_all: np.ndarray, without: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per modality, `(samples,)`: p(predicted | all of the sample's modalities) - p(predicted | that modality
    withheld). `with_all` and each `without[modality]` are `training.scoring.scores` `(samples, num_labels)` of the
    same samples; a sample that had only that modality scores the uniform prior without it (its logits are NaN),
    so its contribution is p(predicted) - 1 / num_labels (0.5 for multi-label). The predicted class is the argmax of
    `with_all`."""
    rows = np.arange(len(with_all))
    predicted = with_all.argmax(1)
    chosen = with_all[rows, predicted]
    return {modality: chosen - scores_without[rows, predicted] for modality, scores_without in without.items()}


def subset_value(logits: np.ndarray, problem_type: str, reference_class: np.ndarray | None = None) -> np.ndarray:
    """The value v(S) that the outputs `logits` (samples, num_labels) of a modality subset S give, per sample, on the
    log-odds scale, for `shapley_values`:

    - single-label: (samples,), the log-odds log(p / (1 - p)) of `reference_class` (samples,) (the class predicted
      with all modalities) under softmax(logits), computed as logit_c - logsumexp(the other logits) so that it
      stays finite where p rounds to 0 or 1. A NaN row (no prediction: the subset holds none of the sample's
      modalities) gets the uniform prior's log-odds log(1 / (num_labels - 1)).
    - multi-label: (samples, labels), the logits themselves (each label's log-odds under its sigmoid); a NaN row
      gets 0, the log-odds of p = 0.5.
    - regression: the raw outputs (samples, outputs); a NaN row stays NaN (the caller fills it, e.g. with the
      training mean).

    `reference_class` is required for single-label (refused if missing, of another length or out of range) and
    ignored otherwise. An unknown `problem_type` is refused."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits: expected (samples, num_labels); got shape {logits.shape}")
    missing = np.isnan(logits).any(1)
    if problem_type == REGRESSION:
        return logits.copy()
    if problem_type == MULTI_LABEL:
        return np.where(missing[:, None], 0.0, logits)
    if problem_type != SINGLE_LABEL:
        raise ValueError(f"problem_type: expected one of {[SINGLE_LABEL, MULTI_LABEL, REGRESSION]}; "
                         f"got {problem_type!r}")
    samples, num_labels = logits.shape
    if num_labels < 2:
        raise ValueError(f"logits: single-label classification needs at least 2 classes; got {num_labels}")
    if reference_class is None:
        raise ValueError("reference_class: required for single-label classification (the class predicted with all "
                         "modalities, per sample)")
    reference_class = np.asarray(reference_class)
    if reference_class.shape != (samples,) or not np.issubdtype(reference_class.dtype, np.integer):
        raise ValueError(f"reference_class: expected integer class ids of shape ({samples},); got "
                         f"{reference_class.dtype} of shape {reference_class.shape}")
    if samples and (reference_class.min() < 0 or reference_class.max() >= num_labels):
        raise ValueError(f"reference_class: class ids must lie in [0, {num_labels}); got "
                         f"[{reference_class.min()}, {reference_class.max()}]")
    rows = np.arange(samples)
    safe = np.where(missing[:, None], 0.0, logits)  # no NaN through logsumexp; those rows are replaced below
    others = safe.copy()
    others[rows, reference_class] = -np.inf
    # log p_c - log(1 - p_c) = z_c - logsumexp(z_k, k != c): the softmax's normaliser cancels
    log_odds = safe[rows, reference_class] - special.logsumexp(others, axis=1)
    return np.where(missing, math.log(1.0 / (num_labels - 1)), log_odds)


def task_subset_values(subset_logits: Mapping[frozenset[str], np.ndarray], task: Any,
                       regression_prior: float | None = None) -> dict[frozenset[str], np.ndarray]:
    """The value function of one task for `shapley_values`: for each subset of modalities, `subset_value` of the
    task's columns (`task.outputs`) of that subset's outputs `subset_logits[subset]` `(samples, outputs)`, each
    single-label row scored on the class predicted with every modality of the largest subset; the empty subset gets
    the value of knowing nothing: the uniform prior (classification), or for regression the task's training mean
    (`task.target_mean`), else `regression_prior`, else NaN. A regression row that a subset leaves without a
    prediction gets the same."""
    full = subset_logits[max(subset_logits, key=len)][:, task.outputs]
    reference = np.nan_to_num(full, nan=0.0).argmax(1) if task.problem_type == SINGLE_LABEL else None
    if task.problem_type == REGRESSION:
        mean = task.target_mean if task.target_mean else [np.nan if regression_prior is None else regression_prior] * (
            task.num_outputs)
        empty = np.broadcast_to(np.asarray(mean, dtype=np.float64), full.shape)
    else:
        empty = subset_value(np.full(full.shape, np.nan), task.problem_type, reference)
    values = {frozenset(): empty}
    for subset, logits in subset_logits.items():
        if not subset:
            continue
        value = subset_value(logits[:, task.outputs], task.problem_type, reference)
        values[frozenset(subset)] = np.where(np.isnan(value), empty, value) if task.problem_type == REGRESSION else value
    return values


def shapley_values(subset_values: Mapping[frozenset[str], np.ndarray], modalities: Sequence[str]
                   ) -> dict[str, np.ndarray]:
    """Exact Shapley values of each modality, per sample: phi_m = sum over the subsets S of the other modalities of
    |S|! (n - |S| - 1)! / n! * (v(S + {m}) - v(S)), with n = len(modalities).

    `subset_values` holds, for every subset of `modalities` (all 2**n of them, the empty frozenset included), the
    value function v(S) per sample as an array (samples, ...) of one shape, e.g. `subset_value` of that subset's
    logits. Returns {modality: float64 array of that shape}. The values are efficient: for each sample they sum to
    v(all modalities) - v(empty set), i.e. with `subset_value` to the log-odds (or output) with every modality minus
    that of the prior; a modality that never changes v gets 0, and two that enter every subset alike get the same.
    Every v(S) enters every phi_m with a nonzero weight, so a sample whose v is NaN in any subset gets NaN from each
    modality.

    Refuses (`ValueError` naming `subset_values`) a missing subset, a subset with a modality not in `modalities`,
    or arrays of different shapes; and repeated or no `modalities`."""
    modalities = list(modalities)
    n = len(modalities)
    if n == 0 or len(set(modalities)) != n:
        raise ValueError(f"modalities: expected distinct modality names, at least one; got {modalities}")
    for subset in subset_values:
        if not frozenset(subset) <= set(modalities):
            raise ValueError(f"subset_values: subset {sorted(subset)} holds modalities not in {modalities}")
    values, shape = {}, None
    for size in range(n + 1):
        for members in itertools.combinations(modalities, size):
            subset = frozenset(members)
            if subset not in subset_values:
                raise ValueError(f"subset_values: no value for the subset {sorted(subset)}; exact Shapley values "
                                 f"need all {2 ** n} subsets of {modalities}, the empty one included")
            values[subset] = np.asarray(subset_values[subset], dtype=np.float64)
            if shape is None:
                shape = values[subset].shape
            elif values[subset].shape != shape:
                raise ValueError(f"subset_values: the subset {sorted(subset)} has shape {values[subset].shape}; "
                                 f"the empty subset has {shape}")
    result = {}
    for modality in modalities:
        others = [m for m in modalities if m != modality]
        phi = np.zeros(shape)
        for size in range(n):
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for members in itertools.combinations(others, size):
                subset = frozenset(members)
                phi += weight * (values[subset | {modality}] - values[subset])
        result[modality] = phi
    return result


def explain_sample(model: torch.nn.Module, processor: MMFusionProcessor, text: str | None = None, image: Any = None,
                   audio: Any = None, sampling_rate: int | None = None) -> dict[str, Any]:
    """The per-sample view for the demo: the model's probabilities for one sample, what each given modality
    contributes, and where each stream's cross-attention goes.

    Inputs are one sample in any form `MMFusionProcessor.__call__` accepts (text a str; image a path, bytes, PIL
    image or array; audio a path, bytes, Gradio `(sampling_rate, array)` tuple, or an array with `sampling_rate`);
    any subset, at least one. Each tower runs once (`encode_towers`), and the fusion once per modality subset.
    Returns:

    - "probabilities": {label name: probability} (softmax; sigmoid per label for a multi-label model);
    - "predicted": the label with the highest probability;
    - "contributions": {modality: p(predicted | all given) - p(predicted | that modality withheld through its has_*
      mask)} for each given modality ("image", "text", "audio"). When only one modality is given, its contribution
      is p(predicted) - 1 / num_labels (the uniform prior stands for the prediction without any input);
    - "cross_attention" (when more than one modality is given): {stream: {other modality: mass}}, the attention
      weight the stream's tokens put on each other given modality, averaged over heads, tokens and fusion layers
      (the rest of each stream's weight goes to the learned sink token).

    Bad input raises the processor's `ValueError` unchanged; a regression model raises `ValueError` (there is no
    predicted class to explain).
    """
    problem_type = problem_type_of(model)
    if problem_type == REGRESSION:
        raise ValueError("model: explain_sample explains a predicted class; this is a regression model")
    batch = dict(processor(text=text, images=image, audio=audio, sampling_rate=sampling_rate))
    base = classifier(model)
    label_names = [base.config.id2label[i] for i in range(base.config.num_labels)]
    given_masks = presence(batch)
    given = [m for m in base.model.modalities if m in given_masks and bool(given_masks[m][0])]
    several = len(given) > 1
    with eval_mode(model), eager_fusion_attention(model) if several else contextlib.nullcontext():
        states = encode_towers(model, batch)
        logits, _, fusion_output = forward_kept(model, batch, given, tower_states=states, output_attentions=several)
        without = {m: forward_kept(model, batch, [o for o in given if o != m], tower_states=states)[0] for m in given}
    probabilities = scores(logits, problem_type)
    change = contributions(probabilities, {m: scores(w, problem_type) for m, w in without.items()})
    view: dict[str, Any] = {
        "probabilities": {name: float(p) for name, p in zip(label_names, probabilities[0])},
        "predicted": label_names[int(probabilities[0].argmax())],
        "contributions": {MODALITY_NAMES[m].user: float(change[m][0]) for m in given},
    }
    if several:
        view["cross_attention"] = {
            MODALITY_NAMES[stream].user: {MODALITY_NAMES[other].user: float(mass[0])
                                          for other, mass in parts.items() if other != "sink"}
            for stream, (parts, _) in cross_attention_mass(fusion_output, base.model.modalities).items()
        }
    return view
