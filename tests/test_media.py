"""processors.media: what each kind of source decodes to. What it refuses is tested through the processor, in the
bad-input table of test_processing_mm.py."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers.audio_utils import load_audio as transformers_load_audio

from processors import MediaLimits, load_audio, load_image, resample_audio


def _random_rgb(height: int = 20, width: int = 30, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------- images


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP", "GIF"])
def test_lossless_image_files_decode_to_their_pixels(tmp_path, fmt):
    pixels = _random_rgb()
    image = Image.fromarray(pixels)
    if fmt == "GIF":  # 256 colours: compare with PIL's own palette reduction
        image = image.quantize(colors=256)
        pixels = np.asarray(image.convert("RGB"))
    options = {"lossless": True} if fmt == "WEBP" else {}
    data = _encode(image, fmt, **options)
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(data)

    for source in (data, bytearray(data), str(path), path, {"bytes": None, "path": str(path)}):
        decoded = load_image(source)
        assert decoded.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(decoded), pixels)


def test_jpeg_decodes_like_pil():
    data = _encode(Image.fromarray(_random_rgb()), "JPEG", quality=90)
    np.testing.assert_array_equal(np.asarray(load_image(data)), np.asarray(Image.open(io.BytesIO(data))))


def test_exif_orientation_is_applied():
    pixels = _random_rgb(20, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = _encode(Image.fromarray(pixels), "PNG", exif=exif.tobytes())
    decoded = np.asarray(load_image(data))
    assert decoded.shape == (40, 20, 3)
    np.testing.assert_array_equal(decoded, np.rot90(pixels, k=-1))


def test_transparency_is_composited_on_white_like_transformers():
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:8, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    decoded = np.asarray(load_image(Image.fromarray(rgba, mode="RGBA")))
    np.testing.assert_array_equal(decoded[0, 0], [200, 0, 0])
    np.testing.assert_array_equal(decoded[15, 15], [255, 255, 255])
    # the same from an RGBA array and from a palette PNG with a transparent index
    np.testing.assert_array_equal(np.asarray(load_image(rgba)), decoded)
    palette = Image.fromarray(rgba[..., :3]).quantize(colors=2)
    palette.info["transparency"] = palette.getpixel((15, 15))
    np.testing.assert_array_equal(np.asarray(load_image(_encode(palette, "PNG")))[15, 15], [255, 255, 255])


def test_greyscale_cmyk_and_sixteen_bit_images_become_rgb():
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(np.asarray(load_image(Image.fromarray(grey))), np.repeat(grey[..., None], 3, axis=2))

    cmyk = Image.new("CMYK", (16, 16), (0, 255, 0, 0))  # no magenta ink... i.e. full magenta: red + blue
    np.testing.assert_array_equal(np.asarray(load_image(_encode(cmyk, "JPEG")))[8, 8], [255, 0, 255])

    # 16-bit greyscale PNG: PIL's convert("RGB") would clip everything above 255 to white; we keep the high byte
    sixteen = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257)
    decoded = np.asarray(load_image(_encode(Image.fromarray(sixteen), "PNG")))
    np.testing.assert_array_equal(decoded[..., 0], (sixteen >> 8).astype(np.uint8))


@pytest.mark.parametrize(
    "array",
    [
        pytest.param(lambda rgb: rgb, id="hwc-uint8"),
        pytest.param(lambda rgb: np.moveaxis(rgb, -1, 0), id="chw-uint8"),
        pytest.param(lambda rgb: torch.from_numpy(np.moveaxis(rgb, -1, 0).copy()) / 255.0, id="chw-float-tensor"),
        pytest.param(lambda rgb: rgb.astype(np.float64) / 255.0, id="hwc-float64"),
        pytest.param(lambda rgb: rgb.astype(np.uint16) * 257, id="hwc-uint16"),
        pytest.param(lambda rgb: rgb.astype(np.int64), id="hwc-int64"),
        pytest.param(lambda rgb: rgb.astype(np.int32), id="hwc-int32"),  # 8-bit values, not 16-bit PIL mode I
    ],
)
def test_arrays_and_tensors_give_the_same_rgb_pixels(array):
    rgb = _random_rgb()
    np.testing.assert_array_equal(np.asarray(load_image(array(rgb))), rgb)


# ----------------------------------------------------------------------------------------------------- audio


def _tone(sampling_rate: int, seconds: float, channels: int = 1) -> np.ndarray:
    t = np.arange(round(sampling_rate * seconds)) / sampling_rate
    mono = 0.4 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 1000 * t)
    if channels == 1:
        return mono.astype(np.float32)
    return np.stack([mono * (1 - 0.3 * c) for c in range(channels)], axis=1).astype(np.float32)


@pytest.mark.parametrize(
    "fmt, subtype, rate, channels",
    [
        ("WAV", "PCM_16", 16_000, 1),
        ("WAV", "PCM_24", 44_100, 2),
        ("WAV", "FLOAT", 48_000, 1),
        ("FLAC", "PCM_16", 22_050, 2),
        ("OGG", "VORBIS", 44_100, 2),
        ("MP3", "MPEG_LAYER_III", 44_100, 2),  # libsndfile >= 1.1 reads MP3; the wheel bundles 1.2
    ],
)
def test_audio_files_decode_like_transformers_load_audio(tmp_path, fmt, subtype, rate, channels):
    """Same steps as transformers' `load_audio(backend="soundfile")` (and librosa.load): mean of channels, soxr HQ,
    ceil(n * 16000 / rate) samples. So the output is bit-identical, from a path and from bytes."""
    path = tmp_path / f"tone.{fmt.lower()}"
    sf.write(path, _tone(rate, 0.7, channels), rate, format=fmt, subtype=subtype)
    expected = transformers_load_audio(str(path), sampling_rate=16_000, backend="soundfile")

    for source in (str(path), path.read_bytes(), {"path": str(path), "bytes": None}):
        waveform = load_audio(source, target_sampling_rate=16_000)
        assert waveform.dtype == np.float32 and waveform.ndim == 1
        np.testing.assert_array_equal(waveform, expected)


def test_integer_samples_are_scaled_to_unit_range():
    as_float = lambda array: load_audio(array, 16_000, sampling_rate=16_000)  # noqa: E731
    tail = np.zeros(1000)  # long enough for min_audio_seconds
    np.testing.assert_array_equal(as_float(np.r_[[-32768, 16384, 0], tail].astype(np.int16))[:3], [-1.0, 0.5, 0.0])
    np.testing.assert_array_equal(as_float(np.r_[[-(2**31), 2**30], tail].astype(np.int32))[:2], [-1.0, 0.5])
    np.testing.assert_array_equal(as_float(np.r_[[0, 128, 192], tail + 128].astype(np.uint8))[:3], [-1.0, 0.0, 0.5])
    np.testing.assert_array_equal(as_float(np.r_[[-128, 64], tail].astype(np.int8))[:2], [-1.0, 0.5])


def test_stereo_is_averaged_and_gradio_tuples_and_dicts_carry_their_rate():
    stereo = (_tone(16_000, 0.5, channels=2) * 32767).astype(np.int16)
    expected = stereo.astype(np.float32).mean(axis=1) / 32768
    np.testing.assert_allclose(load_audio(stereo, 16_000, sampling_rate=16_000), expected, rtol=0, atol=1e-7)
    # Gradio's (sampling_rate, int16 array) and datasets' {"array", "sampling_rate"} ignore the sampling_rate argument
    np.testing.assert_array_equal(load_audio((16_000, stereo), 16_000), load_audio(stereo, 16_000, 16_000))
    as_dict = {"array": expected, "sampling_rate": 16_000}
    np.testing.assert_array_equal(load_audio(as_dict, 16_000, sampling_rate=8_000), expected)
    from_tensor = load_audio(torch.from_numpy(stereo), 16_000, 16_000)
    np.testing.assert_array_equal(from_tensor, load_audio(stereo, 16_000, 16_000))


def test_a_raw_array_without_sampling_rate_is_refused_not_guessed():
    with pytest.raises(ValueError, match=r"audio\[3\]: a raw array needs sampling_rate .* 16000 Hz"):
        load_audio(np.zeros(16_000, np.float32), 16_000, name="audio[3]")


@pytest.mark.parametrize("rate", [8_000, 22_050, 44_100, 48_000])
def test_resampling_keeps_librosa_length_and_the_tone(rate):
    """soxr HQ moves a 440 Hz tone to 16 kHz; away from the 0.05 s edges the error is the filter's passband ripple."""
    waveform = resample_audio(_tone(rate, 1.3), rate, 16_000)
    assert len(waveform) == int(np.ceil(round(rate * 1.3) * 16_000 / rate))
    expected = _tone(16_000, 1.3)[: len(waveform)]
    np.testing.assert_allclose(waveform[800:-800], expected[800:-800], rtol=0, atol=1e-3)


def test_limits_are_settings():
    two_seconds = np.zeros(32_000, np.float32)
    with pytest.raises(ValueError, match=r"audio: 2.0 s is longer than max_audio_seconds=1"):
        load_audio(two_seconds, 16_000, 16_000, limits=MediaLimits(max_audio_seconds=1))
    tiny = np.zeros((2, 2, 3), np.uint8)
    assert load_image(tiny, limits=MediaLimits(min_image_side=1)).size == (2, 2)
    jpeg = _encode(Image.fromarray(_random_rgb()), "JPEG")
    with pytest.raises(ValueError, match=r"image: not an image in an allowed format \(PNG\)"):
        load_image(jpeg, limits=MediaLimits(image_formats=("PNG",)))


def test_camera_multi_picture_jpeg_is_not_refused_as_animated():
    main, preview = Image.fromarray(_random_rgb()), Image.fromarray(_random_rgb(seed=1))
    data = _encode(main, "MPO", save_all=True, append_images=[preview])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    np.testing.assert_array_equal(np.asarray(load_image(data)), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


# ----------------------------------------------------------------------------------------------------- corrupt files


def _valid_files() -> dict[str, bytes]:
    exif = Image.Exif()
    exif[0x0112] = 6
    image = Image.fromarray(_random_rgb(24, 32))
    files = {f"image/{fmt}": _encode(image, fmt, **options) for fmt, options in [
        ("PNG", {"exif": exif.tobytes()}), ("JPEG", {"exif": exif.tobytes()}), ("BMP", {}), ("TIFF", {}), ("WEBP", {}),
    ]}
    files["image/GIF"] = _encode(image.quantize(16), "GIF")
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "green", "blue")]
    files["image/APNG"] = _encode(frames[0], "PNG", save_all=True, append_images=frames[1:])
    for fmt, subtype in [("WAV", "PCM_16"), ("WAV", "FLOAT"), ("FLAC", "PCM_16"), ("OGG", "VORBIS"),
                         ("MP3", "MPEG_LAYER_III")]:
        buffer = io.BytesIO()
        sf.write(buffer, _tone(16_000, 0.5, channels=2), 16_000, format=fmt, subtype=subtype)
        files[f"audio/{fmt}-{subtype}"] = buffer.getvalue()
    return files


VALID_FILES = _valid_files()


@settings(max_examples=300, deadline=None, derandomize=True)
@given(kind=st.sampled_from(sorted(VALID_FILES)), operation=st.sampled_from(["truncate", "overwrite", "insert"]),
       where=st.floats(0, 1), junk=st.binary(min_size=1, max_size=16))
def test_a_corrupted_file_decodes_or_raises_value_error_never_anything_else(kind, operation, where, junk):
    """Cut, overwritten or padded files of every format: PIL and libsndfile raise many exception types on such input;
    load_image and load_audio turn every one of them into a ValueError, or decode what is there."""
    data = bytearray(VALID_FILES[kind])
    at = int(where * (len(data) - 1))
    if operation == "truncate":
        data = data[:at]
    elif operation == "overwrite":
        data[at : at + len(junk)] = junk
    else:
        data[at:at] = junk
    try:
        if kind.startswith("image"):
            image = load_image(bytes(data))
            assert image.mode == "RGB" and min(image.size) >= 8
        else:
            waveform = load_audio(bytes(data), 16_000)
            assert waveform.dtype == np.float32 and waveform.ndim == 1 and np.isfinite(waveform).all()
    except ValueError:
        pass
