"""Frozen towers' outputs, computed once per row and reused every epoch.

A frozen tower is a fixed function of its input (it has nothing to train, so it runs in eval mode: see
`MMFusionModel.train`). Running it every epoch recomputes the same states, and decoding its files every epoch re-reads
the same bytes. `mm-train` (`--cache_frozen_towers`, on by default) therefore runs each frozen tower once over every
split before training, keeps what fusion reads from it (`MMFusionModel.encode_tower`) in memory, and feeds that to the
model as `tower_states`; only the modalities of towers that train are decoded per step. The model's outputs are the
same as from raw inputs (up to float rounding from different batch shapes).

On the built-in sample (all towers frozen) this makes a training step ~3x faster: the frozen all-MiniLM-L6-v2 forward
was two thirds of a step's FLOPs. The cache is skipped, with a warning, when it would take more than half of the
memory available.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import psutil
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from modeling_mm.modeling_mm import PRESENCE_KEYS, TOWER_INPUT_NAMES
from training.data import MMFusionCollator
from training.scoring import fusion_model

logger = logging.getLogger(__name__)

MEMORY_SHARE = 0.5  # of the memory available when caching starts


def frozen_modalities(model: torch.nn.Module) -> tuple[str, ...]:
    """The modalities whose tower has no trainable parameter."""
    base = fusion_model(model)
    return tuple(m for m in base.modalities if not any(p.requires_grad for p in base.get_tower(m).parameters()))


# `list[Tensor | None]` per modality: each row's states trimmed to its real tokens, or None where it lacks the modality
TowerCache = dict[str, list[torch.Tensor | None]]


@torch.no_grad()
def compute_tower_cache(accelerator: Accelerator, model: torch.nn.Module, splits: dict[str, Any],
                        collator: MMFusionCollator, modalities: Sequence[str], batch_size: int,
                        num_workers: int) -> dict[str, TowerCache] | None:
    """Run the towers of `modalities` once over every row of every split (each process takes every
    `num_processes`-th row; all processes get the whole cache). Returns None, having logged why, when the cache
    would take more than `MEMORY_SHARE` of the available memory."""
    base = fusion_model(model)
    was_training = base.training
    base.eval()
    reader = collator.restricted_to(modalities)
    budget = MEMORY_SHARE * psutil.virtual_memory().available
    total_rows = sum(len(split) for split in splits.values())
    caches: dict[str, TowerCache] = {}
    used = 0
    progress = tqdm(total=total_rows, desc=f"caching frozen towers ({', '.join(modalities)})",
                    disable=not accelerator.is_local_main_process)
    for name, split in splits.items():
        rows = list(range(accelerator.process_index, len(split), accelerator.num_processes))
        loader = DataLoader(Subset(split, rows), batch_size=batch_size, collate_fn=reader, num_workers=num_workers)
        mine: list[tuple[int, dict[str, torch.Tensor | None]]] = []
        position = 0
        for batch in loader:
            batch = {k: v.to(accelerator.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            count = min(batch_size, len(rows) - position)  # the loader keeps the order, so this batch's rows
            states = {m: [None] * count for m in modalities}
            for modality in modalities:
                present = batch.get(PRESENCE_KEYS[modality])
                if present is None or not bool(present.any()):
                    continue
                index = present.nonzero().squeeze(1)
                inputs = {k: batch[k][index] for k in TOWER_INPUT_NAMES[modality] if batch.get(k) is not None}
                with accelerator.autocast():
                    tower_states, token_mask = base.encode_tower(modality, **inputs)
                for i, row_states, row_mask in zip(index.tolist(), tower_states, token_mask):
                    # real tokens come first (padding is on the right), so a row keeps only its own length
                    states[modality][i] = row_states[: int(row_mask.sum())].cpu().clone()
                    used += states[modality][i].nbytes
            mine += [(rows[position + i], {m: states[m][i] for m in modalities}) for i in range(count)]
            position += count
            progress.update(count * accelerator.num_processes)
            if used * accelerator.num_processes * total_rows / max(1, progress.n) > budget:
                break
        over_budget = torch.tensor(float(used * accelerator.num_processes * total_rows / max(1, progress.n) > budget),
                                   device=accelerator.device)
        if bool(accelerator.reduce(over_budget, "sum") > 0):
            progress.close()
            logger.warning("not caching the frozen towers: their outputs would take ~%.1f GiB, over half of the "
                           "%.1f GiB available; they run every step instead",
                           used * accelerator.num_processes * total_rows / max(1, progress.n) / 2**30,
                           psutil.virtual_memory().available / 2**30)
            base.train(was_training)
            return None
        gathered = gather_object(mine) if accelerator.num_processes > 1 else mine
        cache: TowerCache = {m: [None] * len(split) for m in modalities}
        for row, row_states in gathered:
            for modality in modalities:
                cache[modality][row] = row_states[modality]
        caches[name] = cache
    progress.close()
    base.train(was_training)
    logger.info("cached the frozen towers' outputs (%s) for %d rows: %.1f MiB", ", ".join(modalities), total_rows,
                used * accelerator.num_processes / 2**20)
    return caches


class CachedTowersDataset(Dataset):
    """The rows of a split, each with its cached tower states."""

    def __init__(self, split: Any, cache: TowerCache):
        self.split, self.cache = split, cache

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"row": self.split[index], "states": {m: states[index] for m, states in self.cache.items()}}


class CachedTowersCollator:
    """A batch of `CachedTowersDataset` items: the processor runs for the modalities that are not cached; the cached
    ones are padded into `tower_states` (right padding, with a mask of real tokens) and their `has_*` flags."""

    def __init__(self, collator: MMFusionCollator, cached: Sequence[str]):
        self.cached = tuple(cached)
        self.reader = collator.restricted_to([m for m in collator.model_modalities if m not in self.cached])

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch = self.reader([item["row"] for item in items])
        tower_states = {}
        for modality in self.cached:
            states = [item["states"][modality] for item in items]
            present = torch.tensor([s is not None for s in states])
            batch[PRESENCE_KEYS[modality]] = present
            if not bool(present.any()):
                continue
            real = [s for s in states if s is not None]
            padded = real[0].new_zeros(len(items), max(len(s) for s in real), real[0].shape[-1])
            token_mask = torch.zeros(padded.shape[:2], dtype=torch.bool)
            for i, row_states in enumerate(states):
                if row_states is not None:
                    padded[i, : len(row_states)] = row_states
                    token_mask[i, : len(row_states)] = True
            tower_states[modality] = (padded, token_mask)
        batch["tower_states"] = tower_states
        return batch
