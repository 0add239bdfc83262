"""Items -> joint-embedding vectors with an `MMFusionContrastiveModel`: the one place where mm-eval's retrieval
section, `mm-index`, the demo's search tab and mm-train's validation turn texts, images and audio clips into vectors.

Each item is embedded from one modality alone (`get_{image,text,audio}_features`), so its vector does not depend on
the other items of its batch nor on the row's other modalities.

```python
>>> from training.embeddings import embed_items
>>> vectors = embed_items(model, processor, "text", ["a red circle", "a blue square"])  # (2, projection_dim)
```
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm

from modeling_mm.configuration_mm import MODALITY_NAMES
from training.scoring import _model_device_and_dtype, _to_model

# the user's names of the modalities (data columns, CLI flags, demo inputs) -> the model's
MODALITY_OF_USER_NAME = {names.user: modality for modality, names in MODALITY_NAMES.items()}


def contrastive_model(model: torch.nn.Module) -> torch.nn.Module:
    """The `MMFusionContrastiveModel` inside `model` (a PeftModel, DDP or Accelerate wrapper may wrap it). Raises
    `ValueError` naming `model` for any other model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base = getattr(base, "module", base)  # DDP
    if not getattr(base.config, "is_contrastive", False) or not hasattr(base, "get_text_features"):
        raise ValueError(f"model: {type(base).__name__} is not a joint embedding model; embeddings come from an "
                         "MMFusionContrastiveModel (mm-train --task contrastive)")
    return base


def model_modality(modality: str) -> str:
    """"image" -> "vision" (and "vision", "text", "audio" as they are); `ValueError` for anything else."""
    modality = MODALITY_OF_USER_NAME.get(modality, modality)
    if modality not in MODALITY_NAMES:
        raise ValueError(f"modality: {modality!r} is not one of {', '.join(MODALITY_OF_USER_NAME)}")
    return modality


@torch.no_grad()
def embed_items(model: torch.nn.Module, processor, modality: str, items: Sequence[Any], batch_size: int = 64,
                normalize: bool = True, progress: bool = False) -> torch.Tensor:
    """Embeddings `(len(items), projection_dim)`, float32 on the CPU, of `items` of one `modality` ("image"/"vision",
    "text" or "audio"): texts, or whatever the processor takes for images and audio (paths, bytes, PIL images,
    arrays, Gradio tuples). Unit vectors with `normalize`. Runs in eval mode without changing the model's mode.
    Raises `ValueError` for a model without that tower, and, naming the item's index, for an item the processor
    refuses (empty text, a corrupt or oversized file)."""
    base = contrastive_model(model)
    modality = model_modality(modality)
    if modality not in base.model.modalities:
        raise ValueError(f"modality: this model has no {MODALITY_NAMES[modality].user} tower (it has "
                         f"{', '.join(MODALITY_NAMES[m].user for m in base.model.modalities)})")
    names = MODALITY_NAMES[modality]
    get_features = getattr(base, f"get_{names.user}_features")
    device, dtype = _model_device_and_dtype(base)
    was_training = base.training
    base.eval()
    chunks = []
    try:
        for start in tqdm(range(0, len(items), batch_size), desc=f"embedding {names.user}", leave=False,
                          disable=not progress):
            part = list(items[start:start + batch_size])
            for offset, item in enumerate(part):
                if item is None or (isinstance(item, str) and not item.strip()):
                    raise ValueError(f"{names.user}: item {start + offset} is empty")
            try:
                batch = processor(**{names.processor_argument: part})
            except ValueError as error:
                raise ValueError(f"{names.user}: items {start}..{start + len(part) - 1}: {error}") from error
            inputs = {name: _to_model(batch[name], device, dtype) for name in names.inputs if batch.get(name) is not None}
            chunks.append(get_features(**inputs, normalize=normalize).float().cpu())
    finally:
        base.train(was_training)
    if not chunks:
        return torch.zeros(0, base.config.projection_dim)
    return torch.cat(chunks)


def column_items(dataset: datasets.Dataset, column: str, modality: str) -> list[Any]:
    """A data set's column of one modality as `embed_items` takes it: texts, or paths or bytes for (undecoded)
    image and audio cells; None where a row has nothing."""
    from training.data import _media, _text

    read = _text if model_modality(modality) == "text" else _media
    return [read(value) for value in dataset[column]]
