"""LoRA and per-tower training modes: what trains, what stays bit-identical, and what a saved model reloads as."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from torch import nn
from transformers import AlbertConfig, AutoConfig, AutoModelForSequenceClassification

from conftest import FUSION_KWARGS, make_batch, tiny_fusion_config, tiny_timm_config
from modeling_mm import MMFusionConfig, MMFusionForSequenceClassification, MMFusionModel
from training.lora import (
    LORA_PRESETS,
    LoraSettings,
    _modules_to_save,
    apply_lora,
    load_trained_model,
    lora_target_modules,
    save_trained_model,
)

LABELS = torch.tensor([0, 1, 0, 1])
FUSION_AND_HEAD = ("model.input_projections.", "model.fusion_layers.", "model.final_norms.", "classifier.")


def from_towers(**towers) -> MMFusionForSequenceClassification:
    torch.manual_seed(0)
    return MMFusionForSequenceClassification.from_towers(**towers, **FUSION_KWARGS)


def weights_in_use(model) -> dict[str, torch.Tensor]:
    """The weights a (peft) model computes with besides LoRA, under their names before `apply_lora`: for wrapped
    modules the trained copy, for LoRA layers the untouched base layer."""
    plain = copy.deepcopy(model).unload() if isinstance(model, PeftModel) else model
    return {name: value.detach().clone() for name, value in plain.state_dict().items()}


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def trained(vit_dir, bert_dir, wav2vec2_dir):
    """Vision frozen, text LoRA, audio full; a few AdamW steps on random batches."""
    model = from_towers(vision=vit_dir, text=bert_dir, audio=wav2vec2_dir)
    before = weights_in_use(model)
    settings = LoraSettings(vision_mode="frozen", text_mode="lora", audio_mode="full", lora_dropout=0.0)
    peft_model = apply_lora(model, settings)
    lora_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for step in range(3):
        peft_model(**make_batch(seed=step), labels=LABELS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    return SimpleNamespace(model=peft_model, before=before, lora_before=lora_before, batch=make_batch(seed=10))


# ---- what trains ---------------------------------------------------------------------------------------------------

def test_lora_and_frozen_tower_weights_are_bit_identical_after_training(trained):
    after = weights_in_use(trained.model)
    towers = [name for name in trained.before if name.startswith(("model.vision_model.", "model.text_model."))]
    assert towers
    for name in towers:
        assert torch.equal(after[name], trained.before[name]), name


def test_lora_fusion_head_and_full_tower_weights_changed(trained):
    after = weights_in_use(trained.model)
    for name in trained.before:
        if name.startswith(FUSION_AND_HEAD):
            assert not torch.equal(after[name], trained.before[name]), name
    audio = [name for name in trained.before if name.startswith("model.audio_model.")]
    changed = [name for name in audio if not torch.equal(after[name], trained.before[name])]
    assert "model.audio_model.encoder.layers.0.attention.q_proj.weight" in changed
    assert len(changed) > len(audio) / 2
    lora_after = dict(trained.model.named_parameters())
    assert len(trained.lora_before) == 2 * 8  # lora_A and lora_B of 2 layers x 4 projections
    for name, value in trained.lora_before.items():
        assert not torch.equal(lora_after[name], value), name


def test_only_lora_fusion_head_and_full_towers_are_trainable(trained):
    trainable = [name for name, p in trained.model.named_parameters() if p.requires_grad]
    for name in trainable:
        name = name.removeprefix("base_model.model.")
        assert ("lora_" in name and name.startswith("model.text_model.")) or (
            ".modules_to_save.default." in name
            and name.startswith(("model.audio_model.", *FUSION_AND_HEAD))
        ), name


def test_every_trainable_weight_gets_a_gradient_when_a_modality_is_absent(vit_dir, bert_dir, wav2vec2_dir):
    """DDP with find_unused_parameters=False needs this; the fusion's anchor must reach peft's trained copies."""
    model = apply_lora(from_towers(vision=vit_dir, text=bert_dir, audio=wav2vec2_dir),
                       LoraSettings(vision_mode="full", text_mode="lora", audio_mode="frozen"))
    model.train()
    model(**make_batch(modalities=("vision", "text")), labels=LABELS).loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert any("audio" in name for name, p in model.named_parameters() if p.requires_grad)


# ---- targets -------------------------------------------------------------------------------------------------------

def test_targets_are_exactly_the_lora_towers_attention_projections(vit_dir, bert_dir, wav2vec2_dir):
    model = from_towers(vision=vit_dir, text=bert_dir, audio=wav2vec2_dir)
    settings = LoraSettings(vision_mode="frozen", text_mode="lora", audio_mode="full")
    expected = [f"model.text_model.encoder.layer.{layer}.attention.{name}" for layer in (0, 1)
                for name in ("self.query", "self.key", "self.value", "output.dense")]
    assert lora_target_modules(model, settings) == expected
    peft_model = apply_lora(model, settings)
    assert peft_model.base_model.targeted_module_names == expected
    lora_layers = [name.removeprefix("base_model.model.") for name, module in peft_model.named_modules()
                   if isinstance(module, LoraLayer)]
    assert lora_layers == expected


@pytest.mark.parametrize("lora_tower, other_tower", [("audio", "vision"), ("vision", "audio")])
def test_shared_projection_names_are_hit_only_in_the_lora_tower(clip_vision_dir, wav2vec2_dir, lora_tower,
                                                                 other_tower):
    """CLIP vision and wav2vec2 both name their projections q_proj/k_proj/v_proj/out_proj."""
    model = from_towers(vision=clip_vision_dir, audio=wav2vec2_dir)
    settings = LoraSettings(**{f"{lora_tower}_mode": "lora", f"{other_tower}_mode": "frozen"})
    targets = lora_target_modules(model, settings)
    assert len(targets) == 2 * 4 and all(name.startswith(f"model.{lora_tower}_model.") for name in targets)
    peft_model = apply_lora(model, settings)
    hit = [name for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)]
    assert hit and not any(f"{other_tower}_model" in name for name in hit)


def _tiny(model_type: str, **overrides):
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    if model_type == "timm_wrapper":
        return tiny_timm_config()
    if model_type == "distilbert":
        sizes = dict(dim=32, n_layers=2, n_heads=4, hidden_dim=37)
    if model_type in ("vit", "deit", "dinov2", "beit", "clip_vision_model", "siglip_vision_model"):
        sizes.update(image_size=32, patch_size=8)
    if model_type in ("wav2vec2", "hubert", "wavlm", "data2vec-audio"):
        sizes.update(conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                     num_conv_pos_embedding_groups=2)
    return AutoConfig.for_model(model_type, **{**sizes, **overrides})


PRESET_CASES = [(model_type, modality) for modality, types in {
    "text": ("bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "mpnet", "deberta-v2",
             "clip_text_model"),
    "vision": ("vit", "deit", "dinov2", "beit", "clip_vision_model", "siglip_vision_model", "timm_wrapper"),
    "audio": ("wav2vec2", "hubert", "wavlm", "data2vec-audio"),
}.items() for model_type in types]


def test_every_preset_has_a_case():
    assert sorted(model_type for model_type, _ in PRESET_CASES) == sorted(LORA_PRESETS)


@pytest.mark.parametrize("model_type, modality", PRESET_CASES)
def test_preset_hits_each_layers_attention_projections_and_only_linears(model_type, modality):
    config = MMFusionConfig(**{f"{modality}_config": _tiny(model_type)}, **FUSION_KWARGS)
    model = MMFusionForSequenceClassification(config)
    targets = lora_target_modules(model, LoraSettings())
    preset = LORA_PRESETS[model_type]
    assert len(targets) == 2 * len(preset), targets
    assert all(name.startswith(f"model.{modality}_model.") for name in targets)
    assert all(isinstance(model.get_submodule(name), nn.Linear) for name in targets)
    assert {next(s for s in preset if name.endswith("." + s)) for name in targets} == set(preset)


# ---- refused settings ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, argument", [
    (dict(text_mode="adapter"), "text_mode"),
    (dict(vision_mode="LoRA"), "vision_mode"),
    (dict(lora_r=0), "lora_r"),
    (dict(lora_alpha=0), "lora_alpha"),
    (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(fusion_mode="lora"), "fusion_mode"),
])
def test_bad_settings_are_refused(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        LoraSettings(**kwargs)


def test_targets_given_as_a_string_are_split():
    assert LoraSettings(text_lora_targets="query, value").text_lora_targets == ["query", "value"]


def test_tower_type_without_preset_needs_targets():
    albert = AlbertConfig(hidden_size=32, embedding_size=16, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=37)
    model = MMFusionForSequenceClassification(MMFusionConfig(text_config=albert, **FUSION_KWARGS))
    with pytest.raises(ValueError, match="text_lora_targets: no LoRA preset .* 'albert'"):
        lora_target_modules(model, LoraSettings())
    targets = lora_target_modules(model, LoraSettings(text_lora_targets=["attention.query", "attention.value"]))
    assert [name.rsplit(".", 1)[-1] for name in targets] == ["query", "value"]
    assert apply_lora(model, LoraSettings(text_mode="frozen")) is model  # no LoRA tower: no targets needed


@pytest.mark.parametrize("modality, targets, message", [
    ("text", ["no_such_layer"], "text_lora_targets: .* match no module of model.text_model"),
    ("vision", ["proj"], "vision_lora_targets: model.vision_model.timm_model.patch_embed.proj is a Conv2d"),
])
def test_targets_that_miss_or_hit_a_non_linear_are_refused(modality, targets, message):
    vision = {"vision_config": tiny_timm_config()} if modality == "vision" else {}
    model = MMFusionForSequenceClassification(tiny_fusion_config(("text",), **vision))
    with pytest.raises(ValueError, match=message):
        apply_lora(model, LoraSettings(**{f"{modality}_lora_targets": targets}))


def test_only_an_unwrapped_mm_fusion_model_is_accepted(bert_dir):
    peft_model = apply_lora(from_towers(text=bert_dir), LoraSettings())
    with pytest.raises(ValueError, match="model: expected an mm-fusion model"):
        apply_lora(peft_model, LoraSettings())


def test_modules_to_save_never_name_a_container_or_a_name_peft_would_match_twice():
    """peft wraps every module whose name ends with an entry, and cannot wrap ModuleDict/ModuleList."""
    toy = nn.Module()
    toy.model = nn.Module()
    toy.model.vision_model = nn.Module()
    toy.model.vision_model.vision_model = nn.Linear(2, 2)
    toy.model.vision_model.norm = nn.LayerNorm(2)
    toy.model.heads = nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Dropout()})
    assert _modules_to_save(toy, ["model.vision_model", "model.heads"]) == [
        "model.vision_model.vision_model", "model.vision_model.norm", "model.heads.a"]
    toy.model.vision_model.scale = nn.Parameter(torch.ones(1))  # would be lost if we descended
    with pytest.raises(ValueError, match="model: cannot save the weights of model.vision_model"):
        _modules_to_save(toy, ["model.vision_model"])


# ---- saving and loading --------------------------------------------------------------------------------------------

def test_merged_folder_loads_in_plain_transformers_with_the_adapter_models_outputs(trained, tmp_path):
    expected = logits(trained.model, trained.batch)
    save_trained_model(trained.model, tmp_path / "merged", merge=True)
    assert torch.equal(logits(trained.model, trained.batch), expected)  # merged a copy, not the model

    files = {path.name for path in (tmp_path / "merged").iterdir()}
    assert {"config.json", "model.safetensors", "modeling_mm.py", "configuration_mm.py"} <= files
    assert "adapter_config.json" not in files
    auto_map = json.loads((tmp_path / "merged" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForSequenceClassification"] == "modeling_mm.MMFusionForSequenceClassification"

    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert type(loaded) is MMFusionForSequenceClassification and not hasattr(loaded, "peft_config")
    assert not any("lora_" in n or "modules_to_save" in n or "original_module" in n for n in loaded.state_dict())
    torch.testing.assert_close(logits(loaded, trained.batch), expected, atol=1e-4, rtol=0)
    # the merged weights are peft's trained copies, not the original modules they were copied from
    wrapper = trained.model.base_model.model.classifier
    assert torch.equal(loaded.classifier.weight, wrapper.modules_to_save["default"].weight)
    assert not torch.equal(loaded.classifier.weight, wrapper.original_module.weight)
    state = loaded.state_dict()
    for name, value in weights_in_use(trained.model).items():
        if not name.startswith("model.text_model."):  # the LoRA tower's weights now include the LoRA update
            assert torch.equal(state[name], value), name


def test_adapter_folder_reloads_without_missing_keys_and_with_identical_outputs(trained, tmp_path):
    save_trained_model(trained.model, tmp_path / "adapter", merge=False)
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any("lora_A" in key for key in saved)
    assert any(key.startswith("base_model.model.model.audio_model.") for key in saved)  # the full tower
    assert any(key.startswith("base_model.model.classifier.") for key in saved)
    assert not any(key.startswith("base_model.model.model.vision_model.") for key in saved)  # frozen: not saved
    assert all("lora_" in key for key in saved if ".text_model." in key)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_trained_model(tmp_path / "adapter")
    assert not [w for w in caught if "missing" in str(w.message).lower()]
    assert isinstance(loaded, PeftModel) and not loaded.training
    torch.testing.assert_close(logits(loaded, trained.batch), logits(trained.model, trained.batch), atol=1e-6,
                               rtol=0)


def test_adapter_of_a_model_loaded_from_a_checkpoint_reloads_on_that_checkpoint(bert_dir, tmp_path):
    from_towers(text=bert_dir).save_pretrained(tmp_path / "base")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3,
                                                               ignore_mismatched_sizes=True)  # a new head
    model = apply_lora(model, LoraSettings(lora_dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:  # stands in for training
                param.add_(torch.randn_like(param) * 0.01)
    save_trained_model(model, tmp_path / "adapter", merge=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_trained_model(tmp_path / "adapter")
    assert not [w for w in caught if "missing" in str(w.message).lower()]
    batch = make_batch(modalities=("text",))
    model.eval()
    assert logits(loaded, batch).shape == (4, 3)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), atol=1e-6, rtol=0)


def test_adapter_of_towers_given_as_relative_paths_loads_from_any_directory(bert_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(bert_dir).parent)
    model = apply_lora(from_towers(text=Path(bert_dir).name), LoraSettings())
    save_trained_model(model, tmp_path / "adapter", merge=False)
    monkeypatch.chdir(tmp_path)
    batch = make_batch(modalities=("text",))
    torch.testing.assert_close(logits(load_trained_model("adapter"), batch), logits(model.eval(), batch),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("merge", [False, True])
def test_base_model_without_head_saves_and_reloads_as_itself(bert_dir, tmp_path, merge):
    torch.manual_seed(0)
    model = apply_lora(MMFusionModel.from_towers(text=bert_dir, **FUSION_KWARGS), LoraSettings())
    assert model.peft_config["default"].modules_to_save == [
        "input_projections.text", "fusion_layers.0", "fusion_layers.1", "final_norms.text"]
    save_trained_model(model, tmp_path / "saved", merge=merge)
    loaded = load_trained_model(tmp_path / "saved")
    assert type(loaded.get_base_model() if isinstance(loaded, PeftModel) else loaded) is MMFusionModel
    batch = make_batch(modalities=("text",))
    with torch.no_grad():
        expected = model.eval()(**batch).pooler_output
        torch.testing.assert_close(loaded(**batch).pooler_output, expected, atol=1e-5, rtol=0)


def test_adapter_needs_a_base_that_can_be_rebuilt(tmp_path):
    model = apply_lora(MMFusionForSequenceClassification(tiny_fusion_config(("text",))), LoraSettings())
    with pytest.raises(ValueError, match="merge: .* text tower was not loaded from a checkpoint"):
        save_trained_model(model, tmp_path / "adapter", merge=False)
    save_trained_model(model, tmp_path / "merged", merge=True)
    assert type(load_trained_model(tmp_path / "merged")) is MMFusionForSequenceClassification


@pytest.mark.parametrize("text_mode", ["lora", "full"])
def test_a_frozen_fusion_keeps_its_weights_while_the_head_and_towers_train(vit_dir, bert_dir, text_mode):
    """fusion_mode frozen (a trained encoder read by a new head): no fusion weight trains, under peft or without, and
    one step leaves them bit-identical while the head's weights move."""
    model = from_towers(vision=vit_dir, text=bert_dir)
    fusion_before = {k: v.clone() for k, v in model.model.state_dict().items()
                     if not k.split(".")[0].endswith("_model")}
    wrapped = apply_lora(model, LoraSettings(vision_mode="frozen", text_mode=text_mode, fusion_mode="frozen"))
    trainable = {name for name, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and not any(part in name for name in trainable
                                 for part in ("input_projections", "fusion_layers", "final_norms"))
    assert any("classifier" in name for name in trainable) and any("text_model" in name for name in trainable)
    head_before = model.classifier.weight.detach().clone() if text_mode == "full" else None
    optimizer = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=0.1)
    batch = make_batch(modalities=("vision", "text"))
    wrapped.train()
    wrapped(**batch, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    optimizer.step()
    after = model.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in fusion_before.items())
    if head_before is not None:
        assert not torch.equal(model.classifier.weight, head_before)


def test_without_a_lora_tower_the_model_is_trained_and_saved_as_is(vit_dir, bert_dir, tmp_path):
    model = from_towers(vision=vit_dir, text=bert_dir)
    assert apply_lora(model, LoraSettings(vision_mode="frozen", text_mode="full")) is model
    trainable = {name.split(".")[1] if name.startswith("model.") else name.split(".")[0]
                 for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"text_model", "input_projections", "fusion_layers", "final_norms", "classifier"}
    save_trained_model(model, tmp_path / "model", merge=False)
    loaded = load_trained_model(tmp_path / "model").eval()
    batch = make_batch(modalities=("vision", "text"))
    model.eval()
    assert torch.equal(logits(loaded, batch), logits(model, batch))
