"""The `mm-fusion-classification` pipeline: any subset of text, image and audio in, labels with scores out.

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


class MMFusionClassificationPipeline(Pipeline):
    r"""
    Classifies samples that have any subset of text, an image and audio with an mm-fusion
    `*ForSequenceClassification` model and its `MMFusionProcessor`. Returns, like transformers' image- and
    audio-classification pipelines, a list of `{"label", "score"}` sorted by score, per sample.

    Inputs: `text=` a str; `image=` a path, bytes, a PIL image or an (H, W, C) array; `audio=` a path, bytes, an
    array with `sampling_rate=`, Gradio's `(sampling_rate, array)` or a `datasets` Audio dict. Leave out what a sample
    does not have. A batch is a list of dicts with those keys (and a per-sample `sampling_rate`), or lists given to the
    keywords; `batch_size=` runs that many samples through the model at once.

    Parameters (at construction or per call): `top_k` (labels returned per sample, default 5, `None` for all) and
    `function_to_apply` (`"softmax"`, `"sigmoid"` or `"none"`; by default sigmoid for multi-label models, none for
    regression, softmax otherwise).

    Example:

    ```python
    >>> from transformers import pipeline
    >>> classifier = pipeline("mm-fusion-classification", model="ORG/NAME", trust_remote_code=True)  # doctest: +SKIP
    >>> classifier(text="a red circle with a high tone", image="circle.png", audio="tone.wav")  # doctest: +SKIP
    [{'label': 'match', 'score': 0.98}, {'label': 'mismatch', 'score': 0.02}]
    >>> classifier([{"text": "a blue square"}, {"image": "square.png"}], batch_size=2)  # doctest: +SKIP
    [[{'label': 'mismatch', ...}, ...], [{'label': 'match', ...}, ...]]
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
    ) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """Classify one sample (`text=`, `image=`, `audio=` or a dict) or a list of them. Returns a list of
        `{"label", "score"}` for one sample, a list of such lists for a batch. Raises `ValueError` naming the
        argument for an unknown key, a sample with no modality, or keyword lists of different lengths."""
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
                    function_to_apply: str | None = None) -> list[list[dict[str, Any]]]:
        config = self.model.config
        if function_to_apply is None:
            function_to_apply = {"multi_label_classification": "sigmoid", "regression": "none"}.get(
                config.problem_type, "softmax")
        logits = model_outputs["logits"].float().numpy()
        if function_to_apply == "softmax":
            scores = np.exp(logits - logits.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
        elif function_to_apply == "sigmoid":
            scores = 1.0 / (1.0 + np.exp(-logits))
        else:
            scores = logits
        results = []
        for row in scores:
            ranked = [{"label": config.id2label[i], "score": float(row[i])} for i in np.argsort(-row, kind="stable")]
            results.append(ranked if top_k is None else ranked[:top_k])
        return results


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


__all__ = ["MMFusionClassificationPipeline", "PIPELINE_TASK"]
