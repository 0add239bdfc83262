"""mm-train --task generation (#17): questions and answers from table columns, a decoder by cross-attention or as a
prefix, LoRA presets on the decoder, the frozen-tower cache, exact resume and two processes against one; the
adapter, the merged folder and trust_remote_code give the same greedy generations (acceptance 5)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import datasets
import pytest
import torch

from conftest import WITHOUT_PROJECT
from test_train import train_args
from test_train_tasks import assert_resume_ends_where_an_uninterrupted_run_does, two_processes_against_one
from training.sample_data import generate_sample
from training.train import main


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    # 128 training rows = 16 batches of 8; tones of 0.25 s keep the tiny wav2vec2 fast
    return generate_sample(tmp_path_factory.mktemp("sample") / "sample", rows=160, audio_seconds=0.25)


@pytest.fixture
def args(sample, vit_dir, bert_dir, wav2vec2_dir, gpt2_decoder_dir):
    def make(output_dir, **overrides) -> list[str]:
        settings = {"task": "generation", "decoder": gpt2_decoder_dir, "target_column": "answer",
                    "prompt_column": "question", "text_mode": "frozen", "vision_mode": "frozen",
                    "audio_mode": "frozen", "decoder_mode": "lora", **overrides}
        flags = train_args(sample, output_dir, vit_dir, bert_dir, wav2vec2_dir, **settings)
        for key, value in overrides.items():  # None: the flag is not given at all
            if value is None:
                index = flags.index(f"--{key}")
                del flags[index:index + 2]
        return flags

    return make


def greedy(model, processor, sample: Path, rows: int = 6) -> list[str]:
    """The model's greedy answers to the first test rows' questions, with every modality."""
    table = datasets.load_dataset("csv", data_files=str(sample / "test.csv"))["train"].select(range(rows))
    batch = processor(text=list(table["text"]), images=[str(sample / p) for p in table["image"]],
                      audio=[str(sample / p) for p in table["audio"]], prompt=list(table["question"]))
    with torch.no_grad():
        return processor.batch_decode(model.generate(**batch, max_new_tokens=6))


@pytest.mark.parametrize("connection", ["cross_attention", "prefix"])
def test_generation_training_writes_a_model_that_answers_and_reports_its_validation(tmp_path, args, connection):
    from modeling_mm import MMFusionForConditionalGeneration

    assert main(args(tmp_path / "run", decoder_connection=connection, num_query_tokens=4 if connection == "prefix"
                     else 0)) == 0
    metrics = json.loads((tmp_path / "run" / "model" / "metrics.json").read_text())
    assert metrics["metric_for_best_model"] == "loss"
    for split in ("validation", "test"):
        assert metrics[split]["samples"] == 16 and 0 < metrics[split]["loss"] < 20
        assert 0 <= metrics[split]["token_accuracy"] <= 1
    model = MMFusionForConditionalGeneration.from_pretrained(tmp_path / "run" / "model")
    assert model.config.decoder_connection == connection
    assert (tmp_path / "run" / "model" / "generation_config.json").exists()
    assert (tmp_path / "run" / "model" / "decoder_tokenizer").is_dir()


def test_generation_flags_are_checked_before_training(tmp_path, args, capsys):
    assert main(args(tmp_path / "a", target_column=None)) == 2
    assert "target_column: --task generation needs" in capsys.readouterr().err
    assert main(args(tmp_path / "b", decoder=None)) == 2
    assert "decoder: --task generation needs a decoder LM" in capsys.readouterr().err
    assert main(args(tmp_path / "c", target_column="nowhere")) == 2
    assert "target_column: 'nowhere' is not a column of the training data" in capsys.readouterr().err
    assert main(args(tmp_path / "d", task="classification")) == 2
    assert "target_column, prompt_column, group_column: only for --task generation" in capsys.readouterr().err
    assert main(args(tmp_path / "e", metric_for_best_model="bleu")) == 2
    assert "metric_for_best_model: 'bleu' is not a validation metric" in capsys.readouterr().err


def test_rows_without_a_target_are_reported_and_skipped(tmp_path, args, sample):
    from test_train_tasks import table

    def drop(row, index):
        if index in (2, 9):
            row["answer"] = None
    train_csv = table(sample, "train", tmp_path / "data", drop)
    assert main(args(tmp_path / "run", train_data=train_csv, max_steps=2)) == 0
    metrics = json.loads((tmp_path / "run" / "model" / "metrics.json").read_text())
    assert [bad["row"] for bad in metrics["bad_rows"]["train"]] == [2, 9]
    assert "answer: row 0 has no target text" in metrics["bad_rows"]["train"][0]["reason"]


def test_generation_resume_from_a_checkpoint_ends_where_an_uninterrupted_run_does(tmp_path, args):
    assert_resume_ends_where_an_uninterrupted_run_does(args, tmp_path, max_steps=6, save_steps=3, save_total_limit=3,
                                                       modality_dropout=0.2)


def test_two_processes_train_as_one_with_the_same_global_batch(tmp_path, args):
    """2 processes x 4 rows against 1 x 8: each process divides its summed token loss by the global target-token
    count over the number of processes, so rows of different answer lengths weigh as in one batch."""
    one, two = two_processes_against_one(args, tmp_path, max_steps=4, modality_dropout=0.0, fusion_dropout=0.0,
                                         save_steps=2, eval_steps=2)
    for key in ("loss", "token_accuracy"):
        assert abs(one["test"][key] - two["test"][key]) <= 1e-4, key


def test_adapter_merged_and_remote_code_folders_give_the_same_greedy_generations(tmp_path, args, sample):
    """LoRA on the GPT-2 decoder (c_attn) and the text tower: the adapter folder, the merged folder of the same run
    and the merged folder loaded by trust_remote_code where the project cannot be imported answer alike."""
    from processors import MMFusionProcessor
    from training.lora import load_trained_model

    common = dict(max_steps=4, learning_rate=5e-3, text_mode="lora")
    assert main(args(tmp_path / "adapter", merge_lora="false", **common)) == 0
    assert main(args(tmp_path / "merged", **common)) == 0
    adapter_dir, merged_dir = tmp_path / "adapter" / "model", tmp_path / "merged" / "model"
    assert (adapter_dir / "adapter_config.json").exists()
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert "c_attn" in adapter_config["target_modules"]
    processor = MMFusionProcessor.from_pretrained(merged_dir)
    merged_answers = greedy(load_trained_model(merged_dir), processor, sample)
    assert greedy(load_trained_model(adapter_dir), processor, sample) == merged_answers
    script = WITHOUT_PROJECT + textwrap.dedent(f"""
        import json, torch
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained({str(merged_dir)!r}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({str(merged_dir)!r}, trust_remote_code=True)
        rows = {json.dumps([str(sample)])}[0]
        import csv
        table = list(csv.DictReader(open(rows + "/test.csv")))[:6]
        batch = processor(text=[r["text"] for r in table], images=[rows + "/" + r["image"] for r in table],
                          audio=[rows + "/" + r["audio"] for r in table], prompt=[r["question"] for r in table])
        with torch.no_grad():
            print(json.dumps(processor.batch_decode(model.generate(**batch, max_new_tokens=6))))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == merged_answers


# ---- the built-in sample's generation recipe (#17 acceptance 4) --------------------------------------------------------

def test_the_generation_sample_answers_from_the_modality_that_carries_the_answer(tmp_path, sample_dir):
    """`mm-train --sample generation` with the main job's frozen towers and fusion, 2 epochs at lr 1e-3 (150 steps;
    the README's recipe trains longer). Thresholds set before the run, on the test split's 300 rows: with every
    modality, colour, shape and pitch answers >= 0.95 exact match and descriptions >= 0.9; without the image, colour
    and shape answers no better than the most common answer + 0.15; without the audio, pitch answers likewise.
    "Does the caption match?" needs all three compared and takes far longer to learn (README): reported, not asserted
    here."""
    from collections import Counter

    from training.main_job import sample_job_args

    output = tmp_path / "generation"
    assert main(sample_job_args(output) + ["--sample", "generation", "--num_train_epochs", "2",
                                           "--learning_rate", "1e-3"]) == 0
    rows = datasets.load_dataset("csv", data_files=str(sample_dir / "test.csv"))["train"]
    kinds, answers = list(rows["question_kind"]), list(rows["answer"])
    predictions = [json.loads(line) for line in
                   (output / "model" / "evaluation" / "predictions.jsonl").read_text().splitlines()]
    assert [p["reference"] for p in predictions] == answers

    def exact_match(kind: str, subset: str | None = None) -> float:
        chosen = [(p["prediction"] if subset is None else p["ablation"][subset], answer)
                  for p, answer, k in zip(predictions, answers, kinds) if k == kind]
        return sum(pred.strip().lower() == answer for pred, answer in chosen) / len(chosen)

    def majority(kind: str) -> float:
        counts = Counter(answer for answer, k in zip(answers, kinds) if k == kind)
        return max(counts.values()) / sum(counts.values())

    for kind in ("colour", "shape", "pitch"):
        assert exact_match(kind) >= 0.95, (kind, exact_match(kind))
    assert exact_match("describe") >= 0.9, exact_match("describe")
    for kind, without in (("colour", "text+audio"), ("shape", "text+audio"), ("pitch", "image+text")):
        assert exact_match(kind, without) <= majority(kind) + 0.15, (kind, without, exact_match(kind, without))
