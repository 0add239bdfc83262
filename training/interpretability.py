"""Interpretability of a fused prediction: what each modality contributes (the prediction with it, minus the
prediction with it withheld through its `has_*` mask), where each stream's cross-attention goes, and
`explain_sample`, the per-sample view the demo shows.

    >>> from training.interpretability import explain_sample
    >>> view = explain_sample(model, processor, text="a red circle, high tone", image="circle.png")  # doctest: +SKIP
    >>> view["predicted"], sorted(view["contributions"])  # doctest: +SKIP
    ('match', ['image', 'text'])

Modalities have their user-facing names ("image", "text", "audio") in what `explain_sample` returns, and the
model's stream names ("vision", "text", "audio") in the functions over batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from modeling_mm.configuration_mm import MODALITY_NAMES
from processors import MMFusionProcessor
from training.scoring import (REGRESSION, classifier, encode_towers, eval_mode, forward_kept, presence,
                              problem_type_of, scores)


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
