"""MMFusionProcessor: the towers' own processors behind one call that turns any subset of text, images and audio
into the batch an mm-fusion model takes, with per-sample presence masks.

This file travels to the Hub with a model (with `media.py`, which it imports relatively), so it imports only
torch, numpy, PIL and transformers.
"""

from __future__ import annotations

import os
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


class MMFusionProcessor(ProcessorMixin):
    r"""
    Prepares text, images and audio for an mm-fusion model with the towers' own tokenizer, image processor and
    feature extractor. Any of the three may be `None` when the model has no tower for that modality.

    Inputs are decoded safely by `processors.media` (limits checked before decoding, EXIF orientation applied,
    audio downmixed and resampled to the feature extractor's rate). Each modality takes one sample or a list, and
    a list may hold `None` for a sample that lacks that modality. The returned `BatchFeature` holds:

    - text (if any sample has text): `input_ids`, `attention_mask`, and `token_type_ids` if the tokenizer makes them;
      rows of samples without text are padding (`pad_token_id`, mask 0);
    - image (if any sample has one): `pixel_values`, zeros for samples without an image;
    - audio (if any sample has it): `input_values` and `audio_attention_mask` (int64, 1 = real sample; returned even
      when the feature extractor does not return a mask), zeros for samples without audio;
    - always `has_text`, `has_image`, `has_audio`: bool tensors of shape (batch,).

    Every bad input raises `ValueError` naming the argument, the sample index and the limit.

    Args:
        image_processor: the vision tower's image processor, or `None`.
        tokenizer: the text tower's tokenizer, or `None`.
        feature_extractor: the audio tower's feature extractor (a raw-waveform one such as wav2vec2's), or `None`.
        max_length: tokens per text; `None` uses the tokenizer's `model_max_length`.
        max_audio_seconds: longest audio accepted, checked before decoding.
        max_image_pixels: largest image (width x height) accepted, checked before decoding.
        treat_empty_text_as_absent: count empty or whitespace-only text as a sample without text instead of
            refusing it.

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
    ```
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        feature_extractor=None,
        max_length: int | None = None,
        max_audio_seconds: float = MediaLimits.max_audio_seconds,
        max_image_pixels: int = MediaLimits.max_image_pixels,
        treat_empty_text_as_absent: bool = False,
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
        self.max_length = max_length
        self.max_audio_seconds = max_audio_seconds
        self.max_image_pixels = max_image_pixels
        self.treat_empty_text_as_absent = treat_empty_text_as_absent
        super().__init__(image_processor, tokenizer, feature_extractor)

    @classmethod
    def from_towers(
        cls,
        vision: str | os.PathLike | None = None,
        text: str | os.PathLike | None = None,
        audio: str | os.PathLike | None = None,
        image_backend: str | None = None,
        **kwargs: Any,
    ) -> MMFusionProcessor:
        """Build the processor from the towers' own processors: `vision` gives the image processor, `text` the
        tokenizer and `audio` the feature extractor (each a Hub id or a local folder, e.g. a full CLIP checkpoint
        for `vision`). `image_backend` is transformers' image-processing backend, "torchvision" or "pil"; the
        default (None) is transformers' choice, torchvision when it is installed, the faster of the two on CPU
        (benchmarks/processor_cpu.py); timm towers have only their own. `kwargs` go to `MMFusionProcessor`."""
        image_processor = AutoImageProcessor.from_pretrained(vision, backend=image_backend) if vision else None
        tokenizer = AutoTokenizer.from_pretrained(text) if text else None
        feature_extractor = AutoFeatureExtractor.from_pretrained(audio) if audio else None
        return cls(image_processor, tokenizer, feature_extractor, **kwargs)

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
    ) -> BatchFeature:
        """Process one sample (a str, an image, a clip) or a batch (lists, `None` for a sample lacking a modality).

        `sampling_rate` is the rate of bare audio arrays (one int, or one per sample); files and Gradio tuples carry
        their own. `padding` ("longest"/True or "max_length"), `truncation` and `max_length` apply to text; text is
        truncated to `max_length` (default: the processor's, else the tokenizer's `model_max_length`).
        `max_audio_seconds` and `treat_empty_text_as_absent` override the processor's settings for this call.
        `return_tensors` is "pt" or "np". Returns the `BatchFeature` described on the class.
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
        texts, image_list, audio_list = _as_batch(text), _as_batch(images), _as_batch(audio, is_audio=True)
        batch_size = self._check_batch(texts, image_list, audio_list)
        texts = [_check_text(t, i, treat_empty_text_as_absent) for i, t in enumerate(texts or [None] * batch_size)]
        image_list, audio_list = image_list or [None] * batch_size, audio_list or [None] * batch_size
        has_text, has_image, has_audio = ([x is not None for x in xs] for xs in (texts, image_list, audio_list))
        for index, present in enumerate(zip(has_text, has_image, has_audio)):
            if not any(present):
                raise ValueError(f"sample {index} has no text, image or audio")

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
        if return_tensors == "np":
            data = {key: value.numpy() for key, value in data.items()}
        return BatchFeature(data)

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
        return output

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> list[str]:
        """Save `processor_config.json` (image processor, feature extractor, the settings above, absent towers) and
        the tokenizer files; after `register_for_auto_class("AutoProcessor")` also this file and `media.py`, with an
        `auto_map`, so that `AutoProcessor.from_pretrained(folder, trust_remote_code=True)` needs only transformers.
        ProcessorMixin's own save cannot skip an absent sub-processor."""
        if push_to_hub:
            repo_id = kwargs.pop("repo_id", Path(save_directory).name)
            files = self.save_pretrained(save_directory)
            self.push_to_hub(repo_id, **kwargs)  # saves into a temporary folder and uploads it
            return files
        os.makedirs(save_directory, exist_ok=True)
        present = [getattr(self, name) for name in self.get_attributes() if getattr(self, name) is not None]
        if self._auto_class is not None:
            configs = [sub.init_kwargs if isinstance(sub, PreTrainedTokenizerBase) else sub for sub in present]
            custom_object_save(self, save_directory, config=[*configs, self])
        for sub in present:
            if isinstance(sub, PreTrainedTokenizerBase):
                sub._set_processor_class(type(self).__name__)
                sub.save_pretrained(save_directory)
                sub.init_kwargs.pop("auto_map", None)  # custom_object_save put it there for tokenizer_config.json only
            elif sub._auto_class is not None:  # a tower whose own processor is remote code
                custom_object_save(sub, save_directory, config=sub)
        config_file = os.path.join(save_directory, PROCESSOR_NAME)
        self.to_json_file(config_file)
        return [config_file]

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        """ProcessorMixin loads every sub-processor named in __init__: skip the absent ones, keep the image backend."""
        processor_dict = processor_dict or {}
        absent = set(processor_dict.get("absent_sub_processors", []))
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
            if name in absent:
                arguments.append(None)
            else:
                arguments.append(loaders[name].from_pretrained(pretrained_model_name_or_path, **kwargs, **extra))
        return arguments

    @property
    def model_input_names(self) -> list[str]:
        names = list(self.tokenizer.model_input_names) if self.tokenizer is not None else []
        if self.image_processor is not None:
            names.append("pixel_values")
        if self.feature_extractor is not None:
            names += ["input_values", "audio_attention_mask"]
        return names + ["has_text", "has_image", "has_audio"]

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        """The tokenizer's `batch_decode`."""
        if self.tokenizer is None:
            raise ValueError("batch_decode: this processor has no tokenizer")
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        """The tokenizer's `decode`."""
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


def _check_text(text: Any, index: int, treat_empty_as_absent: bool) -> str | None:
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValueError(f"text[{index}]: expected a str or None; got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # Python strings may hold lone surrogates; tokenizers cannot encode them
        raise ValueError(
            f"text[{index}]: lone surrogate {text[err.start]!r} at position {err.start}; text must be valid Unicode"
        ) from None
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
