"""The `mm-fusion-classification` pipeline: any subset of text, image and audio in, labels with scores out (or, for a
multi-task model, every task's answer under its name).

This file travels to the Hub with a model (`config.json` names it under `custom_pipelines`), so it imports only numpy,
torch and transformers, and nothing relatively: the processor and the model it drives come from the same repo.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import Pipeline

PIPELINE_TASK = "mm-fusion-classification"
SAMPLE_KEYS = ("text", "image", "audio", "sampling_rate")
DEFAULT_THRESHOLD = 0.5
"""A multi-label task's tag is given when its probability is at least its threshold: this one, unless the task in
`config.tasks` carries its own (`"thresholds"`: {label: value} or one value per label, e.g. tuned on validation)."""


class MMFusionClassificationPipeline(Pipeline):
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

    _load_processor = True
    _load_tokenizer = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_video_processor = False

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
        batch_size = kwargs.pop("batch_size", None) or self._batch_size or 1
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int; got {batch_size!r}")
        # Each item handed to the base class is one model batch: the processor batches any mix of present and
        # missing modalities itself, which transformers' generic padding collator cannot.
        batches = [samples[start : start + batch_size] for start in range(0, len(samples), batch_size)]
        results = super().__call__(batches, batch_size=1, **kwargs)
        flat = [result for batch in results for result in batch]
        return flat[0] if single else flat

    def _sanitize_parameters(self, top_k: Any = "", function_to_apply: str | None = None, sampling_rate=None,
                             **unknown: Any):
        if unknown:
            raise ValueError(f"{', '.join(sorted(unknown))}: not a parameter of {type(self).__name__} "
                             f"(parameters: top_k, function_to_apply, sampling_rate, batch_size)")
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
        audio = [sample.get("audio") for sample in samples]
        rates = [sample.get("sampling_rate", sampling_rate) for sample in samples]
        batch = self.processor(
            text=[sample.get("text") for sample in samples],
            images=[sample.get("image") for sample in samples],
            audio=audio if any(clip is not None for clip in audio) else None,
            sampling_rate=rates,
        )
        return dict(batch)

    def _forward(self, model_inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        dtype = self.model.dtype
        # the processor gives float32; a model loaded in bf16/fp16 needs its own dtype
        model_inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model_inputs.items()}
        return {"logits": self.model(**model_inputs).logits}

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


def _as_samples(inputs: Any, text: Any, image: Any, audio: Any) -> tuple[list[dict[str, Any]], bool]:
    """The call's samples as dicts, and whether it was a single sample."""
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
        unknown = set(sample) - set(SAMPLE_KEYS)
        if unknown:
            raise ValueError(f"inputs[{index}]: unknown keys {sorted(unknown)}; expected {list(SAMPLE_KEYS)}")
        if all(sample.get(key) is None for key in ("text", "image", "audio")):
            raise ValueError(f"inputs[{index}]: the sample has no text, image or audio")
    return list(samples), single


__all__ = ["MMFusionClassificationPipeline", "PIPELINE_TASK", "DEFAULT_THRESHOLD", "task_thresholds"]
