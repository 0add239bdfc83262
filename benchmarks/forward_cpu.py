"""Batch-1 CPU forward latency of base-size mm-fusion models against their three towers run alone.

Base size: ViT-B/16 at 224 px, BERT-base on 128 tokens, wav2vec2-base on 5 s of 16 kHz audio, 2 fusion layers,
random init (nothing is downloaded). The fusion width is the config default (256) and, for comparison, 512 and
768; all models share the same tower modules. Every repeat times the towers alone and each fused model back to
back, so load from elsewhere on the machine hits all of them alike; the ratio is the median of per-repeat ratios.
Target: fused / towers alone <= 1.10 at the default width.

    .venv/bin/python benchmarks/forward_cpu.py [--repeats 15] [--threads 2] [--widths 256 512 768] [--tiny]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModel, BertConfig, ViTConfig, Wav2Vec2Config

from modeling_mm import MMFusionConfig, MMFusionModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--fusion-layers", type=int, default=2)
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512, 768])
    parser.add_argument("--tiny", action="store_true", help="tiny towers: checks that the script runs, in seconds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    if args.tiny:
        small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
        tower_configs = dict(vision_config=ViTConfig(**small), text_config=BertConfig(**small),
                             audio_config=Wav2Vec2Config(conv_dim=(32,) * 7, **small))
        args.widths, args.repeats = [64], 3
    else:
        tower_configs = dict(vision_config=ViTConfig(), text_config=BertConfig(), audio_config=Wav2Vec2Config())
    towers = {f"{key.removesuffix('_config')}_model": AutoModel.from_config(config).eval()
              for key, config in tower_configs.items()}
    models = {}
    for width in args.widths:
        config = MMFusionConfig(**tower_configs, fusion_hidden_size=width, fusion_num_layers=args.fusion_layers,
                                fusion_num_heads=max(1, width // 64), fusion_intermediate_size=4 * width)
        models[width] = MMFusionModel(config, **towers).eval()

    image = torch.randn(1, 3, 224, 224)
    input_ids = torch.randint(1000, 2000, (1, 128))
    attention_mask = torch.ones_like(input_ids)
    audio = torch.randn(1, 5 * 16_000)
    audio_mask = torch.ones_like(audio, dtype=torch.long)
    calls = {
        "vision": lambda: towers["vision_model"](pixel_values=image),
        "text": lambda: towers["text_model"](input_ids=input_ids, attention_mask=attention_mask),
        "audio": lambda: towers["audio_model"](audio),
    }
    calls["towers"] = lambda: (calls["vision"](), calls["text"](), calls["audio"]())
    for width, model in models.items():
        calls[width] = lambda model=model: model(pixel_values=image, input_ids=input_ids, attention_mask=attention_mask,
                                                 input_values=audio, audio_attention_mask=audio_mask)

    times = {name: [] for name in calls}
    with torch.inference_mode():
        for call in calls.values():
            call()  # warm-up
        for _ in range(args.repeats):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append((time.perf_counter() - start) * 1e3)

    def p90(values):
        return max(values) if len(values) < 10 else statistics.quantiles(values, n=10)[-1]

    print(f"CPU forward latency, batch 1, {args.threads} threads, torch {torch.__version__}, {args.repeats} repeats")
    print(f"{'model':<52} {'median ms':>10} {'p90 ms':>8} {'fused/towers':>13}")
    names = {"vision": "ViT-B/16 224 alone", "text": "BERT-base 128 tokens alone", "audio": "wav2vec2-base 5 s alone",
             "towers": "three towers alone, one after another"}
    for name, label in names.items():
        print(f"{label:<52} {statistics.median(times[name]):>10.1f} {p90(times[name]):>8.1f}")
    for width, model in models.items():
        fusion_parameters = sum(p.numel() for n, p in model.named_parameters() if not n.split(".")[0].endswith("_model"))
        ratio = statistics.median(f / t for f, t in zip(times[width], times["towers"]))
        label = f"mm-fusion, {args.fusion_layers} layers, width {width} ({fusion_parameters / 1e6:.1f} M fusion params)"
        print(f"{label:<52} {statistics.median(times[width]):>10.1f} {p90(times[width]):>8.1f} {ratio:>13.3f}")
    print("target: fused / towers alone <= 1.10 at the default fusion width (256)")


if __name__ == "__main__":
    main()
