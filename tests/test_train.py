"""mm-train: exact resume after SIGKILL (also in the middle of writing a checkpoint), 2-process training, non-finite
losses, bad rows, and LoRA training through the real loop (Training acceptance 1-5); what the command line says
(help, usage errors, one line per checkpoint and per run, the distributed type)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import training.data
from training.sample_data import generate_sample
from training.train import NonFiniteLossError, complete_checkpoints, main, parse_settings, resolve_sample, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_sample(tmp_path_factory) -> Path:
    # 128 training rows = 16 batches of 8; tones of 0.25 s keep the tiny wav2vec2 fast
    return generate_sample(tmp_path_factory.mktemp("sample") / "sample", rows=160, audio_seconds=0.25)


def train_args(sample: Path, output_dir: Path, vit_dir, bert_dir, wav2vec2_dir, **overrides) -> list[str]:
    settings = {
        "train_data": sample / "train.csv", "validation_data": sample / "validation.csv",
        "test_data": sample / "test.csv", "vision": vit_dir, "text": bert_dir, "audio": wav2vec2_dir,
        "fusion_hidden_size": 32, "fusion_num_heads": 4, "per_device_batch_size": 8, "num_workers": 0,
        "output_dir": output_dir, "report_to": "none", "logging_steps": 1, "max_steps": 4,
        "text_mode": "lora", "vision_mode": "full", "audio_mode": "frozen", "learning_rate": 1e-3,
        "evaluation_report": False,
    }
    settings.update(overrides)
    flags = []
    for key, value in settings.items():  # a list is one flag with several values (--tasks a:single b:regression)
        flags += [f"--{key}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    return flags


@pytest.fixture
def args(small_sample, vit_dir, bert_dir, wav2vec2_dir):
    def make(output_dir, **overrides):
        return train_args(small_sample, output_dir, vit_dir, bert_dir, wav2vec2_dir, **overrides)

    return make


def run_training(arguments: list[str], env: dict | None = None, wait: bool = True):
    command = [sys.executable, "-m", "training.train", *arguments]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if wait:
        return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


# a test-only hook: makes the training process hang at a chosen point of checkpointing so the test can SIGKILL it
HANG_HOOK = """
import os, time
_replace = os.replace
def replace(source, target, *args, **kwargs):
    _replace(source, target, *args, **kwargs)
    if str(target).endswith(os.environ.get("MM_TEST_HANG_AFTER_COMPLETE", "\\0")):
        time.sleep(600)
os.replace = replace
if os.environ.get("MM_TEST_HANG_INSIDE"):
    import accelerate
    _save_state = accelerate.Accelerator.save_state
    def save_state(self, output_dir=None, **kwargs):
        result = _save_state(self, output_dir, **kwargs)
        if str(output_dir).endswith(os.environ["MM_TEST_HANG_INSIDE"]):
            time.sleep(600)
        return result
    accelerate.Accelerator.save_state = save_state
"""


def kill_when(process: subprocess.Popen, ready, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not ready():
        if process.poll() is not None:
            raise AssertionError(f"training ended before the kill point: {process.stderr.read()[-3000:]}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError("the kill point was never reached")
        time.sleep(0.2)
    process.kill()  # SIGKILL: no cleanup, no atexit
    process.wait()


def checkpoint_contents(folder: Path) -> dict:
    state = torch.load(folder / "custom_checkpoint_0.pkl", weights_only=False)
    return {"weights": load_file(folder / "model.safetensors"),
            "optimizer": torch.load(folder / "optimizer.bin", weights_only=False), "state": state}


def assert_same_checkpoint(a: Path, b: Path) -> None:
    first, second = checkpoint_contents(a), checkpoint_contents(b)
    assert first["weights"].keys() == second["weights"].keys()
    for name, tensor in first["weights"].items():
        assert torch.equal(tensor, second["weights"][name]), name
    for index, slot in first["optimizer"]["state"].items():
        for key, value in slot.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(second["optimizer"]["state"][index][key])), key
    assert first["state"]["losses"] == second["state"]["losses"]
    assert len(first["state"]["losses"]) == 12


def test_a_killed_run_resumes_exactly_and_a_half_written_checkpoint_is_ignored(tmp_path, args):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HANG_HOOK)
    common = dict(max_steps=12, save_steps=6, save_total_limit=3, modality_dropout=0.3, fusion_dropout=0.1)

    reference = tmp_path / "uninterrupted"
    result = run_training(args(reference, **common))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in complete_checkpoints(reference)] == ["checkpoint-6", "checkpoint-12"]

    # killed right after the step-6 checkpoint is complete
    killed = tmp_path / "killed"
    process = run_training(args(killed, **common), env={"PYTHONPATH": str(hook),
                                                        "MM_TEST_HANG_AFTER_COMPLETE": "checkpoint-6"}, wait=False)
    kill_when(process, lambda: (killed / "checkpoints" / "checkpoint-6" / "COMPLETE").exists())
    result = run_training(args(killed, resume_from_checkpoint="latest", **common))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr and "step 6" in result.stderr
    assert_same_checkpoint(reference / "checkpoints" / "checkpoint-12", killed / "checkpoints" / "checkpoint-12")

    # killed while writing the step-12 checkpoint: step 6 stays intact and resume starts from it
    torn = tmp_path / "torn"
    process = run_training(args(torn, **common), env={"PYTHONPATH": str(hook),
                                                      "MM_TEST_HANG_INSIDE": "checkpoint-12"}, wait=False)
    kill_when(process, lambda: (torn / "checkpoints" / ".tmp-checkpoint-12" / "model.safetensors").exists()
              and (torn / "checkpoints" / ".tmp-checkpoint-12" / "custom_checkpoint_0.pkl").exists())
    assert [p.name for p in complete_checkpoints(torn)] == ["checkpoint-6"]
    result = run_training(args(torn, resume_from_checkpoint="latest", **common))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint-6" in result.stderr
    assert_same_checkpoint(reference / "checkpoints" / "checkpoint-12", torn / "checkpoints" / "checkpoint-12")


def with_random_missing_cells(sample: Path, folder: Path) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = datasets.load_dataset("csv", data_files=str(sample / "train.csv"))["train"].to_list()
    for row in rows:
        row["image"], row["audio"] = str(sample / row["image"]), str(sample / row["audio"])
        keep = rng.random(3) < 0.6
        if not keep.any():
            keep[rng.integers(3)] = True
        for column, kept in zip(("text", "image", "audio"), keep):
            row[column] = row[column] if kept else ""
    datasets.Dataset.from_list(rows).to_csv(str(folder / "train.csv"))
    return folder / "train.csv"


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, small_sample, args):
    train_csv = with_random_missing_cells(small_sample, tmp_path / "data")
    deterministic = dict(train_data=train_csv, validation_data=small_sample / "validation.csv", max_steps=4,
                         modality_dropout=0.0, fusion_dropout=0.0, classifier_dropout=0.0, lora_dropout=0.0,
                         activation_checkpointing=True, audio_mode="full")
    single = run_training(args(tmp_path / "one", per_device_batch_size=8, **deterministic))
    assert single.returncode == 0, single.stderr[-3000:]
    # `--multi_gpu` selects accelerate's torchrun launcher; without CUDA, mm-train runs DDP on the CPU with gloo
    # (`accelerate launch --cpu` would start one process only: it needs MPI for more)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "training.train",
              *args(tmp_path / "two", per_device_batch_size=4, **deterministic)]
    double = subprocess.run(launch, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=600)
    assert double.returncode == 0, double.stderr[-3000:]
    # the run's results, and the distributed type that runs, are said once, not once per process
    for said in ("test accuracy ", "model written to "):
        assert double.stdout.count(said) == 1, double.stdout
    assert double.stderr.count("distributed type: MULTI_CPU") == 1, double.stderr[-3000:]
    one_metrics = json.loads((tmp_path / "one" / "model" / "metrics.json").read_text())
    two_metrics = json.loads((tmp_path / "two" / "model" / "metrics.json").read_text())
    assert (one_metrics["num_processes"], two_metrics["num_processes"]) == (1, 2)
    one, two = one_metrics["losses"], two_metrics["losses"]
    assert [step for step, _ in one] == [step for step, _ in two] == [1, 2, 3, 4]
    # same samples per optimizer step, all dropout off: only the order of floating-point sums differs
    for (_, a), (_, b) in zip(one, two):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (one, two)


def test_non_finite_losses_are_skipped_and_too_many_abort_without_a_checkpoint(tmp_path, args, monkeypatch):
    original = training.data.MMFusionCollator.__call__
    poisoned_calls: set[int] = set()
    calls = {"n": 0}

    def poisoning_call(self, rows):
        batch = original(self, rows)
        if len(rows) == 8 and "pixel_values" in batch:  # training/eval batches, not the one-row checks
            calls["n"] += 1
            if calls["n"] in poisoned_calls:
                batch["pixel_values"] = torch.full_like(batch["pixel_values"], float("nan"))
        return batch

    monkeypatch.setattr(training.data.MMFusionCollator, "__call__", poisoning_call)

    poisoned_calls.update({3})
    metrics = train(*parse_settings(args(tmp_path / "skip", max_steps=6, eval_steps=100)))
    assert metrics["skipped_nonfinite_steps"] == 1 and metrics["global_step"] == 6
    model_dir = tmp_path / "skip" / "model"
    assert all(torch.isfinite(t).all() for t in load_file(model_dir / "model.safetensors").values())

    calls["n"] = 0
    poisoned_calls.clear()
    poisoned_calls.update(range(3, 20))
    with pytest.raises(NonFiniteLossError, match="max_nonfinite_steps: 3 non-finite losses in a row"):
        train(*parse_settings(args(tmp_path / "abort", max_steps=10, save_steps=1, max_nonfinite_steps=3)))
    assert [p.name for p in complete_checkpoints(tmp_path / "abort")] == ["checkpoint-1", "checkpoint-2"]
    assert not (tmp_path / "abort" / "model").exists()


def test_bad_rows_are_reported_and_skipped_and_strict_fails_on_the_first(tmp_path, small_sample, args, capsys):
    rows = datasets.load_dataset("csv", data_files=str(small_sample / "train.csv"))["train"].to_list()
    for row in rows:
        row["image"], row["audio"] = str(small_sample / row["image"]), str(small_sample / row["audio"])
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    rows[3]["image"] = str(tmp_path / "does_not_exist.png")
    rows[7]["image"] = str(tmp_path / "corrupt.png")
    rows[11]["label"] = None
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "bad.csv"))

    assert main(args(tmp_path / "lenient", train_data=tmp_path / "bad.csv", max_steps=2)) == 0
    metrics = json.loads((tmp_path / "lenient" / "model" / "metrics.json").read_text())
    assert set(metrics["test_by_modalities"]) == {"vision", "text", "audio", "vision+text", "vision+audio",
                                                  "text+audio"}
    assert all(0.0 <= m["accuracy"] <= 1.0 and m["samples"] == metrics["test"]["samples"]
               for m in metrics["test_by_modalities"].values())
    assert [bad["row"] for bad in metrics["bad_rows"]["train"]] == [3, 7, 11]
    assert "does_not_exist.png" in metrics["bad_rows"]["train"][0]["reason"]

    assert main(args(tmp_path / "strict", train_data=tmp_path / "bad.csv", max_steps=2, strict=True)) == 2
    assert "train row 3: images[0]" in capsys.readouterr().err


def test_lora_training_through_the_loop_keeps_base_weights_and_writes_loadable_folders(tmp_path, args, bert_dir,
                                                                                       vit_dir, wav2vec2_dir):
    from transformers import AutoModelForSequenceClassification, BertModel, Wav2Vec2Model

    import modeling_mm  # noqa: F401
    from processors import MMFusionProcessor
    from training.lora import load_trained_model

    for merge in (True, False):
        output = tmp_path / f"merge_{merge}"
        assert main(args(output, max_steps=3, merge_lora=merge)) == 0
        model_dir = output / "model"
        assert {"training_args.json", "metrics.json", "processor_config.json"} <= {p.name for p in model_dir.iterdir()}
        trained = load_trained_model(model_dir).eval()
        if merge:
            plain = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
            assert type(plain).__name__ == "MMFusionForSequenceClassification"
            # frozen audio tower: bit-identical to the checkpoint it came from
            audio_alone = Wav2Vec2Model.from_pretrained(wav2vec2_dir).state_dict()
            for name, tensor in plain.model.audio_model.state_dict().items():
                assert torch.equal(tensor, audio_alone[name]), name
            # LoRA on the text tower: merged weights differ from the base where LoRA was applied
            text_alone = BertModel.from_pretrained(bert_dir).state_dict()
            changed = [n for n, t in plain.model.text_model.state_dict().items() if not torch.equal(t, text_alone[n])]
            assert changed and all(any(k in n for k in ("q_proj", "k_proj", "v_proj", "query", "key", "value",
                                                          "attention.output.dense", "o_proj")) for n in changed)
        processor = MMFusionProcessor.from_pretrained(model_dir)
        batch = processor(text=["a red circle with a high tone"], images=[np.zeros((32, 32, 3), np.uint8)],
                          audio=[np.zeros(4000, np.float32)], sampling_rate=16_000)
        with torch.no_grad():
            assert torch.isfinite(trained(**batch).logits).all()


def test_a_vit_image_classifier_checkpoint_trains_as_the_vision_tower_with_its_encoder_weights_kept(tmp_path, args):
    """#14 acceptance 3: a `ViTForImageClassification` checkpoint (no pooler weights, like google/vit-base-patch16-224)
    works as --vision for mm-train; the trained model's frozen vision encoder equals the checkpoint's, bit for bit."""
    from transformers import AutoModelForSequenceClassification, ViTForImageClassification, ViTImageProcessor

    from conftest import IMAGE_SIZE, tiny_vit_config

    torch.manual_seed(0)
    classifier = ViTForImageClassification(tiny_vit_config(num_labels=3))
    classifier.save_pretrained(tmp_path / "vit-classifier")
    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(tmp_path / "vit-classifier")

    output = tmp_path / "run"
    assert main(args(output, vision=tmp_path / "vit-classifier", vision_mode="frozen", max_steps=2)) == 0
    metrics = json.loads((output / "model" / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and all(np.isfinite(loss) for _, loss in metrics["losses"])
    trained = AutoModelForSequenceClassification.from_pretrained(output / "model")
    tower = trained.model.vision_model.state_dict()
    encoder = classifier.vit.state_dict()
    assert set(tower) - set(encoder) == {"pooler.dense.weight", "pooler.dense.bias"}  # initialised, not loaded
    for name, tensor in encoder.items():
        assert torch.equal(tower[name], tensor), name


def test_resolve_sample_points_settings_without_data_at_the_built_in_sample_and_train_trains_only_what_it_is_given(
        tmp_path, sample_dir, vit_dir):
    model_settings, data_settings, _, settings = parse_settings(["--vision", vit_dir, "--output_dir", str(tmp_path)])
    assert resolve_sample(model_settings, data_settings, settings.output_dir) == sample_dir
    assert (data_settings.train_data, data_settings.validation_data, data_settings.test_data) == tuple(
        str(sample_dir / f"{split}.csv") for split in ("train", "validation", "test"))
    assert (model_settings.vision, model_settings.text, model_settings.audio) == (vit_dir, None, None)  # as given

    given = parse_settings(["--train_data", str(tmp_path / "data.csv"), "--validation_data", ""])
    assert resolve_sample(given[0], given[1], tmp_path) is None
    assert (given[1].train_data, given[1].validation_data, given[1].test_data) == (str(tmp_path / "data.csv"), "", None)
    with pytest.raises(ValueError, match="train_data: none given"):
        train(*parse_settings(["--vision", vit_dir, "--output_dir", str(tmp_path / "run"), "--report_to", "none"]))


def test_cached_frozen_towers_train_exactly_like_running_them_also_with_two_processes(tmp_path, small_sample, args):
    """--cache_frozen_towers (the default) runs each frozen tower once per row and reuses its outputs; the losses are
    those of running the towers every step, with rows missing modalities, and under DDP (the cache is computed in
    shares and gathered)."""
    train_csv = with_random_missing_cells(small_sample, tmp_path / "data")
    common = dict(train_data=train_csv, validation_data=small_sample / "validation.csv", max_steps=4,
                  text_mode="frozen", vision_mode="full", audio_mode="frozen", modality_dropout=0.0,
                  fusion_dropout=0.0, classifier_dropout=0.0)
    plain = run_training(args(tmp_path / "plain", cache_frozen_towers=False, **common))
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert "cached the frozen towers" not in plain.stderr
    cached = run_training(args(tmp_path / "cached", **common))
    assert cached.returncode == 0, cached.stderr[-3000:]
    assert "cached the frozen towers' outputs (text, audio) for 160 rows" in cached.stderr
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "training.train",
              *args(tmp_path / "two", per_device_batch_size=4, **common)]
    double = subprocess.run(launch, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=600)
    assert double.returncode == 0, double.stderr[-3000:]

    metrics = {name: json.loads((tmp_path / name / "model" / "metrics.json").read_text())
               for name in ("plain", "cached", "two")}
    reference = metrics["plain"]["losses"]
    assert [step for step, _ in reference] == [1, 2, 3, 4]
    for name in ("cached", "two"):
        for (step, a), (other_step, b) in zip(reference, metrics[name]["losses"], strict=True):
            assert step == other_step and abs(a - b) <= 1e-4 * max(1.0, abs(a)), (name, reference, metrics[name])
        assert metrics[name]["test"]["accuracy"] == metrics["plain"]["test"]["accuracy"]
        for subset, result in metrics["plain"]["test_by_modalities"].items():
            assert abs(metrics[name]["test_by_modalities"][subset]["loss"] - result["loss"]) <= 1e-4, subset
    weights = {name: load_file(tmp_path / name / "model" / "model.safetensors") for name in ("plain", "cached")}
    assert max((weights["plain"][k] - weights["cached"][k]).abs().max().item() for k in weights["plain"]) <= 1e-4


def test_group_by_length_batches_rows_of_similar_length_in_a_seeded_order(tmp_path, small_sample, args):
    from training.data import DataSettings, MMFusionCollator, prepare_splits, row_lengths
    from training.train import EpochLengthGroupedSampler, build_model_and_processor, ModelSettings

    settings = parse_settings(args(tmp_path / "unused"))
    splits, labels = prepare_splits(settings[1], 0)
    _, processor = build_model_and_processor(settings[0], labels)
    collator = MMFusionCollator(processor, settings[1], labels)
    rows = splits["train"]  # 128 rows: mega-batches of 8 batches
    lengths = row_lengths(rows, collator)
    tokens = [len(processor.tokenizer(t)["input_ids"]) for t in rows["text"]]
    assert lengths == [t + 12 for t in tokens]  # 0.25 s of audio = 12 frames of 20 ms
    # a row without text or audio counts only what it has
    blank = rows.map(lambda row, i: {"text": "" if i == 0 else row["text"], "audio": "" if i == 1 else row["audio"]},
                     with_indices=True)
    assert row_lengths(blank, collator)[:2] == [12, tokens[1]]

    sampler = EpochLengthGroupedSampler(4, lengths, seed=3)
    first, again = list(sampler), list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert first == again and first != second and sorted(first) == sorted(second) == list(range(128))
    def padding(order):  # tokens of padding over batches of 4
        batches = [[lengths[i] for i in order[start:start + 4]] for start in range(0, len(order), 4)]
        return sum(len(b) * max(b) - sum(b) for b in batches)

    shuffled = torch.randperm(128, generator=torch.Generator().manual_seed(3)).tolist()
    assert padding(first) < 0.5 * padding(shuffled), (padding(first), padding(shuffled))

    metrics = train(*parse_settings(args(tmp_path / "grouped", group_by_length=True, max_steps=3)))
    assert metrics["global_step"] == 3 and all(np.isfinite(loss) for _, loss in metrics["losses"])


def test_compile_trains_like_eager(tmp_path, args):
    """--compile (regional torch.compile of the layer stacks) gives the losses of eager mode and a model folder that
    loads without it."""
    common = dict(max_steps=3, modality_dropout=0.0, fusion_dropout=0.0, classifier_dropout=0.0, lora_dropout=0.0)
    eager = train(*parse_settings(args(tmp_path / "eager", **common)))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = train(*parse_settings(args(tmp_path / "compiled", compile=True, **common)))
    stats = torch._dynamo.utils.counters["stats"]
    assert stats["unique_graphs"] >= 3, dict(stats)  # fusion layer and the towers' layers, at least
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    for (_, a), (_, b) in zip(eager["losses"], compiled["losses"], strict=True):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (eager["losses"], compiled["losses"])
    weights = {name: load_file(tmp_path / name / "model" / "model.safetensors") for name in ("eager", "compiled")}
    assert weights["eager"].keys() == weights["compiled"].keys()
    assert max((weights["eager"][k] - weights["compiled"][k]).abs().max().item() for k in weights["eager"]) <= 1e-3


def test_help_keeps_each_example_line_of_the_docstring(capsys):
    import training.train as module

    examples = [line.strip() for line in module.__doc__.split("\n\n")[1].splitlines()]
    assert len(examples) >= 5 and examples[0].startswith("mm-train")
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    shown = [line.strip() for line in capsys.readouterr().out.splitlines()]
    for line in examples:
        assert line in shown, line


def test_an_unknown_flag_or_key_is_a_usage_error_with_close_matches(tmp_path, capsys):
    # not an abbreviation of --learning-rate either (the missing data file ends the run if it ever started)
    with pytest.raises(SystemExit) as exited:
        main(["--learning-rat", "1e-4", "--train_data", str(tmp_path / "missing.csv")])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("usage: mm-train") and "Traceback" not in error
    assert "unrecognized arguments: --learning-rat 1e-4\n" in error and "did you mean --learning_rate?" in error
    with pytest.raises(SystemExit) as exited:
        main(["--max_steps", "3", "--zzzz", "1"])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "unrecognized arguments: --zzzz 1" in error and "did you mean" not in error

    settings = tmp_path / "settings.yaml"
    settings.write_text("max_steps: 3\nlearning_rat: 1.0e-4\n")
    with pytest.raises(SystemExit) as exited:
        main([str(settings)])
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert f"{settings}: unknown keys: learning_rat" in error and "did you mean learning_rate?" in error


def test_one_log_line_per_checkpoint_and_the_detail_at_debug(tmp_path, args, capsys):
    train(*parse_settings(args(tmp_path / "run", max_steps=2, save_steps=1)))
    error = capsys.readouterr().err
    written = [line for line in error.splitlines() if "checkpoint written: " in line]
    assert len(written) == 2 and written[-1].endswith(str(tmp_path / "run" / "checkpoints" / "checkpoint-2"))
    # accelerate's line per file (about nine per checkpoint) only at debug
    assert "Model weights saved in" not in error
    assert [line for line in error.splitlines() if " INFO accelerate." in line] == []

    train(*parse_settings(args(tmp_path / "run", max_steps=3, save_steps=1, resume_from_checkpoint="latest",
                               log_level="debug")))
    error = capsys.readouterr().err
    assert error.count("checkpoint written: ") == 1
    assert "Model weights saved in" in error and "All model weights loaded successfully" in error


def test_the_run_says_which_distributed_type_runs_and_warns_when_it_is_not_the_one_asked_for(tmp_path, args,
                                                                                               monkeypatch, capsys):
    # what `accelerate launch` with an FSDP config passes to each process; one process without torchrun runs NO
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    train(*parse_settings(args(tmp_path / "run", max_steps=1, validation_data="", test_data="")))
    lines = capsys.readouterr().err.splitlines()
    said = [line for line in lines if "distributed type: NO" in line]
    warned = [line for line in lines if "asked for FSDP" in line]
    assert len(said) == 1 and len(warned) == 1, lines
    assert " WARNING " in warned[0] and "asked for FSDP, but NO runs" in warned[0]
