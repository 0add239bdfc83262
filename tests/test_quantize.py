"""training/quantize.py: dynamic int8 for CPU inference, and mm-demo's --quantize."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

from conftest import FUSION_KWARGS, make_batch
from modeling_mm import MMFusionForSequenceClassification
from training.lora import LoraSettings, apply_lora
from training.quantize import MIN_QUANTIZED_WEIGHTS, quantize_for_cpu, quantized_linear_count

# 32 x 4096 = 2**17 weights: the fusion MLPs reach the default threshold, everything else in the tiny model is smaller
BIG_MLP = {**FUSION_KWARGS, "fusion_intermediate_size": MIN_QUANTIZED_WEIGHTS // FUSION_KWARGS["fusion_hidden_size"]}


@pytest.fixture(scope="module")
def tiny_model(vit_dir, bert_dir, wav2vec2_dir) -> MMFusionForSequenceClassification:
    torch.manual_seed(0)
    model = MMFusionForSequenceClassification.from_towers(
        vision=vit_dir, text=bert_dir, audio=wav2vec2_dir, num_labels=3, **BIG_MLP)
    return model.eval()


def linear_sizes(model: nn.Module) -> dict[str, int]:
    return {name: m.in_features * m.out_features for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_quantized_logits_stay_close_to_float32_and_keep_every_clear_prediction(tiny_model):
    """Tolerance: int8 weights and activations (per-tensor scales) move a random-init model's logits by 2-4% of their
    range (measured over seeds); allowed: 10%. A random-init head has near-ties, so the argmax must agree wherever
    float32's top-2 margin exceeds twice the largest logit change, and that must be most of the batch."""
    batch = make_batch(batch_size=16)
    quantized = quantize_for_cpu(copy.deepcopy(tiny_model), min_weights=0)
    with torch.no_grad():
        reference, logits = tiny_model(**batch).logits, quantized(**batch).logits
    difference = (logits - reference).abs().max()
    assert difference <= 0.1 * (reference.max() - reference.min())
    top2 = reference.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * difference
    assert clear.sum() >= len(clear) // 2
    assert torch.equal(logits.argmax(-1)[clear], reference.argmax(-1)[clear])


@pytest.mark.parametrize("min_weights", [0, MIN_QUANTIZED_WEIGHTS, 10**9])
def test_exactly_the_linears_with_at_least_min_weights_are_replaced(tiny_model, min_weights):
    sizes = linear_sizes(tiny_model)
    quantized = quantize_for_cpu(copy.deepcopy(tiny_model), min_weights=min_weights)
    modules = dict(quantized.named_modules())
    for name, size in sizes.items():
        assert isinstance(modules[name], DynamicQuantizedLinear if size >= min_weights else nn.Linear), name
    assert quantized_linear_count(quantized) == sum(size >= min_weights for size in sizes.values())
    with torch.no_grad():
        assert quantized(**make_batch(batch_size=2)).logits.shape == (2, 3)


def test_the_default_quantizes_the_big_mlps_and_skip_keeps_towers_in_float32(tiny_model):
    quantized = quantize_for_cpu(copy.deepcopy(tiny_model))
    names = {name for name, m in quantized.named_modules() if isinstance(m, DynamicQuantizedLinear)}
    assert names == {f"model.fusion_layers.{layer}.streams.{modality}.mlp.{fc}" for layer in range(2)
                     for modality in ("vision", "text", "audio") for fc in ("fc_in", "fc_out")}
    towers = [f"model.{modality}_model" for modality in ("vision", "text", "audio")]
    fusion_only = quantize_for_cpu(copy.deepcopy(tiny_model), min_weights=0, skip=towers)
    for name, module in fusion_only.named_modules():
        if isinstance(module, (nn.Linear, DynamicQuantizedLinear)):
            assert isinstance(module, nn.Linear) == name.startswith(tuple(towers)), name


def test_quantizing_emits_no_deprecation_warning_and_returns_an_eval_model(tiny_model):
    model = copy.deepcopy(tiny_model).train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantized = quantize_for_cpu(model, min_weights=0)
        with torch.no_grad():
            quantized(**make_batch(batch_size=2))
    assert [str(w.message) for w in caught if "quantiz" in str(w.message)] == []
    assert not quantized.training


def test_a_peft_model_is_merged_before_quantizing(tiny_model):
    peft_model = apply_lora(copy.deepcopy(tiny_model), LoraSettings(lora_dropout=0.0)).eval()
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:  # a non-zero update, so merging matters
                parameter.normal_(std=0.05)
        batch = make_batch(batch_size=4)
        reference = peft_model(**batch).logits
        quantized = quantize_for_cpu(peft_model, min_weights=0)
        logits = quantized(**batch).logits
    assert isinstance(quantized, MMFusionForSequenceClassification)
    assert not any("lora" in name for name, _ in quantized.named_modules())
    assert (logits - reference).abs().max() <= 0.1 * (reference.max() - reference.min())


@pytest.mark.parametrize("move, message", [
    (lambda m: m.to("meta"), "is on meta; quantize_for_cpu quantizes for the CPU only"),
    (lambda m: m.to(torch.bfloat16), "is torch.bfloat16; quantize_for_cpu takes a float32 model"),
])
def test_a_model_off_the_cpu_or_not_float32_is_refused(tiny_model, move, message):
    with pytest.raises(ValueError, match=message):
        quantize_for_cpu(move(copy.deepcopy(tiny_model)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_model_on_cuda_is_refused(tiny_model):
    with pytest.raises(ValueError, match="is on cuda:0"):
        quantize_for_cpu(copy.deepcopy(tiny_model).to("cuda"))


def test_negative_min_weights_is_refused(tiny_model):
    with pytest.raises(ValueError, match="min_weights: must be >= 0; got -1"):
        quantize_for_cpu(tiny_model, min_weights=-1)


# ---- mm-demo --quantize -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tiny_model, vit_dir, bert_dir, wav2vec2_dir, tmp_path_factory):
    from processors import MMFusionProcessor

    folder = tmp_path_factory.mktemp("quantize") / "model"
    tiny_model.save_pretrained(folder)
    MMFusionProcessor.from_towers(vision=vit_dir, text=bert_dir, audio=wav2vec2_dir).save_pretrained(folder)
    return folder


def test_the_demo_flag_builds_a_quantized_app_that_classifies(tiny_model_dir, tmp_path, monkeypatch):
    from demo.app import build_demo, parse_args

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    assert parse_args(["--quantize"]).quantize and not parse_args([]).quantize
    monkeypatch.setenv("MM_FUSION_QUANTIZE", "1")
    assert parse_args([]).quantize

    plain, quantized = build_demo(str(tiny_model_dir)), build_demo(str(tiny_model_dir), quantize=True)
    assert quantized_linear_count(plain.model) == 0
    assert quantized_linear_count(quantized.model) == 12 and quantized.model.device.type == "cpu"
    predict = next(fn.fn for fn in quantized.fns.values() if fn.api_name == "predict")
    labels, _, _, errors = predict(text=["a red circle with a deep tone"], image=[None], audio=[None])
    assert errors == [""] and set(labels[0]) == set(quantized.model.config.id2label.values())
