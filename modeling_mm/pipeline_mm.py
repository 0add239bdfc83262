"""The mm-fusion pipelines, in transformers' pipeline style:

- `mm-fusion-classification`: any subset of text, image and audio in, labels with scores out (or, for a multi-task
  model, every task's answer under its name);
- `mm-fusion-zero-shot-classification`: an image or an audio clip scored against label texts by a joint embedding
  model (`MMFusionContrastiveModel`), as transformers' zero-shot image and audio classification pipelines do;
- `mm-fusion-feature-extraction`: the joint embedding of each modality of a sample (and, on request, of the sample's
  modalities fused);
- `mm-fusion-text-generation`: text generated from any subset of text, image and audio, with an optional prompt or
  dialogue history, by a generation model (`MMFusionForConditionalGeneration`): captioning, question answering,
  dialogue.

This file travels to the Hub with a model (`config.json` names its pipelines under `custom_pipelines`), so it imports
only numpy, PIL, torch and transformers, and relatively only `configuration_mm.py`, which travels too; the processor
and the model it drives come from the same repo.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import GenerationConfig, GenerationMixin, Pipeline

from .configuration_mm import MODALITY_NAMES

PIPELINE_TASK = "mm-fusion-classification"
ZERO_SHOT_TASK = "mm-fusion-zero-shot-classification"
FEATURE_EXTRACTION_TASK = "mm-fusion-feature-extraction"
GENERATION_TASK = "mm-fusion-text-generation"
SAMPLE_KEYS = ("text", "image", "audio", "sampling_rate")
DEFAULT_THRESHOLD = 0.5
"""A multi-label task's tag is given when its probability is at least its threshold: this one, unless the task in
`config.tasks` carries its own (`"thresholds"`: {label: value} or one value per label, e.g. tuned on validation)."""
DEFAULT_MAX_NEW_TOKENS = 64
"""The generation pipeline's length limit where neither the call nor the model's `generation_config` sets
`max_new_tokens` or `max_length` (transformers' global `max_length=20` would count the prompt too)."""
DEFAULT_HYPOTHESIS_TEMPLATES = {"vision": "a photo of {}", "audio": "the sound of {}"}
"""How zero-shot classification turns a label into the text it compares with, per modality classified (CLIP's and
CLAP's prompt styles); `hypothesis_template=` replaces it."""


class MMFusionPipeline(Pipeline):
    """What every mm-fusion pipeline shares: it loads only the model's `MMFusionProcessor` (which holds the tokenizer,
    image processor, feature extractor and, for a generation model, the decoder tokenizer, and batches any mix of
    present and missing modalities), runs a call's samples `batch_size` at a time as model batches, and refuses a
    parameter it does not know naming it."""

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

    def _call_in_model_batches(self, samples: list[Any], single: bool, kwargs: dict[str, Any]) -> Any:
        """Run `samples` through the pipeline `batch_size` at a time (the call's, else the pipeline's, else 1) and
        return the results in order, the one result for a `single` sample."""
        batch_size = kwargs.pop("batch_size", None)
        if batch_size is None:
            batch_size = self._batch_size or 1
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int; got {batch_size!r}")
        # Each item handed to the base class is one model batch: the processor batches any mix of present and
        # missing modalities itself, which transformers' generic padding collator cannot.
        batches = [samples[start : start + batch_size] for start in range(0, len(samples), batch_size)]
        results = Pipeline.__call__(self, batches, batch_size=1, **kwargs)
        flat = [result for batch in results for result in batch]
        return flat[0] if single else flat

    def _refuse_unknown(self, unknown: dict[str, Any], parameters: str) -> None:
        if unknown:
            raise ValueError(f"{', '.join(sorted(unknown))}: not a parameter of {type(self).__name__} "
                             f"(parameters: {parameters})")


class MMFusionClassificationPipeline(MMFusionPipeline):
    r"""
    Classifies samples that have any subset of text, an image and audio with an mm-fusion
    `*ForSequenceClassification` model and its `MMFusionProcessor`. Returns, like transformers' image- and
    audio-classification pipelines, a list of `{"label", "score"}` sorted by score, per sample.

    With an `MMFusionForMultiTask` model it returns, per sample, a dict with every task's answer under the task's name:
    a single-label task the list of `{"label", "score"}` as above; a multi-label task `{"labels": [the labels whose
    probability is at least their threshold, most probable first], "scores": {label: probability}}` (thresholds
    `DEFAULT_THRESHOLD` unless the task in the config carries its own); a regression task its value (a list of values
    for several outputs), in the targets' original units.

    Inputs: `text=` a str; `image=` a path, bytes, a PIL image or an (H, W, C) array; `audio=` a path, bytes, an
    array with `sampling_rate=`, Gradio's `(sampling_rate, array)` or a `datasets` Audio dict. Leave out what a sample
    does not have. A batch is a list of dicts with those keys (and a per-sample `sampling_rate`), or lists given to the
    keywords; `batch_size=` runs that many samples through the model at once.

    Parameters (at construction or per call): `top_k` (labels returned per sample, default 5, `None` for all; for a
    multi-task model, per single-label task) and `function_to_apply` (`"softmax"`, `"sigmoid"` or `"none"`; by default
    sigmoid for multi-label models, none for regression, softmax otherwise; a multi-task model scores each task by its
    own problem type and refuses it).

    Example:

    ```python
    >>> from transformers import pipeline
    >>> classifier = pipeline("mm-fusion-classification", model="ORG/NAME", trust_remote_code=True)  # doctest: +SKIP
    >>> classifier(text="a red circle with a high tone", image="circle.png", audio="tone.wav")  # doctest: +SKIP
    [{'label': 'match', 'score': 0.98}, {'label': 'mismatch', 'score': 0.02}]
    >>> classifier([{"text": "a blue square"}, {"image": "square.png"}], batch_size=2)  # doctest: +SKIP
    [[{'label': 'mismatch', ...}, ...], [{'label': 'match', ...}, ...]]
    >>> multi_task = pipeline("mm-fusion-classification", model="ORG/MULTI", trust_remote_code=True)  # doctest: +SKIP
    >>> multi_task(text="a red circle", image="circle.png")  # doctest: +SKIP
    {'shape': [{'label': 'circle', 'score': 0.97}, ...], 'colours': {'labels': ['red'], 'scores': {'red': 0.91, ...}},
     'pitch': 440.2}
    ```
    """

    def __call__(
        self,
        inputs: dict[str, Any] | list[dict[str, Any]] | None = None,
        *,
        text: str | list[str | None] | None = None,
        image: Any = None,
        audio: Any = None,
        **kwargs: Any,
    ) -> list[dict[str, Any]] | list[list[dict[str, Any]]] | dict[str, Any]:
        """Classify one sample (`text=`, `image=`, `audio=` or a dict) or a list of them. Returns a list of
        `{"label", "score"}` for one sample, a list of such lists for a batch (a multi-task model: one dict of task
        answers per sample, see the class). Raises `ValueError` naming the argument for an unknown key, a sample with
        no modality, or keyword lists of different lengths."""
        samples, single = _as_samples(inputs, text, image, audio)
        return self._call_in_model_batches(samples, single, kwargs)

    def _sanitize_parameters(self, top_k: Any = "", function_to_apply: str | None = None, sampling_rate=None,
                             **unknown: Any):
        self._refuse_unknown(unknown, "top_k, function_to_apply, sampling_rate, batch_size")
        preprocess, postprocess = {}, {}
        if sampling_rate is not None:
            preprocess["sampling_rate"] = sampling_rate
        # "" is the unset marker, so that top_k=None can ask for every label
        if top_k != "":
            if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
                raise ValueError(f"top_k: expected a positive int or None; got {top_k!r}")
            postprocess["top_k"] = top_k
        if function_to_apply is not None:
            tasks = getattr(self.model.config, "tasks", None)
            if tasks:
                kinds = ", ".join(f"{task['name']}: {task['problem_type']}" for task in tasks)
                raise ValueError(f"function_to_apply: a multi-task model scores each task by its own problem type "
                                 f"({kinds})")
            if function_to_apply not in ("softmax", "sigmoid", "none"):
                raise ValueError(
                    f"function_to_apply: expected 'softmax', 'sigmoid' or 'none'; got {function_to_apply!r}")
            postprocess["function_to_apply"] = function_to_apply
        return preprocess, {}, postprocess

    def preprocess(self, samples: list[dict[str, Any]], sampling_rate: int | None = None) -> dict[str, torch.Tensor]:
        return _process_samples(self.processor, samples, sampling_rate)

    def _forward(self, model_inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"logits": self.model(**_in_dtype(model_inputs, self.model.dtype)).logits}

    def postprocess(self, model_outputs: dict[str, torch.Tensor], top_k: int | None = 5,
                    function_to_apply: str | None = None) -> list[list[dict[str, Any]]] | list[dict[str, Any]]:
        config = self.model.config
        logits = model_outputs["logits"]
        if isinstance(logits, dict):  # a multi-task model: each task's answers, then regrouped per sample
            answers = {task["name"]: _task_answers(task, logits[task["name"]].float().numpy(), top_k)
                       for task in config.tasks}
            return [{name: rows[i] for name, rows in answers.items()} for i in range(len(next(iter(logits.values()))))]
        if function_to_apply is None:
            function_to_apply = {"multi_label_classification": "sigmoid", "regression": "none"}.get(
                config.problem_type, "softmax")
        logits = logits.float().numpy()
        scores = {"softmax": _softmax, "sigmoid": _sigmoid}.get(function_to_apply, lambda x: x)(logits)
        names = [config.id2label[i] for i in range(logits.shape[-1])]
        return [_ranked(row, names, top_k) for row in scores]


def _softmax(logits: np.ndarray) -> np.ndarray:
    scores = np.exp(logits - logits.max(-1, keepdims=True))
    return scores / scores.sum(-1, keepdims=True)


def _sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


def _ranked(row: np.ndarray, names: list[str], top_k: int | None) -> list[dict[str, Any]]:
    """`{"label", "score"}` for every label, highest score first (ties in label order), cut to `top_k`."""
    ranked = [{"label": names[i], "score": float(row[i])} for i in np.argsort(-row, kind="stable")]
    return ranked if top_k is None else ranked[:top_k]


def task_thresholds(task: dict[str, Any]) -> np.ndarray:
    """A multi-label task's decision thresholds, one per label in label order: the task's own `"thresholds"` (a dict
    {label: value}, labels it leaves out at `DEFAULT_THRESHOLD`, or one value per label) when `config.tasks` carries
    them, else `DEFAULT_THRESHOLD` for every label. Raises `ValueError` naming the task for a list of another length."""
    labels = task["labels"]
    given = task.get("thresholds")
    if given is None:
        return np.full(len(labels), DEFAULT_THRESHOLD)
    if isinstance(given, dict):
        return np.array([float(given.get(label, DEFAULT_THRESHOLD)) for label in labels])
    if len(given) != len(labels):
        raise ValueError(f"tasks.{task['name']}.thresholds: {len(given)} values for {len(labels)} labels")
    return np.asarray(given, dtype=np.float64)


def _task_answers(task: dict[str, Any], logits: np.ndarray, top_k: int | None) -> list[Any]:
    """One task's answer per sample, from its logits `(samples, num_outputs)` (see the pipeline's docstring)."""
    if task["problem_type"] == "single_label_classification":
        return [_ranked(row, task["labels"], top_k) for row in _softmax(logits)]
    if task["problem_type"] == "multi_label_classification":
        thresholds = task_thresholds(task)
        answers = []
        for row in _sigmoid(logits):
            given = [i for i in np.argsort(-row, kind="stable") if row[i] >= thresholds[i]]
            answers.append({"labels": [task["labels"][i] for i in given],
                            "scores": {label: float(p) for label, p in zip(task["labels"], row)}})
        return answers
    # regression: the model already answers in the targets' original units
    return [float(row[0]) if len(row) == 1 else [float(value) for value in row] for row in logits]


class MMFusionZeroShotClassificationPipeline(MMFusionPipeline):
    r"""
    Zero-shot classification of an image or an audio clip with an mm-fusion joint embedding model
    (`MMFusionContrastiveModel`) and its `MMFusionProcessor`, as transformers' zero-shot image and audio classification
    pipelines do with CLIP, SigLIP and CLAP: each candidate label becomes a text (`hypothesis_template`, default
    "a photo of {}" for an image and "the sound of {}" for audio), the item and the texts are embedded each alone, and
    the scores are those of the model's own logits, `exp(logit_scale)` (clamped at 100) times the cosine
    similarities: a softmax over the labels for an InfoNCE model, or, for a sigmoid-loss model (it has a
    `logit_bias`), SigLIP's independent `sigmoid(logits + logit_bias)` per label. Returns a list of
    `{"label", "score"}`, best first, per item.

    Inputs: `image=` a path, bytes, a PIL image or an (H, W, C) array; `audio=` a path, bytes, an array with
    `sampling_rate=`, Gradio's `(sampling_rate, array)` or a `datasets` Audio dict; or the item given positionally,
    where its kind is told from its type, its file suffix or its first bytes (an image for a model without an audio
    tower, and the other way round). A list of items is a batch; `batch_size=` runs that many through the model at
    once (the label texts are embedded once per model batch).

    Parameters (at construction or per call): `candidate_labels` (a list of distinct non-empty strings, required),
    `hypothesis_template` (a string with `{}` where the label goes) and `sampling_rate` (of bare audio arrays).

    Example:

    ```python
    >>> from transformers import pipeline
    >>> classifier = pipeline("mm-fusion-zero-shot-classification", model="ORG/NAME",
    ...                       trust_remote_code=True)  # doctest: +SKIP
    >>> classifier(image="circle.png", candidate_labels=["red circle", "blue square"])  # doctest: +SKIP
    [{'label': 'red circle', 'score': 0.93}, {'label': 'blue square', 'score': 0.07}]
    >>> classifier(audio=["beep.wav", "hum.wav"], candidate_labels=["a high tone", "a deep tone"])  # doctest: +SKIP
    [[{'label': 'a high tone', ...}, ...], [{'label': 'a deep tone', ...}, ...]]
    ```
    """

    def __init__(self, model: Any, *args: Any, **kwargs: Any):
        _check_joint_embedding_model(model, "zero-shot classification")
        if "text" not in model.config.modalities:
            raise ValueError(f"model: zero-shot classification compares with label texts, but this model has no text "
                             f"tower (it has {_tower_names(model)})")
        super().__init__(model, *args, **kwargs)

    def __call__(
        self,
        inputs: Any = None,
        *,
        image: Any = None,
        audio: Any = None,
        **kwargs: Any,
    ) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """Score one item (`image=`, `audio=` or given positionally) or a list of them against `candidate_labels`.
        Returns a list of `{"label", "score"}` (best first) for one item, a list of such lists for a batch. Raises
        `ValueError` naming the argument for: no item or both kinds, an item whose kind cannot be told, a modality
        the model has no tower for, no or bad `candidate_labels`, a `hypothesis_template` without `{}`."""
        modality, items, single = self._items(inputs, image, audio)
        if "candidate_labels" not in kwargs and "candidate_labels" not in self._preprocess_params:
            raise ValueError("candidate_labels: give the labels to choose from, e.g. candidate_labels=['cat', 'dog']")
        samples = [{"modality": modality, "item": item} for item in items]
        return self._call_in_model_batches(samples, single, kwargs)

    def _items(self, inputs: Any, image: Any, audio: Any) -> tuple[str, list[Any], bool]:
        """The modality classified ("vision" or "audio"), the items, and whether it was a single item."""
        if image is not None and audio is not None:
            raise ValueError("image, audio: give one of them; zero-shot classification scores one modality at a time")
        keyword = "vision" if image is not None else "audio" if audio is not None else None
        if inputs is not None and keyword is not None:
            raise ValueError(f"inputs: give the items either positionally or as "
                             f"{MODALITY_NAMES[keyword].user}=, not both")
        given = image if image is not None else audio if audio is not None else inputs
        if given is None:
            raise ValueError("inputs: give an image (image=) or an audio clip (audio=) to classify")
        single = not isinstance(given, list)
        items = [given] if single else given
        if not items:
            raise ValueError("inputs: the list of items is empty")
        towers = self.model.config.modalities
        if keyword is None:
            kinds = {_guess_modality(item, index, towers) for index, item in enumerate(items)}
            if len(kinds) > 1:
                raise ValueError("inputs: the batch mixes images and audio; classify each kind in its own call")
            (keyword,) = kinds
        if keyword not in towers:
            user = MODALITY_NAMES[keyword].user
            raise ValueError(f"{user}: this model has no {user} tower (it has {_tower_names(self.model)})")
        for index, item in enumerate(items):
            if item is None:
                raise ValueError(f"{MODALITY_NAMES[keyword].user}[{index}]: is None")
        return keyword, items, single

    def _sanitize_parameters(self, candidate_labels: Any = None, hypothesis_template: Any = None,
                             sampling_rate: int | None = None, **unknown: Any):
        self._refuse_unknown(unknown, "candidate_labels, hypothesis_template, sampling_rate, batch_size")
        preprocess = {}
        if candidate_labels is not None:
            preprocess["candidate_labels"] = _checked_labels(candidate_labels)
        if hypothesis_template is not None:
            preprocess["hypothesis_template"] = _checked_template(hypothesis_template)
        if sampling_rate is not None:
            preprocess["sampling_rate"] = sampling_rate
        return preprocess, {}, {}

    def preprocess(self, samples: list[dict[str, Any]], candidate_labels: list[str] | None = None,
                   hypothesis_template: str | None = None, sampling_rate: int | None = None) -> dict[str, Any]:
        if not candidate_labels:
            raise ValueError("candidate_labels: give at least one label")
        modality = samples[0]["modality"]
        template = hypothesis_template or DEFAULT_HYPOTHESIS_TEMPLATES[modality]
        names = MODALITY_NAMES[modality]
        items = self.processor(**{names.processor_argument: [sample["item"] for sample in samples]},
                               sampling_rate=sampling_rate)
        texts = self.processor(text=[template.format(label) for label in candidate_labels])
        return {"modality": modality, "items": dict(items), "texts": dict(texts), "candidate_labels": candidate_labels}

    def _forward(self, model_inputs: dict[str, Any]) -> dict[str, Any]:
        model = self.model
        text_embeds = _features(model, "text", model_inputs["texts"])  # (labels, projection_dim)
        item_embeds = _features(model, model_inputs["modality"], _in_dtype(model_inputs["items"], model.dtype))
        scale = model.logit_scale.exp().clamp(max=100)  # as the model's own logits
        logits = scale * item_embeds @ text_embeds.t()  # (items, labels)
        bias = getattr(model, "logit_bias", None)
        scores = torch.sigmoid(logits + bias) if bias is not None else logits.softmax(dim=-1)
        return {"scores": scores.float(), "candidate_labels": model_inputs["candidate_labels"]}

    def postprocess(self, model_outputs: dict[str, Any]) -> list[list[dict[str, Any]]]:
        labels = model_outputs["candidate_labels"]
        return [_ranked(row, labels, None) for row in model_outputs["scores"].numpy()]


class MMFusionFeatureExtractionPipeline(MMFusionPipeline):
    r"""
    Joint embeddings of samples with an mm-fusion joint embedding model (`MMFusionContrastiveModel`) and its
    `MMFusionProcessor`: for each sample, the embedding of each modality it has, each computed from that modality
    alone (`get_text_features`, `get_image_features`, `get_audio_features`, so comparable across modalities and
    independent of the rest of the batch), under `"text_embeds"`, `"image_embeds"`, `"audio_embeds"`; with
    `return_fused=True` also `"fused_embeds"`, the sample's modalities fused (`get_fused_features`). Vectors of
    `config.projection_dim` floats, unit length unless `normalize=False`; Python lists, or torch tensors with
    `return_tensors=True` (as transformers' feature-extraction pipeline).

    Inputs as for the `mm-fusion-classification` pipeline: `text=` a str; `image=` a path, bytes, a PIL image or an
    (H, W, C) array; `audio=` a path, bytes, an array with `sampling_rate=`, Gradio's `(sampling_rate, array)` or a
    `datasets` Audio dict; a batch is a list of dicts with those keys, or lists given to the keywords.

    Example:

    ```python
    >>> from transformers import pipeline
    >>> extractor = pipeline("mm-fusion-feature-extraction", model="ORG/NAME", trust_remote_code=True)  # doctest: +SKIP
    >>> out = extractor(text="a red circle", image="circle.png")  # doctest: +SKIP
    >>> sorted(out), len(out["text_embeds"])  # doctest: +SKIP
    (['image_embeds', 'text_embeds'], 256)
    >>> similarity = sum(a * b for a, b in zip(out["text_embeds"], out["image_embeds"]))  # doctest: +SKIP
    >>> extractor([{"text": "a blue square"}, {"audio": "beep.wav"}], return_fused=True)  # doctest: +SKIP
    [{'text_embeds': [...], 'fused_embeds': [...]}, {'audio_embeds': [...], 'fused_embeds': [...]}]
    ```
    """

    def __init__(self, model: Any, *args: Any, **kwargs: Any):
        _check_joint_embedding_model(model, "feature extraction")
        super().__init__(model, *args, **kwargs)

    def __call__(
        self,
        inputs: dict[str, Any] | list[dict[str, Any]] | None = None,
        *,
        text: str | list[str | None] | None = None,
        image: Any = None,
        audio: Any = None,
        **kwargs: Any,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """Embed one sample (`text=`, `image=`, `audio=` or a dict) or a list of them. Returns a dict of embeddings
        for one sample, a list of dicts for a batch. Raises `ValueError` naming the argument for an unknown key, a
        sample with no modality, a modality the model has no tower for, or keyword lists of different lengths."""
        samples, single = _as_samples(inputs, text, image, audio)
        _check_towers(self.model, samples)
        return self._call_in_model_batches(samples, single, kwargs)

    def _sanitize_parameters(self, normalize: bool | None = None, return_fused: bool | None = None,
                             return_tensors: bool | None = None, sampling_rate: int | None = None, **unknown: Any):
        self._refuse_unknown(unknown, "normalize, return_fused, return_tensors, sampling_rate, batch_size")
        for name, value in (("normalize", normalize), ("return_fused", return_fused),
                            ("return_tensors", return_tensors)):
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name}: expected True or False; got {value!r}")
        preprocess = {} if sampling_rate is None else {"sampling_rate": sampling_rate}
        forward = {name: value for name, value in (("normalize", normalize), ("return_fused", return_fused))
                   if value is not None}
        postprocess = {} if return_tensors is None else {"return_tensors": return_tensors}
        return preprocess, forward, postprocess

    def preprocess(self, samples: list[dict[str, Any]], sampling_rate: int | None = None) -> dict[str, torch.Tensor]:
        return _process_samples(self.processor, samples, sampling_rate)

    def _forward(self, model_inputs: dict[str, torch.Tensor], normalize: bool = True,
                 return_fused: bool = False) -> dict[str, Any]:
        model_inputs = _in_dtype(model_inputs, self.model.dtype)
        outputs: dict[str, Any] = {"presence": {}}
        for modality in self.model.config.modalities:
            names = MODALITY_NAMES[modality]
            present = model_inputs[names.presence]  # (batch,)
            outputs["presence"][names.user] = present
            if bool(present.any()):
                # each modality alone, on the rows that have it
                outputs[f"{names.user}_embeds"] = _features(self.model, modality, model_inputs, present, normalize)
        if return_fused:
            outputs["fused_embeds"] = self.model.get_fused_features(normalize=normalize, **model_inputs)
        return outputs

    def postprocess(self, model_outputs: dict[str, Any], return_tensors: bool = False) -> list[dict[str, Any]]:
        def vector(embeds: torch.Tensor) -> torch.Tensor | list[float]:
            return embeds if return_tensors else embeds.float().tolist()

        presence = model_outputs["presence"]  # by modality, in the config's order (image, text, audio)
        batch_size = len(next(iter(presence.values())))
        rows = {user: iter(model_outputs[f"{user}_embeds"]) for user, present in presence.items() if present.any()}
        results = []
        for index in range(batch_size):
            result = {f"{user}_embeds": vector(next(rows[user])) for user, present in presence.items()
                      if bool(present[index])}
            if "fused_embeds" in model_outputs:
                result["fused_embeds"] = vector(model_outputs["fused_embeds"][index])
            results.append(result)
        return results


class MMFusionTextGenerationPipeline(MMFusionPipeline):
    r"""
    Text generated from samples that have any subset of text, an image and audio by an mm-fusion generation model
    (`MMFusionForConditionalGeneration`, a decoder LM conditioned on the fused inputs) and its `MMFusionProcessor`
    (with the decoder's tokenizer): a caption or a description without a prompt, an answer with a question as the
    prompt, the assistant's next turn with a dialogue history as the prompt. Returns, like transformers'
    text-generation and image-text-to-text pipelines, a list of `{"generated_text": str}` per sample (one entry, or
    `num_return_sequences`), only the new text: what `model.generate(**processor(..., prompt=...))` returns, decoded
    by `processor.batch_decode`.

    Inputs as for the `mm-fusion-classification` pipeline: `text=` a str (read by the text tower, not continued);
    `image=` a path, bytes, a PIL image or an (H, W, C) array; `audio=` a path, bytes, an array with `sampling_rate=`,
    Gradio's `(sampling_rate, array)` or a `datasets` Audio dict; a batch is a list of dicts with those keys (and a
    per-sample `"prompt"`), or lists given to the keywords. Every sample needs at least one of text, image and audio.

    `prompt=` (optional) starts the decoder's text, as in training: a str (e.g. "Question: what colour? Answer:"),
    or a dialogue history, a list of `{"role", "content"}` messages (roles system, user, assistant; not ending with an
    assistant message), rendered by the decoder tokenizer's chat template with its generation prompt. One prompt (a
    str or a history) serves every sample of the call; a list of them (`None` for none) gives one per sample. Each
    row starts with the decoder's start token, prompt or not, so a sample's text does not depend on its batch
    partners.

    Parameters (at construction or per call): whatever `generate()` takes (`max_new_tokens`, `num_beams`, `do_sample`,
    `temperature`, `top_p`, `num_return_sequences`, `repetition_penalty`, `streamer`, `generation_config`, ...; or
    as a dict `generate_kwargs=`), on top of the model's `generation_config` (saved with it), with one default of
    the pipeline's, `max_new_tokens=DEFAULT_MAX_NEW_TOKENS`, only where neither sets a length; `skip_special_tokens`
    (default True) and `sampling_rate` (of bare audio arrays).

    Example:

    ```python
    >>> from transformers import pipeline
    >>> generator = pipeline("mm-fusion-text-generation", model="ORG/NAME", trust_remote_code=True)  # doctest: +SKIP
    >>> generator(image="circle.png", audio="tone.wav")  # doctest: +SKIP
    [{'generated_text': 'a red circle with a high tone.'}]
    >>> generator(image=["circle.png", "square.png"], prompt="Question: what colour? Answer:",
    ...           num_beams=3)  # doctest: +SKIP
    [[{'generated_text': ' red'}], [{'generated_text': ' blue'}]]
    >>> history = [{"role": "user", "content": "what shape is it?"}, {"role": "assistant", "content": "a star"},
    ...            {"role": "user", "content": "and its colour?"}]
    >>> generator(image="star.png", prompt=history, max_new_tokens=10)  # doctest: +SKIP
    [{'generated_text': ' yellow'}]
    ```
    """

    _pipeline_calls_generate = True
    _default_generation_config = GenerationConfig(max_new_tokens=DEFAULT_MAX_NEW_TOKENS)

    def __init__(self, model: Any, *args: Any, **kwargs: Any):
        # by what the pipeline calls rather than by class: through trust_remote_code the class is the repo's own copy
        if getattr(model.config, "decoder_config", None) is None or not hasattr(model, "get_decoder_context"):
            raise ValueError(f"model: text generation needs an mm-fusion generation model "
                             f"(MMFusionForConditionalGeneration, what mm-train --task generation trains); got "
                             f"{type(model).__name__}")
        super().__init__(model, *args, **kwargs)
        if getattr(self.processor, "decoder_tokenizer", None) is None:
            raise ValueError("processor: text generation needs the model's MMFusionProcessor with its "
                             f"decoder_tokenizer (saved with the model); got {type(self.processor).__name__}")
        # generate() arguments given at construction that are not generation-config fields (a streamer, stopping
        # criteria) serve every call too, as the fields do (the base class keeps those in `_generate_kwargs`)
        self._generate_kwargs.update(self._forward_params.pop("generate_kwargs", {}))

    def __call__(
        self,
        inputs: dict[str, Any] | list[dict[str, Any]] | None = None,
        *,
        text: str | list[str | None] | None = None,
        image: Any = None,
        audio: Any = None,
        prompt: str | list[dict[str, str]] | list[str | list[dict[str, str]] | None] | None = None,
        **kwargs: Any,
    ) -> list[dict[str, str]] | list[list[dict[str, str]]]:
        """Generate for one sample (`text=`, `image=`, `audio=` or a dict) or a list of them, each with its prompt
        (`prompt=` or a sample's `"prompt"`). Returns a list of `{"generated_text"}` for one sample, a list of such
        lists for a batch. Raises `ValueError` naming the argument for: no text, image or audio (a prompt alone
        conditions nothing), an unknown key or parameter, a modality the model has no tower for, keyword lists of
        different lengths, and a prompt that is not a str, a dialogue history or one of them per sample (or a
        message without a role or content, an unknown role, a history ending with the assistant)."""
        if inputs is None and text is None and image is None and audio is None:
            raise ValueError("text, image, audio: give at least one of them; the text is generated from the fused "
                             "inputs" + (" (a prompt alone conditions on nothing)" if prompt is not None else ""))
        if _is_history(inputs) and all("role" in message for message in inputs):
            raise ValueError("inputs: this is a dialogue history, which is a prompt: pass it as prompt=, with the "
                             "text, image or audio it is about")
        samples, single = _as_samples(inputs, text, image, audio, keys=(*SAMPLE_KEYS, "prompt"))
        if prompt is not None:
            samples = _with_prompt(samples, prompt)
        _check_towers(self.model, samples)
        # every prompt checked (and its length) before any media is decoded, indexed by sample over the whole call
        self.processor.decoder_inputs([sample.get("prompt") for sample in samples])
        return self._call_in_model_batches(samples, single, kwargs)

    def _sanitize_parameters(self, sampling_rate: int | None = None, skip_special_tokens: bool | None = None,
                             generate_kwargs: dict[str, Any] | None = None, **parameters: Any):
        if generate_kwargs is not None:
            if not isinstance(generate_kwargs, dict):
                raise ValueError(f"generate_kwargs: expected a dict; got {type(generate_kwargs).__name__}")
            twice = sorted(set(generate_kwargs) & set(parameters))
            if twice:
                raise ValueError(f"generate_kwargs, {', '.join(twice)}: given twice; give each once")
            parameters = {**generate_kwargs, **parameters}
        self._refuse_unknown({name: value for name, value in parameters.items() if name not in _GENERATE_PARAMETERS},
                             "sampling_rate, skip_special_tokens, batch_size, and what generate() takes: "
                             "max_new_tokens, num_beams, do_sample, num_return_sequences, ...")
        if skip_special_tokens is not None and not isinstance(skip_special_tokens, bool):
            raise ValueError(f"skip_special_tokens: expected True or False; got {skip_special_tokens!r}")
        preprocess = {} if sampling_rate is None else {"sampling_rate": sampling_rate}
        forward = {"generate_kwargs": parameters} if parameters else {}
        postprocess = {} if skip_special_tokens is None else {"skip_special_tokens": skip_special_tokens}
        return preprocess, forward, postprocess

    def preprocess(self, samples: list[dict[str, Any]], sampling_rate: int | None = None) -> dict[str, torch.Tensor]:
        # `prompt` always, so that every row starts as in training ([start] prompt tokens), left-padded for generate
        return _process_samples(self.processor, samples, sampling_rate,
                                prompt=[sample.get("prompt") for sample in samples])

    def _forward(self, model_inputs: dict[str, torch.Tensor],
                 generate_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
        generate_kwargs = self._prepare_generate_kwargs(generate_kwargs or {}, return_dict_in_generate=False)
        if self._get_set_generation_params(generate_kwargs).get("stop_strings") is not None:
            generate_kwargs["tokenizer"] = self.processor.decoder_tokenizer  # generate() finds the strings through it
        sequences = self.model.generate(**_in_dtype(model_inputs, self.model.dtype), **generate_kwargs)
        return {"sequences": sequences, "batch_size": len(model_inputs["has_text"])}

    def postprocess(self, model_outputs: dict[str, Any],
                    skip_special_tokens: bool = True) -> list[list[dict[str, str]]]:
        texts = self.processor.batch_decode(model_outputs["sequences"], skip_special_tokens=skip_special_tokens)
        per_sample = len(texts) // model_outputs["batch_size"]  # num_return_sequences, a sample's next to each other
        return [[{"generated_text": text} for text in texts[start : start + per_sample]]
                for start in range(0, len(texts), per_sample)]


# What a generation pipeline passes to generate(): the generation-config fields and generate()'s own arguments (the
# model's inputs come from the processor)
_GENERATE_PARAMETERS = frozenset(
    {name for name in vars(GenerationConfig()) if not name.startswith("_")}
    | set(inspect.signature(GenerationMixin.generate).parameters) - {"self", "inputs", "kwargs"}
)


def _is_history(value: Any) -> bool:
    """A dialogue history: a non-empty list of message dicts (the processor's rule, which this file cannot import)."""
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(m, Mapping) for m in value)


def _with_prompt(samples: list[dict[str, Any]], prompt: Any) -> list[dict[str, Any]]:
    """`samples` with the call's `prompt=`: one prompt (a str or a dialogue history) for every sample, or a list of
    one per sample. Raises `ValueError` naming `prompt` for another type, a list of another length, or samples that
    carry their own."""
    own = [index for index, sample in enumerate(samples) if sample.get("prompt") is not None]
    if own:
        raise ValueError(f"prompt: inputs[{own[0]}] carries its own prompt; give prompts in the samples or as "
                         "prompt=, not both")
    if isinstance(prompt, str) or _is_history(prompt):
        prompts = [prompt] * len(samples)
    elif isinstance(prompt, (list, tuple)):
        if len(prompt) != len(samples):
            raise ValueError(f"prompt: {len(prompt)} prompts for {len(samples)} samples; give one prompt (a str or a "
                             "dialogue history) for all of them, or one per sample")
        prompts = list(prompt)
    else:
        raise ValueError(f"prompt: expected a str, a dialogue history (a list of {{'role', 'content'}} messages) or "
                         f"a list of one per sample; got {type(prompt).__name__}")
    return [{**sample, "prompt": row} for sample, row in zip(samples, prompts)]


def _as_samples(inputs: Any, text: Any, image: Any, audio: Any,
                keys: tuple[str, ...] = SAMPLE_KEYS) -> tuple[list[dict[str, Any]], bool]:
    """The call's samples as dicts (with `keys` at most), and whether it was a single sample."""
    keywords = {key: value for key, value in (("text", text), ("image", image), ("audio", audio)) if value is not None}
    if inputs is not None and keywords:
        raise ValueError(f"inputs: give samples either as dicts or as {'/'.join(keywords)}=, not both")
    if inputs is None:
        if not keywords:
            raise ValueError("text, image, audio: give at least one of them")
        lists = {key: value for key, value in keywords.items() if isinstance(value, list)}
        if not lists:
            return [keywords], True
        if len(lists) != len(keywords) or len({len(value) for value in lists.values()}) > 1:
            sizes = ", ".join(f"{key} has {len(v) if isinstance(v, list) else 'one'}" for key, v in keywords.items())
            raise ValueError(f"text, image, audio: give one sample each or lists of one length; {sizes}")
        size = len(next(iter(lists.values())))
        inputs = [{key: value[i] for key, value in lists.items() if value[i] is not None} for i in range(size)]
    single = isinstance(inputs, dict)
    samples = [inputs] if single else inputs
    if not isinstance(samples, (list, tuple)) or not samples:
        raise ValueError(f"inputs: expected a dict or a non-empty list of dicts; got {type(inputs).__name__}")
    for index, sample in enumerate(samples):
        if not isinstance(sample, dict):
            raise ValueError(f"inputs[{index}]: expected a dict with text/image/audio; got {type(sample).__name__}")
        unknown = set(sample) - set(keys)
        if unknown:
            raise ValueError(f"inputs[{index}]: unknown keys {sorted(unknown)}; expected {list(keys)}")
        if all(sample.get(key) is None for key in ("text", "image", "audio")):
            raise ValueError(f"inputs[{index}]: the sample has no text, image or audio")
    return list(samples), single


def _check_towers(model: Any, samples: list[dict[str, Any]]) -> None:
    """Refuse, naming the sample, a modality the model has no tower for (before any media is decoded)."""
    towers = model.config.modalities
    for index, sample in enumerate(samples):
        for modality in ("vision", "text", "audio"):
            user = MODALITY_NAMES[modality].user
            if sample.get(user) is not None and modality not in towers:
                raise ValueError(f"inputs[{index}].{user}: this model has no {user} tower (it has "
                                 f"{_tower_names(model)})")


# ---- shared by the pipelines ----------------------------------------------------------------------------------------

def _process_samples(processor: Any, samples: list[dict[str, Any]], sampling_rate: int | None,
                     **decoder: Any) -> dict[str, Any]:
    """The processor's batch of samples given as dicts (`SAMPLE_KEYS`); `decoder` (e.g. `prompt=`) passed on."""
    audio = [sample.get("audio") for sample in samples]
    rates = [sample.get("sampling_rate", sampling_rate) for sample in samples]
    batch = processor(
        text=[sample.get("text") for sample in samples],
        images=[sample.get("image") for sample in samples],
        audio=audio if any(clip is not None for clip in audio) else None,
        sampling_rate=rates,
        **decoder,
    )
    return dict(batch)


def _in_dtype(model_inputs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    # the processor gives float32; a model loaded in bf16/fp16 needs its own dtype
    return {key: value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value
            for key, value in model_inputs.items()}


def _features(model: Any, modality: str, batch: dict[str, Any], rows: torch.Tensor | None = None,
              normalize: bool = True) -> torch.Tensor:
    """`get_{image,text,audio}_features` of a joint embedding model on the processor's `batch` (its `rows` only, a
    bool mask, when given): `(rows, projection_dim)`."""
    names = MODALITY_NAMES[modality]
    inputs = {name: batch[name] if rows is None else batch[name][rows]
              for name in names.inputs if batch.get(name) is not None}
    return getattr(model, f"get_{names.user}_features")(**inputs, normalize=normalize)


def _check_joint_embedding_model(model: Any, purpose: str) -> None:
    # by what the pipeline calls rather than by class: through trust_remote_code the class is the repo's own copy
    if not (getattr(model.config, "is_contrastive", False) and hasattr(model, "get_text_features")
            and hasattr(model, "logit_scale")):
        raise ValueError(f"model: {purpose} needs an mm-fusion joint embedding model (MMFusionContrastiveModel, "
                         f"what mm-train --task contrastive trains); got {type(model).__name__}")


def _tower_names(model: Any) -> str:
    return ", ".join(MODALITY_NAMES[modality].user for modality in model.config.modalities)


def _checked_labels(candidate_labels: Any) -> list[str]:
    if isinstance(candidate_labels, str) or not isinstance(candidate_labels, (list, tuple)):
        raise ValueError(f"candidate_labels: expected a list of labels; got {type(candidate_labels).__name__}")
    if not candidate_labels:
        raise ValueError("candidate_labels: give at least one label")
    for index, label in enumerate(candidate_labels):
        if not isinstance(label, str) or not label.strip():
            raise ValueError(f"candidate_labels[{index}]: expected a non-empty str; got {label!r}")
    repeated = sorted({label for label in candidate_labels if candidate_labels.count(label) > 1})
    if repeated:
        raise ValueError(f"candidate_labels: {repeated} given more than once (the scores are by label)")
    return list(candidate_labels)


def _checked_template(template: Any) -> str:
    if not isinstance(template, str) or "{}" not in template:
        raise ValueError(f"hypothesis_template: expected a str with '{{}}' where the label goes, such as "
                         f"'a photo of {{}}'; got {template!r}")
    try:
        template.format("label")
    except (IndexError, KeyError, ValueError) as error:
        raise ValueError(f"hypothesis_template: {template!r} is not a format string with one '{{}}' ({error!r}); "
                         "double any other braces") from None
    return template


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp")
_AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus")


def _guess_modality(item: Any, index: int, towers: tuple[str, ...]) -> str:
    """Whether a positional zero-shot input is an image ("vision") or audio: the one the model has a tower for when
    it has only one of them, else told from the item's type, its file suffix or its file's first bytes."""
    candidates = [modality for modality in ("vision", "audio") if modality in towers]
    if len(candidates) == 1:
        return candidates[0]
    if isinstance(item, Image.Image):
        return "vision"
    if isinstance(item, tuple) or (isinstance(item, dict) and "array" in item):  # Gradio and datasets audio
        return "audio"
    if isinstance(item, dict):  # datasets' undecoded {"bytes", "path"}
        item = item.get("bytes") if item.get("bytes") is not None else item.get("path")
    if isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim in (1, 3):
        return "audio" if item.ndim == 1 else "vision"
    if isinstance(item, (str, os.PathLike)):
        suffix = os.path.splitext(os.fspath(item))[1].lower()
        if suffix in _IMAGE_SUFFIXES or suffix in _AUDIO_SUFFIXES:
            return "vision" if suffix in _IMAGE_SUFFIXES else "audio"
    if isinstance(item, (bytes, bytearray, memoryview)):
        head = bytes(item[:12])
        if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")) or (
                head.startswith(b"RIFF") and head[8:12] == b"WEBP"):
            return "vision"
        if head.startswith((b"fLaC", b"OggS", b"ID3")) or (head.startswith(b"RIFF") and head[8:12] == b"WAVE") or (
                len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):  # an MP3 frame
            return "audio"
    raise ValueError(f"inputs[{index}]: cannot tell whether this {type(item).__name__} is an image or audio; "
                     "pass it as image= or audio=")


__all__ = [
    "MMFusionClassificationPipeline",
    "MMFusionZeroShotClassificationPipeline",
    "MMFusionFeatureExtractionPipeline",
    "MMFusionTextGenerationPipeline",
    "MMFusionPipeline",
    "PIPELINE_TASK",
    "ZERO_SHOT_TASK",
    "FEATURE_EXTRACTION_TASK",
    "GENERATION_TASK",
    "DEFAULT_THRESHOLD",
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_HYPOTHESIS_TEMPLATES",
    "task_thresholds",
]
