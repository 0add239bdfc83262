"""MMFusionProcessor: the towers' own processors behind one call that turns any subset of text, images and audio
into the batch an mm-fusion model takes, with per-sample presence masks.

This file travels to the Hub with a model (with `media.py`, which it imports relatively), so it imports only
torch, numpy, PIL and transformers.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoTokenizer, BatchFeature
from transformers.dynamic_module_utils import custom_object_save
from transformers.processing_utils import ProcessorMixin
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.utils import PROCESSOR_NAME

from .media import AudioSource, ImageSource, MediaLimits, _is_gradio_audio, load_audio, load_image

# A tokenizer without a known maximum reports this placeholder (transformers' VERY_LARGE_INTEGER is 1e30)
_NO_MODEL_MAX_LENGTH = 1_000_000

# The chat template set on a decoder tokenizer that has none (BERT, GPT-2), and saved with it. A history renders as one
# "role: content" line per message, each assistant message closed by the end token as a target is, and the generation
# prompt is "assistant:" with no space after it, so that the target (tokenized on its own) starts right there:
#   [{"role": "user", "content": "what shape?"}, {"role": "assistant", "content": "a star"}, {"role": "user", ...}]
#   -> "user: what shape?\nassistant: a star<eos>\nuser: ...\nassistant:"
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] + ': ' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)
CHAT_ROLES = ("system", "user", "assistant")
# Where save_pretrained puts the decoder tokenizer: transformers' own place for a processor's additional tokenizer
DECODER_TOKENIZER_SUBFOLDER = "decoder_tokenizer"
# Label of a position that takes no loss (prompt, padding): the value transformers' losses ignore
IGNORE_INDEX = -100


class MMFusionProcessor(ProcessorMixin):
    r"""
    Prepares text, images and audio for an mm-fusion model with the towers' own tokenizer, image processor and
    feature extractor. Any of the three may be `None` when the model has no tower for that modality. For a
    generation model it also holds the decoder LM's tokenizer (`decoder_tokenizer`) and makes the decoder's prompts,
    targets and labels.

    Inputs are decoded safely by `processors.media` (limits checked before decoding, EXIF orientation applied,
    audio downmixed and resampled to the feature extractor's rate). Each modality takes one sample or a list, and
    a list may hold `None` for a sample that lacks that modality. The returned `BatchFeature` holds:

    - text (if any sample has text): `input_ids`, `attention_mask`, and `token_type_ids` if the tokenizer makes them;
      rows of samples without text are padding (`pad_token_id`, mask 0);
    - image (if any sample has one): `pixel_values`, zeros for samples without an image;
    - audio (if any sample has it): `input_values` and `audio_attention_mask` (int64, 1 = real sample; returned even
      when the feature extractor does not return a mask), zeros for samples without audio;
    - always `has_text`, `has_image`, `has_audio`: bool tensors of shape (batch,);
    - with `prompt` or `target` (needs a `decoder_tokenizer`): `decoder_input_ids`, `decoder_attention_mask` and,
      with `target`, `labels`, all int64 of shape (batch, decoder length).

    Every bad input raises `ValueError` naming the argument, the sample index and the limit.

    **Prompts and targets.** `prompt` holds one entry per sample: `None` or `""` (no prompt), a string (a caption
    prefix or a question, tokenized as it is) or a dialogue history, a list of `{"role": "system" | "user" |
    "assistant", "content": str}` messages rendered by the decoder tokenizer's chat template with
    `add_generation_prompt=True` (what follows is the assistant's reply); a history may not end with an assistant
    message. `target` holds one non-empty string per sample: the caption or answer. A single string, or a single
    history (a list of message dicts), is one sample. Each row of the decoder batch is

        [start] prompt tokens | target tokens [end] | padding
        labels: -100 ...  -100 | the same ids ...    | -100

    where start/end/pad are the decoder tokenizer's `bos_token`/`eos_token`/`pad_token`. The processor makes sure
    they exist: a tokenizer without bos/eos (BERT) gets its `cls_token`/`sep_token` as bos/eos, one without a pad
    token (GPT-2, Llama) gets its eos token as pad, and one without a chat template gets `DEFAULT_CHAT_TEMPLATE`
    (one "role: content" line per message, "assistant:" as the generation prompt); these are set on the processor's
    own copy of the tokenizer and saved with it. A template that writes the bos token itself (Llama 3) gets no second
    one. Prompt and target are tokenized apart (no special tokens) and joined with nothing in between, so the
    boundary is exact: with a tokenizer that marks word starts by a space (GPT-2), the target "red" is the tokens of
    "red", not of " red". `decoder_attention_mask` is 1 exactly on the start, prompt, target and end tokens, and
    `labels` are -100 exactly on the start, prompt and padding positions (never found by comparing with the pad id,
    which may be the eos id).

    Training rows are right-padded by default; without `target` (generation) only `[start] prompt tokens` are
    returned, left-padded by default so that every row's last real token sits in the last column, as batched
    `generate()` needs (`decoder_padding_side` overrides either default). `max_prompt_length` bounds `[start] prompt
    tokens`: a longer prompt loses its oldest tokens (truncated from the left, so the latest turns and the generation
    prompt survive; the start token stays). `max_target_length` bounds `target tokens [end]`: a longer target keeps its
    first `max_target_length` tokens and gets no end token, so the model is never taught to stop in the middle of an
    answer. Without these limits a row longer than the decoder tokenizer's `model_max_length` is a `ValueError`.
    `batch_decode` and `decode` then turn generated ids into text with the decoder tokenizer (special tokens skipped).

    Args:
        image_processor: the vision tower's image processor, or `None`.
        tokenizer: the text tower's tokenizer, or `None`.
        feature_extractor: the audio tower's feature extractor (a raw-waveform one such as wav2vec2's), or `None`.
        decoder_tokenizer: the decoder LM's tokenizer (may be the same as `tokenizer`), or `None` for a model that
            generates no text. Saved in the `decoder_tokenizer/` subfolder, transformers' place for a processor's
            additional tokenizer.
        max_length: tokens per text; `None` uses the tokenizer's `model_max_length`.
        max_audio_seconds: longest audio accepted, checked before decoding.
        max_image_pixels: largest image (width x height) accepted, checked before decoding.
        treat_empty_text_as_absent: count empty or whitespace-only text as a sample without text instead of
            refusing it.
        max_prompt_length: decoder prompt positions per row, start token included (see above); `None`: no limit.
        max_target_length: decoder target positions per row, end token included (see above); `None`: no limit.

    Example:

    ```python
    >>> import numpy as np
    >>> from PIL import Image
    >>> from processors import MMFusionProcessor

    >>> processor = MMFusionProcessor.from_towers(
    ...     vision="google/vit-base-patch16-224-in21k",
    ...     text="sentence-transformers/all-MiniLM-L6-v2",
    ...     audio="facebook/wav2vec2-base",
    ... )
    >>> batch = processor(
    ...     text=["a red circle", None],
    ...     images=[Image.new("RGB", (64, 48), "red"), None],
    ...     audio=[None, np.zeros(8000, dtype=np.int16)],
    ...     sampling_rate=8000,
    ... )
    >>> batch["pixel_values"].shape, batch["input_values"].shape, batch["has_audio"].tolist()
    (torch.Size([2, 3, 224, 224]), torch.Size([2, 16000]), [False, True])

    >>> # a generation model: captions and answers are targets, questions and dialogue histories prompts
    >>> processor = MMFusionProcessor.from_towers(
    ...     vision="google/vit-base-patch16-224-in21k", decoder="openai-community/gpt2"
    ... )
    >>> history = [
    ...     {"role": "user", "content": "What colour is it?"},
    ...     {"role": "assistant", "content": "Red."},
    ...     {"role": "user", "content": "And the shape?"},
    ... ]
    >>> images = [Image.new("RGB", (64, 48), "red")] * 3
    >>> prompts = [None, "Question: what colour? Answer:", history]
    >>> batch = processor(images=images, prompt=prompts, target=["A red square.", " red", "A square."])
    >>> labels = batch["labels"][2]
    >>> processor.decode(labels[labels != -100])  # the loss is taken on the target and its end token only
    'A square.'
    >>> processor.decoder_tokenizer.pad_token  # GPT-2 has no pad token: its eos pads
    '<|endoftext|>'
    >>> inputs = processor(images=images, prompt=prompts)  # for generate(): prompts only, left-padded
    >>> inputs["decoder_attention_mask"][:, -1].tolist()
    [1, 1, 1]
    ```
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        feature_extractor=None,
        decoder_tokenizer=None,
        max_length: int | None = None,
        max_audio_seconds: float = MediaLimits.max_audio_seconds,
        max_image_pixels: int = MediaLimits.max_image_pixels,
        treat_empty_text_as_absent: bool = False,
        max_prompt_length: int | None = None,
        max_target_length: int | None = None,
    ):
        if image_processor is None and tokenizer is None and feature_extractor is None:
            raise ValueError("MMFusionProcessor needs at least one of image_processor, tokenizer, feature_extractor")
        if feature_extractor is not None and "input_values" not in feature_extractor.model_input_names:
            raise ValueError(
                f"feature_extractor: {type(feature_extractor).__name__} returns {feature_extractor.model_input_names}; "
                "mm-fusion takes raw-waveform audio towers whose feature extractor returns input_values (wav2vec2, "
                "HuBERT, WavLM, data2vec-audio)"
            )
        if tokenizer is not None:
            if tokenizer.pad_token_id is None:
                raise ValueError(f"tokenizer: {type(tokenizer).__name__} has no pad token, so batches cannot be padded")
            if max_length is None and tokenizer.model_max_length > _NO_MODEL_MAX_LENGTH:
                raise ValueError(f"max_length: {type(tokenizer).__name__} sets no model_max_length; pass max_length")
        if decoder_tokenizer is not None:
            decoder_tokenizer = _prepare_decoder_tokenizer(decoder_tokenizer)
        _check_optional_length("max_prompt_length", max_prompt_length)
        _check_optional_length("max_target_length", max_target_length)
        self.max_length = max_length
        self.max_audio_seconds = max_audio_seconds
        self.max_image_pixels = max_image_pixels
        self.treat_empty_text_as_absent = treat_empty_text_as_absent
        self.max_prompt_length = max_prompt_length
        self.max_target_length = max_target_length
        super().__init__(image_processor, tokenizer, feature_extractor, decoder_tokenizer)

    def with_decoder_tokenizer(self, decoder_tokenizer: PreTrainedTokenizerBase) -> MMFusionProcessor:
        """This processor's tower processors and settings with `decoder_tokenizer` as the decoder LM's tokenizer: the
        processor of a generation model built on a trained encoder (`MMFusionForConditionalGeneration.from_encoder`)."""
        towers = {name: getattr(self, name) for name in ("image_processor", "tokenizer", "feature_extractor")}
        settings = {name: getattr(self, name) for name in (
            "max_length", "max_audio_seconds", "max_image_pixels", "treat_empty_text_as_absent", "max_prompt_length",
            "max_target_length")}
        return type(self)(**towers, decoder_tokenizer=decoder_tokenizer, **settings)

    @classmethod
    def from_towers(
        cls,
        vision: str | os.PathLike | None = None,
        text: str | os.PathLike | None = None,
        audio: str | os.PathLike | None = None,
        decoder: str | os.PathLike | None = None,
        image_backend: str | None = None,
        **kwargs: Any,
    ) -> MMFusionProcessor:
        """Build the processor from the towers' own processors: `vision` gives the image processor, `text` the
        tokenizer, `audio` the feature extractor and `decoder` the decoder LM's tokenizer (each a Hub id or a local
        folder, e.g. a full CLIP checkpoint for `vision`; `decoder` may be the same as `text`). `image_backend` is
        transformers' image-processing backend, "torchvision" or "pil"; the default (None) is transformers' choice,
        torchvision when it is installed, the faster of the two on CPU (benchmarks/processor_cpu.py); timm towers have
        only their own. `kwargs` go to `MMFusionProcessor`."""
        image_processor = AutoImageProcessor.from_pretrained(vision, backend=image_backend) if vision else None
        tokenizer = AutoTokenizer.from_pretrained(text) if text else None
        feature_extractor = AutoFeatureExtractor.from_pretrained(audio) if audio else None
        decoder_tokenizer = AutoTokenizer.from_pretrained(decoder) if decoder else None
        return cls(image_processor, tokenizer, feature_extractor, decoder_tokenizer, **kwargs)

    def __call__(
        self,
        text: str | list[str | None] | None = None,
        images: ImageSource | list[ImageSource | None] | None = None,
        audio: AudioSource | list[AudioSource | None] | None = None,
        sampling_rate: int | list[int | None] | None = None,
        padding: bool | str = True,
        truncation: bool = True,
        max_length: int | None = None,
        max_audio_seconds: float | None = None,
        treat_empty_text_as_absent: bool | None = None,
        return_tensors: str = "pt",
        *,
        prompt: str | list[dict[str, str]] | list[str | list[dict[str, str]] | None] | None = None,
        target: str | list[str] | None = None,
        decoder_padding_side: str | None = None,
        max_prompt_length: int | None = None,
        max_target_length: int | None = None,
    ) -> BatchFeature:
        """Process one sample (a str, an image, a clip) or a batch (lists, `None` for a sample lacking a modality).

        `sampling_rate` is the rate of bare audio arrays (one int, or one per sample); files and Gradio tuples carry
        their own. `padding` ("longest"/True or "max_length"), `truncation` and `max_length` apply to text; text is
        truncated to `max_length` (default: the processor's, else the tokenizer's `model_max_length`).
        `max_audio_seconds` and `treat_empty_text_as_absent` override the processor's settings for this call.
        `return_tensors` is "pt" or "np". Returns the `BatchFeature` described on the class.

        `prompt` and `target` (one entry per sample, see the class docstring for the layout) add the decoder's
        `decoder_input_ids` and `decoder_attention_mask`, and with `target` its `labels`; every sample still needs
        text, an image or audio to condition on. `decoder_padding_side` is "right" or "left" (default: "right" with
        `target`, "left" without, for `generate()`); `max_prompt_length` and `max_target_length` override the
        processor's settings for this call.
        """
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"return_tensors: expected 'pt' or 'np'; got {return_tensors!r}")
        if padding not in (True, "longest", "max_length"):
            raise ValueError(f"padding: expected True, 'longest' or 'max_length'; got {padding!r}")
        if max_audio_seconds is None:
            max_audio_seconds = self.max_audio_seconds
        if not isinstance(max_audio_seconds, (int, float)) or not max_audio_seconds > 0:
            raise ValueError(f"max_audio_seconds: expected a positive number of seconds; got {max_audio_seconds!r}")
        if treat_empty_text_as_absent is None:
            treat_empty_text_as_absent = self.treat_empty_text_as_absent
        decoding = prompt is not None or target is not None
        if decoding:
            self._check_decoder_call(prompt, target, modality_given=any(x is not None for x in (text, images, audio)))
            decoder_padding_side, max_prompt_length, max_target_length = self._decoder_settings(
                target, decoder_padding_side, max_prompt_length, max_target_length)
        texts, image_list, audio_list = _as_batch(text), _as_batch(images), _as_batch(audio, is_audio=True)
        batch_size = self._check_batch(texts, image_list, audio_list)
        texts = [_check_text(t, i, treat_empty_text_as_absent) for i, t in enumerate(texts or [None] * batch_size)]
        image_list, audio_list = image_list or [None] * batch_size, audio_list or [None] * batch_size
        has_text, has_image, has_audio = ([x is not None for x in xs] for xs in (texts, image_list, audio_list))
        for index, present in enumerate(zip(has_text, has_image, has_audio)):
            if not any(present):
                if decoding:
                    field = "target" if target is not None else "prompt"
                    raise ValueError(f"{field}[{index}]: sample {index} has no text, image or audio to condition on")
                raise ValueError(f"sample {index} has no text, image or audio")
        if decoding:  # checked before any media is decoded
            prompts = _check_prompts(prompt, batch_size)
            targets = None if target is None else _check_targets(target, batch_size)

        limits = MediaLimits(max_image_pixels=self.max_image_pixels, max_audio_seconds=max_audio_seconds)
        image_list = [
            None if image is None else load_image(image, limits, name=f"images[{i}]")
            for i, image in enumerate(image_list)
        ]
        waveforms = self._load_waveforms(audio_list, sampling_rate, limits)

        data: dict[str, torch.Tensor] = {}
        if any(has_text):
            data.update(self._encode_text(texts, padding, truncation, max_length))
        if any(has_image):
            pixel_values = self._encode_images([image for image in image_list if image is not None])
            data["pixel_values"] = _scatter(pixel_values, has_image, fill=0.0)
        if any(has_audio):
            data.update(self._encode_audio(waveforms, has_audio))
        data["has_text"] = torch.tensor(has_text, dtype=torch.bool)
        data["has_image"] = torch.tensor(has_image, dtype=torch.bool)
        data["has_audio"] = torch.tensor(has_audio, dtype=torch.bool)
        if decoding:
            data.update(
                self._encode_decoder(prompts, targets, decoder_padding_side, max_prompt_length, max_target_length)
            )
        if return_tensors == "np":
            data = {key: value.numpy() for key, value in data.items()}
        return BatchFeature(data)

    def decoder_inputs(
        self,
        prompt: list[str | list[dict[str, str]] | None],
        target: list[str] | None = None,
        decoder_padding_side: str | None = None,
        max_prompt_length: int | None = None,
        max_target_length: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Only the decoder's part of `__call__` (`decoder_input_ids`, `decoder_attention_mask`, and `labels` with
        `target`), for one prompt per sample: for batches whose towers' outputs come from elsewhere (mm-train's cache
        of frozen towers). The same checks and layout as `__call__`."""
        self._check_decoder_call(prompt, target, modality_given=True)
        decoder_padding_side, max_prompt_length, max_target_length = self._decoder_settings(
            target, decoder_padding_side, max_prompt_length, max_target_length)
        prompts = _check_prompts(prompt, len(prompt))
        targets = None if target is None else _check_targets(target, len(prompt))
        return self._encode_decoder(prompts, targets, decoder_padding_side, max_prompt_length, max_target_length)

    def _decoder_settings(self, target: Any, padding_side: str | None, max_prompt_length: int | None,
                          max_target_length: int | None) -> tuple[str, int | None, int | None]:
        """The decoder call's padding side (right for training, left for generation, unless given) and length limits
        (the processor's unless given), checked."""
        if padding_side is None:
            padding_side = "right" if target is not None else "left"
        if padding_side not in ("right", "left"):
            raise ValueError(f"decoder_padding_side: expected 'right' or 'left'; got {padding_side!r}")
        max_prompt_length = self.max_prompt_length if max_prompt_length is None else max_prompt_length
        max_target_length = self.max_target_length if max_target_length is None else max_target_length
        _check_optional_length("max_prompt_length", max_prompt_length)
        _check_optional_length("max_target_length", max_target_length)
        return padding_side, max_prompt_length, max_target_length

    def _check_decoder_call(self, prompt: Any, target: Any, modality_given: bool) -> None:
        if self.decoder_tokenizer is None:
            field = "prompt" if prompt is not None else "target"
            raise ValueError(
                f"{field}: this processor has no decoder_tokenizer (its model generates no text); "
                "build it with MMFusionProcessor.from_towers(..., decoder=...)"
            )
        if not modality_given:
            field = "target" if target is not None else "prompt"
            raise ValueError(
                f"{field}: no text, images or audio given; the decoder is conditioned on the fused inputs, "
                "so every sample needs at least one of them"
            )

    def _check_batch(self, texts: list | None, images: list | None, audio: list | None) -> int:
        given = {"text": texts, "images": images, "audio": audio}
        owners = {"text": "tokenizer", "images": "image_processor", "audio": "feature_extractor"}
        for argument, samples in given.items():
            if samples is not None and getattr(self, owners[argument]) is None and any(s is not None for s in samples):
                raise ValueError(
                    f"{argument}: this processor has no {owners[argument]} (its model has no tower for {argument})"
                )
        sizes = {argument: len(samples) for argument, samples in given.items() if samples is not None}
        if len(set(sizes.values())) > 1:
            described = ", ".join(f"{argument} has {size}" for argument, size in sizes.items())
            raise ValueError(f"batch sizes differ between modalities: {described} samples")
        if not sizes or not max(sizes.values()):
            raise ValueError("empty batch: pass text, images or audio with at least one sample")
        return max(sizes.values())

    def _load_waveforms(
        self, audio: list[AudioSource | None], sampling_rate: int | list[int | None] | None, limits: MediaLimits
    ) -> list[np.ndarray | None]:
        if isinstance(sampling_rate, (list, tuple)):
            if len(sampling_rate) != len(audio):
                raise ValueError(
                    f"sampling_rate: {len(sampling_rate)} rates for {len(audio)} audio samples; pass one per sample"
                )
            rates = list(sampling_rate)
        else:
            rates = [sampling_rate] * len(audio)
        target = self.feature_extractor.sampling_rate if self.feature_extractor is not None else None
        return [
            None if clip is None else load_audio(clip, target, rate, limits, name=f"audio[{i}]")
            for i, (clip, rate) in enumerate(zip(audio, rates))
        ]

    def _encode_text(
        self, texts: list[str | None], padding: bool | str, truncation: bool, max_length: int | None
    ) -> dict[str, torch.Tensor]:
        limit = next(n for n in (max_length, self.max_length, self.tokenizer.model_max_length) if n is not None)
        if not isinstance(limit, int) or limit < 1:
            raise ValueError(f"max_length: expected a positive int; got {limit!r}")
        present = [t is not None for t in texts]
        # without truncation or max_length padding the tokenizer ignores max_length (and warns about it)
        uses_limit = truncation or padding == "max_length"
        lists = self.tokenizer(
            [t for t in texts if t is not None],
            padding=padding,
            truncation=truncation,
            max_length=limit if uses_limit else None,
        )
        # the same int64 tensors as return_tensors="pt", which flattens the nested lists in Python at half the speed
        encoded = {key: torch.from_numpy(np.array(value, dtype=np.int64)) for key, value in lists.items()}
        if not truncation:
            rows = [i for i, has in enumerate(present) if has]
            for row, length in zip(rows, encoded["attention_mask"].sum(dim=1).tolist()):
                if length > limit:
                    raise ValueError(
                        f"text[{row}]: {length} tokens is longer than max_length={limit}; pass truncation=True"
                    )
        fills = {"input_ids": self.tokenizer.pad_token_id, "token_type_ids": self.tokenizer.pad_token_type_id}
        return {key: _scatter(value, present, fill=fills.get(key, 0)) for key, value in encoded.items()}

    def _encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        if getattr(self.image_processor, "backend", None) == "torchvision":
            # The torchvision backend turns a PIL image into a CHW tensor with a uint8 permute that takes 0.7 ms for
            # 640x480; PIL's band split gives the same tensor in a third of the time (same pixel_values, tested).
            planar = [torch.from_numpy(np.stack([np.asarray(band) for band in image.split()])) for image in images]
            return self.image_processor(planar, input_data_format="channels_first", return_tensors="pt")["pixel_values"]
        return self.image_processor(images, return_tensors="pt")["pixel_values"]

    def _encode_audio(self, waveforms: list[np.ndarray | None], present: list[bool]) -> dict[str, torch.Tensor]:
        extractor = self.feature_extractor
        # Always ask for the mask: it makes normalisation per sample (a sample's features do not depend on its batch)
        # and tells the model which frames are real; the model decides whether its tower may receive it.
        features = extractor(
            [w for w in waveforms if w is not None],
            sampling_rate=extractor.sampling_rate,
            padding=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return {
            "input_values": _scatter(features["input_values"], present, fill=extractor.padding_value),
            "audio_attention_mask": _scatter(features["attention_mask"].long(), present, fill=0),
        }

    def _encode_decoder(
        self,
        prompts: list[str | list[dict[str, str]] | None],
        targets: list[str] | None,
        padding_side: str,
        max_prompt_length: int | None,
        max_target_length: int | None,
    ) -> dict[str, torch.Tensor]:
        """The decoder rows of the layout on the class docstring, padded to the longest row on `padding_side`."""
        tokenizer = self.decoder_tokenizer
        start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
        target_ids = None
        if targets is not None:
            target_ids = tokenizer(targets, add_special_tokens=False, verbose=False)["input_ids"]
        limit = tokenizer.model_max_length
        rows, row_labels = [], []
        for index, prompt_ids in enumerate(self._tokenize_prompts(prompts)):
            if prompt_ids[:1] == [start]:  # a template that writes the bos token itself (Llama 3): one, not two
                prompt_ids = prompt_ids[1:]
            if max_prompt_length is not None:  # from the left: the latest turns and the generation prompt survive
                prompt_ids = prompt_ids[max(0, len(prompt_ids) - (max_prompt_length - 1)) :]
            row = [start, *prompt_ids]
            label_row = [IGNORE_INDEX] * len(row)
            if target_ids is not None:
                answer = target_ids[index]
                if not answer:
                    raise ValueError(f"target[{index}]: {targets[index]!r} has no tokens in the decoder tokenizer")
                if max_target_length is None or len(answer) < max_target_length:
                    answer = [*answer, end]
                else:  # cut, and no end token: the model must not learn to stop in the middle of an answer
                    answer = answer[:max_target_length]
                row += answer
                label_row += answer
            if len(row) > limit and limit <= _NO_MODEL_MAX_LENGTH:
                field = f"target[{index}]" if target_ids is not None else f"prompt[{index}]"
                raise ValueError(
                    f"{field}: the decoder row has {len(row)} tokens, more than the decoder tokenizer's "
                    f"model_max_length={limit}; set max_prompt_length and max_target_length (their sum at most "
                    f"{limit}) to truncate"
                )
            rows.append(row)
            row_labels.append(label_row)

        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for index, (row, row_label) in enumerate(zip(rows, row_labels)):
            columns = slice(0, len(row)) if padding_side == "right" else slice(width - len(row), width)
            input_ids[index, columns] = torch.tensor(row)
            attention_mask[index, columns] = 1
            labels[index, columns] = torch.tensor(row_label)
        data = {"decoder_input_ids": input_ids, "decoder_attention_mask": attention_mask}
        if targets is not None:
            data["labels"] = labels
        return data

    def _tokenize_prompts(self, prompts: list[str | list[dict[str, str]] | None]) -> list[list[int]]:
        """Prompt token ids without special tokens: strings as they are, histories through the chat template."""
        tokenizer = self.decoder_tokenizer
        ids: list[list[int]] = [[] for _ in prompts]
        plain = [index for index, prompt in enumerate(prompts) if isinstance(prompt, str)]
        if plain:
            encoded = tokenizer([prompts[i] for i in plain], add_special_tokens=False, verbose=False)["input_ids"]
            for index, row in zip(plain, encoded):
                ids[index] = row
        for index, prompt in enumerate(prompts):
            if isinstance(prompt, list):
                # the target (or the generated text) is the assistant's reply: the template's generation prompt
                # (e.g. "assistant:") ends the prompt, in training and in generation alike
                ids[index] = list(
                    tokenizer.apply_chat_template(
                        prompt, add_generation_prompt=True, tokenize=True, return_dict=False,
                        tokenizer_kwargs={"verbose": False},
                    )
                )
        return ids

    # ------------------------------------------------------------------------------------------ save and load

    def check_argument_for_proper_class(self, argument_name: str, argument: Any):
        if argument is None:  # the model has no tower for this modality
            return None
        return super().check_argument_for_proper_class(argument_name, argument)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        # ProcessorMixin reloads every sub-processor named in __init__; record which ones are absent
        output["absent_sub_processors"] = [name for name in self.get_attributes() if getattr(self, name) is None]
        # the image processor's own config does not say which backend (torchvision or PIL) it ran on
        backend = getattr(self.image_processor, "backend", None)
        if backend is not None:
            output["image_processor_backend"] = backend
        image_config = output.get("image_processor")
        if isinstance(image_config, dict) and "data_config" in image_config and "pretrained_cfg" not in image_config:
            # TimmWrapperImageProcessor saves its resolved data_config but is rebuilt from a pretrained_cfg (which
            # timm keeps in the tower's config.json); a data_config is a valid pretrained_cfg
            image_config["pretrained_cfg"] = image_config["data_config"]
        # said outright, because a processor saved before decoder tokenizers existed does not list one as absent
        if self.decoder_tokenizer is not None:
            output["decoder_tokenizer_subfolder"] = DECODER_TOKENIZER_SUBFOLDER
        return output

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> list[str]:
        """Save `processor_config.json` (image processor, feature extractor, the settings above, absent towers) and
        the tokenizer files, the decoder tokenizer's (with its chat template and special tokens) in the
        `decoder_tokenizer/` subfolder; after `register_for_auto_class("AutoProcessor")` also this file and
        `media.py`, with an `auto_map`, so that `AutoProcessor.from_pretrained(folder, trust_remote_code=True)` needs
        only transformers. ProcessorMixin's own save cannot skip an absent sub-processor."""
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", Path(save_directory).name)
            files = self.save_pretrained(save_directory)
            self.push_to_hub(repo_id, **kwargs)  # saves into a temporary folder and uploads it
            return files
        os.makedirs(save_directory, exist_ok=True)
        names = [name for name in self.get_attributes() if getattr(self, name) is not None]
        if self._auto_class is not None:
            # the decoder tokenizer's folder stays a plain tokenizer folder: the auto_map lives at the root
            root = [getattr(self, name) for name in names if name != "decoder_tokenizer"]
            configs = [sub.init_kwargs if isinstance(sub, PreTrainedTokenizerBase) else sub for sub in root]
            custom_object_save(self, save_directory, config=[*configs, self])
        for name in names:
            sub = getattr(self, name)
            if isinstance(sub, PreTrainedTokenizerBase):
                sub._set_processor_class(type(self).__name__)
                is_decoder = name == "decoder_tokenizer"
                sub.save_pretrained(os.path.join(save_directory, DECODER_TOKENIZER_SUBFOLDER if is_decoder else ""))
                sub.init_kwargs.pop("auto_map", None)  # custom_object_save put it there for tokenizer_config.json only
            elif sub._auto_class is not None:  # a tower whose own processor is remote code
                custom_object_save(sub, save_directory, config=sub)
        config_file = os.path.join(save_directory, PROCESSOR_NAME)
        self.to_json_file(config_file)
        return [config_file]

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        """ProcessorMixin loads every sub-processor named in __init__: skip the absent ones, keep the image backend,
        load the decoder tokenizer from its subfolder."""
        processor_dict = processor_dict or {}
        absent = set(processor_dict.get("absent_sub_processors", []))
        decoder_folder = processor_dict.get("decoder_tokenizer_subfolder")
        if decoder_folder is None:
            absent.add("decoder_tokenizer")
        loaders = {
            "image_processor": AutoImageProcessor,
            "tokenizer": AutoTokenizer,
            "feature_extractor": AutoFeatureExtractor,
        }
        arguments = []
        for name in cls.get_attributes():
            extra = {}
            if name == "image_processor" and "image_processor_backend" in processor_dict and "backend" not in kwargs:
                extra["backend"] = processor_dict["image_processor_backend"]
            if name == "decoder_tokenizer" and name not in absent:
                parent = kwargs.get("subfolder") or ""
                extra["subfolder"] = f"{parent}/{decoder_folder}" if parent else decoder_folder
            if name in absent:
                arguments.append(None)
            else:
                loader = AutoTokenizer if name == "decoder_tokenizer" else loaders[name]
                arguments.append(loader.from_pretrained(pretrained_model_name_or_path, **{**kwargs, **extra}))
        return arguments

    @property
    def model_input_names(self) -> list[str]:
        names = list(self.tokenizer.model_input_names) if self.tokenizer is not None else []
        if self.image_processor is not None:
            names.append("pixel_values")
        if self.feature_extractor is not None:
            names += ["input_values", "audio_attention_mask"]
        names += ["has_text", "has_image", "has_audio"]
        if self.decoder_tokenizer is not None:
            names += ["decoder_input_ids", "decoder_attention_mask"]
        return names

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        """Generated ids to text: the decoder tokenizer's `batch_decode`, special tokens skipped unless
        `skip_special_tokens=False`; without a decoder tokenizer the text tokenizer's, as it is."""
        if self.decoder_tokenizer is not None:
            return self.decoder_tokenizer.batch_decode(*args, **{"skip_special_tokens": True, **kwargs})
        if self.tokenizer is None:
            raise ValueError("batch_decode: this processor has no tokenizer")
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        """Generated ids to text: the decoder tokenizer's `decode`, special tokens skipped unless
        `skip_special_tokens=False`; without a decoder tokenizer the text tokenizer's, as it is."""
        if self.decoder_tokenizer is not None:
            return self.decoder_tokenizer.decode(*args, **{"skip_special_tokens": True, **kwargs})
        if self.tokenizer is None:
            raise ValueError("decode: this processor has no tokenizer")
        return self.tokenizer.decode(*args, **kwargs)


# Here, where the class is defined, and not in a package that imports it: a processor saved by code that imports only
# this module still writes `auto_map` and this file (with media.py), so it loads where only transformers is installed.
MMFusionProcessor.register_for_auto_class("AutoProcessor")


def _as_batch(value: Any, is_audio: bool = False) -> list | None:
    """A list or tuple is a batch, anything else one sample, and so is Gradio's (sampling_rate, array) audio tuple."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and not (is_audio and _is_gradio_audio(value)):
        return list(value)
    return [value]


def _check_unicode(value: str, field: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # Python strings may hold lone surrogates; tokenizers cannot encode them
        raise ValueError(
            f"{field}: lone surrogate {value[err.start]!r} at position {err.start}; text must be valid Unicode"
        ) from None


def _check_text(text: Any, index: int, treat_empty_as_absent: bool) -> str | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValueError(f"text[{index}]: expected a str or None; got {type(text).__name__}")
    _check_unicode(text, f"text[{index}]")
    if not text.strip():
        if treat_empty_as_absent:
            return None
        raise ValueError(
            f"text[{index}]: empty or whitespace-only text; pass None for a sample without text, "
            "or treat_empty_text_as_absent=True"
        )
    return text


def _scatter(rows: torch.Tensor, present: list[bool], fill: float) -> torch.Tensor:
    """Put the rows of the samples that have a modality at their places in the batch; fill the others."""
    if all(present):
        return rows
    full = rows.new_full((len(present), *rows.shape[1:]), fill)
    full[torch.tensor(present)] = rows
    return full


def _prepare_decoder_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The decoder tokenizer with the start (bos), end (eos) and pad tokens and the chat template the decoder layout
    needs: bos/eos fall back to cls/sep (BERT), pad to eos (GPT-2, Llama), the template to DEFAULT_CHAT_TEMPLATE.
    Changes go to a copy, so that the caller's tokenizer (maybe the text tower's own object) stays as it was."""
    name = type(tokenizer).__name__
    changes: dict[str, Any] = {}
    if tokenizer.bos_token is None:
        if tokenizer.cls_token is None:
            raise ValueError(f"decoder_tokenizer: {name} has neither a bos_token nor a cls_token to start a row")
        changes["bos_token"] = tokenizer.cls_token
    eos_token = tokenizer.eos_token
    if eos_token is None:
        if tokenizer.sep_token is None:
            raise ValueError(f"decoder_tokenizer: {name} has neither an eos_token nor a sep_token to end a target")
        eos_token = changes["eos_token"] = tokenizer.sep_token
    if tokenizer.pad_token is None:
        changes["pad_token"] = eos_token  # padding is found by the attention mask, never by this id
    if not tokenizer.chat_template:
        changes["chat_template"] = DEFAULT_CHAT_TEMPLATE
    if not changes:
        return tokenizer
    tokenizer = copy.deepcopy(tokenizer)
    for attribute, value in changes.items():
        setattr(tokenizer, attribute, value)
    return tokenizer


def _check_optional_length(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name}: expected a positive int or None; got {value!r}")


def _is_history(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(m, Mapping) for m in value)


def _check_prompts(prompt: Any, batch_size: int) -> list[str | list[dict[str, str]] | None]:
    """One prompt per sample: None (also for "" and []), a str, or a history as a list of plain message dicts. A
    single str or a single history is one sample; `None` is no prompt for any sample."""
    if prompt is None:
        return [None] * batch_size
    rows = [prompt] if isinstance(prompt, str) or _is_history(prompt) else prompt
    if not isinstance(rows, (list, tuple)):
        raise ValueError(f"prompt: expected a str, a list of messages or a list of them; got {type(prompt).__name__}")
    if len(rows) != batch_size:
        raise ValueError(f"prompt: {len(rows)} prompts for a batch of {batch_size} samples; pass one per sample")
    prompts: list[str | list[dict[str, str]] | None] = []
    for index, row in enumerate(rows):
        if row is None or (isinstance(row, (list, tuple)) and not row) or (isinstance(row, str) and not row.strip()):
            prompts.append(None)
        elif isinstance(row, str):
            _check_unicode(row, f"prompt[{index}]")
            prompts.append(row)
        elif isinstance(row, (list, tuple)):
            prompts.append([_check_message(message, f"prompt[{index}][{turn}]") for turn, message in enumerate(row)])
            if prompts[-1][-1]["role"] == "assistant":
                raise ValueError(
                    f"prompt[{index}][{len(row) - 1}]: a history may not end with an assistant message; what follows "
                    "the prompt (the target, or the generated text) is the assistant's reply"
                )
        else:
            raise ValueError(f"prompt[{index}]: expected a str, a list of messages or None; got {type(row).__name__}")
    return prompts


def _check_message(message: Any, field: str) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise ValueError(f"{field}: expected a message {{'role': ..., 'content': ...}}; got {type(message).__name__}")
    for key in ("role", "content"):
        if key not in message:
            raise ValueError(f"{field}: message without '{key}'; a message is {{'role': ..., 'content': ...}}")
    if message["role"] not in CHAT_ROLES:
        raise ValueError(f"{field}: unknown role {message['role']!r}; expected one of {', '.join(CHAT_ROLES)}")
    if not isinstance(message["content"], str):
        raise ValueError(f"{field}: content must be a str; got {type(message['content']).__name__}")
    _check_unicode(message["content"], field)
    return dict(message)


def _check_targets(target: Any, batch_size: int) -> list[str]:
    """One non-empty str per sample; a single str is one sample."""
    rows = [target] if isinstance(target, str) else target
    if not isinstance(rows, (list, tuple)):
        raise ValueError(f"target: expected a str or a list of str; got {type(target).__name__}")
    if len(rows) != batch_size:
        raise ValueError(f"target: {len(rows)} targets for a batch of {batch_size} samples; pass one per sample")
    for index, row in enumerate(rows):
        if not isinstance(row, str):
            raise ValueError(
                f"target[{index}]: expected a str; got {type(row).__name__} (every sample needs a target when target "
                "is given; call without target to generate)"
            )
        if not row.strip():
            raise ValueError(f"target[{index}]: empty or whitespace-only target; a target is the text to learn")
        _check_unicode(row, f"target[{index}]")
    return list(rows)
