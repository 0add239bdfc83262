"""The built-in sample: a coloured shape, a tone and a caption that does or does not describe both.

Each row shows an image (a red/green/blue/yellow circle/square/triangle on a plain grey background), a tone (low:
180-300 Hz, or high: 660-1000 Hz, the frequency drawn uniformly in its range) and a caption naming a colour, a
shape and a pitch ("deep" or "shrill"); 30% of the captions also name the grey background ("a red circle on grey
with a deep tone"), which is always true. The label is `match` when the caption names colour, shape and pitch
correctly, else `mismatch`; half the rows of every split match, and a mismatch gets exactly one of colour, shape or
pitch wrong, each a third of the time (never the background). So no single modality says anything about the label;
image + text can catch colour and shape mismatches only (best accuracy 5/6, about 83%), text + audio pitch
mismatches only (2/3, about 67%), and only all three reach 100%.

Next to the label, each row carries the targets of a multi-task recipe (`MULTITASK_TASKS`, what
`mm-train --sample multitask` trains), each of which one modality alone can learn, except the last:

    shape            image   single-label classification (circle/square/triangle)
    pitch_hz         audio   regression: the tone's true frequency in Hz, rounded to 0.1
    caption_colours  text    multi-label classification: the colours the caption names, "|"-joined ("red|grey")
    label            all     single-label classification (match/mismatch), the task named `match`

For generation, each row also has a `question` (one of `QUESTIONS`: the shape's colour and kind need the image, the
tone's pitch the audio, whether the caption matches all three, and "describe what you see and hear." asks for the
`description`), its `answer` ("red", "a circle", "deep", "no", or the description), what it `needs`, and the
`description` of what the row really shows ("a red circle and a deep tone", whatever the caption says).

The `aligned` variant (`generate_sample(..., variant="aligned")`, in its own folder `sample-aligned`; what
`mm-train --sample retrieval` trains on) is a joint-embedding data set: every caption describes its row, and each
shape makes its own sound (circle: a deep tone, square: a mellow one, 380-520 Hz, triangle: a shrill one), as a
dog's picture and its bark go together. Image and audio then share something (the shape) that a model can learn
from image-text and audio-text pairs alone, and image<->audio retrieval measures that emergent alignment (in the
default variant image and audio are independent by design, so that no pair of modalities gives the label away).

The folder holds real files, read back through `datasets` like any user data:

    images/00000.png ...   audio/00000.wav ...   train.csv  validation.csv  test.csv (80/10/10)   COMPLETE.json

CSV columns: `text, image, audio, label`, where `image`/`audio` are paths relative to the CSV's folder (so the
folder can move, and loading works from any working directory), plus what each row really shows: `colour, shape,
pitch, pitch_hz`, what its caption says: `caption_colour, caption_shape, caption_pitch, caption_colours`, and
`mismatch` (`none` or the attribute the caption gets wrong).

Generation is deterministic: the same parameters give byte-identical files on every run. The folder is written
to a temporary sibling and renamed into place with a `COMPLETE.json` marker holding the parameters, so an
interrupted run never leaves a half-written sample behind; a complete folder with the same parameters is reused.

    python -m training.sample_data --output DIR [--rows 3000 --seed 0 --variant aligned]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import tempfile
import wave
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Bump when the generator's output changes, so that cached samples of an older version are regenerated.
GENERATOR_VERSION = 5
COMPLETE_MARKER = "COMPLETE.json"
SPLITS = {"train": 0.8, "validation": 0.1, "test": 0.1}
LABELS = ("match", "mismatch")

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}
SHAPES = ("circle", "square", "triangle")
# Each pitch's frequency range in Hz. A continuous range makes `pitch_hz` a regression target worth learning; the
# ranges lie more than an octave apart (300 to 660 Hz), so low and high stay easy to tell apart.
PITCHES = {"low": (180.0, 300.0), "high": (660.0, 1000.0)}
# How captions name the pitches. Not "low"/"high": a sentence encoder places those antonyms almost on top of each
# other (in all-MiniLM-L6-v2 they explain 4% of a caption's mean-pooled variance, against 21% for these words), so
# the tone would be the one attribute a caption hardly tells apart.
PITCH_WORDS = {"low": "deep", "middle": "mellow", "high": "shrill"}
# The aligned variant: every row matches, and the shape picks the pitch (its range is drawn from ALIGNED_PITCHES)
VARIANTS = ("default", "aligned")
ALIGNED_PITCHES = {"low": PITCHES["low"], "middle": (380.0, 520.0), "high": PITCHES["high"]}
SHAPE_PITCHES = {"circle": "low", "square": "middle", "triangle": "high"}
# what makes two rows of the aligned variant the same item (for retrieval with several positives per query)
ALIGNED_ITEM_COLUMNS = ("colour", "shape", "pitch")
MISMATCH_KINDS = ("colour", "shape", "pitch")
# Words are those of the tests' tiny tokenizer vocabulary, so a test tokenizer sees whole words.
CAPTION_TEMPLATES = (
    "a {colour} {shape} with a {pitch} tone",
    "the {shape} is {colour} and the tone is {pitch}",
    "a {pitch} beep and a {colour} {shape}",
    "{colour} {shape}, {pitch} tone",
)
# The image's background is a random grey level, so a caption naming it stays true. These captions make
# `caption_colours` multi-label (two colours instead of one); they name the shape's colour first, as the column does.
BACKGROUND = "grey"
BACKGROUND_CAPTION_TEMPLATES = (
    "a {colour} {shape} on {background} with a {pitch} tone",
    "the {shape} is {colour} on {background} and the tone is {pitch}",
)
# Share of each split's captions that name the background: exact (not drawn per row), so a small sample has some too.
BACKGROUND_CAPTION_FRACTION = 0.3
CAPTION_COLOURS_SEPARATOR = "|"
# Generation (`mm-train --sample generation`): each row also carries one question about it and its answer, and a
# description of what its image and tone really show. The questions need different modalities: colour and shape the
# image, the tone the audio, whether the caption matches all three; "describe" asks for the description.
QUESTIONS = {
    "colour": ("what colour is the shape?", "image"),
    "shape": ("what shape is it?", "image"),
    "pitch": ("is the tone deep or shrill?", "audio"),
    "match": ("does the caption match?", "all"),
    "describe": ("describe what you see and hear.", "all"),
}
DESCRIPTION_TEMPLATE = "a {colour} {shape} and a {pitch} tone"
COLUMNS = ("text", "image", "audio", "label", "colour", "shape", "pitch", "pitch_hz", "caption_colour",
           "caption_shape", "caption_pitch", "caption_colours", "mismatch", "question", "answer", "question_kind",
           "needs", "description")
# The multi-task recipe on this sample: shape from the image, pitch_hz from the audio, caption_colours from the
# text, and match (the `label` column) from all three.
MULTITASK_TASKS = [
    {"name": "shape", "column": "shape", "problem_type": "single_label_classification", "loss_weight": 1.0},
    {"name": "pitch_hz", "column": "pitch_hz", "problem_type": "regression", "loss_weight": 1.0},
    {"name": "caption_colours", "column": "caption_colours", "problem_type": "multi_label_classification",
     "loss_weight": 1.0, "label_separator": CAPTION_COLOURS_SEPARATOR},
    {"name": "match", "column": "label", "problem_type": "single_label_classification", "loss_weight": 1.0},
]


def default_sample_dir(variant: str = "default") -> Path:
    """Where the sample is cached: `$MM_FUSION_CACHE/sample` (`sample-aligned` for the aligned variant), by default
    under `~/.cache/mm-fusion`."""
    cache = os.environ.get("MM_FUSION_CACHE") or Path("~/.cache/mm-fusion").expanduser()
    return Path(cache) / ("sample" if variant == "default" else f"sample-{variant}")


def generate_sample(
    root: str | os.PathLike | None = None,
    rows: int = 3000,
    seed: int = 0,
    image_size: int = 32,
    audio_seconds: float = 1.0,
    sampling_rate: int = 16_000,
    variant: str = "default",
) -> Path:
    """Write the sample to `root` (default: `default_sample_dir(variant)`) and return its path. `variant` "aligned"
    writes the joint-embedding variant (see the module docstring).

    Reuses `root` when it already holds a complete sample with the same parameters; regenerates it when it holds a
    sample with other parameters. Raises `ValueError` when a parameter is out of range, or when `root` is a
    non-empty folder that is not a sample (it is never deleted).
    """
    root = Path(root) if root is not None else default_sample_dir(variant)
    parameters = _checked_parameters(rows, seed, image_size, audio_seconds, sampling_rate, variant)
    existing = _read_marker(root)
    if existing == parameters:
        return root
    if existing is None and root.exists() and any(root.iterdir()):
        raise ValueError(f"root: {str(root)!r} exists, is not empty and holds no {COMPLETE_MARKER}; "
                         "refusing to overwrite it")

    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the sample is a shared cache
    try:
        _write_sample(staging, parameters)
        _write_marker(staging, parameters)
        _move_into_place(staging, root, parameters)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _checked_parameters(rows: int, seed: int, image_size: int, audio_seconds: float, sampling_rate: int,
                        variant: str = "default") -> dict:
    if variant not in VARIANTS:
        raise ValueError(f"variant: {variant!r} is not one of {', '.join(VARIANTS)}")
    if rows < 20:
        raise ValueError(f"rows: {rows} is too few; need >= 20 so every split has both labels")
    if image_size < 16:
        raise ValueError(f"image_size: {image_size} is too small; need >= 16 pixels to tell the shapes apart")
    if not audio_seconds > 0:
        raise ValueError(f"audio_seconds: {audio_seconds} must be > 0")
    highest = max(top for _, top in PITCHES.values())
    if sampling_rate < 4 * highest:
        raise ValueError(f"sampling_rate: {sampling_rate} Hz is too low for a {highest:.0f} Hz tone; need >= "
                         f"{int(4 * highest)} Hz")
    parameters = {"version": GENERATOR_VERSION, "rows": int(rows), "seed": int(seed), "image_size": int(image_size),
                  "audio_seconds": float(audio_seconds), "sampling_rate": int(sampling_rate)}
    if variant != "default":  # so that the default sample's marker, and the cached folder, stay as they were
        parameters["variant"] = variant
    return parameters


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None


def _write_marker(folder: Path, parameters: dict) -> None:
    (folder / COMPLETE_MARKER).write_text(json.dumps(parameters, indent=2, sort_keys=True) + "\n")


def _move_into_place(staging: Path, root: Path, parameters: dict) -> None:
    """Rename the finished folder to `root`. An older sample is moved aside first and deleted after; if another
    process finished the same sample meanwhile, keep theirs."""
    old = None
    if root.exists():
        old = root.with_name(f".{root.name}.old-{os.getpid()}")
        os.rename(root, old)
    try:
        os.rename(staging, root)
    except OSError:
        if _read_marker(root) != parameters:
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- the rows ------------------------------------------------------------------------------------------------------

def _split_sizes(rows: int) -> dict[str, int]:
    validation = test = int(round(rows * SPLITS["test"]))
    return {"train": rows - validation - test, "validation": validation, "test": test}


def _balanced(values: tuple, count: int, rng: np.random.Generator) -> list:
    """`count` values, each as often as possible equally, in random order."""
    repeated = [values[i % len(values)] for i in range(count)]
    return [repeated[i] for i in rng.permutation(count)]


def _make_rows(parameters: dict) -> dict[str, list[dict]]:
    """The table of every split: what each row shows and what its caption says. Labels, mismatch kinds and the
    share of captions naming the background are balanced within each split; shown attributes, frequencies and
    templates are drawn independently of the label."""
    rng = np.random.default_rng([parameters["seed"], 0])
    colours, pitches = tuple(COLOURS), tuple(PITCHES)
    aligned = parameters.get("variant") == "aligned"
    splits, index = {}, 0
    for split, size in _split_sizes(parameters["rows"]).items():
        labels = ["match"] * size if aligned else _balanced(LABELS, size, rng)
        kinds = iter(_balanced(MISMATCH_KINDS, labels.count("mismatch"), rng))
        names_background = iter(rng.permutation(size) < int(round(size * BACKGROUND_CAPTION_FRACTION)))
        split_rows = []
        for label in labels:
            shown = {"colour": colours[rng.integers(len(colours))], "shape": SHAPES[rng.integers(len(SHAPES))],
                     "pitch": pitches[rng.integers(2)]}
            if aligned:
                shown["pitch"] = SHAPE_PITCHES[shown["shape"]]
            # rounded here, so the CSV holds the very frequency the tone is made at
            pitch_hz = round(float(rng.uniform(*ALIGNED_PITCHES[shown["pitch"]])), 1)
            caption = dict(shown)
            kind = next(kinds) if label == "mismatch" else "none"
            if kind != "none":
                choices = {"colour": colours, "shape": SHAPES, "pitch": pitches}[kind]
                others = [value for value in choices if value != shown[kind]]
                caption[kind] = others[rng.integers(len(others))]
            with_background = bool(next(names_background))
            templates = BACKGROUND_CAPTION_TEMPLATES if with_background else CAPTION_TEMPLATES
            template = templates[rng.integers(len(templates))]
            caption_colours = [caption["colour"], BACKGROUND] if with_background else [caption["colour"]]
            split_rows.append({
                "text": template.format(**{**caption, "pitch": PITCH_WORDS[caption["pitch"]],
                                           "background": BACKGROUND}),
                "image": f"images/{index:05d}.png",
                "audio": f"audio/{index:05d}.wav",
                "label": label,
                **shown,
                "pitch_hz": pitch_hz,
                **{f"caption_{key}": value for key, value in caption.items()},
                "caption_colours": CAPTION_COLOURS_SEPARATOR.join(caption_colours),
                "mismatch": kind,
            })
            index += 1
        splits[split] = split_rows
    _add_questions(splits, np.random.default_rng([parameters["seed"], 2]))
    return splits


def _add_questions(splits: dict[str, list[dict]], rng: np.random.Generator) -> None:
    """Give each row one question (the kinds balanced within each split), its answer, and the description of what
    the row shows. Drawn from a generator of their own, so that every other column is what it was before they
    existed."""
    for split_rows in splits.values():
        kinds = _balanced(tuple(QUESTIONS), len(split_rows), rng)
        for row, kind in zip(split_rows, kinds):
            description = DESCRIPTION_TEMPLATE.format(colour=row["colour"], shape=row["shape"],
                                                      pitch=PITCH_WORDS[row["pitch"]])
            answers = {"colour": row["colour"], "shape": f"a {row['shape']}", "pitch": PITCH_WORDS[row["pitch"]],
                       "match": "yes" if row["label"] == "match" else "no", "describe": description}
            row.update(question=QUESTIONS[kind][0], answer=answers[kind], question_kind=kind,
                       needs=QUESTIONS[kind][1], description=description)


# ---- the media -----------------------------------------------------------------------------------------------------

def _draw_image(colour: str, shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    background = int(rng.integers(200, 241))
    image = Image.new("RGB", (size, size), (background,) * 3)
    fill = tuple(int(np.clip(c + rng.integers(-15, 16), 0, 255)) for c in COLOURS[colour])
    # Nearly filling the image and centred. The random-init ViT sees 8x8-pixel patches: a shape drawn at 70% of the
    # side differs from another in ~15-35% of the pixels of its edge patches only, and fusion took 1900+ steps (some
    # seeds never got there) to learn to compare shapes; at 85-95% the corner and edge patches differ outright
    # (and more of every patch shows the colour), and fusion learns all three comparisons in ~600 steps.
    extent = size * rng.uniform(0.85, 0.95)  # side / diameter of the shape
    centre = size / 2 + rng.uniform(-0.02, 0.02, size=2) * size
    left, top = centre - extent / 2
    right, bottom = centre + extent / 2
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=fill)
    elif shape == "square":
        draw.rectangle((left, top, right, bottom), fill=fill)
    else:
        draw.polygon([(centre[0], top), (right, bottom), (left, bottom)], fill=fill)
    return image


def _tone(frequency: float, seconds: float, sampling_rate: int, rng: np.random.Generator) -> np.ndarray:
    """A sine at `frequency` Hz with random amplitude and phase, 5 ms fades and faint noise: int16."""
    samples = int(round(seconds * sampling_rate))
    time = np.arange(samples) / sampling_rate
    signal = rng.uniform(0.3, 0.6) * np.sin(2 * np.pi * frequency * time + rng.uniform(0, 2 * np.pi))
    fade = min(samples // 2, int(0.005 * sampling_rate))
    if fade:
        ramp = np.linspace(0.0, 1.0, fade)
        signal[:fade] *= ramp
        signal[samples - fade :] *= ramp[::-1]
    signal += rng.normal(0.0, 0.01, samples)
    return np.round(np.clip(signal, -1.0, 1.0) * 32767).astype("<i2")


def _write_wav(path: Path, samples: np.ndarray, sampling_rate: int) -> None:
    with wave.open(str(path), "wb") as file:
        file.setnchannels(1)
        file.setsampwidth(2)
        file.setframerate(sampling_rate)
        file.writeframes(samples.tobytes())


def _write_sample(folder: Path, parameters: dict) -> None:
    (folder / "images").mkdir()
    (folder / "audio").mkdir()
    for split, split_rows in _make_rows(parameters).items():
        for row in split_rows:
            index = int(Path(row["image"]).stem)
            # one generator per row: a file depends only on (seed, row), never on the order of writing
            rng = np.random.default_rng([parameters["seed"], 1, index])
            _draw_image(row["colour"], row["shape"], parameters["image_size"], rng).save(folder / row["image"])
            tone = _tone(row["pitch_hz"], parameters["audio_seconds"], parameters["sampling_rate"], rng)
            _write_wav(folder / row["audio"], tone, parameters["sampling_rate"])
        with open(folder / f"{split}.csv", "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(split_rows)


def write_examples(sample: str | os.PathLike, folder: str | os.PathLike, per_kind: int = 2) -> Path:
    """Copy a few test rows (`per_kind` matches and `per_kind` of each mismatch kind) with their files into
    `folder`: `examples.csv` (text, image, audio, label; paths relative to the CSV) plus the files. A model trained on
    the sample ships them, so its demo works on the first click. Returns `folder`."""
    sample, folder = Path(sample), Path(folder)
    with open(sample / "test.csv", newline="") as file:
        test_rows = list(csv.DictReader(file))
    chosen = []
    for kind in ("none", *MISMATCH_KINDS):
        chosen += [row for row in test_rows if row["mismatch"] == kind][:per_kind]
    chosen.sort(key=lambda row: row["image"])
    for sub in ("images", "audio"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for row in chosen:
        shutil.copyfile(sample / row["image"], folder / row["image"])
        shutil.copyfile(sample / row["audio"], folder / row["audio"])
    with open(folder / "examples.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=("text", "image", "audio", "label"), lineterminator="\n",
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(chosen)
    return folder


def save_sample_towers(folder: Path, image_size: int = 32) -> None:
    """Small random-init vision (ViT) and audio (wav2vec2, layer-norm encoder) towers with their processors, saved
    like Hub checkpoints: the sample's shapes and tones need no pretrained features. Idempotent."""
    import torch  # imported here: generating the sample itself needs no torch
    from transformers import ViTConfig, ViTImageProcessor, ViTModel, Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    vision, audio = folder / "vision", folder / "audio"
    if not (vision / "config.json").exists():
        torch.manual_seed(0)
        ViTModel(ViTConfig(image_size=image_size, patch_size=8, **small)).save_pretrained(vision)
        ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(vision)
    if not (audio / "config.json").exists():
        torch.manual_seed(0)
        # 320x downsampling (20 ms frames like wav2vec2-base, in 4 instead of 7 convolutions): 50 frames per second
        config = Wav2Vec2Config(conv_dim=(32, 32, 32, 32), conv_stride=(5, 4, 4, 4), conv_kernel=(10, 8, 4, 4),
                                num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, feat_extract_norm="layer",
                                do_stable_layer_norm=True, mask_time_prob=0.0, layerdrop=0.0, **small)
        Wav2Vec2Model(config).save_pretrained(audio)
        Wav2Vec2FeatureExtractor(sampling_rate=16_000, return_attention_mask=True).save_pretrained(audio)


def save_sample_decoder(folder: Path, tokenizer_source: str | os.PathLike, width: int = 128) -> None:
    """A small random-init GPT-2 decoder LM over the tokenizer at `tokenizer_source` (the text tower's: no pretrained
    decoder ships offline), saved like a Hub checkpoint with that tokenizer; the tokenizer's [CLS]/[SEP]/[PAD] (or
    bos/eos/pad) are its special tokens. Idempotent."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    if (folder / "config.json").exists():
        return
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=width, n_layer=2, n_head=4, n_positions=256,
                        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=None, help="Folder to write (default: the cache, see default_sample_dir).")
    parser.add_argument("--rows", type=int, default=3000, help="Rows over all splits (80/10/10).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the rows and the media.")
    parser.add_argument("--image_size", type=int, default=32, help="Image side in pixels.")
    parser.add_argument("--audio_seconds", type=float, default=1.0, help="Length of each tone.")
    parser.add_argument("--sampling_rate", type=int, default=16_000, help="Sampling rate of the WAV files.")
    parser.add_argument("--variant", default="default", choices=VARIANTS,
                        help="default (match/mismatch captions) or aligned (joint embedding: every caption true, "
                             "each shape with its own tone).")
    args = parser.parse_args(argv)
    root = generate_sample(args.output, args.rows, args.seed, args.image_size, args.audio_seconds, args.sampling_rate,
                           args.variant)
    print(root)


if __name__ == "__main__":
    main()
