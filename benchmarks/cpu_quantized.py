"""Batch-1 CPU latency and test accuracy of an mm-fusion classifier in float32 and with dynamic int8 Linears, in one
run, side by side.

Variants: float32; `training.quantize.quantize_for_cpu` as `mm-demo --quantize` uses it (int8 where a Linear has at
least 2**17 weights); and, to show why that default, int8 on every Linear and int8 on the fusion layers and head only.
Every test row is pre-processed once at batch 1 (the processor's cost does not depend on the variant); then each
row runs through every variant back to back, so load from elsewhere on the machine hits all of them alike. Latency
is the model's forward only (as in mm-eval's efficiency section); the speed-up is the median of per-row ratios.
Target (issue #8): int8 >= 1.5x faster than float32 at batch 1, test accuracy within 1 point. On a machine shared
with other jobs, `--threads 1` gives steadier numbers: two OpenMP threads that wait for a busy core stall every op.

A second table times the same two paths at base size (random init, as benchmarks/gpu.py builds it: ViT-B/16 224 px,
BERT-base 128 tokens, wav2vec2-base 5 s, 2 fusion layers of width 768): how much int8 gains depends on the share of
the latency spent in Linears, which is far larger there than in the sample model's small towers and fusion.

    .venv/bin/python benchmarks/cpu_quantized.py [--model outputs/sample/model] [--data TEST.csv] [--threads 2]
                                                 [--rows N] [--warmup 10] [--base-size base|tiny|none]
                                                 [--base-repeats 8] [--json report.json]
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import torch

from gpu import fusion_config, sizes, synthetic_inputs  # this folder: the script's own directory is on sys.path
from modeling_mm import MMFusionForSequenceClassification
from processors import MMFusionProcessor
from training.data import DataSettings, MMFusionCollator, load_table
from training.lora import load_trained_model
from training.quantize import MIN_QUANTIZED_WEIGHTS, quantize_for_cpu, quantized_linear_count

TARGET_SPEEDUP, TARGET_ACCURACY_DROP = 1.5, 0.01


def build_variants(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    towers = [f"model.{modality}_model" for modality in model.config.modalities]
    return {
        "float32": model,
        f"int8 (quantize_for_cpu: Linears >= {MIN_QUANTIZED_WEIGHTS} weights)": quantize_for_cpu(copy.deepcopy(model)),
        "int8, every Linear": quantize_for_cpu(copy.deepcopy(model), min_weights=0),
        "int8, fusion layers and head only": quantize_for_cpu(copy.deepcopy(model), min_weights=0, skip=towers),
    }


def weights_megabytes(model: torch.nn.Module) -> float:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell() / 2**20


def batches_of_one(model_dir: str, data: str, rows: int | None, config) -> list[dict[str, torch.Tensor]]:
    """Every row of `data` (the first `rows`) as a batch of one, through the model's own processor."""
    processor = MMFusionProcessor.from_pretrained(model_dir)
    collator = MMFusionCollator(processor, DataSettings(), [config.id2label[i] for i in range(config.num_labels)])
    table = load_table(data)["train"]
    count = len(table) if rows is None else min(rows, len(table))
    return [collator([table[i]]) for i in range(count)]


def linear_share(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Share of `model`'s CPU time over `batches` (torch profiler, self time of every op) spent in Linear matmuls: the
    part dynamic int8 can speed up."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as profiler:
        for batch in batches:
            model(**batch)
    events = profiler.key_averages()
    total = sum(event.self_cpu_time_total for event in events)
    linear = sum(event.self_cpu_time_total for event in events if event.key in ("aten::addmm", "aten::mm"))
    return linear / total if total else 0.0


def base_size_latency(size: str, repeats: int) -> dict:
    """Batch-1 latency of a random-init classifier at base size (or tiny), float32 and quantize_for_cpu, interleaved."""
    run = sizes(tiny=size == "tiny", batch_size=1)
    torch.manual_seed(0)
    float32 = MMFusionForSequenceClassification(fusion_config(run, num_labels=2)).eval()
    int8 = quantize_for_cpu(copy.deepcopy(float32))
    batch = synthetic_inputs(run, torch.device("cpu"))
    batch.pop("labels")
    times = {"float32": [], "int8": []}
    with torch.inference_mode():
        for model in (float32, int8):  # warm-up
            model(**batch)
        for _ in range(repeats):
            for name, model in (("float32", float32), ("int8", int8)):
                start = time.perf_counter()
                model(**batch)
                times[name].append((time.perf_counter() - start) * 1e3)
    return {
        "size": size, "image_size": run["image_size"], "tokens": run["tokens"], "audio_seconds": run["audio_seconds"],
        "fusion_width": run["width"], "repeats": repeats,
        "linear_share_of_float32_cpu_time": linear_share(float32, [batch]),
        "quantized_linears": quantized_linear_count(int8),
        "latency_batch_1_ms": {name: statistics.median(values) for name, values in times.items()},
        "speedup_vs_float32": statistics.median(f / t for f, t in zip(times["float32"], times["int8"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="outputs/sample/model", help="model folder written by mm-train")
    parser.add_argument("--data", default=None, help="test table (default: the built-in sample's test.csv)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=None, help="only the first N test rows")
    parser.add_argument("--warmup", type=int, default=10, help="untimed rows per variant first")
    parser.add_argument("--base-size", choices=["base", "tiny", "none"], default="base",
                        help="also time float32 and int8 on a random-init model of this size (tiny: for tests)")
    parser.add_argument("--base-repeats", type=int, default=8, help="timed forwards per variant at base size")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.data is None:
        from training.sample_data import generate_sample

        args.data = str(generate_sample() / "test.csv")  # the cached sample, generated on first use

    model = load_trained_model(args.model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model = model.float().eval()
    batches = batches_of_one(args.model, args.data, args.rows, model.config)
    variants = build_variants(model)
    labels = np.array([int(batch.pop("labels")) for batch in batches])

    times = {name: [] for name in variants}
    logits = {name: [] for name in variants}
    with torch.inference_mode():
        for batch in batches[: args.warmup]:
            for variant in variants.values():
                variant(**batch)
        for batch in batches:
            for name, variant in variants.items():
                start = time.perf_counter()
                output = variant(**batch).logits
                times[name].append((time.perf_counter() - start) * 1e3)
                logits[name].append(output[0].float().numpy())

    sample_linear_share = linear_share(model, batches[:20])  # one row alone varied by +-10 points
    base = base_size_latency(args.base_size, args.base_repeats) if args.base_size != "none" else None

    reference = "float32"
    reference_predictions = np.stack(logits[reference]).argmax(-1)
    results = []
    for name, variant in variants.items():
        latencies, scores = np.array(times[name]), np.stack(logits[name])
        predictions = scores.argmax(-1)
        results.append({
            "variant": name,
            "quantized_linears": quantized_linear_count(variant),
            "float32_linears": sum(isinstance(m, torch.nn.Linear) for m in variant.modules()),
            "weights_mb": weights_megabytes(variant),
            "latency_batch_1_ms": {"p50": float(np.percentile(latencies, 50)),
                                   "p95": float(np.percentile(latencies, 95))},
            "speedup_vs_float32": statistics.median(f / t for f, t in zip(times[reference], times[name])),
            "accuracy": float((predictions == labels).mean()),
            "agreement_with_float32": float((predictions == reference_predictions).mean()),
            "max_abs_logit_difference": float(np.abs(scores - np.stack(logits[reference])).max()),
        })
    chosen = results[1]
    meets = {"speedup": chosen["speedup_vs_float32"] >= TARGET_SPEEDUP,
             "accuracy": results[0]["accuracy"] - chosen["accuracy"] <= TARGET_ACCURACY_DROP}

    print(f"CPU batch-1 inference, {args.threads} threads, torch {torch.__version__} "
          f"({torch.backends.quantized.engine} int8 kernels), {len(batches)} test rows of {args.data}")
    print(f"model: {args.model}; latency is the model forward only, rows interleaved across variants")
    print(f"{'variant':<50} {'int8/Linears':>12} {'MB':>6} {'p50 ms':>7} {'p95 ms':>7} {'speed-up':>8} "
          f"{'accuracy':>8} {'agree':>6}")
    for r in results:
        print(f"{r['variant']:<50} {r['quantized_linears']:>5}/{r['quantized_linears'] + r['float32_linears']:<6} "
              f"{r['weights_mb']:>6.1f} {r['latency_batch_1_ms']['p50']:>7.1f} {r['latency_batch_1_ms']['p95']:>7.1f} "
              f"{r['speedup_vs_float32']:>7.2f}x {r['accuracy']:>8.3f} {r['agreement_with_float32']:>6.3f}")
    print(f"target: int8 >= {TARGET_SPEEDUP}x faster than float32 at batch 1 "
          f"({'met' if meets['speedup'] else 'NOT met'}), accuracy within {TARGET_ACCURACY_DROP * 100:.0f} point "
          f"({'met' if meets['accuracy'] else 'NOT met'})")
    print(f"share of the float32 sample model's CPU time in Linear matmuls (what int8 speeds up): "
          f"{sample_linear_share:.0%}")
    if base is not None:
        latency = base["latency_batch_1_ms"]
        print(f"\nrandom-init model at {args.base_size} size ({base['image_size']} px, {base['tokens']} tokens, "
              f"{base['audio_seconds']:g} s audio, fusion width {base['fusion_width']}), batch 1, "
              f"{base['repeats']} repeats; Linear matmuls are {base['linear_share_of_float32_cpu_time']:.0%} "
              "of its float32 CPU time")
        print(f"{'variant':<50} {'int8 Linears':>12} {'median ms':>10} {'speed-up':>8}")
        print(f"{'float32':<50} {0:>12} {latency['float32']:>10.1f} {1:>7.2f}x")
        print(f"{'int8 (quantize_for_cpu)':<50} {base['quantized_linears']:>12} {latency['int8']:>10.1f} "
              f"{base['speedup_vs_float32']:>7.2f}x")
    if args.json:
        report = {"model": args.model, "data": args.data, "rows": len(batches), "threads": args.threads,
                  "torch": torch.__version__, "quantized_engine": torch.backends.quantized.engine,
                  "what": "model forward only, batch 1, eval mode, inference_mode; rows interleaved across variants",
                  "variants": results, "chosen": chosen["variant"],
                  "linear_share_of_float32_cpu_time": sample_linear_share, "base_size": base,
                  "target": {"speedup": TARGET_SPEEDUP, "accuracy_drop": TARGET_ACCURACY_DROP, "met": meets}}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
