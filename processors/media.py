"""Safe decoding of images and audio: files, bytes, PIL images, numpy arrays, torch tensors and Gradio tuples.

Every limit is checked before pixels or samples are decoded, from the file header where there is one, so a
decompression bomb or a two-hour recording is refused without being decoded. Every refusal is a `ValueError`
whose message starts with the argument and sample index (`name`, e.g. "audio[2]") and names the limit.

This file travels to the Hub next to `processing_mm.py`, so at module level it imports only numpy, PIL and torch;
soundfile and soxr are imported where audio files are decoded or resampled.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Union

import numpy as np
import PIL.Image
import torch
from PIL import ImageOps


@dataclass(frozen=True)
class MediaLimits:
    """What `load_image` and `load_audio` accept. Each field is checked before decoding where a header allows it."""

    max_image_pixels: int = 89_478_485
    """Width x height, read from the header: PIL's own DecompressionBombWarning threshold (PIL refuses above twice
    it). An image that size decodes to 270 MB of RGB."""
    min_image_side: int = 8
    """Smaller images (1x1 tracking pixels) carry no content; from 8 on, HWC and CHW arrays cannot be confused."""
    image_formats: tuple[str, ...] = ("BMP", "GIF", "JPEG", "PNG", "TIFF", "WEBP")
    """PIL format names tried when decoding files and bytes (JPEG includes MPO, the multi-picture JPEG of cameras)."""
    max_audio_seconds: float = 600.0
    """Duration, read from the header for files and from the shape for arrays."""
    min_audio_seconds: float = 0.025
    """wav2vec2's convolutions need 400 samples at 16 kHz (25 ms) to produce one frame."""
    audio_formats: tuple[str, ...] = ("FLAC", "MP3", "OGG", "WAV", "WAVEX")
    """libsndfile container names accepted for files and bytes."""
    min_sampling_rate: int = 1_000
    max_sampling_rate: int = 192_000
    max_audio_channels: int = 8
    """7.1 surround; a 2-D array with more "channels" is almost always a batch or a transposed clip."""


ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, PIL.Image.Image, np.ndarray, torch.Tensor, dict]
AudioSource = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, torch.Tensor, tuple, dict]

_BYTES = (bytes, bytearray, memoryview)
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


# ----------------------------------------------------------------------------------------------------- images


def load_image(source: ImageSource, limits: MediaLimits = MediaLimits(), name: str = "image") -> PIL.Image.Image:
    """Decode `source` into an RGB PIL image with its EXIF orientation applied.

    `source` is a file path, the bytes of a file, a PIL image, a numpy array or torch tensor (HWC or CHW; uint8,
    uint16, bool, or float in [0, 1]), or a `datasets` Image dict (`{"bytes": ..., "path": ...}`). Transparency is
    composited onto white, as transformers' `convert_to_rgb` does; 16-bit images keep their 8 most significant bits.

    Raises `ValueError` (message starting with `name`) for: a missing file, a URL, a file that is not an image in
    `limits.image_formats`, a truncated or corrupt file, an animated or multi-frame image, more pixels than
    `limits.max_image_pixels` (checked from the header, before decoding), a side shorter than
    `limits.min_image_side`, an array of the wrong shape, dtype or range, and non-finite pixel values.
    """
    if isinstance(source, dict):
        source = _source_from_dataset_dict(source, name)
    if isinstance(source, PIL.Image.Image):
        _check_image_header(source, limits, name)
        _load_pixels(source, name)
        return _to_rgb(_apply_exif_orientation(source), name)
    if isinstance(source, (np.ndarray, torch.Tensor)):
        image = _image_from_array(_to_numpy(source), name)
        _check_image_header(image, limits, name)
        return image
    if isinstance(source, (str, os.PathLike)):
        return _decode_image_file(_existing_file(source, name), limits, name)
    if isinstance(source, _BYTES):
        return _decode_image_file(io.BytesIO(bytes(source)), limits, name)
    raise ValueError(
        f"{name}: expected a file path, bytes, a PIL image, a numpy array or a torch tensor; "
        f"got {type(source).__name__}"
    )


def _decode_image_file(file: str | io.BytesIO, limits: MediaLimits, name: str) -> PIL.Image.Image:
    formats = ", ".join(limits.image_formats)
    try:
        image = PIL.Image.open(file, formats=list(limits.image_formats))  # reads the header only
    except PIL.Image.DecompressionBombError as err:
        # PIL refuses above 2 x PIL.Image.MAX_IMAGE_PIXELS on its own, before our check can run
        raise ValueError(
            f"{name}: refused before decoding, more pixels than max_image_pixels={limits.max_image_pixels} ({err})"
        ) from None
    except PIL.UnidentifiedImageError:
        raise ValueError(f"{name}: not an image in an allowed format ({formats})") from None
    except Exception as err:  # PIL's header parsers raise OSError, SyntaxError, struct.error, ... for malformed files
        raise ValueError(f"{name}: could not read the image header ({type(err).__name__}: {err})") from None
    with image:
        _check_image_header(image, limits, name)
        _load_pixels(image, name)
        return _to_rgb(_apply_exif_orientation(image), name)


def _load_pixels(image: PIL.Image.Image, name: str) -> None:
    try:
        image.load()
    except Exception as err:  # as for the header: decoders raise many types for truncated or corrupt data
        raise ValueError(
            f"{name}: the {image.format} image is truncated or corrupt ({type(err).__name__}: {err})"
        ) from None


def _check_image_header(image: PIL.Image.Image, limits: MediaLimits, name: str) -> None:
    """Checks what the header says (size, frame count) so that nothing is decoded for a refused image."""
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise ValueError(
            f"{name}: {width}x{height} = {width * height} pixels is more than "
            f"max_image_pixels={limits.max_image_pixels}"
        )
    if min(width, height) < limits.min_image_side:
        raise ValueError(f"{name}: {width}x{height} has a side shorter than min_image_side={limits.min_image_side}")
    try:
        frames = getattr(image, "n_frames", 1)  # GIF and APNG count their frames by seeking through the file
    except Exception as err:  # as when decoding: a corrupt file raises many types
        raise ValueError(f"{name}: could not read the {image.format} frames ({type(err).__name__}: {err})") from None
    # MPO is a JPEG with extra pictures (depth maps, previews) after the main one, not an animation
    if frames > 1 and image.format != "MPO":
        raise ValueError(f"{name}: animated or multi-frame {image.format} with {frames} frames; pass a single frame")


def _apply_exif_orientation(image: PIL.Image.Image) -> PIL.Image.Image:
    try:
        orientation = image.getexif().get(0x0112, 1)  # 0x0112: Orientation
    except Exception:  # broken EXIF is common in camera files whose pixels are fine: keep them as stored
        return image
    # exif_transpose copies even when there is nothing to do, so look at the tag first
    return ImageOps.exif_transpose(image) if orientation != 1 else image


def _to_rgb(image: PIL.Image.Image, name: str) -> PIL.Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        # PIL's convert() clips 16-bit values at 255 instead of scaling them; mode I holds 16-bit PNG/TIFF greyscale
        return _image_from_array(np.asarray(image).clip(0, 65535).astype(np.uint16), name)
    if image.mode == "F":
        return _image_from_array(np.asarray(image), name)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # 1, L, P, CMYK, YCbCr, LAB, HSV


def _image_from_array(array: np.ndarray, name: str) -> PIL.Image.Image:
    """HW, HWC or CHW with 1, 3 or 4 channels -> RGB. HWC wins when both read; min_image_side rules out the overlap."""
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ValueError(
            f"{name}: an image array must be (height, width), (height, width, 1|3|4) or (1|3|4, height, width); "
            f"got shape {tuple(array.shape)}"
        )
    if 0 in array.shape:
        raise ValueError(f"{name}: the image array is empty (shape {tuple(array.shape)})")
    array = np.ascontiguousarray(_to_uint8(array, name))
    if array.ndim == 2:
        return PIL.Image.fromarray(array, mode="L").convert("RGB")
    if array.shape[-1] == 4:
        return _to_rgb(PIL.Image.fromarray(array, mode="RGBA"), name)
    return PIL.Image.fromarray(array, mode="RGB")


def _to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return (array >> 8).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"{name}: the image array holds NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(f"{name}: float pixel values must lie in [0, 1]; got [{low:g}, {high:g}]")
        return np.rint(array * 255.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ValueError(f"{name}: {array.dtype} pixel values must lie in [0, 255]; got [{low}, {high}]")
        return array.astype(np.uint8)
    raise ValueError(f"{name}: unsupported image dtype {array.dtype}")


# ----------------------------------------------------------------------------------------------------- audio


def load_audio(
    source: AudioSource,
    target_sampling_rate: int,
    sampling_rate: int | None = None,
    limits: MediaLimits = MediaLimits(),
    name: str = "audio",
) -> np.ndarray:
    """Decode `source` into a mono float32 waveform at `target_sampling_rate`.

    `source` is a file path or the bytes of a file (`limits.audio_formats`), a 1-D or (samples, channels) numpy
    array or torch tensor recorded at `sampling_rate`, Gradio's `(sampling_rate, array)` tuple, or a `datasets`
    Audio dict (`{"array", "sampling_rate"}` or `{"bytes", "path"}`). Integer samples are scaled to [-1, 1]
    (int16 / 32768, ...); channels are averaged; the rate is converted with soxr (the steps and output length of
    `librosa.load` and transformers' `load_audio`). Files and tuples carry their own rate; `sampling_rate` is used
    only for bare arrays, where it is required.

    Raises `ValueError` (message starting with `name`) for: a missing sampling rate or one outside
    [`limits.min_sampling_rate`, `limits.max_sampling_rate`], a file that is not audio in `limits.audio_formats`,
    a truncated file, more than `limits.max_audio_seconds` (checked from the header or shape, before decoding),
    fewer than `limits.min_audio_seconds` (empty audio included), more than `limits.max_audio_channels`,
    an unsupported dtype or shape, and NaN or infinite samples.
    """
    if isinstance(source, dict):
        source, sampling_rate = _audio_from_dataset_dict(source, sampling_rate, name)
    if _is_gradio_audio(source):
        sampling_rate, source = source
    if isinstance(source, (str, os.PathLike)):
        waveform, sampling_rate = _decode_audio_file(_existing_file(source, name), limits, name)
    elif isinstance(source, _BYTES):
        waveform, sampling_rate = _decode_audio_file(io.BytesIO(bytes(source)), limits, name)
    elif isinstance(source, (np.ndarray, torch.Tensor)):
        if sampling_rate is None:
            raise ValueError(
                f"{name}: a raw array needs sampling_rate (the rate it was recorded at); "
                f"the model expects {target_sampling_rate} Hz"
            )
        sampling_rate = _check_sampling_rate(sampling_rate, limits, name)
        waveform = _waveform_from_array(_to_numpy(source), sampling_rate, limits, name)
    else:
        raise ValueError(
            f"{name}: expected a file path, bytes, a numpy array, a torch tensor or a (sampling_rate, array) tuple; "
            f"got {type(source).__name__}"
        )
    if not np.isfinite(waveform).all():
        raise ValueError(f"{name}: the audio holds NaN or infinite samples")
    return resample_audio(waveform, int(sampling_rate), target_sampling_rate)


def resample_audio(waveform: np.ndarray, sampling_rate: int, target_sampling_rate: int) -> np.ndarray:
    """Resample a mono float32 waveform with soxr's high-quality filter; the length is ceil(n * target / rate),
    padded with zeros where soxr returns fewer samples, as in `librosa.load`."""
    if sampling_rate == target_sampling_rate:
        return waveform
    try:
        import soxr
    except ImportError:
        raise ImportError("resampling audio needs the `soxr` package: pip install soxr") from None
    length = math.ceil(len(waveform) * target_sampling_rate / sampling_rate)
    resampled = soxr.resample(waveform, sampling_rate, target_sampling_rate, quality="soxr_hq")
    if len(resampled) != length:
        resampled = np.pad(resampled, (0, max(0, length - len(resampled))))[:length]
    return np.ascontiguousarray(resampled, dtype=np.float32)


def _decode_audio_file(file: str | io.BytesIO, limits: MediaLimits, name: str) -> tuple[np.ndarray, int]:
    try:
        import soundfile
    except ImportError:
        raise ImportError("decoding audio files needs the `soundfile` package: pip install soundfile") from None
    formats = ", ".join(limits.audio_formats)
    try:
        sound = soundfile.SoundFile(file)  # reads the header only
    except Exception as err:  # libsndfile reports malformed files as RuntimeError, odd inputs as TypeError/ValueError
        raise ValueError(f"{name}: not a readable audio file ({formats}): {err}") from None
    with sound:
        if sound.format not in limits.audio_formats:
            raise ValueError(f"{name}: {sound.format} audio is not an allowed format ({formats})")
        if sound.channels > limits.max_audio_channels:
            raise ValueError(
                f"{name}: {sound.channels} channels is more than max_audio_channels={limits.max_audio_channels}"
            )
        sampling_rate = _check_sampling_rate(sound.samplerate, limits, name)
        _check_duration(sound.frames, sampling_rate, limits, name)
        waveform = np.empty(sound.frames, dtype=np.float32)
        decoded = 0
        try:
            # one block at a time, so memory stays at the mono output whatever the channel count
            for block in sound.blocks(blocksize=max(1, 2**20 // sound.channels), dtype="float32", always_2d=True):
                waveform[decoded : decoded + len(block)] = _mean_of_channels(block)
                decoded += len(block)
        except Exception as err:  # a header that promises more data than the file holds fails mid-read
            raise ValueError(f"{name}: the {sound.format} file is truncated or corrupt: {err}") from None
    # MP3 frame counts are estimates from the Xing header, so allow 1% short; a bigger gap is a cut file
    if decoded < 0.99 * sound.frames:
        raise ValueError(
            f"{name}: truncated {sound.format} file: its header promises {sound.frames} frames, {decoded} decode"
        )
    return waveform[:decoded], sampling_rate


def _waveform_from_array(array: np.ndarray, sampling_rate: int, limits: MediaLimits, name: str) -> np.ndarray:
    if array.ndim == 2 and array.shape[1] > limits.max_audio_channels:
        looks_transposed = array.shape[0] <= limits.max_audio_channels
        hint = " (it looks like (channels, samples): pass its transpose)" if looks_transposed else ""
        raise ValueError(
            f"{name}: a 2-D audio array must be (samples, channels) with at most max_audio_channels="
            f"{limits.max_audio_channels} channels; got shape {tuple(array.shape)}{hint}; pass a batch as a list"
        )
    if array.ndim not in (1, 2):
        raise ValueError(f"{name}: audio must be 1-D or (samples, channels); got shape {tuple(array.shape)}")
    _check_duration(array.shape[0], sampling_rate, limits, name)
    if array.dtype in _INT_SCALE:
        offset, scale = _INT_SCALE[array.dtype]
        array = (array.astype(np.float32) - offset) * np.float32(1.0 / scale)
    elif np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32, copy=False)
    else:
        raise ValueError(f"{name}: unsupported audio dtype {array.dtype}; use float, int8/16/32 or uint8 samples")
    return np.ascontiguousarray(_mean_of_channels(array) if array.ndim == 2 else array)


def _mean_of_channels(samples: np.ndarray) -> np.ndarray:
    """(frames, channels) -> (frames,), equal to `samples.mean(axis=1)` (the same float32 sums, left to right, and
    division) but ~20x faster: numpy reduces a short last axis one frame at a time, 4 ms for 5 s of stereo."""
    if samples.shape[1] == 1:
        return samples[:, 0]
    total = samples[:, 0] + samples[:, 1]
    for channel in range(2, samples.shape[1]):
        total += samples[:, channel]
    return total / np.float32(samples.shape[1])


# integer PCM -> [-1, 1]: (x - offset) / scale; 8-bit PCM is unsigned around 128
_INT_SCALE = {
    np.dtype(np.int8): (0.0, 2.0**7),
    np.dtype(np.uint8): (128.0, 2.0**7),
    np.dtype(np.int16): (0.0, 2.0**15),
    np.dtype(np.int32): (0.0, 2.0**31),
}


def _check_duration(frames: int, sampling_rate: int, limits: MediaLimits, name: str) -> None:
    seconds = frames / sampling_rate
    if seconds > limits.max_audio_seconds:
        raise ValueError(f"{name}: {seconds:.1f} s is longer than max_audio_seconds={limits.max_audio_seconds:g}")
    if frames == 0:
        raise ValueError(f"{name}: the audio is empty (0 samples)")
    if seconds < limits.min_audio_seconds:
        raise ValueError(
            f"{name}: {frames} samples at {sampling_rate} Hz ({seconds * 1000:.1f} ms) is shorter than "
            f"min_audio_seconds={limits.min_audio_seconds:g}"
        )


def _check_sampling_rate(sampling_rate: Any, limits: MediaLimits, name: str) -> int:
    if isinstance(sampling_rate, Real) and not isinstance(sampling_rate, bool) and float(sampling_rate).is_integer():
        if limits.min_sampling_rate <= sampling_rate <= limits.max_sampling_rate:
            return int(sampling_rate)
        raise ValueError(
            f"{name}: sampling_rate={sampling_rate} Hz is outside "
            f"[min_sampling_rate={limits.min_sampling_rate}, max_sampling_rate={limits.max_sampling_rate}]"
        )
    raise ValueError(f"{name}: sampling_rate must be a whole number of Hz; got {sampling_rate!r}")


def _is_gradio_audio(source: Any) -> bool:
    """Gradio's Audio component gives `(sampling_rate, array)`."""
    return (
        isinstance(source, tuple)
        and len(source) == 2
        and isinstance(source[0], Integral)
        and isinstance(source[1], (np.ndarray, torch.Tensor))
    )


def _audio_from_dataset_dict(source: dict, sampling_rate: int | None, name: str) -> tuple[Any, int | None]:
    if "array" in source:
        if "sampling_rate" not in source:
            raise ValueError(f"{name}: an audio dict with 'array' needs 'sampling_rate'")
        return np.asarray(source["array"]), source["sampling_rate"]
    return _source_from_dataset_dict(source, name), sampling_rate


# ----------------------------------------------------------------------------------------------------- shared


def _to_numpy(value: np.ndarray | torch.Tensor) -> np.ndarray:
    """A numpy array in native byte order (16-bit PNGs and some WAV readers give big-endian arrays)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return (value.float() if value.dtype in (torch.bfloat16, torch.float16) else value).numpy()
    if not value.dtype.isnative:
        return value.astype(value.dtype.newbyteorder("="))
    return value


def _existing_file(path: str | os.PathLike, name: str) -> str:
    path = os.fspath(path)
    if path.startswith(("http://", "https://")):
        raise ValueError(f"{name}: URLs are not fetched; download the file and pass its path or bytes")
    if not os.path.isfile(path):
        raise ValueError(f"{name}: no such file: {path!r}")
    return path


def _source_from_dataset_dict(source: dict, name: str) -> Any:
    """`datasets` Image/Audio features with decode=False give {"bytes": ..., "path": ...}."""
    if source.get("bytes") is not None:
        return source["bytes"]
    if source.get("path") is not None:
        return source["path"]
    raise ValueError(f"{name}: a dict must hold 'bytes' or 'path' (or, for audio, 'array' and 'sampling_rate')")
