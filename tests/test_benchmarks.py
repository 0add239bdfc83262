"""benchmarks/gpu.py and benchmarks/cpu_quantized.py run end to end on the CPU and write every row of their tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import FUSION_KWARGS, REPO_ROOT

GPU_ROWS = {
    "vision_train", "text_train", "audio_train", "towers_train",
    "vision_inference", "text_inference", "audio_inference", "towers_inference",
    "lora_train", "full_train", "dynamic_train", "compiled_train", "inference", "tensors_train", "files_train",
}
GPU_TARGETS = {"LoRA training / towers' combined full fine-tuning": 1.0, "LoRA training MFU": 0.35,
               "inference / towers' combined inference": 1.0, "from files / from pre-made tensors": 0.9}


def run_script(arguments: list[str], tmp_path, timeout: float) -> str:
    # one thread, as in conftest: OpenMP threads spin-waiting for a busy second core make tiny steps 10-100x slower
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MM_FUSION_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, *arguments], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_gpu_benchmark_tiny_writes_every_row_and_target_with_positive_numbers(tmp_path):
    output = run_script(["benchmarks/gpu.py", "--tiny", "--json", str(tmp_path / "gpu.json")], tmp_path, timeout=240)
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert set(report["rows"]) == GPU_ROWS
    assert report["tiny"] and report["matmul_peak_tflops"] > 0
    for key, row in report["rows"].items():
        assert row["samples_per_second"] > 0 and row["step_ms"] > 0, key
        assert row["flops_per_step"] > 0 and row["mfu"] > 0, key
        if report["device"] == "cpu":
            assert row["peak_memory_gib"] is None, key  # torch keeps no peak for the CPU allocator
        else:
            assert row["peak_memory_gib"] > 0, key
        assert row["name"] in output
    assert {t["name"]: t["target"] for t in report["targets"]} == GPU_TARGETS
    for target in report["targets"]:
        assert target["value"] > 0 and isinstance(target["met"], bool)
        assert target["met"] == (target["value"] >= target["target"])
    towers = report["rows"]["towers_train"]
    parts = [report["rows"][f"{m}_train"] for m in ("vision", "text", "audio")]
    assert towers["step_ms"] == pytest.approx(sum(p["step_ms"] for p in parts))  # one after another


@pytest.fixture(scope="module")
def sample_classifier_dir(vit_dir, bert_dir, wav2vec2_dir, tmp_path_factory):
    """A tiny classifier with the built-in sample's labels, saved with its processor; its fusion MLPs (32 x 4096) are
    big enough for quantize_for_cpu's default."""
    from modeling_mm import MMFusionForSequenceClassification
    from processors import MMFusionProcessor

    folder = tmp_path_factory.mktemp("sample_classifier") / "model"
    torch.manual_seed(0)
    labels = {0: "match", 1: "mismatch"}
    model = MMFusionForSequenceClassification.from_towers(
        vision=vit_dir, text=bert_dir, audio=wav2vec2_dir, num_labels=2, id2label=labels,
        label2id={v: k for k, v in labels.items()}, **{**FUSION_KWARGS, "fusion_intermediate_size": 4096})
    model.save_pretrained(folder)
    MMFusionProcessor.from_towers(vision=vit_dir, text=bert_dir, audio=wav2vec2_dir).save_pretrained(folder)
    return folder


def test_cpu_quantized_benchmark_reports_float32_and_int8_side_by_side(sample_classifier_dir, sample_dir, tmp_path):
    output = run_script(["benchmarks/cpu_quantized.py", "--model", str(sample_classifier_dir), "--data",
                         str(sample_dir / "test.csv"), "--rows", "6", "--warmup", "1", "--threads", "1",
                         "--base-size", "tiny", "--base-repeats", "2", "--json", str(tmp_path / "quantized.json")],
                        tmp_path, timeout=240)
    report = json.loads((tmp_path / "quantized.json").read_text())
    assert report["rows"] == 6 and report["threads"] == 1
    variants = {v["variant"]: v for v in report["variants"]}
    assert list(variants)[0] == "float32" and report["chosen"] == list(variants)[1]
    assert variants["float32"]["quantized_linears"] == 0 and variants["float32"]["speedup_vs_float32"] == 1.0
    assert variants[report["chosen"]]["quantized_linears"] == 12  # the fusion MLPs: 2 layers x 3 streams x 2
    assert variants["int8, every Linear"]["float32_linears"] == 0
    for name, variant in variants.items():
        assert 0 < variant["latency_batch_1_ms"]["p50"] <= variant["latency_batch_1_ms"]["p95"], name
        assert 0 <= variant["accuracy"] <= 1 and 0 <= variant["agreement_with_float32"] <= 1, name
        assert variant["weights_mb"] > 0 and name in output
    assert set(report["target"]["met"]) == {"speedup", "accuracy"}
    assert 0 < report["linear_share_of_float32_cpu_time"] < 1
    base = report["base_size"]  # the same two paths on a random-init model (tiny here; base size by default)
    assert base["size"] == "tiny" and base["repeats"] == 2 and 0 < base["linear_share_of_float32_cpu_time"] < 1
    assert base["quantized_linears"] == 0  # tiny towers' Linears are all under MIN_QUANTIZED_WEIGHTS
    assert base["latency_batch_1_ms"]["float32"] > 0 and base["latency_batch_1_ms"]["int8"] > 0
    assert base["speedup_vs_float32"] > 0 and "random-init model at tiny size" in output


def test_retrieval_index_benchmark_tiny_times_exact_and_faiss_at_each_size(tmp_path):
    output = run_script(["benchmarks/retrieval_index.py", "--tiny", "--threads", "1", "--json",
                         str(tmp_path / "index.json")], tmp_path, timeout=120)
    report = json.loads((tmp_path / "index.json").read_text())
    assert report["tiny"] and report["dim"] == 32 and report["top_k"] == 10
    assert [(row["gallery"], row["backend"]) for row in report["rows"]] == [
        (200, "exact"), (200, "faiss"), (2_000, "exact"), (2_000, "faiss")]
    for row in report["rows"]:
        assert set(row["p50_ms"]) == {"1", "64"} and all(ms > 0 for ms in row["p50_ms"].values())
        if row["backend"] == "faiss":  # an exact FAISS index: every query's top-10 is torch's
            assert row["agrees_top10"] == row["queries"] == 64 and row["build_ms"] > 0
    assert set(report["faiss_faster_from"]) == {"1", "64"} and report["auto_faiss_min_gallery"] > 0
    assert "64/64 identical" in output and "auto (training/index.py): faiss from" in output
