"""`mm-selfcheck`: the end-to-end path on one built-in sample, with nothing downloaded.

Builds tiny random towers (the sample's ViT and wav2vec2, a BERT with a small tokenizer) and saves them like Hub
checkpoints; writes
one sample as real files (a red circle PNG, a 440 Hz tone WAV, a caption); builds the processor and the model with
`from_towers`; runs a forward pass; saves both to one folder; reloads them through `AutoProcessor` and
`AutoModelForSequenceClassification`; and checks that the reloaded pair gives the same logits. Exits non-zero if
anything differs.

    mm-selfcheck [--output-dir outputs/selfcheck]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import soundfile
import torch
from PIL import Image, ImageDraw
from transformers import AutoModelForSequenceClassification, AutoProcessor, BertConfig, BertModel, BertTokenizer

from transformers.utils import logging as transformers_logging

import modeling_mm  # noqa: F401  (registers the Auto classes)
from modeling_mm import MMFusionForSequenceClassification
from processors import MMFusionProcessor
from training.sample_data import save_sample_towers

CAPTION = "a red circle with a high tone"
WORDS = "a an the red green blue circle square triangle with high low tone and".split()


def save_tiny_towers(folder: Path) -> dict[str, str]:
    """Random-init towers saved with their own processors, standing in for Hub checkpoints: the sample's vision and
    audio towers, and a small BERT with a tokenizer for the sample's words (so no extra package is needed)."""
    save_sample_towers(folder)
    torch.manual_seed(0)
    text = folder / "text"
    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    BertModel(BertConfig(vocab_size=len(vocab), max_position_embeddings=64, hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=64)).save_pretrained(text)
    BertTokenizer(vocab=vocab, model_max_length=64).save_pretrained(text)
    return {"vision": str(folder / "vision"), "text": str(text), "audio": str(folder / "audio")}


def write_sample(folder: Path) -> tuple[Path, Path]:
    image_path, audio_path = folder / "red_circle.png", folder / "tone_440hz.wav"
    image = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(image).ellipse((12, 12, 52, 52), fill="red")
    image.save(image_path)
    seconds, rate = 0.5, 22_050  # not the towers' 16 kHz: the processor resamples
    t = np.arange(int(seconds * rate)) / rate
    soundfile.write(audio_path, (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate)
    return image_path, audio_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/selfcheck", help="where towers, sample and model go")
    args = parser.parse_args(argv)
    transformers_logging.disable_progress_bar()  # tiny towers load in milliseconds: the bars would only be noise
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)

    print(f"1/5 saving tiny random towers under {output / 'towers'}")
    towers = save_tiny_towers(output / "towers")
    print(f"2/5 writing the sample under {output / 'sample'}")
    (output / "sample").mkdir(exist_ok=True)
    image_path, audio_path = write_sample(output / "sample")

    print("3/5 building processor and model from the towers")
    processor = MMFusionProcessor.from_towers(**towers)
    torch.manual_seed(0)
    model = MMFusionForSequenceClassification.from_towers(
        **towers, fusion_hidden_size=32, fusion_num_heads=4, fusion_intermediate_size=64,
        id2label={0: "mismatch", 1: "match"}, label2id={"mismatch": 0, "match": 1},
    ).eval()
    batch = processor(text=[CAPTION, CAPTION, None], images=[str(image_path), None, str(image_path)],
                      audio=[str(audio_path), str(audio_path), None])
    with torch.no_grad():
        logits = model(**batch).logits

    model_dir = output / "model"
    print(f"4/5 saving model and processor to {model_dir}")
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)

    print("5/5 reloading through AutoProcessor / AutoModelForSequenceClassification")
    reloaded_processor = AutoProcessor.from_pretrained(model_dir)
    reloaded_model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    reloaded_batch = reloaded_processor(text=[CAPTION, CAPTION, None], images=[str(image_path), None, str(image_path)],
                                        audio=[str(audio_path), str(audio_path), None])
    with torch.no_grad():
        reloaded_logits = reloaded_model(**reloaded_batch).logits
    difference = (logits - reloaded_logits).abs().max().item()

    print(f"\n{'sample':<8} {'text':<6} {'image':<6} {'audio':<6} {'P(match)':>9} {'reloaded':>9}")
    probabilities = logits.softmax(-1)[:, 1].tolist()
    reloaded_probabilities = reloaded_logits.softmax(-1)[:, 1].tolist()
    for i in range(len(probabilities)):
        flags = [("yes" if bool(batch[key][i]) else "-") for key in ("has_text", "has_image", "has_audio")]
        print(f"{i:<8} {flags[0]:<6} {flags[1]:<6} {flags[2]:<6} {probabilities[i]:>9.4f} {reloaded_probabilities[i]:>9.4f}")
    print(f"\nmax |logits - reloaded logits| = {difference:.2e}; files in {model_dir}: "
          f"{', '.join(sorted(p.name for p in model_dir.iterdir()))}")
    if difference > 1e-6 or not torch.isfinite(logits).all():
        print("FAILED: the reloaded model does not reproduce the original", file=sys.stderr)
        return 1
    print("OK: built, ran, saved and reloaded with identical outputs (random towers: probabilities are untrained)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
