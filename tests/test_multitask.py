"""MMFusionForMultiTask: the `tasks` config is checked and normalised, the loss is the weighted sum of masked
per-task losses (fixed or uncertainty weights), a missing target adds nothing, regression heads answer in the
targets' units, and the model survives save/load (also through trust_remote_code), LoRA adapters and
activation checkpointing with every head and its loss weighting intact."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from peft import PeftModel
from torch import nn

from conftest import FUSION_KWARGS, WITHOUT_PROJECT, make_batch, select_samples, tiny_fusion_config
from modeling_mm import MMFusionConfig, MMFusionForMultiTask, MMFusionForSequenceClassification
from modeling_mm.configuration_mm import TASK_KEYS
from training.lora import LoraSettings, apply_lora, load_trained_model, save_trained_model

NAN = float("nan")
MODALITIES = ("vision", "text")
BATCH_SIZE = 6
# three kinds of head, each with its own fixed loss weight
TASKS = [
    {"name": "topic", "problem_type": "single_label_classification", "labels": ["sport", "music", "news"],
     "loss_weight": 1.0},
    {"name": "tags", "problem_type": "multi_label_classification", "labels": ["red", "green", "blue", "grey"],
     "loss_weight": 0.5},
    {"name": "score", "problem_type": "regression", "target_mean": 10.0, "target_std": 4.0, "loss_weight": 2.0},
]
# Kendall et al.: c = 1/2 for regression, 1 for classification
UNCERTAINTY_SCALE = {"single_label_classification": 1.0, "multi_label_classification": 1.0, "regression": 0.5}


def build_multitask(task_weighting: str = "fixed", modalities=MODALITIES, tasks=TASKS, seed: int = 0,
                    **overrides) -> MMFusionForMultiTask:
    torch.manual_seed(seed)
    config = tiny_fusion_config(modalities, tasks=tasks, task_weighting=task_weighting, **overrides)
    return MMFusionForMultiTask(config).eval()


def labels_with_gaps() -> dict[str, torch.Tensor]:
    """Targets for a batch of 6 in which every task lacks some rows (-100 / NaN) and one tag entry is unobserved."""
    return {
        "topic": torch.tensor([0, -100, 2, 1, -100, 2]),
        "tags": torch.tensor([[1.0, 0, NAN, 1], [NAN] * 4, [0, 0, 0, 0], [NAN] * 4, [1, 1, 0, 1], [0, 1, 1, NAN]]),
        "score": torch.tensor([12.0, 7.5, NAN, 3.0, NAN, 15.0]),
    }


def random_labels(generator: torch.Generator, batch_size: int = BATCH_SIZE) -> dict[str, torch.Tensor]:
    return {
        "topic": torch.randint(0, 3, (batch_size,), generator=generator),
        "tags": torch.randint(0, 2, (batch_size, 4), generator=generator).float(),
        "score": 10 + 4 * torch.randn(batch_size, generator=generator),
    }


def hand_losses(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each task's loss written out in float64 from the model's logits, over the targets present only."""
    topic_rows = labels["topic"] != -100
    log_probs = torch.log_softmax(logits["topic"][topic_rows].double(), dim=-1)
    topic = -log_probs.gather(1, labels["topic"][topic_rows].unsqueeze(1)).mean()

    observed = ~torch.isnan(labels["tags"])
    x, y = logits["tags"].double(), labels["tags"].double()
    bce = -(y * nn.functional.logsigmoid(x) + (1 - y) * nn.functional.logsigmoid(-x))
    tags = bce[observed].mean()

    present = ~torch.isnan(labels["score"])
    standardised_prediction = (logits["score"].squeeze(-1).double() - 10) / 4
    standardised_target = (labels["score"].double() - 10) / 4
    score = ((standardised_prediction - standardised_target)[present] ** 2).mean()
    return {"topic": topic, "tags": tags, "score": score}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def all_logits(model, batch) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {name: value.clone() for name, value in model(**batch).logits.items()}


# ---- 1. the tasks config ---------------------------------------------------------------------------------------------

def test_tasks_are_normalised_with_every_key_present():
    config = MMFusionConfig(tasks=[
        {"name": "topic", "problem_type": "single_label_classification", "labels": ["a", "b", "c"]},
        {"name": "tags", "problem_type": "multi_label_classification", "labels": ["x"], "loss_weight": 2,
         "column": "tag_list", "label_separator": "|"},
        {"name": "score", "problem_type": "regression", "target_mean": 10, "target_std": 4},
        {"name": "box-size", "problem_type": "regression", "num_outputs": 2, "target_mean": [1, 2],
         "target_std": [0.5, 3]},
    ])
    assert config.task_weighting == "fixed"
    assert all(set(task) == set(TASK_KEYS) for task in config.tasks)
    assert config.tasks == [
        {"name": "topic", "problem_type": "single_label_classification", "labels": ["a", "b", "c"], "num_outputs": 3,
         "loss_weight": 1.0, "target_mean": None, "target_std": None, "thresholds": None, "column": None, "label_separator": None},
        {"name": "tags", "problem_type": "multi_label_classification", "labels": ["x"], "num_outputs": 1,
         "loss_weight": 2.0, "target_mean": None, "target_std": None, "thresholds": None, "column": "tag_list", "label_separator": "|"},
        {"name": "score", "problem_type": "regression", "labels": None, "num_outputs": 1, "loss_weight": 1.0,
         "target_mean": [10.0], "target_std": [4.0], "thresholds": None, "column": None, "label_separator": None},
        {"name": "box-size", "problem_type": "regression", "labels": None, "num_outputs": 2, "loss_weight": 1.0,
         "target_mean": [1.0, 2.0], "target_std": [0.5, 3.0], "thresholds": None, "column": None, "label_separator": None},
    ]
    assert isinstance(config.tasks[1]["loss_weight"], float)


GOOD_TASK = {"name": "ok", "problem_type": "single_label_classification", "labels": ["a", "b"]}
BAD_TASKS = {  # each put at index 1, after a good task, so the error must name the right index
    "duplicate name": ({"name": "ok", "problem_type": "regression"}, r"tasks\[1\]\.name: 'ok' is used by two"),
    "dotted name": ({"name": "a.b", "problem_type": "regression"}, r"tasks\[1\]\.name: .*'a\.b'"),
    "slashed name": ({"name": "a/b", "problem_type": "regression"}, r"tasks\[1\]\.name: .*'a/b'"),
    "empty name": ({"name": "", "problem_type": "regression"}, r"tasks\[1\]\.name"),
    "unknown problem_type": ({"name": "t", "problem_type": "ranking"}, r"tasks\[1\]\.problem_type: .*'ranking'"),
    "single-label with 1 label": ({"name": "t", "problem_type": "single_label_classification", "labels": ["a"]},
                                  r"tasks\[1\]\.labels: .*>= 2"),
    "single-label without labels": ({"name": "t", "problem_type": "single_label_classification"},
                                    r"tasks\[1\]\.labels"),
    "regression with labels": ({"name": "t", "problem_type": "regression", "labels": ["a", "b"]},
                               r"tasks\[1\]\.labels: a regression task has no labels"),
    "negative loss_weight": ({"name": "t", "problem_type": "regression", "loss_weight": -0.5},
                             r"tasks\[1\]\.loss_weight: .*>= 0, got -0\.5"),
    "zero target_std": ({"name": "t", "problem_type": "regression", "target_mean": 1.0, "target_std": 0.0},
                        r"tasks\[1\]\.target_std: must be finite and > 0"),
    "negative target_std": ({"name": "t", "problem_type": "regression", "target_mean": 1.0, "target_std": -2.0},
                            r"tasks\[1\]\.target_std: must be finite and > 0"),
    "mean/std shorter than outputs": ({"name": "t", "problem_type": "regression", "num_outputs": 2,
                                       "target_mean": [1.0], "target_std": [1.0]},
                                      r"tasks\[1\]\.target_mean, tasks\[1\]\.target_std: need one value per output \(2\)"),
    "mean and std of different lengths": ({"name": "t", "problem_type": "regression", "target_mean": [1.0, 2.0],
                                           "target_std": [1.0]}, r"tasks\[1\]\.target_mean, tasks\[1\]\.target_std"),
    "mean without std": ({"name": "t", "problem_type": "regression", "target_mean": 1.0},
                         r"tasks\[1\]\.target_mean, tasks\[1\]\.target_std: give both or neither"),
    # the message reads "tasks[1]: unknown keys ['colour']": it names the index and the key
    "unknown key": ({"name": "t", "problem_type": "regression", "colour": "red"},
                    r"tasks\[1\]: unknown keys \['colour'\]"),
}


@pytest.mark.parametrize("case", BAD_TASKS)
def test_bad_tasks_are_refused_naming_the_task_and_key(case):
    bad, message = BAD_TASKS[case]
    with pytest.raises(ValueError, match=message):
        MMFusionConfig(tasks=[GOOD_TASK, bad])


@pytest.mark.parametrize("weighting", ["learned", "Uncertainty", "", None])
def test_task_weighting_other_than_fixed_or_uncertainty_is_refused(weighting):
    with pytest.raises(ValueError, match=r"task_weighting: must be one of \('fixed', 'uncertainty'\)"):
        MMFusionConfig(tasks=[GOOD_TASK], task_weighting=weighting)


def test_multitask_config_save_load_round_trip_is_exact(tmp_path):
    config = tiny_fusion_config(MODALITIES, tasks=TASKS, task_weighting="uncertainty")
    config.save_pretrained(tmp_path)
    loaded = MMFusionConfig.from_pretrained(tmp_path)
    assert loaded.tasks == config.tasks and loaded.task_weighting == "uncertainty"
    assert {**loaded.to_dict(), "_name_or_path": ""} == {**config.to_dict(), "_name_or_path": ""}
    assert json.loads((tmp_path / "config.json").read_text())["tasks"] == config.tasks


# ---- 2. the loss -----------------------------------------------------------------------------------------------------

def test_fixed_weight_loss_is_the_weighted_sum_of_hand_computed_task_losses():
    model = build_multitask("fixed")
    labels = labels_with_gaps()
    with torch.no_grad():
        out = model(**make_batch(BATCH_SIZE, modalities=MODALITIES), labels=labels)
    assert {name: tuple(value.shape) for name, value in out.logits.items()} == {
        "topic": (6, 3), "tags": (6, 4), "score": (6, 1)}
    expected = hand_losses(out.logits, labels)
    for name, value in expected.items():
        assert abs(out.task_losses[name].item() - value.item()) <= 1e-6, name
        assert out.task_weights[name].item() == {"topic": 1.0, "tags": 0.5, "score": 2.0}[name]
    total = 1.0 * expected["topic"] + 0.5 * expected["tags"] + 2.0 * expected["score"]
    assert abs(out.loss.item() - total.item()) <= 1e-6


def test_uncertainty_loss_is_kendalls_sum_with_the_log_variances_set():
    model = build_multitask("uncertainty")
    log_variance = torch.tensor([0.3, -0.7, 1.2])
    with torch.no_grad():
        model.task_weighting.log_variance.copy_(log_variance)
    labels = labels_with_gaps()
    with torch.no_grad():
        out = model(**make_batch(BATCH_SIZE, modalities=MODALITIES), labels=labels)
    losses = hand_losses(out.logits, labels)
    total = 0.0
    for index, task in enumerate(TASKS):
        s = log_variance[index].double()
        c = UNCERTAINTY_SCALE[task["problem_type"]]
        total = total + task["loss_weight"] * (c * torch.exp(-s) * losses[task["name"]] + s / 2)
        assert abs(out.task_weights[task["name"]].item() - task["loss_weight"] * c * math.exp(-s.item())) <= 1e-6
    assert abs(out.loss.item() - total.item()) <= 1e-6


# ---- 3. masking: a missing target adds nothing and is never read as class 0 / a zero target --------------------------

MISSING = {"topic": lambda n: torch.full((n,), -100), "tags": lambda n: torch.full((n, 4), NAN),
           "score": lambda n: torch.full((n,), NAN)}


@pytest.mark.parametrize("task_weighting", ["fixed", "uncertainty"])
@pytest.mark.parametrize("missing", ["topic", "tags", "score"])
@pytest.mark.parametrize("how", ["all missing", "not given"])
def test_a_task_without_targets_in_the_batch_gives_its_head_exactly_zero_gradient(task_weighting, missing, how):
    model = build_multitask(task_weighting).train()
    labels = random_labels(torch.Generator().manual_seed(1))
    if how == "all missing":
        labels[missing] = MISSING[missing](BATCH_SIZE)
    else:
        del labels[missing]
    out = model(**make_batch(BATCH_SIZE, modalities=MODALITIES), labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert out.task_losses[missing].item() == 0.0
    for name, head in model.heads.items():
        for parameter in (head.weight, head.bias):
            assert parameter.grad is not None, name  # still in the graph (DDP needs every parameter used)
            if name == missing:
                assert torch.equal(parameter.grad, torch.zeros_like(parameter)), name
            else:
                assert parameter.grad.abs().max().item() > 1e-6, name
    if task_weighting == "uncertainty":  # nothing to learn from: its log-variance must not drift
        index = model.task_names.index(missing)
        grad = model.task_weighting.log_variance.grad
        assert grad[index].item() == 0.0
        assert all(abs(grad[i].item()) > 1e-6 for i in range(3) if i != index)


@pytest.mark.parametrize("task", ["topic", "tags", "score"])
def test_a_row_missing_a_target_does_not_change_that_tasks_loss(task):
    # Eval mode, dropout 0: a row's outputs do not depend on its batch partners, so the task loss over the batch
    # with a row lacking the target must equal the loss over the batch without that row.
    model = build_multitask("fixed")
    batch = make_batch(BATCH_SIZE, modalities=MODALITIES)
    labels = random_labels(torch.Generator().manual_seed(2))
    dropped_row = 2
    labels[task][dropped_row] = MISSING[task](1)[0]
    keep = [i for i in range(BATCH_SIZE) if i != dropped_row]
    with torch.no_grad():
        with_row = model(**batch, labels=labels).task_losses[task]
        without_row = model(**select_samples(batch, keep), labels={k: v[keep] for k, v in labels.items()}).task_losses[task]
    assert abs(with_row.item() - without_row.item()) <= 1e-6


@pytest.mark.parametrize("task, zero", [("topic", 0), ("tags", 0.0), ("score", 0.0)])
def test_missing_is_never_class_0_or_a_zero_target(task, zero):
    model = build_multitask("fixed")
    batch = make_batch(BATCH_SIZE, modalities=MODALITIES)
    missing = labels_with_gaps()
    zeros = copy.deepcopy(missing)
    row = 1  # lacks every task's target in labels_with_gaps
    zeros[task][row] = zero
    with torch.no_grad():
        a, b = model(**batch, labels=missing), model(**batch, labels=zeros)
    assert abs(a.task_losses[task].item() - b.task_losses[task].item()) > 1e-4
    assert abs(a.loss.item() - b.loss.item()) > 1e-4


# ---- 4. regression in the targets' units -------------------------------------------------------------------------------

def raw_output_of(module: nn.Module, run) -> torch.Tensor:
    captured = []
    handle = module.register_forward_hook(lambda _module, _inputs, output: captured.append(output.detach().clone()))
    try:
        result = run()
    finally:
        handle.remove()
    assert len(captured) == 1
    return captured[0], result


def test_multitask_regression_logits_are_head_output_times_std_plus_mean():
    tasks = [*TASKS, {"name": "size", "problem_type": "regression", "num_outputs": 2, "target_mean": [100.0, -3.0],
                      "target_std": [20.0, 0.5]}]
    model = build_multitask("fixed", tasks=tasks)
    batch = make_batch(BATCH_SIZE, modalities=MODALITIES)
    with torch.no_grad():
        score_raw, out = raw_output_of(model.heads["score"], lambda: model(**batch))
        size_raw, _ = raw_output_of(model.heads["size"], lambda: model(**batch))
        topic_raw, _ = raw_output_of(model.heads["topic"], lambda: model(**batch))
    assert max_diff(out.logits["score"], score_raw * 4.0 + 10.0) <= 1e-6
    assert max_diff(out.logits["size"], size_raw * torch.tensor([20.0, 0.5]) + torch.tensor([100.0, -3.0])) <= 1e-5
    assert torch.equal(out.logits["topic"], topic_raw)  # classification heads are not rescaled
    assert max_diff(score_raw, out.logits["score"]) > 5.0  # the rescaling did happen (outputs near 10, raw near 0)


def test_single_task_regression_answers_in_target_units_and_learns_standardised_values():
    torch.manual_seed(0)
    config = tiny_fusion_config(MODALITIES, num_labels=1, problem_type="regression", target_mean=[10.0],
                                target_std=[4.0])
    model = MMFusionForSequenceClassification(config).eval()
    batch = make_batch(BATCH_SIZE, modalities=MODALITIES)
    labels = torch.tensor([12.0, 7.5, NAN, 3.0, 9.0, 15.0])
    with torch.no_grad():
        raw, out = raw_output_of(model.classifier, lambda: model(**batch, labels=labels))
    assert max_diff(out.logits, raw * 4.0 + 10.0) <= 1e-6
    present = ~torch.isnan(labels)
    standardised = ((out.logits.squeeze(-1).double() - 10) / 4 - (labels.double() - 10) / 4)[present]
    assert abs(out.loss.item() - (standardised**2).mean().item()) <= 1e-6


# ---- 5. uncertainty weights learn -------------------------------------------------------------------------------------

def test_a_few_steps_move_the_log_variances_and_the_task_weights():
    model = build_multitask("uncertainty").train()
    generator = torch.Generator().manual_seed(3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first_weights = None
    for step in range(3):
        out = model(**make_batch(BATCH_SIZE, seed=step, modalities=MODALITIES), labels=random_labels(generator))
        first_weights = first_weights or {name: w.item() for name, w in out.task_weights.items()}
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    # at s = 0 every task is weighted loss_weight * c
    assert first_weights == {task["name"]: task["loss_weight"] * UNCERTAINTY_SCALE[task["problem_type"]]
                             for task in TASKS}
    log_variance = model.task_weighting.log_variance.detach()
    assert (log_variance.abs() > 1e-3).all(), log_variance
    with torch.no_grad():
        out = model(**make_batch(BATCH_SIZE, seed=9, modalities=MODALITIES), labels=random_labels(generator))
    for index, task in enumerate(TASKS):
        expected = task["loss_weight"] * UNCERTAINTY_SCALE[task["problem_type"]] * math.exp(-log_variance[index].item())
        assert abs(out.task_weights[task["name"]].item() - expected) <= 1e-6, task["name"]
        assert abs(out.task_weights[task["name"]].item() - first_weights[task["name"]]) > 1e-4, task["name"]


# ---- 6. saving and loading -------------------------------------------------------------------------------------------

def run_fresh(script: str, cwd) -> subprocess.CompletedProcess:
    """`script` in a fresh interpreter in `cwd`, where the project's packages cannot be imported, offline."""
    environment = {**os.environ, "HF_MODULES_CACHE": str(cwd / "modules"), "HF_HUB_OFFLINE": "1"}
    environment.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-I", "-c", WITHOUT_PROJECT + textwrap.dedent(script)], cwd=cwd,
                          env=environment, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def saved_multitask(tmp_path_factory):
    """A three-tower multi-task model with uncertainty weighting and non-zero log-variances, saved."""
    folder = tmp_path_factory.mktemp("multitask") / "model"
    model = build_multitask("uncertainty", modalities=("vision", "text", "audio"))
    with torch.no_grad():
        model.task_weighting.log_variance.copy_(torch.tensor([0.25, -0.5, 0.75]))
    model.save_pretrained(folder)
    return model, folder


def test_save_pretrained_writes_the_multitask_auto_map(saved_multitask):
    _, folder = saved_multitask
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_mm.MMFusionConfig",
                                  "AutoModel": "modeling_mm.MMFusionForMultiTask"}
    assert {"configuration_mm.py", "modeling_mm.py", "model.safetensors"} <= {p.name for p in folder.iterdir()}


def test_from_pretrained_round_trip_is_exact(saved_multitask):
    model, folder = saved_multitask
    loaded, info = MMFusionForMultiTask.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    batch = make_batch(BATCH_SIZE)
    expected, got = all_logits(model, batch), all_logits(loaded.eval(), batch)
    for name in expected:
        assert max_diff(expected[name], got[name]) <= 1e-6, name


def test_trust_remote_code_loads_every_head_where_the_project_cannot_be_imported(saved_multitask, tmp_path):
    model, folder = saved_multitask
    copied = tmp_path / "copied"  # only the saved folder travels
    shutil.copytree(folder, copied)
    batch = make_batch(BATCH_SIZE)
    torch.save({"batch": batch, "logits": all_logits(model, batch),
                "log_variance": model.task_weighting.log_variance.detach().clone()}, tmp_path / "case.pt")
    work = tmp_path / "work"
    work.mkdir()
    result = run_fresh(f"""
        import sys
        import torch
        from transformers import AutoModel
        case = torch.load({str(tmp_path / "case.pt")!r})
        model = AutoModel.from_pretrained({str(copied)!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == "MMFusionForMultiTask", type(model)
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        with torch.no_grad():
            logits = model(**case["batch"]).logits
        assert list(logits) == ["topic", "tags", "score"], list(logits)
        for name, expected in case["logits"].items():
            difference = (logits[name] - expected).abs().max().item()
            assert difference <= 1e-6, (name, difference)
        assert torch.equal(model.task_weighting.log_variance.detach(), case["log_variance"])
        loaded = [name for name in sys.modules if name.split(".")[0] in ("modeling_mm", "processors", "training")]
        assert not loaded, loaded
        print("identical")
    """, work)
    assert result.returncode == 0 and "identical" in result.stdout, result.stderr[-3000:]


# ---- 7. LoRA (peft) ---------------------------------------------------------------------------------------------------

HEADS_AND_WEIGHTING = ("heads.topic", "heads.tags", "heads.score", "task_weighting")


@pytest.fixture(scope="module")
def lora_multitask(vit_dir, bert_dir):
    """Vision frozen, text LoRA, uncertainty weighting; every trainable weight perturbed (stands in for training)."""
    torch.manual_seed(0)
    model = MMFusionForMultiTask.from_towers(vision=vit_dir, text=bert_dir, tasks=TASKS,
                                             task_weighting="uncertainty", **FUSION_KWARGS)
    peft_model = apply_lora(model, LoraSettings(vision_mode="frozen", text_mode="lora", lora_dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for _, parameter in peft_model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    return peft_model.eval()


def trained_log_variance(peft_model) -> torch.Tensor:
    return peft_model.base_model.model.task_weighting.modules_to_save["default"].log_variance.detach().clone()


def test_lora_trains_every_head_and_the_task_weighting(lora_multitask):
    modules_to_save = lora_multitask.peft_config["default"].modules_to_save
    assert set(HEADS_AND_WEIGHTING) <= set(modules_to_save), modules_to_save
    trainable = {name.removeprefix("base_model.model.") for name, p in lora_multitask.named_parameters()
                 if p.requires_grad}
    for module in HEADS_AND_WEIGHTING:
        names = [n for n in trainable if n.startswith(f"{module}.modules_to_save.default.")]
        assert len(names) == (1 if module == "task_weighting" else 2), (module, names)
    assert any("lora_A" in name and name.startswith("model.text_model.") for name in trainable)
    assert not any(name.startswith("model.vision_model.") for name in trainable)
    # the perturbed (trained) copy of the log-variances is the one the loss uses
    log_variance = trained_log_variance(lora_multitask)
    assert (log_variance.abs() > 1e-3).all()
    labels = labels_with_gaps()
    with torch.no_grad():
        out = lora_multitask(**make_batch(BATCH_SIZE, modalities=MODALITIES), labels=labels)
    losses = hand_losses(out.logits, labels)
    total = sum(task["loss_weight"] * (UNCERTAINTY_SCALE[task["problem_type"]] * torch.exp(-log_variance[i].double())
                                       * losses[task["name"]] + log_variance[i].double() / 2)
                for i, task in enumerate(TASKS))
    assert abs(out.loss.item() - total.item()) <= 1e-5


def assert_same_outputs(loaded, peft_model, threshold: float = 1e-5) -> None:
    batch = make_batch(BATCH_SIZE, seed=4, modalities=MODALITIES)
    expected, got = all_logits(peft_model, batch), all_logits(loaded, batch)
    assert list(got) == list(expected)
    for name in expected:
        assert max_diff(expected[name], got[name]) <= threshold, name


def test_lora_adapter_saved_unmerged_reloads_every_head_and_the_log_variances(lora_multitask, tmp_path):
    save_trained_model(lora_multitask, tmp_path / "adapter", merge=False)
    config = MMFusionConfig.from_pretrained(tmp_path / "adapter")
    assert config.architectures == ["MMFusionForMultiTask"]
    # the base rebuilt from its tower checkpoints, as load_trained_model does, then the adapter on it
    from modeling_mm.modeling_mm import load_tower

    towers = {f"{m}_model": load_tower(m, config.tower_config(m)._name_or_path, {}) for m in config.modalities}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(MMFusionForMultiTask(config, **towers), tmp_path / "adapter").eval()
    assert not [w for w in caught if "missing" in str(w.message).lower()]
    assert_same_outputs(loaded, lora_multitask)
    assert torch.equal(trained_log_variance(loaded), trained_log_variance(lora_multitask))


def test_load_trained_model_reloads_a_multitask_adapter_as_multitask(lora_multitask, tmp_path):
    save_trained_model(lora_multitask, tmp_path / "adapter", merge=False)
    loaded = load_trained_model(tmp_path / "adapter")
    assert type(loaded.get_base_model()) is MMFusionForMultiTask, type(loaded.get_base_model())
    assert_same_outputs(loaded, lora_multitask)
    assert torch.equal(trained_log_variance(loaded), trained_log_variance(lora_multitask))


def test_lora_merged_folder_reloads_every_head_and_the_log_variances(lora_multitask, tmp_path):
    save_trained_model(lora_multitask, tmp_path / "merged", merge=True)
    auto_map = json.loads((tmp_path / "merged" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_mm.MMFusionForMultiTask"
    loaded, info = MMFusionForMultiTask.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not any("lora_" in n or "modules_to_save" in n for n in loaded.state_dict())
    assert_same_outputs(loaded.eval(), lora_multitask)
    assert torch.equal(loaded.task_weighting.log_variance.detach(), trained_log_variance(lora_multitask))


# ---- 8. activation checkpointing -----------------------------------------------------------------------------------

def gradients(model, batch, labels) -> dict[str, torch.Tensor | None]:
    model.zero_grad()
    model(**batch, labels=labels).loss.backward()
    return {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_every_head_and_log_variance_the_same_gradient(use_reentrant):
    model = build_multitask("uncertainty", modalities=("vision", "text", "audio")).train()
    with torch.no_grad():
        model.task_weighting.log_variance.copy_(torch.tensor([0.2, -0.3, 0.4]))
    batch = make_batch(BATCH_SIZE)
    batch["has_audio"] = torch.tensor([1, 0, 1, 1, 0, 1]).bool()
    labels = labels_with_gaps()
    plain = gradients(model, batch, labels)
    assert not [name for name, grad in plain.items() if grad is None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecated alias Trainer still calls
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert all(layer.gradient_checkpointing for layer in model.model.fusion_layers)
    checkpointed = gradients(model, batch, labels)
    without = sorted(name for name, grad in checkpointed.items() if grad is None)
    assert not without, f"{len(without)} parameters got no gradient, e.g. {without[:4]}"
    for name in ("heads.topic.weight", "heads.tags.bias", "heads.score.weight", "task_weighting.log_variance"):
        assert plain[name].abs().max().item() > 1e-6, name  # a real gradient, compared below
    for name, grad in plain.items():
        assert max_diff(grad, checkpointed[name]) <= 1e-5, name
