"""Training throughput of an mm-fusion LoRA step against the three towers trained alone, in one run.

On a GPU: base size (ViT-B/16 224 px, BERT-base 128 tokens, wav2vec2-base 5 s, 2 fusion layers of width 768, random
init), bf16 autocast, batch 32 by default. Without a GPU: a tiny configuration, so that the script cannot rot.
Prints samples/s, step time, peak memory and model FLOP utilisation: the FLOPs of the real step (forward and
backward, counted by torch's FLOP counter) per second, against a matmul peak measured in the same run (bf16 on the
GPU; fp32 on the CPU, where bf16 matmuls are emulated and slower).

    .venv/bin/python benchmarks/train_throughput.py [--batch-size 32] [--steps 10] [--tiny]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModel, BertConfig, ViTConfig, Wav2Vec2Config

from modeling_mm import MMFusionConfig, MMFusionForSequenceClassification
from training.lora import LoraSettings, apply_lora


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    size = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    repeats = 20 if device.type == "cuda" else 5
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(step, device: torch.device, steps: int) -> tuple[float, float, float]:
    """Seconds per step, training FLOPs per step, peak memory in GiB."""
    step()  # warm-up (and lazy allocations)
    with FlopCounterMode(display=False) as counter:
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return seconds, counter.get_total_flops(), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="tiny towers (the default without a GPU)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny or device.type == "cpu"
    dtype = torch.bfloat16
    torch.manual_seed(0)
    if tiny:
        small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
        towers = dict(vision_config=ViTConfig(image_size=64, patch_size=16, **small), text_config=BertConfig(**small),
                      audio_config=Wav2Vec2Config(conv_dim=(32,) * 7, **small))
        image_size, tokens, seconds, width, batch = 64, 32, 1.0, 64, min(args.batch_size, 8)
    else:
        towers = dict(vision_config=ViTConfig(), text_config=BertConfig(), audio_config=Wav2Vec2Config())
        image_size, tokens, seconds, width, batch = 224, 128, 5.0, 768, args.batch_size

    inputs = {
        "pixel_values": torch.randn(batch, 3, image_size, image_size, device=device),
        "input_ids": torch.randint(1000, 2000, (batch, tokens), device=device),
        "attention_mask": torch.ones(batch, tokens, dtype=torch.long, device=device),
        "input_values": torch.randn(batch, int(seconds * 16_000), device=device),
        "audio_attention_mask": torch.ones(batch, int(seconds * 16_000), dtype=torch.long, device=device),
    }
    labels = torch.randint(0, 2, (batch,), device=device)
    rows = []

    def training_step(model, optimizer, forward):
        def step():
            with torch.autocast(device.type, dtype=dtype):
                loss = forward(model)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    tower_inputs = {"vision": {"pixel_values": inputs["pixel_values"]},
                    "text": {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]},
                    "audio": {"input_values": inputs["input_values"]}}
    for modality, config in (("vision", towers["vision_config"]), ("text", towers["text_config"]),
                             ("audio", towers["audio_config"])):
        tower = AutoModel.from_config(config).to(device).train()
        optimizer = torch.optim.AdamW(tower.parameters(), lr=1e-5, fused=device.type == "cuda")
        step = training_step(tower, optimizer, lambda m, x=tower_inputs[modality]: m(**x).last_hidden_state.float().mean())
        rows.append((f"{modality} tower alone, full fine-tuning", *measure(step, device, args.steps)))
        del tower, optimizer
    harmonic = 1 / sum(1 / (batch / r[1]) for r in rows)  # the three trained one after another

    config = MMFusionConfig(**towers, fusion_hidden_size=width, fusion_num_heads=max(1, width // 64),
                            fusion_intermediate_size=4 * width, num_labels=2)
    model = apply_lora(MMFusionForSequenceClassification(config), LoraSettings()).to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                  fused=device.type == "cuda")
    step = training_step(model, optimizer, lambda m: m(**inputs, labels=labels).loss)
    rows.append((f"mm-fusion LoRA on all towers, width {width}", *measure(step, device, args.steps)))

    peak = matmul_peak_tflops(device, dtype if device.type == "cuda" else torch.float32)
    print(f"{device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU, tiny configuration'}), "
          f"batch {batch}, bf16 autocast, measured matmul peak {peak:.3f} TFLOP/s")
    print(f"{'step':<44} {'samples/s':>10} {'step ms':>9} {'peak GiB':>9} {'MFU':>7}")
    for name, seconds_per_step, flops, memory in rows:
        mfu = flops / seconds_per_step / (peak * 1e12)
        print(f"{name:<44} {batch / seconds_per_step:>10.1f} {seconds_per_step * 1e3:>9.1f} {memory:>9.2f} {mfu:>7.1%}")
    fused = batch / rows[-1][1]
    print(f"{'three towers trained one after another':<44} {harmonic:>10.1f}")
    print(f"mm-fusion LoRA / towers alone: {fused / harmonic:.2f}x (target >= 1.0x)")


if __name__ == "__main__":
    main()
