"""Robustness corruptions: noise, blur and typos applied to decoded media (before the processor), each seeded per
(seed, corruption, level, row), so a row's corruption never depends on batching, order or workers.

    >>> from training.corruptions import Corruption, corrupt
    >>> corrupt(Corruption("text_typos", 0.0, 0), "a red circle", seed=42, row=0)
    'a red circle'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageFilter

from modeling_mm.configuration_mm import MODALITY_NAMES

if TYPE_CHECKING:
    from training.evaluation import EvaluationSettings

CORRUPTION_KINDS = ("audio_noise", "image_blur", "image_noise", "text_typos")
CORRUPTION_MODALITY = {"audio_noise": "audio", "image_blur": "vision", "image_noise": "vision", "text_typos": "text"}
CORRUPTION_LEVEL_NAMES = {"audio_noise": "SNR (dB)", "image_blur": "blur radius (px)",
                          "image_noise": "noise std (fraction of 255)", "text_typos": "typo rate per character"}


def corrupt_audio(waveform: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """Add white Gaussian noise at `snr_db` dB below the waveform's mean power."""
    waveform = np.asarray(waveform, dtype=np.float32)
    power = float(np.mean(waveform.astype(np.float64) ** 2))
    noise_std = math.sqrt(power / 10 ** (snr_db / 10)) if power > 0 else 0.0
    return (waveform + rng.normal(0.0, noise_std, waveform.shape)).astype(np.float32)


def corrupt_image_blur(image: Image.Image, radius: float) -> Image.Image:
    """PIL's Gaussian blur with `radius` pixels (of the image as decoded)."""
    return image.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else image


def corrupt_image_noise(image: Image.Image, std: float, rng: np.random.Generator) -> Image.Image:
    """Add Gaussian noise of `std` x 255 to every pixel channel, clipped to [0, 255]."""
    pixels = np.asarray(image, dtype=np.float64)
    noisy = np.clip(pixels + rng.normal(0.0, std * 255.0, pixels.shape), 0, 255)
    return Image.fromarray(np.round(noisy).astype(np.uint8), mode=image.mode)


def corrupt_text(text: str, rate: float, rng: np.random.Generator) -> str:
    """Character-level typos: each character, with probability `rate`, is swapped with the next one, deleted,
    doubled by a random lowercase letter inserted after it, or substituted by one (each kind equally likely).
    Never returns an empty string (the processor refuses empty text)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    characters, output, i = list(text), [], 0
    while i < len(characters):
        character = characters[i]
        if rng.random() >= rate:
            output.append(character)
            i += 1
            continue
        kind = rng.integers(4)
        if kind == 0 and i + 1 < len(characters):  # swap with the next character
            output += [characters[i + 1], character]
            i += 2
            continue
        if kind == 2:  # insert
            output += [character, letters[rng.integers(26)]]
        elif kind == 3 or kind == 0:  # substitute (also a swap at the last character)
            output.append(letters[rng.integers(26)])
        i += 1  # kind 1: delete
    corrupted = "".join(output)
    return corrupted if corrupted.strip() else text[:1] if text.strip() else text


@dataclass(frozen=True)
class Corruption:
    """One robustness condition: a kind from `CORRUPTION_KINDS` at one level (SNR dB, blur radius, noise std or
    typo rate); `index` is the level's position, part of the per-row seed.

    Example:

    ```python
    >>> from training.corruptions import Corruption, robustness_conditions
    >>> from training.evaluation import EvaluationSettings
    >>> Corruption("audio_noise", -10.0, 3).name
    'audio_noise@-10'
    >>> [c.name for c in robustness_conditions(EvaluationSettings(), ("vision",))]
    ['image_blur@1', 'image_blur@2', 'image_blur@4', 'image_noise@0.05', 'image_noise@0.1', 'image_noise@0.2']
    ```
    """

    kind: str
    level: float
    index: int

    @property
    def name(self) -> str:
        """The condition's name in reports: kind@level."""
        return f"{self.kind}@{self.level:g}"

    @property
    def modality(self) -> str:
        """The model's stream the corruption changes ("vision", "text", "audio")."""
        return CORRUPTION_MODALITY[self.kind]

    @property
    def processor_argument(self) -> str:
        """The `MMFusionProcessor` argument whose values it changes ("images", "text", "audio")."""
        return MODALITY_NAMES[self.modality].processor_argument


def robustness_conditions(settings: EvaluationSettings, modalities: Sequence[str]) -> list[Corruption]:
    """The corruptions of `settings` (its `audio_snr_db`, `image_blur_radii`, `image_noise_std`, `text_typo_rates`)
    that apply to a model with these (internal) modalities."""
    levels = {"audio_noise": settings.audio_snr_db, "image_blur": settings.image_blur_radii,
              "image_noise": settings.image_noise_std, "text_typos": settings.text_typo_rates}
    return [Corruption(kind, float(level), index) for kind in CORRUPTION_KINDS
            if CORRUPTION_MODALITY[kind] in modalities for index, level in enumerate(levels[kind])]


def corrupt(corruption: Corruption, value: Any, seed: int, row: int) -> Any:
    """`value` (a decoded waveform, a PIL image or a text, as the corruption's modality takes) under `corruption`,
    with one numpy Generator per (seed, kind, level, row)."""
    rng = np.random.default_rng([seed, CORRUPTION_KINDS.index(corruption.kind), corruption.index, row])
    if corruption.kind == "audio_noise":
        return corrupt_audio(value, corruption.level, rng)
    if corruption.kind == "image_blur":
        return corrupt_image_blur(value, corruption.level)
    if corruption.kind == "image_noise":
        return corrupt_image_noise(value, corruption.level, rng)
    return corrupt_text(value, corruption.level, rng)

