"""MMFusionProcessor: acceptance 1-7 of the Processor issue (round trip, equivalence with the towers' own processors,
the real MiniLM tokenizer, mixed batches, resampling, bad inputs, property-based shapes); the decoder's prompts, targets
and labels of issue #17 part 2."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoProcessor, AutoTokenizer
from transformers.audio_utils import load_audio as transformers_load_audio
from transformers.dynamic_module_utils import get_imports

from conftest import PROJECT_PACKAGES, WITHOUT_PROJECT, tiny_fusion_config
from modeling_mm import MMFusionForSequenceClassification
from processors import MMFusionProcessor
from processors.processing_mm import DEFAULT_CHAT_TEMPLATE

HUB_FILES = ("processing_mm.py", "media.py")
TEXT_KEYS = ("input_ids", "token_type_ids", "attention_mask")


@pytest.fixture(scope="module")
def processor(vit_dir, bert_dir, wav2vec2_dir) -> MMFusionProcessor:
    return MMFusionProcessor.from_towers(vision=vit_dir, text=bert_dir, audio=wav2vec2_dir)


def _rgb(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _noise(samples: int, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(samples)).astype(np.float32)


def _assert_same(actual: dict, expected: dict, keys) -> None:
    for key in keys:
        assert torch.equal(torch.as_tensor(actual[key]), torch.as_tensor(expected[key])), key


# ---- 1. round trip -----------------------------------------------------------------------------------------------

def _round_trip_inputs(with_text: bool) -> dict:
    return dict(
        text=["a red circle with a high tone and a blue star and a low beep", None] if with_text else None,
        images=[_rgb(48, 40, 0), None],
        audio=[_noise(24_000, 1), np.cos(np.arange(30_000) / 5.0)],
        sampling_rate=22_050,
    )


@pytest.mark.parametrize(
    "towers",
    [
        pytest.param(dict(vision="vit_dir", text="bert_dir", audio="wav2vec2_dir"), id="vit-bert-wav2vec2"),
        pytest.param(dict(vision="timm_dir", audio="wav2vec2_group_norm_dir"), id="timm-wav2vec2base-no-text"),
    ],
)
def test_round_trip_in_process_and_where_only_transformers_is_installed(tmp_path, request, towers):
    towers = {modality: request.getfixturevalue(fixture) for modality, fixture in towers.items()}
    original = MMFusionProcessor.from_towers(**towers, max_length=12, max_audio_seconds=2.5)
    inputs = _round_trip_inputs(with_text="text" in towers)
    expected = original(**inputs)
    saved = tmp_path / "saved"
    original.save_pretrained(saved)
    assert {path.name for path in saved.glob("*.py")} == set(HUB_FILES)

    # with the package imported: the registered class
    reloaded = AutoProcessor.from_pretrained(saved)
    assert type(reloaded) is MMFusionProcessor
    _assert_same(reloaded(**inputs), expected, expected.keys())
    # construction kwargs survived (max_length=12, max_audio_seconds=2.5) and call kwargs override them
    if "text" in towers:
        assert expected["input_ids"].shape[1] == 12
        assert reloaded(**inputs, max_length=6)["input_ids"].shape[1] == 6
    three_seconds = np.zeros(66_150, np.float32)
    with pytest.raises(ValueError, match=r"audio\[0\]: 3.0 s is longer than max_audio_seconds=2.5"):
        reloaded(audio=three_seconds, sampling_rate=22_050)
    assert reloaded(audio=three_seconds, sampling_rate=22_050, max_audio_seconds=4)["input_values"].shape == (1, 48_000)

    # in a fresh interpreter where the project's packages cannot be imported: the code saved in the folder
    with open(tmp_path / "case.pkl", "wb") as file:
        pickle.dump((inputs, dict(expected)), file)
    script = WITHOUT_PROJECT + textwrap.dedent(f"""
        import pickle, sys

        import torch
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained({str(saved)!r}, trust_remote_code=True)
        assert type(processor).__module__.startswith("transformers_modules."), type(processor).__module__
        with open({str(tmp_path / "case.pkl")!r}, "rb") as file:
            inputs, expected = pickle.load(file)
        actual = processor(**inputs)
        assert sorted(actual.keys()) == sorted(expected.keys()), (actual.keys(), expected.keys())
        for key in expected:
            assert torch.equal(actual[key], expected[key]), key
        loaded = [name for name in sys.modules if name.split(".")[0] in {PROJECT_PACKAGES!r}]
        assert not loaded, loaded
        print("identical")
    """)
    result = _run_fresh(script, tmp_path)
    assert result.returncode == 0 and "identical" in result.stdout, result.stderr[-3000:]


def _run_fresh(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run `script` in a fresh interpreter (nothing imported yet, stdin closed) in `tmp_path`, offline."""
    environment = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    environment.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, env=environment,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)


def test_a_processor_saved_with_only_processors_imported_carries_its_code(tmp_path, vit_dir, bert_dir):
    """Importing `processors` alone registers MMFusionProcessor for `auto_map`; `modeling_mm` need not be imported."""
    saved = tmp_path / "saved"
    save = textwrap.dedent(f"""
        from processors import MMFusionProcessor
        MMFusionProcessor.from_towers(vision={vit_dir!r}, text={bert_dir!r}).save_pretrained({str(saved)!r})
    """)
    result = _run_fresh(save, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {path.name for path in saved.glob("*.py")} == set(HUB_FILES)
    processor_config = json.loads((saved / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_mm.MMFusionProcessor"}

    load = WITHOUT_PROJECT + textwrap.dedent(f"""
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained({str(saved)!r}, trust_remote_code=True)
        print(type(processor).__module__, type(processor).__name__)
    """)
    result = _run_fresh(load, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    module, name = result.stdout.split()[-2:]
    assert name == "MMFusionProcessor" and module.startswith("transformers_modules."), result.stdout


def test_processor_from_a_model_folder_with_only_processors_imported_does_not_prompt(tmp_path, vit_dir, bert_dir):
    """The folder's config.json has model_type mm_fusion and an auto_map: importing `processors` registers the
    config, so its sub-loaders neither ask whether to run the folder's code nor read it as a model of type ``."""
    model_dir = tmp_path / "model"
    MMFusionForSequenceClassification(tiny_fusion_config(("vision", "text"))).save_pretrained(model_dir)
    MMFusionProcessor.from_towers(vision=vit_dir, text=bert_dir).save_pretrained(model_dir)
    load = textwrap.dedent(f"""
        from processors import MMFusionProcessor
        processor = MMFusionProcessor.from_pretrained({str(model_dir)!r})
        print("loaded", type(processor).__module__)
    """)
    result = _run_fresh(load, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "loaded processors.processing_mm" in result.stdout, output[-3000:]
    assert "Do you wish to run the custom code" not in output, output[-3000:]
    assert "model of type ``" not in output, output[-3000:]


def test_hub_files_import_only_torch_numpy_pil_and_transformers():
    """transformers' check_imports skips imports inside try blocks, where media.py imports soundfile and soxr."""
    folder = Path(sys.modules[MMFusionProcessor.__module__].__file__).parent
    for name in HUB_FILES:
        third_party = set(get_imports(folder / name)) - set(sys.stdlib_module_names)
        assert third_party <= {"torch", "numpy", "PIL", "transformers"}, (name, third_party)


def test_a_processor_without_some_towers_saves_and_loads(tmp_path, bert_dir):
    original = MMFusionProcessor.from_towers(text=bert_dir)
    original.save_pretrained(tmp_path)
    reloaded = MMFusionProcessor.from_pretrained(tmp_path)
    assert reloaded.image_processor is None and reloaded.feature_extractor is None
    _assert_same(reloaded(text="a red star"), original(text="a red star"), TEXT_KEYS)
    assert reloaded.decode(original(text="a red star")["input_ids"][0], skip_special_tokens=True) == "a red star"


def test_the_image_backend_survives_the_round_trip(tmp_path, vit_dir):
    original = MMFusionProcessor.from_towers(vision=vit_dir, image_backend="pil")
    original.save_pretrained(tmp_path)
    assert MMFusionProcessor.from_pretrained(tmp_path).image_processor.backend == "pil"


# ---- 2. equivalence with the towers' own processors ------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
@pytest.mark.parametrize("fixture", ["vit_dir", "clip_vision_dir", "clip_dir", "timm_dir"])
def test_pixel_values_equal_the_towers_image_processor(tmp_path, request, fixture, backend):
    folder = request.getfixturevalue(fixture)
    ours = MMFusionProcessor.from_towers(vision=folder, image_backend=backend)
    theirs = AutoImageProcessor.from_pretrained(folder, backend=backend)
    jpeg = tmp_path / "photo.jpg"
    Image.fromarray(_rgb(60, 80, 1)).save(jpeg, quality=90)
    images = [Image.fromarray(_rgb(48, 64, 0)), str(jpeg), _rgb(40, 30, 2)]
    expected = theirs([Image.fromarray(_rgb(48, 64, 0)), Image.open(jpeg), Image.fromarray(_rgb(40, 30, 2))],
                      return_tensors="pt")
    assert torch.equal(ours(images=images)["pixel_values"], expected["pixel_values"])


def test_text_tensors_equal_the_tokenizer(processor, bert_dir):
    texts = ["the red circle", "a blue square with a high tone and a low beep", "star"]
    expected = AutoTokenizer.from_pretrained(bert_dir)(texts, padding=True, truncation=True, return_tensors="pt")
    _assert_same(processor(text=texts), expected, TEXT_KEYS)


@pytest.mark.parametrize("fixture", ["wav2vec2_dir", "wav2vec2_group_norm_dir"])
def test_audio_features_equal_the_feature_extractor(tmp_path, request, fixture):
    folder = request.getfixturevalue(fixture)
    ours = MMFusionProcessor.from_towers(audio=folder)
    theirs = AutoFeatureExtractor.from_pretrained(folder)
    clips = [_noise(16_000, 0), _noise(9_000, 1)]
    # a batch: the extractor asked for its attention mask, which makes its normalisation per sample
    expected = theirs(clips, sampling_rate=16_000, padding=True, return_attention_mask=True, return_tensors="pt")
    batch = ours(audio=clips, sampling_rate=16_000)
    assert torch.equal(batch["input_values"], expected["input_values"])
    assert torch.equal(batch["audio_attention_mask"], expected["attention_mask"].long())
    # one sample: the extractor exactly as the tower's users call it (group norm: no mask)
    alone = theirs(clips[1], sampling_rate=16_000, return_tensors="pt")
    assert torch.equal(ours(audio=clips[1], sampling_rate=16_000)["input_values"], alone["input_values"])
    # a 44.1 kHz stereo file: as transformers' own load_audio decodes and resamples it
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([_noise(44_100, 2), _noise(44_100, 3)], axis=1), 44_100, subtype="PCM_16")
    expected = theirs(transformers_load_audio(str(path), 16_000, backend="soundfile"), sampling_rate=16_000,
                      return_tensors="pt")
    assert torch.equal(ours(audio=str(path))["input_values"], expected["input_values"])


# ---- 3. the real all-MiniLM-L6-v2 tokenizer --------------------------------------------------------------------


def test_minilm_tokenizer_tensors_equal_autotokenizer(minilm_dir):
    texts = ["A man is playing a guitar.", "Ünïcödé, emoji 🎸 and CJK 你好 survive", "short"]
    ours = MMFusionProcessor.from_towers(text=minilm_dir)
    expected = AutoTokenizer.from_pretrained(minilm_dir)(texts, padding=True, truncation=True, return_tensors="pt")
    _assert_same(ours(text=texts), expected, TEXT_KEYS)


def test_a_million_character_string_is_truncated_not_rejected(minilm_dir):
    ours = MMFusionProcessor.from_towers(text=minilm_dir)
    start = time.perf_counter()
    batch = ours(text=["word " * 200_000, "short"])
    # a guard against quadratic work on huge inputs (~0.5 s idle), not a speed goal: generous for a busy machine
    assert time.perf_counter() - start < 10.0
    assert batch["input_ids"].shape == (2, 512) and batch["attention_mask"][0].all()


# ---- 4. mixed batches: has_* masks, and each sample's tensors equal its tensors alone ----------------------------


@pytest.mark.parametrize("audio_fixture", ["wav2vec2_dir", "wav2vec2_group_norm_dir"])
def test_mixed_batch_masks_and_per_sample_tensors(request, vit_dir, bert_dir, audio_fixture):
    processor = MMFusionProcessor.from_towers(vision=vit_dir, text=bert_dir,
                                              audio=request.getfixturevalue(audio_fixture))
    text = ["the red circle", None, "a high tone with a blue star", None]
    images = [_rgb(40, 50, 0), _rgb(64, 32, 1), None, None]
    audio = [None, _noise(12_000, 0), (44_100, (_noise(30_000, 1) * 30_000).astype(np.int16)), _noise(8_000, 2)]
    batch = processor(text=text, images=images, audio=audio, sampling_rate=16_000)

    assert batch["has_text"].tolist() == [True, False, True, False]
    assert batch["has_image"].tolist() == [True, True, False, False]
    assert batch["has_audio"].tolist() == [False, True, True, True]
    assert all(batch[f"has_{m}"].dtype == torch.bool for m in ("text", "image", "audio"))
    for index in range(4):
        alone = processor(text=text[index], images=images[index], audio=audio[index], sampling_rate=16_000)
        if text[index] is None:
            assert "input_ids" not in alone
            assert (batch["input_ids"][index] == processor.tokenizer.pad_token_id).all()
            assert not batch["attention_mask"][index].any()
        else:
            length = alone["input_ids"].shape[1]
            for key in TEXT_KEYS:
                assert torch.equal(batch[key][index, :length], alone[key][0]), key
            assert not batch["attention_mask"][index, length:].any()
        if images[index] is None:
            assert not batch["pixel_values"][index].any()
        else:
            assert torch.equal(batch["pixel_values"][index], alone["pixel_values"][0])
        if audio[index] is None:
            assert not batch["input_values"][index].any() and not batch["audio_attention_mask"][index].any()
        else:
            length = alone["input_values"].shape[1]
            assert torch.equal(batch["input_values"][index, :length], alone["input_values"][0])
            padding = batch["input_values"].shape[1] - length
            assert batch["audio_attention_mask"][index].tolist() == [1] * length + [0] * padding
            assert not batch["input_values"][index, length:].any()


def test_model_accepts_a_mixed_batch_and_each_sample_equals_its_output_alone(vit_dir, bert_dir, wav2vec2_dir):
    from conftest import FUSION_KWARGS
    from modeling_mm import MMFusionForSequenceClassification

    processor = MMFusionProcessor.from_towers(vision=vit_dir, text=bert_dir, audio=wav2vec2_dir)
    model = MMFusionForSequenceClassification.from_towers(vision=vit_dir, text=bert_dir, audio=wav2vec2_dir,
                                                          **FUSION_KWARGS).eval()
    text = ["the red circle", None, "a high tone with a blue star", None, "beep"]
    images = [_rgb(40, 50, 0), _rgb(64, 32, 1), None, None, _rgb(33, 33, 2)]
    audio = [None, _noise(12_000, 0), (44_100, (_noise(30_000, 1) * 30_000).astype(np.int16)), _noise(8_000, 2),
             _noise(16_000, 3)]
    batch = processor(text=text, images=images, audio=audio, sampling_rate=16_000)
    with torch.no_grad():
        mixed = model(**batch)
        assert torch.isfinite(mixed.logits).all()
        for index in range(5):
            alone = processor(text=text[index], images=images[index], audio=audio[index], sampling_rate=16_000)
            logits = model(**alone).logits[0]
            assert (mixed.logits[index] - logits).abs().max().item() <= 1e-5, index


def test_keys_appear_only_for_modalities_some_sample_has(processor):
    batch = processor(text=["a tone", "a star"], images=[None, None])
    assert list(batch.keys()) == [*TEXT_KEYS, "has_text", "has_image", "has_audio"]
    assert batch["has_image"].tolist() == [False, False]
    as_numpy = processor(images=_rgb(32, 32, 0), return_tensors="np")
    assert isinstance(as_numpy["pixel_values"], np.ndarray) and as_numpy["has_image"].dtype == np.bool_


def test_empty_text_counts_as_absent_only_when_asked(processor):
    batch = processor(text=["a star", "  "], images=[None, _rgb(32, 32, 0)], treat_empty_text_as_absent=True)
    assert batch["has_text"].tolist() == [True, False]
    with pytest.raises(ValueError, match=r"text\[1\]: empty or whitespace-only"):
        processor(text=["a star", "  "], images=[None, _rgb(32, 32, 0)])


# ---- 5. resampling --------------------------------------------------------------------------------------------


def _band_limited_tone(sampling_rate: int, seconds: float) -> np.ndarray:
    """220 + 1234.5 + 3000 Hz (all below 8 kHz, so a 16 kHz sampling of it is exact), with 50 ms fades so that
    the clip's edges do not ring in the resampling filter."""
    t = np.arange(round(sampling_rate * seconds)) / sampling_rate
    fade = np.clip(np.minimum(t, seconds - t) / 0.05, 0, 1) ** 2
    return fade * (0.3 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * 1234.5 * t + 1)
                   + 0.1 * np.sin(2 * np.pi * 3000 * t))


def test_44k_stereo_int16_matches_16k_mono_float_within_resampling_error(processor):
    """Tolerance, in the feature extractor's units (zero mean, unit variance, so 1.0 = the signal's RMS of ~0.27):
    int16 rounding is at most 0.5 / 32768 = 1.5e-5 of full scale, i.e. ~6e-5 after normalisation; soxr's HQ filter
    adds passband ripple and stopband leakage of the same order. Observed: max 1e-4, RMS 1.4e-5. Asserted:
    max 5e-4, RMS 5e-5 (a wrong rate, channel layout or int scale gives errors of order 1)."""
    seconds = 1.0
    mono_16k = _band_limited_tone(16_000, seconds).astype(np.float32)
    tone_44k = _band_limited_tone(44_100, seconds)
    side = 0.05 * np.sin(2 * np.pi * 500 * np.arange(len(tone_44k)) / 44_100)  # cancels in the mono mix
    stereo_int16 = np.round(np.stack([tone_44k + side, tone_44k - side], axis=1) * 32767).astype(np.int16)

    reference = processor(audio=mono_16k, sampling_rate=16_000)["input_values"][0]
    resampled = processor(audio=stereo_int16, sampling_rate=44_100)["input_values"][0]
    assert resampled.shape == reference.shape == (16_000,)
    error = (resampled - reference).abs()
    assert error.max() < 5e-4 and error.pow(2).mean().sqrt() < 5e-5, (error.max(), error.pow(2).mean().sqrt())


# ---- 6. bad inputs ---------------------------------------------------------------------------------------------


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header announces width x height RGB pixels and whose data is empty: no pixels are allocated."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _wav_header(frames: int, sampling_rate: int = 16_000) -> bytes:
    """A 16-bit mono WAV header announcing `frames` samples."""
    data_bytes = 2 * frames
    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sampling_rate, 2 * sampling_rate, 2, 16)
            + b"data" + struct.pack("<I", data_bytes))


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("bad_media")
    files = {}

    def write(name: str, data: bytes) -> None:
        (folder / name).write_bytes(data)
        files[name] = str(folder / name)

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1), "red").save(buffer, "PNG")
    write("one_pixel.png", buffer.getvalue())
    frames = [Image.new("RGB", (16, 16), colour) for colour in ("red", "green", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100)
    write("animated.gif", buffer.getvalue())
    write("notes.png", b"these are my notes, not a picture\n")
    buffer = io.BytesIO()
    Image.fromarray(_rgb(64, 64, 0)).save(buffer, "PNG")
    write("truncated.png", buffer.getvalue()[: len(buffer.getvalue()) // 2])
    write("bomb.png", _png_header(20_000, 20_000))  # PIL's own bomb limit fires first
    write("large.png", _png_header(12_000, 12_000))  # under PIL's limit, over ours
    buffer = io.BytesIO()
    Image.fromarray(_rgb(16, 16, 0)).save(buffer, "PPM")
    write("image.ppm", buffer.getvalue())

    write("empty.wav", b"")
    write("lying.wav", _wav_header(16_000 * 3600))  # claims an hour, holds no sample
    buffer = io.BytesIO()
    sf.write(buffer, _noise(16_000, 0), 16_000, format="FLAC")
    flac = bytearray(buffer.getvalue())
    flac[21] &= 0xF0  # STREAMINFO's 36-bit sample count: claim 10 s for the 1 s stream
    flac[22:26] = struct.pack(">I", 160_000)
    write("lying.flac", bytes(flac))
    with open(folder / "two_hours.wav", "wb") as file:  # a sparse file: 2 hours of silence, no disk used
        file.write(_wav_header(16_000 * 7200))
        file.seek(2 * 16_000 * 7200 - 1, os.SEEK_CUR)
        file.write(b"\0")
    files["two_hours.wav"] = str(folder / "two_hours.wav")
    write("notes.wav", b"RIFF? no, just text\n" * 10)
    buffer = io.BytesIO()
    sf.write(buffer, _noise(16_000, 0), 16_000, format="AIFF")
    write("tone.aiff", buffer.getvalue())
    buffer = io.BytesIO()
    sf.write(buffer, _noise(48_000, 0), 16_000, format="WAV")
    write("three_seconds.wav", buffer.getvalue())
    return files


@pytest.fixture(scope="module")
def processors(processor, vit_dir, bert_dir, wav2vec2_dir) -> dict[str, MMFusionProcessor]:
    return {
        "full": processor,
        "no_text": MMFusionProcessor.from_towers(vision=vit_dir, audio=wav2vec2_dir),
        "text_only": MMFusionProcessor.from_towers(text=bert_dir),
    }


IMAGE = _rgb(32, 32, 0)
CLIP = _noise(16_000, 0)
BAD_INPUTS = [
    # text
    ("text-empty", "full", lambda f: dict(text=""), ["text[0]", "empty"]),
    ("text-whitespace", "full", lambda f: dict(text=["a star", " \n\t"]), ["text[1]", "whitespace"]),
    ("text-lone-surrogate", "full", lambda f: dict(text=["ok", "bad \ud800 text"]),
     ["text[1]", "surrogate", "position 4"]),
    ("text-not-a-string", "full", lambda f: dict(text=["ok", 42]), ["text[1]", "str", "int"]),
    ("text-too-long-without-truncation", "full", lambda f: dict(text="a " * 100, truncation=False),
     ["text[0]", "102 tokens", "max_length=64"]),
    ("text-max-length-negative", "full", lambda f: dict(text="a", max_length=-3), ["max_length", "-3"]),
    ("text-max-length-zero", "full", lambda f: dict(text="a", max_length=0), ["max_length", "got 0"]),
    ("text-without-tokenizer", "no_text", lambda f: dict(text="a star"), ["text", "no tokenizer"]),
    # images
    ("image-1x1", "full", lambda f: dict(images=f["one_pixel.png"]), ["images[0]", "1x1", "min_image_side=8"]),
    ("image-animated-gif", "full", lambda f: dict(images=[IMAGE, f["animated.gif"]]),
     ["images[1]", "animated", "3 frames"]),
    ("image-text-file-named-png", "full", lambda f: dict(images=f["notes.png"]), ["images[0]", "not an image", "PNG"]),
    ("image-truncated-png", "full", lambda f: dict(images=f["truncated.png"]), ["images[0]", "truncated"]),
    ("image-20000x20000-png", "full", lambda f: dict(images=f["bomb.png"]), ["images[0]", "max_image_pixels=89478485"]),
    ("image-12000x12000-png", "full", lambda f: dict(images=f["large.png"]),
     ["images[0]", "144000000 pixels", "max_image_pixels=89478485"]),
    ("image-format-not-allowed", "full", lambda f: dict(images=f["image.ppm"]), ["images[0]", "allowed format"]),
    ("image-missing-file", "full", lambda f: dict(images="/no/such/photo.jpg"), ["images[0]", "no such file"]),
    ("image-url", "full", lambda f: dict(images="https://example.com/cat.png"), ["images[0]", "URLs are not fetched"]),
    ("image-zero-bytes", "full", lambda f: dict(images=b""), ["images[0]", "not an image"]),
    ("image-float-out-of-range", "full", lambda f: dict(images=IMAGE * 2.0), ["images[0]", "[0, 1]", "510"]),
    ("image-nan", "full", lambda f: dict(images=np.full((32, 32, 3), np.nan)), ["images[0]", "NaN"]),
    ("image-two-channels", "full", lambda f: dict(images=np.zeros((32, 32, 2), np.uint8)),
     ["images[0]", "shape (32, 32, 2)"]),
    ("image-wrong-type", "full", lambda f: dict(images=[IMAGE, 5]), ["images[1]", "int"]),
    ("image-without-image-processor", "text_only", lambda f: dict(images=IMAGE), ["images", "no image_processor"]),
    # audio
    ("audio-nan", "full", lambda f: dict(audio=np.r_[CLIP, np.nan], sampling_rate=16_000), ["audio[0]", "NaN"]),
    ("audio-inf", "full", lambda f: dict(audio=[CLIP, np.r_[CLIP, np.inf]], sampling_rate=16_000),
     ["audio[1]", "infinite"]),
    ("audio-empty-array", "full", lambda f: dict(audio=np.zeros(0, np.float32), sampling_rate=16_000),
     ["audio[0]", "empty"]),
    ("audio-too-short", "full", lambda f: dict(audio=CLIP[:100], sampling_rate=16_000),
     ["audio[0]", "min_audio_seconds=0.025"]),
    ("audio-zero-byte-wav", "full", lambda f: dict(audio=f["empty.wav"]), ["audio[0]", "not a readable audio file"]),
    ("audio-wav-header-lies-about-length", "full", lambda f: dict(audio=f["lying.wav"]), ["audio[0]", "empty"]),
    ("audio-flac-header-lies-about-length", "full", lambda f: dict(audio=f["lying.flac"]),
     ["audio[0]", "truncated or corrupt"]),
    ("audio-two-hour-wav", "full", lambda f: dict(audio=f["two_hours.wav"]),
     ["audio[0]", "7200.0 s", "max_audio_seconds=600"]),
    ("audio-longer-than-call-limit", "full", lambda f: dict(audio=f["three_seconds.wav"], max_audio_seconds=1),
     ["audio[0]", "3.0 s", "max_audio_seconds=1"]),
    ("audio-text-file", "full", lambda f: dict(audio=f["notes.wav"]), ["audio[0]", "not a readable audio file"]),
    ("audio-image-file", "full", lambda f: dict(audio=[CLIP, f["one_pixel.png"]], sampling_rate=16_000),
     ["audio[1]", "not a readable"]),
    ("audio-format-not-allowed", "full", lambda f: dict(audio=f["tone.aiff"]), ["audio[0]", "AIFF", "allowed format"]),
    ("audio-missing-sampling-rate", "full", lambda f: dict(audio=CLIP),
     ["audio[0]", "needs sampling_rate", "16000 Hz"]),
    ("audio-sampling-rate-too-low", "full", lambda f: dict(audio=CLIP, sampling_rate=5),
     ["audio[0]", "sampling_rate=5", "min_sampling_rate=1000"]),
    ("audio-sampling-rates-per-sample-mismatch", "full", lambda f: dict(audio=[CLIP, CLIP], sampling_rate=[16_000]),
     ["sampling_rate", "1 rates for 2 audio samples"]),
    ("audio-channels-first", "full", lambda f: dict(audio=np.stack([CLIP, CLIP]), sampling_rate=16_000),
     ["audio[0]", "(2, 16000)", "transpose"]),
    ("audio-three-dimensional", "full", lambda f: dict(audio=np.zeros((2, 2, 2)), sampling_rate=16_000),
     ["audio[0]", "shape (2, 2, 2)"]),
    ("audio-complex-dtype", "full", lambda f: dict(audio=CLIP.astype(np.complex64), sampling_rate=16_000),
     ["audio[0]", "complex64"]),
    ("audio-without-feature-extractor", "text_only", lambda f: dict(audio=CLIP, sampling_rate=16_000),
     ["audio", "no feature_extractor"]),
    # the batch
    ("batch-sizes-differ", "full", lambda f: dict(text=["a", "b"], images=[IMAGE] * 3), ["text has 2", "images has 3"]),
    ("batch-empty", "full", lambda f: dict(), ["empty batch"]),
    ("batch-empty-lists", "full", lambda f: dict(text=[], images=[]), ["empty batch"]),
    ("batch-sample-with-nothing", "full", lambda f: dict(text=[None, "a star"], images=[None, None]),
     ["sample 0", "no text, image or audio"]),
    ("batch-return-tensors", "full", lambda f: dict(text="a", return_tensors="tf"), ["return_tensors", "'tf'"]),
    ("batch-padding-off", "full", lambda f: dict(text="a", padding=False), ["padding", "False"]),
]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own, before our refusal
@pytest.mark.parametrize("case, owner, make_inputs, words", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_raises_value_error_naming_argument_index_and_limit(
    processors, bad_files, case, owner, make_inputs, words
):
    inputs = make_inputs(bad_files)
    temp_before = set(os.listdir(tempfile.gettempdir()))
    start = time.perf_counter()
    with pytest.raises(ValueError) as raised:
        processors[owner](**inputs)
    elapsed = time.perf_counter() - start
    message = str(raised.value)
    for word in words:
        assert word in message, (word, message)
    assert elapsed < 2.0, elapsed
    assert set(os.listdir(tempfile.gettempdir())) == temp_before


def test_the_bad_input_table_covers_the_three_modalities():
    kinds = [case.split("-")[0] for case, *_ in BAD_INPUTS]
    assert len(BAD_INPUTS) >= 25 and all(kinds.count(kind) >= 7 for kind in ("text", "image", "audio"))


# ---- 7. property: any shapes, dtypes, lengths and rates give a finite batch of the expected shapes or ValueError --
# Two properties over the same space: valid inputs always succeed with exactly the expected shapes (no false
# refusals), and arbitrary inputs, bad ones included, give either such a batch or a ValueError, never anything else.

PROPERTY_SETTINGS = settings(max_examples=200, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.too_slow])
GOOD_RATES = [8_000, 16_000, 22_050, 44_100, 48_000, 96_000]


@st.composite
def image_arrays(draw, valid: bool = True):
    channels = draw(st.sampled_from([1, 3, 4] if valid else [1, 2, 3, 4]))
    height, width = draw(st.integers(8 if valid else 1, 40)), draw(st.integers(8, 40))
    shape = draw(st.sampled_from([(height, width), (height, width, channels), (channels, height, width)]))
    dtype = draw(st.sampled_from(["uint8", "uint16", "int32", "float32", "float64", "bool"]))
    scale = {"uint8": 255, "uint16": 65535, "bool": 1}.get(dtype) or (1.0 if dtype.startswith("float") else 255)
    if not valid:
        scale = draw(st.sampled_from([scale, 70_000]))
    array = np.random.default_rng(draw(st.integers(0, 1000))).uniform(0, scale, shape)
    if not valid and dtype.startswith("float"):
        array.flat[0] = draw(st.sampled_from([0.5, np.nan, np.inf, -1.0]))
    return array.astype(dtype)


@st.composite
def audio_arrays(draw, rate: int | None = None):
    """With a `rate`, a valid clip for it (at least 25 ms, (samples,) or (samples, channels)); without, anything."""
    valid = rate is not None
    samples = draw(st.integers(math.ceil(0.025 * rate) if valid else 0, 24_000))
    channels = draw(st.integers(1, 3))
    layouts = ["mono", "samples-channels"] + ([] if valid else ["channels-samples"])
    layout = draw(st.sampled_from(layouts))
    shapes = {"mono": (samples,), "samples-channels": (samples, channels), "channels-samples": (channels, samples)}
    shape = shapes[layout]
    dtype = draw(st.sampled_from(["float32", "float64", "int16", "int32", "uint8"] + ([] if valid else ["int64"])))
    array = np.random.default_rng(draw(st.integers(0, 1000))).uniform(-1, 1, shape)
    if dtype.startswith("int") or dtype == "uint8":
        array = (array + (dtype == "uint8")) * np.iinfo(dtype).max / 2
    if not valid and dtype.startswith("float") and samples:
        array.flat[0] = draw(st.sampled_from([0.5, np.nan, np.inf]))
    return array.astype(dtype)


good_texts = st.one_of(st.text(st.characters(codec="utf-8"), min_size=1, max_size=80).filter(str.strip),
                       st.just("x" * 5000))
any_texts = st.one_of(good_texts, st.sampled_from(["", " \t", "a \ud800 b"]))


def _check_batch(batch, text, images, audio, rate, size) -> None:
    def present(values):
        return [value is not None for value in (values or [None] * size)]

    assert batch["has_text"].tolist() == present(text)
    assert batch["has_image"].tolist() == present(images)
    assert batch["has_audio"].tolist() == present(audio)
    if any(present(text)):
        assert batch["input_ids"].shape[0] == size and 2 <= batch["input_ids"].shape[1] <= 64
        assert batch["attention_mask"].sum(dim=1).gt(0).tolist() == present(text)
    if any(present(images)):
        assert batch["pixel_values"].shape == (size, 3, 32, 32)
    if any(present(audio)):
        lengths = [math.ceil(clip.shape[0] * 16_000 / rate) if clip is not None else 0 for clip in audio]
        assert batch["input_values"].shape == (size, max(lengths))
        assert batch["audio_attention_mask"].sum(dim=1).tolist() == lengths
    for value in batch.values():
        assert not value.is_floating_point() or torch.isfinite(value).all()


@PROPERTY_SETTINGS
@given(data=st.data())
def test_valid_inputs_of_any_shape_dtype_length_and_rate_give_a_finite_batch_of_expected_shapes(processor, data):
    size = data.draw(st.integers(1, 3))
    rate = data.draw(st.sampled_from(GOOD_RATES))
    presence = data.draw(st.lists(st.tuples(st.booleans(), st.booleans(), st.booleans()).filter(any),
                                  min_size=size, max_size=size))
    text = [data.draw(good_texts) if has else None for has, _, _ in presence]
    images = [data.draw(image_arrays()) if has else None for _, has, _ in presence]
    audio = [data.draw(audio_arrays(rate)) if has else None for _, _, has in presence]
    batch = processor(text=text, images=images, audio=audio, sampling_rate=rate)
    _check_batch(batch, text, images, audio, rate, size)


@PROPERTY_SETTINGS
@given(data=st.data())
def test_any_input_gives_a_finite_batch_of_expected_shapes_or_value_error(processor, data):
    size = data.draw(st.integers(1, 3))

    def batch_of(sample):  # None: the modality is not given; in a list, None: this sample lacks it
        return data.draw(st.one_of(st.none(), st.lists(st.one_of(st.none(), sample), min_size=size, max_size=size)))

    text, images, audio = batch_of(any_texts), batch_of(image_arrays(valid=False)), batch_of(audio_arrays())
    rate = data.draw(st.sampled_from([None, 1, 250_000, *GOOD_RATES]))
    try:
        batch = processor(text=text, images=images, audio=audio, sampling_rate=rate)
    except ValueError:
        return
    _check_batch(batch, text, images, audio, rate, size)


# ---- Issue #17, part 2: the decoder's prompts, targets and labels ------------------------------------------------
# A processor with a `decoder_tokenizer` makes `decoder_input_ids`, `decoder_attention_mask` and `labels` with the
# layout of the class docstring: [bos] prompt | target [eos] | padding, labels -100 on bos, prompt and padding.

HISTORY = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "what colour is the star"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "and the shape"},
]
# the default template's rendering of HISTORY with the generation prompt, as documented next to it; {eos} per tokenizer
HISTORY_RENDERED = ("system: be brief\nuser: what colour is the star\nassistant: red{eos}\nuser: and the shape\n"
                    "assistant:")
# mixed prompt lengths: none, empty, short, a dialogue history, longer; targets of different lengths (vocabulary words,
# so that the BERT tokenizer decodes them back exactly)
DECODER_TEXTS = ["a red circle", "a blue star", "a high tone", "the green square", "a low beep"]
DECODER_PROMPTS = [None, "", "what colour is it?", HISTORY, "is it a star or a circle or a square?"]
DECODER_TARGETS = ["red circle", "a blue star with a high tone", "green", "a yellow triangle", "grey"]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> str:
    """A tiny GPT-2 tokenizer (byte-level BPE trained here on the test vocabulary, no network): like GPT-2's, it has
    <|endoftext|> as bos, eos and unk, no pad token and no chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Tokenizer

    from conftest import VOCAB

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([" ".join(VOCAB[5:]), "system: user: assistant: what colour is it be brief shape"] * 3,
                            trainer)
    model = json.loads(bpe.to_str())["model"]
    folder = tmp_path_factory.mktemp("gpt2_tokenizer")
    GPT2Tokenizer(vocab=model["vocab"], merges=[tuple(merge) for merge in model["merges"]],
                  model_max_length=128).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def decoder_processors(vit_dir, bert_dir, gpt2_dir) -> dict[str, MMFusionProcessor]:
    """"bert": the text tower's tokenizer as the decoder's, as in the built-in sample; "gpt2": a GPT-2 decoder."""
    return {
        "bert": MMFusionProcessor.from_towers(text=bert_dir, decoder=bert_dir),
        "gpt2": MMFusionProcessor.from_towers(vision=vit_dir, text=bert_dir, decoder=gpt2_dir),
    }


def _prompt_ids(tokenizer, prompt) -> list[int]:
    """The prompt's tokens as the class docstring defines them, from the tokenizer's own calls."""
    if not prompt:
        return []
    if isinstance(prompt, list):
        prompt = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(prompt, add_special_tokens=False)


def _real_columns(mask_row: torch.Tensor) -> list[int]:
    return [column for column, value in enumerate(mask_row.tolist()) if value]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("decoder", ["bert", "gpt2"])
def test_labels_are_minus_100_exactly_on_prompt_and_padding_positions(decoder_processors, decoder, side):
    """Acceptance 3: for a batch with mixed prompt lengths (none, empty, a history), on both padding sides, labels
    are -100 exactly on the bos, prompt and padding positions and equal the ids on the target and eos positions;
    decoder_attention_mask is 1 exactly on the real tokens. GPT-2 pads with its eos id: the eos that ends a target is
    still labelled, the padding is not."""
    processor = decoder_processors[decoder]
    tokenizer = processor.decoder_tokenizer
    batch = processor(text=DECODER_TEXTS, prompt=DECODER_PROMPTS, target=DECODER_TARGETS, decoder_padding_side=side)
    ids, mask, labels = batch["decoder_input_ids"], batch["decoder_attention_mask"], batch["labels"]
    assert ids.dtype == mask.dtype == labels.dtype == torch.int64 and ids.shape == mask.shape == labels.shape
    assert batch["has_text"].all() and "input_ids" in batch  # the fusion keys are there as always
    width = ids.shape[1]
    for row, (prompt, target) in enumerate(zip(DECODER_PROMPTS, DECODER_TARGETS)):
        prompt_ids, target_ids = _prompt_ids(tokenizer, prompt), tokenizer.encode(target, add_special_tokens=False)
        expected = [tokenizer.bos_token_id, *prompt_ids, *target_ids, tokenizer.eos_token_id]
        padding = width - len(expected)
        real = list(range(len(expected))) if side == "right" else list(range(padding, width))
        assert _real_columns(mask[row]) == real, row
        assert ids[row, real].tolist() == expected, row
        pads = [column for column in range(width) if column not in real]
        assert ids[row, pads].eq(tokenizer.pad_token_id).all(), row
        prompt_columns, target_columns = real[: 1 + len(prompt_ids)], real[1 + len(prompt_ids) :]
        assert labels[row, prompt_columns + pads].eq(-100).all(), row
        assert labels[row, target_columns].tolist() == [*target_ids, tokenizer.eos_token_id], row
        # read back: the labelled tokens are the target, the rest of the row is the prompt
        assert processor.decode(labels[row][labels[row] != -100]) == target
    if decoder == "gpt2":
        assert tokenizer.pad_token_id == tokenizer.eos_token_id  # so the test above is the one that matters
    as_numpy = processor(text=DECODER_TEXTS, prompt=DECODER_PROMPTS, target=DECODER_TARGETS, return_tensors="np")
    assert np.array_equal(as_numpy["labels"], processor(text=DECODER_TEXTS, prompt=DECODER_PROMPTS,
                                                        target=DECODER_TARGETS)["labels"].numpy())


@pytest.mark.parametrize("decoder", ["bert", "gpt2"])
def test_generation_prompts_are_left_padded_and_do_not_depend_on_the_batch_partners(decoder_processors, decoder):
    """Without a target: the prompts only ([bos] prompt), left-padded, so every row's last real token is in the last
    column and is the same whatever the batch partners; each row is the start of its training row."""
    processor = decoder_processors[decoder]
    batch = processor(text=DECODER_TEXTS, prompt=DECODER_PROMPTS)
    assert "labels" not in batch and batch["decoder_attention_mask"][:, -1].all()
    reversed_batch = processor(text=DECODER_TEXTS[::-1], prompt=DECODER_PROMPTS[::-1])
    assert torch.equal(reversed_batch["decoder_input_ids"][:, -1], batch["decoder_input_ids"].flip(0)[:, -1])
    training = processor(text=DECODER_TEXTS, prompt=DECODER_PROMPTS, target=DECODER_TARGETS)
    for row, prompt in enumerate(DECODER_PROMPTS):
        alone = processor(text=DECODER_TEXTS[row], prompt=[prompt])
        assert alone["decoder_attention_mask"].all()
        real = batch["decoder_input_ids"][row, _real_columns(batch["decoder_attention_mask"][row])]
        assert torch.equal(real, alone["decoder_input_ids"][0]), row
        assert real[0] == processor.decoder_tokenizer.bos_token_id
        assert real.tolist() == [processor.decoder_tokenizer.bos_token_id, *_prompt_ids(processor.decoder_tokenizer,
                                                                                      prompt)]
        training_row = training["decoder_input_ids"][row, : len(real)]  # right-padded: its real tokens come first
        assert torch.equal(training_row, real) and training["labels"][row, : len(real)].eq(-100).all(), row
    right = processor(text=DECODER_TEXTS, prompt=DECODER_PROMPTS, decoder_padding_side="right")
    assert right["decoder_attention_mask"][:, 0].all()


def test_the_default_chat_template_renders_a_history_as_documented(bert_dir, gpt2_dir):
    """BERT and GPT-2 have no chat template: the decoder tokenizer gets DEFAULT_CHAT_TEMPLATE, and BERT its
    [CLS]/[SEP] as bos/eos, GPT-2 its eos as pad, on the processor's copy; the caller's tokenizer, here the text
    tower's own object, is left as it was."""
    text_tokenizer = AutoTokenizer.from_pretrained(bert_dir)
    processor = MMFusionProcessor(tokenizer=text_tokenizer, decoder_tokenizer=text_tokenizer)
    decoder = processor.decoder_tokenizer
    assert decoder.chat_template == DEFAULT_CHAT_TEMPLATE
    assert (decoder.bos_token, decoder.eos_token, decoder.pad_token) == ("[CLS]", "[SEP]", "[PAD]")
    assert processor.tokenizer is text_tokenizer and decoder is not text_tokenizer
    assert text_tokenizer.chat_template is None and text_tokenizer.bos_token is text_tokenizer.eos_token is None
    rendered = decoder.apply_chat_template(HISTORY, tokenize=False, add_generation_prompt=True)
    assert rendered == HISTORY_RENDERED.format(eos="[SEP]")
    assert decoder.apply_chat_template(HISTORY, tokenize=False) == rendered.removesuffix("assistant:")
    row = processor(text="a star", prompt=[HISTORY])["decoder_input_ids"][0].tolist()
    assert row == [decoder.bos_token_id, *decoder.encode(rendered, add_special_tokens=False)]

    gpt2 = MMFusionProcessor.from_towers(text=bert_dir, decoder=gpt2_dir).decoder_tokenizer
    assert gpt2.chat_template == DEFAULT_CHAT_TEMPLATE and gpt2.pad_token == gpt2.eos_token == "<|endoftext|>"
    rendered = gpt2.apply_chat_template(HISTORY, tokenize=False, add_generation_prompt=True)
    assert rendered == HISTORY_RENDERED.format(eos="<|endoftext|>")
    assert AutoTokenizer.from_pretrained(gpt2_dir).pad_token is None  # the folder's tokenizer is untouched


OWN_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_a_decoder_tokenizers_own_chat_template_is_used_and_its_bos_is_not_doubled(bert_dir, gpt2_dir):
    own = AutoTokenizer.from_pretrained(gpt2_dir)
    own.chat_template = OWN_TEMPLATE  # writes the bos token itself, as Llama 3's does
    processor = MMFusionProcessor(tokenizer=AutoTokenizer.from_pretrained(bert_dir), decoder_tokenizer=own)
    assert processor.decoder_tokenizer.chat_template == OWN_TEMPLATE
    assert own.pad_token is None  # the pad token went to the processor's copy
    batch = processor(text="a star", prompt=[HISTORY], target=["a red star"])
    row, labels = batch["decoder_input_ids"][0], batch["labels"][0]
    expected = "<|endoftext|><system>be brief<user>what colour is the star<assistant>red<user>and the shape<assistant>"
    assert processor.decode(row[labels == -100], skip_special_tokens=False) == expected
    assert processor.decode(labels[labels != -100]) == "a red star"


def test_truncation_keeps_the_latest_prompt_tokens_and_the_first_target_tokens(decoder_processors):
    """max_prompt_length cuts the prompt from the left (the start token stays, then the latest tokens, generation
    prompt included); max_target_length cuts the target from the right and drops the end token, so that the model
    is not taught to stop in the middle of an answer; a target that fits keeps its end token."""
    processor = decoder_processors["gpt2"]
    tokenizer = processor.decoder_tokenizer
    prompts, targets = [HISTORY, "what colour"], ["a blue star with a high tone", "red"]
    full = _prompt_ids(tokenizer, HISTORY)
    target_ids = tokenizer.encode(targets[0], add_special_tokens=False)
    assert len(full) > 5 and len(target_ids) > 3
    batch = processor(text=["a", "b"], prompt=prompts, target=targets, max_prompt_length=5, max_target_length=3)
    real = batch["decoder_input_ids"][0, _real_columns(batch["decoder_attention_mask"][0])].tolist()
    assert real == [tokenizer.bos_token_id, *full[-4:], *target_ids[:3]]
    assert batch["labels"][0, 5:8].tolist() == target_ids[:3] and batch["labels"][0, :5].eq(-100).all()
    red = tokenizer.encode("red", add_special_tokens=False)
    short = batch["labels"][1][batch["labels"][1] != -100]
    assert len(red) < 3 and processor.decode(short, skip_special_tokens=False) == "red<|endoftext|>"
    # the processor's own settings, saved with it, apply when a call gives none
    limited = MMFusionProcessor(tokenizer=processor.tokenizer, decoder_tokenizer=tokenizer, max_prompt_length=5,
                                max_target_length=3)
    assert torch.equal(limited(text=["a", "b"], prompt=prompts, target=targets)["labels"], batch["labels"])


def test_decode_uses_the_decoder_tokenizer_and_skips_special_tokens(decoder_processors, processor):
    gpt2 = decoder_processors["gpt2"]
    batch = gpt2(text=DECODER_TEXTS[:2], prompt=DECODER_PROMPTS[:2], target=DECODER_TARGETS[:2])
    assert gpt2.batch_decode(batch["decoder_input_ids"]) == DECODER_TARGETS[:2]  # prompts are None and ""
    assert gpt2.decode(batch["decoder_input_ids"][0], skip_special_tokens=False).startswith("<|endoftext|>red circle")
    # without a decoder tokenizer: the text tokenizer's, as before
    ids = processor(text="a red star")["input_ids"][0]
    assert processor.decode(ids) == "[CLS] a red star [SEP]"


def test_a_processor_with_a_decoder_tokenizer_round_trips_also_where_only_transformers_is_installed(
    tmp_path, decoder_processors
):
    original = decoder_processors["gpt2"]
    inputs = dict(text=DECODER_TEXTS, images=[_rgb(40, 30, row) for row in range(5)], prompt=DECODER_PROMPTS,
                  target=DECODER_TARGETS)
    expected = original(**inputs)
    generation = original(**{**inputs, "target": None})
    saved = tmp_path / "saved"
    original.save_pretrained(saved)
    # transformers' place for an additional tokenizer; the template and the pad token travel with it
    assert (saved / "decoder_tokenizer" / "chat_template.jinja").read_text() == DEFAULT_CHAT_TEMPLATE
    assert {path.name for path in saved.glob("*.py")} == set(HUB_FILES)

    for reloaded in (MMFusionProcessor.from_pretrained(saved), AutoProcessor.from_pretrained(saved)):
        assert type(reloaded) is MMFusionProcessor
        decoder = reloaded.decoder_tokenizer
        assert (decoder.bos_token, decoder.eos_token, decoder.pad_token) == ("<|endoftext|>",) * 3
        assert decoder.chat_template == DEFAULT_CHAT_TEMPLATE
        _assert_same(reloaded(**inputs), expected, expected.keys())
        _assert_same(reloaded(**{**inputs, "target": None}), generation, generation.keys())

    with open(tmp_path / "case.pkl", "wb") as file:
        pickle.dump((inputs, dict(expected), dict(generation)), file)
    script = WITHOUT_PROJECT + textwrap.dedent(f"""
        import pickle, sys

        import torch
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained({str(saved)!r}, trust_remote_code=True)
        assert type(processor).__module__.startswith("transformers_modules."), type(processor).__module__
        with open({str(tmp_path / "case.pkl")!r}, "rb") as file:
            inputs, expected, generation = pickle.load(file)
        generating = processor(**{{**inputs, "target": None}})
        for actual, wanted in ((processor(**inputs), expected), (generating, generation)):
            assert sorted(actual.keys()) == sorted(wanted.keys()), (actual.keys(), wanted.keys())
            for key in wanted:
                assert torch.equal(actual[key], wanted[key]), key
        assert processor.batch_decode(expected["labels"].clamp(min=0))[0].startswith("red circle")
        loaded = [name for name in sys.modules if name.split(".")[0] in {PROJECT_PACKAGES!r}]
        assert not loaded, loaded
        print("identical")
    """)
    result = _run_fresh(script, tmp_path)
    assert result.returncode == 0 and "identical" in result.stdout, result.stderr[-3000:]


def test_a_processor_saved_before_decoder_tokenizers_existed_loads_without_one(tmp_path, bert_dir):
    """Its processor_config.json lists no decoder_tokenizer as absent and has no decoder_tokenizer_subfolder."""
    MMFusionProcessor.from_towers(text=bert_dir).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert "decoder_tokenizer" in config["absent_sub_processors"] and "decoder_tokenizer_subfolder" not in config
    assert not (tmp_path / "decoder_tokenizer").exists()
    config["absent_sub_processors"].remove("decoder_tokenizer")
    del config["max_prompt_length"], config["max_target_length"]
    (tmp_path / "processor_config.json").write_text(json.dumps(config))
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert reloaded.decoder_tokenizer is None
    assert "decoder_input_ids" not in reloaded.model_input_names and "decoder_input_ids" not in reloaded(text="a")


def test_a_decoder_tokenizer_without_start_or_end_tokens_is_refused(bert_dir, gpt2_dir):
    from transformers import GPT2Tokenizer

    bare = GPT2Tokenizer.from_pretrained(gpt2_dir, bos_token=None, eos_token=None)
    with pytest.raises(ValueError, match=r"decoder_tokenizer: GPT2Tokenizer has neither a bos_token nor a cls_token"):
        MMFusionProcessor(tokenizer=AutoTokenizer.from_pretrained(bert_dir), decoder_tokenizer=bare)
    bare = GPT2Tokenizer.from_pretrained(gpt2_dir, eos_token=None)
    with pytest.raises(ValueError, match=r"decoder_tokenizer: GPT2Tokenizer has neither an eos_token nor a sep_token"):
        MMFusionProcessor(tokenizer=AutoTokenizer.from_pretrained(bert_dir), decoder_tokenizer=bare)


def _message(**message) -> list:
    return [[message]]


DECODER_BAD_INPUTS = [
    # no decoder tokenizer, no inputs to condition on, row counts
    ("prompt-without-decoder-tokenizer", "none", dict(text="a star", prompt="what colour"),
     ["prompt", "no decoder_tokenizer", "decoder="]),
    ("target-without-decoder-tokenizer", "none", dict(text="a star", target="red"), ["target", "no decoder_tokenizer"]),
    ("target-without-any-modality", "bert", dict(target=["red", "blue"]), ["target", "no text, images or audio"]),
    ("prompt-without-any-modality", "bert", dict(prompt=["what colour"]), ["prompt", "no text, images or audio"]),
    ("target-row-without-modality", "gpt2", dict(text=["a", None], images=[None, None], target=["red", "blue"]),
     ["target[1]", "sample 1 has no text, image or audio"]),
    ("prompt-count-differs", "bert", dict(text=["a", "b"], prompt=["what"], target=["red", "blue"]),
     ["prompt", "1 prompts", "batch of 2 samples"]),
    ("target-count-differs", "bert", dict(text=["a", "b", "c"], target=["red", "blue"]),
     ["target", "2 targets", "batch of 3 samples"]),
    # targets
    ("target-empty", "bert", dict(text=["a", "b"], target=["red", ""]), ["target[1]", "empty"]),
    ("target-whitespace", "bert", dict(text="a", target=" \n"), ["target[0]", "whitespace"]),
    ("target-none-in-a-batch", "bert", dict(text=["a", "b"], target=["red", None]),
     ["target[1]", "NoneType", "call without target to generate"]),
    ("target-not-a-string", "bert", dict(text=["a", "b"], target=["red", 7]), ["target[1]", "int"]),
    ("target-lone-surrogate", "bert", dict(text="a", target="red \ud800"), ["target[0]", "surrogate", "position 4"]),
    ("target-without-tokens", "bert", dict(text="a", target="\u200b"), ["target[0]", "no tokens"]),
    ("target-longer-than-the-decoder", "bert", dict(text="a", target="red " * 70),
     ["target[0]", "72 tokens", "model_max_length=64", "max_prompt_length"]),
    # prompts and messages
    ("prompt-not-a-string-or-history", "bert", dict(text=["a", "b"], prompt=["what", 5]), ["prompt[1]", "int"]),
    ("prompt-lone-surrogate", "bert", dict(text="a", prompt="what \udfff"), ["prompt[0]", "surrogate"]),
    ("message-without-role", "bert", dict(text="a", prompt=_message(content="hi")),
     ["prompt[0][0]", "without 'role'"]),
    ("message-without-content", "bert", dict(text="a", prompt=_message(role="user")),
     ["prompt[0][0]", "without 'content'"]),
    ("message-unknown-role", "bert", dict(text="a", prompt=_message(role="bot", content="hi")),
     ["prompt[0][0]", "unknown role 'bot'", "system, user, assistant"]),
    ("message-content-not-a-string", "bert", dict(text="a", prompt=_message(role="user", content=["hi"])),
     ["prompt[0][0]", "content", "list"]),
    ("message-not-a-dict", "bert", dict(text="a", prompt=[[{"role": "user", "content": "hi"}, "and"]]),
     ["prompt[0][1]", "str"]),
    ("history-ends-with-assistant", "bert", dict(text=["a", "b"], prompt=[None, HISTORY[:3]]),
     ["prompt[1][2]", "assistant message"]),
    ("prompt-longer-than-the-decoder", "bert", dict(text="a", prompt="red " * 70),
     ["prompt[0]", "71 tokens", "model_max_length=64"]),
    # settings
    ("decoder-padding-side", "bert", dict(text="a", target="red", decoder_padding_side="middle"),
     ["decoder_padding_side", "'middle'"]),
    ("max-prompt-length-zero", "bert", dict(text="a", target="red", max_prompt_length=0),
     ["max_prompt_length", "got 0"]),
    ("max-target-length-negative", "bert", dict(text="a", target="red", max_target_length=-2),
     ["max_target_length", "-2"]),
]


@pytest.mark.parametrize("case, owner, inputs, words", DECODER_BAD_INPUTS, ids=[row[0] for row in DECODER_BAD_INPUTS])
def test_bad_decoder_input_raises_value_error_naming_field_row_and_limit(
    processor, decoder_processors, case, owner, inputs, words
):
    owners = {"none": processor, **decoder_processors}
    with pytest.raises(ValueError) as raised:
        owners[owner](**inputs)
    for word in words:
        assert word in str(raised.value), (word, str(raised.value))
