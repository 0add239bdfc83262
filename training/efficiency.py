"""Efficiency of a model's forward pass: parameter counts per part (towers, fusion, head), latency and throughput,
peak memory (CUDA allocator or the process's peak RSS), and FLOPs per sample split by part.

    >>> from training.efficiency import parameter_counts
    >>> parameter_counts(model)["fusion"]  # doctest: +SKIP
    {'total': 404736, 'trainable': 404736}
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from modeling_mm.configuration_mm import MODALITY_NAMES
from training.scoring import classifier, eval_mode


def parameter_counts(model: torch.nn.Module) -> dict[str, dict[str, int]]:
    """Total and trainable parameters of each part: each tower ("image_tower", "text_tower", "audio_tower"),
    "fusion" (input projections, fusion layers, final norms), "head" (classifier), and "total". LoRA weights count
    in their tower; of a peft `modules_to_save` module only the trained copy counts, not the frozen original.
    Trainable means `requires_grad` now: what mm-train trains in its final evaluation, none for a loaded folder."""
    parts = {**_parts(model), "total": [model]}

    def count(modules):
        parameters = [p for module in modules for name, p in module.named_parameters()
                      if "original_module." not in name]
        return {"total": sum(p.numel() for p in parameters),
                "trainable": sum(p.numel() for p in parameters if p.requires_grad)}

    return {name: count(modules) for name, modules in parts.items()}


def _parts(model: torch.nn.Module) -> dict[str, list[torch.nn.Module]]:
    """The modules of each part: "image_tower", "text_tower", "audio_tower" (those the model has), "fusion"
    (input projections, fusion layers, final norms) and "head" (the classifier, or a multi-task model's heads)."""
    base = classifier(model)
    fusion = base.model
    parts = {f"{MODALITY_NAMES[m].user}_tower": [fusion.get_tower(m)] for m in fusion.modalities}
    parts["fusion"] = [fusion.input_projections, fusion.fusion_layers, fusion.final_norms]
    parts["head"] = ([base.classifier] if hasattr(base, "classifier") else
                     [base.heads] + ([base.task_weighting] if base.task_weighting is not None else []))
    return parts


def _part_names(model: torch.nn.Module) -> dict[str, list[str]]:
    """Module names (as in model.named_modules()) of each part, to split FLOPs by part."""
    names = {id(module): name for name, module in model.named_modules()}
    return {part: [names[id(m)] for m in modules] for part, modules in _parts(model).items()}


def measure_efficiency(model: torch.nn.Module, single: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
                       runs: int = 20) -> dict[str, Any]:
    """Latency p50/p95 of `runs` forward passes on the one-sample batch `single` (after 3 warm-up passes), throughput
    on `batch`, peak memory, and FLOPs per sample (torch.utils.flop_counter.FlopCounterMode on `single`). Model
    forward only: decoding and the processor are not timed."""
    from torch.utils.flop_counter import FlopCounterMode

    part_names = _part_names(model)  # refuses a model without a classification head before any timing
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    single = {k: v.to(device) for k, v in single.items()}
    batch = {k: v.to(device) for k, v in batch.items()}
    batch_size = len(next(iter(batch.values())))

    def timed(inputs) -> float:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model(**inputs)
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    with eval_mode(model), torch.no_grad():
        for _ in range(3):
            timed(single)
        latencies = [timed(single) for _ in tqdm(range(runs), desc="latency", leave=False)]
        timed(batch)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        rss_before = _peak_rss_bytes()
        batch_times = [timed(batch) for _ in tqdm(range(max(3, runs // 4)), desc="throughput", leave=False)]
        memory = ({"peak_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
                   "what": "torch.cuda.max_memory_allocated during the throughput runs"} if cuda else
                  {"peak_rss_bytes": _peak_rss_bytes(),
                   "peak_rss_growth_bytes": None if rss_before is None else _peak_rss_bytes() - rss_before,
                   "what": "the process's peak resident set size (resource.getrusage), and its growth during the "
                           "throughput runs (0 when an earlier peak was higher); None where the platform lacks it"})
        with FlopCounterMode(display=False) as counter:
            model(**single)
    flop_counts = {name.split(".", 1)[1] if "." in name else "": sum(ops.values())
                   for name, ops in counter.get_flop_counts().items() if name != "Global"}
    flops_by_part = {part: _flops_under(flop_counts, names) for part, names in part_names.items()}
    latencies_ms = np.array(latencies) * 1000
    return {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "what": "model forward only (no decoding, no processor), eval mode, no_grad",
        "latency_batch_1_ms": {"p50": float(np.percentile(latencies_ms, 50)),
                               "p95": float(np.percentile(latencies_ms, 95)), "runs": runs},
        "throughput": {"batch_size": batch_size, "samples_per_second": float(batch_size / np.median(batch_times)),
                       "runs": len(batch_times)},
        "memory": memory,
        "flops_per_sample": int(counter.get_total_flops()),
        "flops_per_sample_by_part": flops_by_part,
    }


def _flops_under(flop_counts: dict[str, int], prefixes: Sequence[str]) -> int:
    """FLOPs of the modules under `prefixes`. Containers (ModuleDict, ModuleList) are never called, so the counter
    lists their children instead: sum the outermost counted modules under each prefix, never a child twice."""
    matching = [name for name in flop_counts for prefix in prefixes if name == prefix or name.startswith(prefix + ".")]
    outermost = [name for name in matching if not any(name.startswith(other + ".") for other in matching)]
    return int(sum(flop_counts[name] for name in outermost))


def _peak_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux
