"""Batch-1 CPU forward latency of a base-size mm-fusion model against its three towers run alone.

Base size: ViT-B/16 at 224 px, BERT-base on 128 tokens, wav2vec2-base on 5 s of 16 kHz audio, 2 fusion layers of
width 768, random init (nothing is downloaded). Prints a table; the target is fused / towers-alone <= 1.10.

    .venv/bin/python benchmarks/forward_cpu.py [--repeats 20] [--threads 2] [--fusion-layers 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import BertConfig, ViTConfig, Wav2Vec2Config

from modeling_mm import MMFusionConfig, MMFusionModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--fusion-layers", type=int, default=2)
    parser.add_argument("--fusion-hidden-size", type=int, default=768)
    parser.add_argument("--fusion-intermediate-size", type=int, default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny towers: checks the script runs, in seconds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    if args.tiny:
        towers = dict(
            vision_config=ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
            text_config=BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
            audio_config=Wav2Vec2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=128, conv_dim=(32,) * 7),
        )
        args.fusion_hidden_size, args.repeats = 64, 3
    else:
        towers = dict(vision_config=ViTConfig(), text_config=BertConfig(), audio_config=Wav2Vec2Config())
    width = args.fusion_hidden_size
    config = MMFusionConfig(
        **towers, fusion_hidden_size=width, fusion_num_layers=args.fusion_layers, fusion_num_heads=max(1, width // 64),
        fusion_intermediate_size=args.fusion_intermediate_size or 4 * width,
    )
    model = MMFusionModel(config).eval()

    image = torch.randn(1, 3, config.vision_config.image_size, config.vision_config.image_size)
    input_ids = torch.randint(1000, 2000, (1, 128))
    attention_mask = torch.ones_like(input_ids)
    audio = torch.randn(1, 5 * 16_000)
    audio_mask = torch.ones_like(audio, dtype=torch.long)

    def towers_alone():
        model.vision_model(pixel_values=image)
        model.text_model(input_ids=input_ids, attention_mask=attention_mask)
        model.audio_model(audio)

    def fused():
        model(pixel_values=image, input_ids=input_ids, attention_mask=attention_mask, input_values=audio,
              audio_attention_mask=audio_mask)

    # interleaved, so that load from elsewhere on the machine hits both sides alike
    calls = {"vision": lambda: model.vision_model(pixel_values=image),
             "text": lambda: model.text_model(input_ids=input_ids, attention_mask=attention_mask),
             "audio": lambda: model.audio_model(audio), "towers": towers_alone, "fused": fused}
    times = {name: [] for name in calls}
    with torch.inference_mode():
        for name, call in calls.items():
            call()  # warm-up
        for _ in range(args.repeats):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append((time.perf_counter() - start) * 1e3)
    stats = {name: (statistics.median(t), max(t) if len(t) < 10 else statistics.quantiles(t, n=10)[-1])
             for name, t in times.items()}
    rows = [("ViT-B/16 224 alone", *stats["vision"]), ("BERT-base 128 tokens alone", *stats["text"]),
            ("wav2vec2-base 5 s alone", *stats["audio"]), ("three towers alone, one after another", *stats["towers"]),
            (f"mm-fusion ({args.fusion_layers} fusion layers, width {width})", *stats["fused"])]
    ratio = statistics.median(f / t for f, t in zip(times["fused"], times["towers"]))

    fusion_params = sum(p.numel() for n, p in model.named_parameters() if not n.split(".")[0].endswith("_model"))
    print(f"CPU forward latency, batch 1, {args.threads} threads, torch {torch.__version__}, "
          f"fusion parameters {fusion_params / 1e6:.1f} M")
    print(f"{'model':<48} {'median ms':>10} {'p90 ms':>10}")
    for name, median, p90 in rows:
        print(f"{name:<48} {median:>10.1f} {p90:>10.1f}")
    print(f"{'fused / towers alone (median of paired runs)':<48} {ratio:>10.3f}   target <= 1.10: "
          f"{'met' if ratio <= 1.10 else 'NOT met'}")


if __name__ == "__main__":
    main()
