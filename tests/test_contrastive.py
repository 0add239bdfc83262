"""MMFusionContrastiveModel: an item's embedding depends on that item alone and is a unit vector; the loss is the
hand-computed symmetric InfoNCE (or SigLIP's sigmoid loss) over the rows that have both modalities of each pair,
averaged over the pairs with a row, restricted to the anchor's pairs when one is set, plus the fused term; the
logit scale is clamped at 100; every trainable weight gets a gradient (also under activation checkpointing); the
model survives save/load and `AutoModel` gives it back; bad settings raise ValueError naming the field."""

from __future__ import annotations

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
import torch.nn.functional as F
from transformers import AutoModel

from conftest import WITHOUT_PROJECT, make_batch, tiny_fusion_config
from modeling_mm import MMFusionConfig, MMFusionContrastiveModel, MMFusionModel

BATCH_SIZE = 6
PROJECTION_DIM = 16
# every pair of modalities has rows, and every row lacks something or has all three
GAPS = {"has_image": [1, 1, 0, 1, 1, 1], "has_text": [1, 0, 1, 1, 1, 1], "has_audio": [0, 1, 1, 1, 0, 1]}
EMBEDS = {"vision": "image_embeds", "text": "text_embeds", "audio": "audio_embeds"}
PRESENCE = {"vision": "has_image", "text": "has_text", "audio": "has_audio"}
PAIR_NAMES = {("vision", "text"): "image_text", ("vision", "audio"): "image_audio", ("text", "audio"): "text_audio"}


def build(seed: int = 0, modalities=("vision", "text", "audio"), **overrides) -> MMFusionContrastiveModel:
    torch.manual_seed(seed)
    return MMFusionContrastiveModel(tiny_fusion_config(modalities, projection_dim=PROJECTION_DIM, **overrides)).eval()


def batch_with(presence: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    batch = make_batch(len(next(iter(presence.values()))), seed=seed)
    batch.update({key: torch.tensor(value).bool() for key, value in presence.items()})
    return batch


def hand_infonce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    logits = scale * a @ b.T
    target = torch.arange(a.shape[0])
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def hand_sigmoid(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    logits = scale * a @ b.T + bias
    labels = 2 * torch.eye(a.shape[0]) - 1
    return -F.logsigmoid(labels * logits).sum() / a.shape[0]


def hand_pair_losses(out, pair_loss, pairs=PAIR_NAMES) -> dict[str, torch.Tensor]:
    """Each pair's loss from the returned embeddings, over the rows that have both modalities (those with a row)."""
    losses = {}
    for (a, b), name in pairs.items():
        both = getattr(out, PRESENCE[a]) & getattr(out, PRESENCE[b])
        if both.any():
            losses[name] = pair_loss(getattr(out, EMBEDS[a])[both], getattr(out, EMBEDS[b])[both])
    return losses


def trimmed_row(batch: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Row i alone, its text and audio cut to their true lengths (no padding at all)."""
    text_length, audio_length = int(batch["attention_mask"][i].sum()), int(batch["audio_attention_mask"][i].sum())
    return {"pixel_values": batch["pixel_values"][i : i + 1],
            "input_ids": batch["input_ids"][i : i + 1, :text_length],
            "attention_mask": batch["attention_mask"][i : i + 1, :text_length],
            "token_type_ids": batch["token_type_ids"][i : i + 1, :text_length],
            "input_values": batch["input_values"][i : i + 1, :audio_length],
            "audio_attention_mask": batch["audio_attention_mask"][i : i + 1, :audio_length]}


def alone(model: MMFusionContrastiveModel, modality: str, inputs: dict[str, torch.Tensor], **kwargs) -> torch.Tensor:
    if modality == "vision":
        return model.get_image_features(inputs["pixel_values"], **kwargs)
    if modality == "text":
        return model.get_text_features(inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"], **kwargs)
    return model.get_audio_features(inputs["input_values"], inputs["audio_attention_mask"], **kwargs)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# ---- 1. embeddings ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("modality", ["vision", "text", "audio"])
def test_features_are_unit_vectors_with_normalize_and_the_raw_projection_without(modality):
    model = build()
    batch = make_batch(4)
    with torch.no_grad():
        unit, raw = alone(model, modality, batch), alone(model, modality, batch, normalize=False)
    assert unit.shape == (4, PROJECTION_DIM)
    assert max_diff(unit.norm(dim=-1), torch.ones(4)) <= 1e-5
    assert (raw.norm(dim=-1) - 1).abs().min().item() > 1e-2  # the raw projection is not unit-norm by chance
    assert max_diff(F.normalize(raw, dim=-1), unit) <= 1e-6


def test_an_items_embedding_is_the_same_alone_and_in_a_batch_with_other_items_and_modalities():
    model = build()
    batch = batch_with(GAPS)
    with torch.no_grad():
        out = model(**batch)
        for modality, key in EMBEDS.items():
            embeds, has = getattr(out, key), getattr(out, PRESENCE[modality])
            assert torch.equal(has, batch[PRESENCE[modality]])
            assert torch.equal(embeds[~has], torch.zeros_like(embeds[~has]))  # rows without it hold zeros
            assert max_diff(embeds[has].norm(dim=-1), torch.ones(int(has.sum()))) <= 1e-5
            for i in has.nonzero().flatten().tolist():
                assert max_diff(embeds[i], alone(model, modality, trimmed_row(batch, i))[0]) <= 1e-5, (modality, i)


def test_cached_tower_states_give_the_same_embeddings_as_raw_inputs():
    model = build()
    batch = batch_with(GAPS)
    text = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.no_grad():
        cached = model.get_text_features(tower_states={"text": model.encode_tower("text", **text)})
        assert max_diff(cached, model.get_text_features(**text)) <= 1e-6
        states = {"vision": model.encode_tower("vision", pixel_values=batch["pixel_values"])}
        raw = model(**batch)
        from_cache = model(**{k: v for k, v in batch.items() if k != "pixel_values"}, tower_states=states)
    for key in EMBEDS.values():
        assert max_diff(getattr(raw, key), getattr(from_cache, key)) <= 1e-6, key
    with pytest.raises(ValueError, match=r"tower_states: get_text_features takes only 'text', got \['vision'\]"):
        model.get_text_features(tower_states=states)
    with pytest.raises(ValueError, match=r"input_ids: required \(or tower_states\['text'\]\)"):
        model.get_text_features()


def test_logits_per_pair_are_the_scaled_similarities_of_every_row_with_each_modality():
    model = build()
    batch = batch_with(GAPS)
    with torch.no_grad():
        out = model(**batch)
    assert set(out.logits_per_pair) == {"image_text", "image_audio", "text_audio"}
    for (a, b), name in PAIR_NAMES.items():
        rows_a, rows_b = getattr(out, PRESENCE[a]), getattr(out, PRESENCE[b])
        expected = out.logit_scale * getattr(out, EMBEDS[a])[rows_a] @ getattr(out, EMBEDS[b])[rows_b].T
        assert out.logits_per_pair[name].shape == (int(rows_a.sum()), int(rows_b.sum()))
        assert max_diff(out.logits_per_pair[name], expected) <= 1e-6, name
    assert out.loss is None and out.fused_embeds is None and out.logit_bias is None


# ---- 2. the loss ------------------------------------------------------------------------------------------------------

def test_infonce_loss_is_the_mean_of_hand_computed_symmetric_infonce_over_rows_with_both():
    model = build()
    with torch.no_grad():
        out = model(**batch_with(GAPS), return_loss=True)
    losses = hand_pair_losses(out, lambda a, b: hand_infonce(a, b, out.logit_scale))
    assert len(losses) == 3
    expected = torch.stack(list(losses.values())).mean()
    assert abs(out.loss.item() - expected.item()) <= 1e-6
    assert out.loss.item() > 0.1  # a real loss (6 near-random rows), not a zero by construction


def test_a_pair_without_a_row_drops_out_of_the_average_and_keeps_its_weights_in_the_graph():
    # images and audio never in the same row: the image-audio pair has no row
    presence = {"has_image": [1, 1, 1, 0, 0, 0], "has_text": [1, 1, 1, 1, 1, 1], "has_audio": [0, 0, 0, 1, 1, 1]}
    model = build().train()
    out = model(**batch_with(presence), return_loss=True)
    assert out.logits_per_pair["image_audio"].shape == (3, 3)  # still compared, for retrieval
    losses = hand_pair_losses(out, lambda a, b: hand_infonce(a, b, out.logit_scale))
    assert set(losses) == {"image_text", "text_audio"}
    assert abs(out.loss.item() - (losses["image_text"] + losses["text_audio"]).item() / 2) <= 1e-6
    out.loss.backward()
    assert not [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]


def test_sigmoid_loss_is_siglips_with_the_learned_bias():
    model = build(contrastive_loss="sigmoid")
    assert model.logit_bias.item() == -10.0  # SigLIP's init
    with torch.no_grad():
        model.logit_bias.fill_(-2.5)  # away from the init, so a missing bias would show
        out = model(**batch_with(GAPS), return_loss=True)
    assert out.logit_bias.item() == -2.5
    losses = hand_pair_losses(out, lambda a, b: hand_sigmoid(a, b, out.logit_scale, out.logit_bias))
    expected = torch.stack(list(losses.values())).mean()
    assert abs(out.loss.item() - expected.item()) <= 1e-6
    rows_a, rows_b = out.has_image, out.has_text
    assert max_diff(out.logits_per_pair["image_text"],
                    out.logit_scale * out.image_embeds[rows_a] @ out.text_embeds[rows_b].T - 2.5) <= 1e-6


def test_the_anchor_trains_only_the_pairs_that_include_it():
    with torch.no_grad():
        out = build(contrastive_anchor="text")(**batch_with(GAPS), return_loss=True)
        all_pairs = build()(**batch_with(GAPS), return_loss=True).loss
    losses = hand_pair_losses(out, lambda a, b: hand_infonce(a, b, out.logit_scale))
    assert abs(out.loss.item() - (losses["image_text"] + losses["text_audio"]).item() / 2) <= 1e-6
    assert abs(out.loss.item() - all_pairs.item()) > 1e-4  # the image-audio pair was really left out

    # the anchor (vision) never shares a row with another modality: nothing is trained, text-audio included
    presence = {"has_image": [1, 1, 0, 0, 0, 0], "has_text": [0, 0, 1, 1, 1, 1], "has_audio": [0, 0, 1, 1, 1, 1]}
    for anchor, trains in (("vision", False), (None, True)):
        model = build(contrastive_anchor=anchor).train()
        loss = model(**batch_with(presence), return_loss=True).loss
        loss.backward()
        assert (loss.item() == 0.0) is not trains, anchor
        for projection in (model.text_projection, model.audio_projection):
            assert projection.weight.grad is not None
            assert (projection.weight.grad.abs().max().item() > 1e-6) is trains, anchor


def test_the_fused_term_adds_its_weight_times_the_loss_between_fused_and_single_embeddings():
    weight = 0.5
    model = build(fused_contrastive_weight=weight)
    # rows 1 and 2 have one modality each: no fused term for them
    batch = batch_with({"has_image": [1, 0, 0, 1, 1, 1], "has_text": [1, 1, 0, 1, 0, 1],
                        "has_audio": [0, 0, 1, 1, 1, 1]})
    with torch.no_grad():
        out = model(**batch, return_loss=True)
        plain = build()(**batch, return_loss=True)  # same seed: the same weights, without the fused term
    several = (batch["has_image"].int() + batch["has_text"].int() + batch["has_audio"].int()) >= 2
    assert several.tolist() == [True, False, False, True, True, True]
    assert torch.equal(out.fused_embeds[~several], torch.zeros_like(out.fused_embeds[~several]))
    assert max_diff(out.fused_embeds[several].norm(dim=-1), torch.ones(4)) <= 1e-5
    fused_terms = []
    for modality, key in EMBEDS.items():
        rows = several & getattr(out, PRESENCE[modality])
        fused_terms.append(hand_infonce(out.fused_embeds[rows], getattr(out, key)[rows], out.logit_scale))
    pairs = hand_pair_losses(out, lambda a, b: hand_infonce(a, b, out.logit_scale))
    expected = torch.stack(list(pairs.values())).mean() + weight * torch.stack(fused_terms).mean()
    assert abs(out.loss.item() - expected.item()) <= 1e-6
    assert abs(out.loss.item() - plain.loss.item()) > 1e-3
    assert abs(out.loss.item() - plain.loss.item() - weight * torch.stack(fused_terms).mean().item()) <= 1e-6
    # a row's fused embedding is that row's alone, too
    with torch.no_grad():
        row = {k: v[3:4] for k, v in batch.items()}
        assert max_diff(out.fused_embeds[3], model.get_fused_features(**row)[0]) <= 1e-5



def test_the_fused_embedding_ignores_a_modality_that_no_row_of_the_batch_has():
    """Audio inputs given, but has_audio False for every row (a DDP process whose share lacks audio): the fused
    embeddings are those of the batch without any audio input. (They took the audio in, before the fix.)"""
    model = build(fused_contrastive_weight=0.5)
    batch = batch_with({"has_image": [1, 1, 0, 1], "has_text": [1, 1, 1, 1], "has_audio": [0, 0, 0, 0]})
    without_audio = {k: v for k, v in batch.items() if k not in ("input_values", "audio_attention_mask", "has_audio")}
    with torch.no_grad():
        given, absent = model(**batch, return_loss=True), model(**without_audio, return_loss=True)
    assert max_diff(given.fused_embeds, absent.fused_embeds) <= 1e-6
    assert abs(given.loss.item() - absent.loss.item()) <= 1e-6


# ---- 3. the logit scale -----------------------------------------------------------------------------------------------

def test_the_logit_scale_starts_at_one_over_007_and_is_clamped_at_100():
    model = build()
    assert abs(model.logit_scale.item() - 2.6592) <= 1e-6
    with torch.no_grad():
        assert abs(model(**make_batch(4)).logit_scale.item() - 1 / 0.07) <= 1e-3
        model.logit_scale.fill_(10.0)  # exp(10) = 22026
    model.train()
    out = model(**make_batch(4), return_loss=True)
    assert out.logit_scale.item() == 100.0
    expected = 100.0 * out.image_embeds @ out.text_embeds.T
    assert max_diff(out.logits_per_pair["image_text"], expected) <= 1e-5
    out.loss.backward()
    assert model.logit_scale.grad.item() == 0.0  # the clamp holds, as in CLIP


# ---- 4. gradients -----------------------------------------------------------------------------------------------------

def gradients(model, batch) -> dict[str, torch.Tensor | None]:
    model.zero_grad()
    model(**batch, return_loss=True).loss.backward()
    return {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_every_trainable_weight_gets_a_gradient_and_checkpointing_gives_the_same(use_reentrant):
    model = build(contrastive_loss="sigmoid", fused_contrastive_weight=0.5).train()
    batch = batch_with(GAPS)
    plain = gradients(model, batch)
    assert not [name for name, grad in plain.items() if grad is None]
    zero = sorted(name for name, grad in plain.items() if grad.abs().max().item() == 0.0)
    assert not zero, zero  # every weight is read (the tiny wav2vec2 has no SpecAugment mask embedding)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert all(layer.gradient_checkpointing for layer in model.model.fusion_layers)
    checkpointed = gradients(model, batch)
    assert not [name for name, grad in checkpointed.items() if grad is None]
    for name, grad in plain.items():
        assert max_diff(grad, checkpointed[name]) <= 1e-5, name


def test_a_batch_without_a_modality_still_gives_every_weight_a_gradient():
    # DDP with find_unused_parameters=False: the audio tower, its fusion stream and audio_projection are unused here
    model = build().train()
    batch = {k: v for k, v in batch_with(GAPS).items() if k in ("pixel_values", "input_ids", "attention_mask",
                                                                 "token_type_ids", "has_image", "has_text")}
    out = model(**batch, return_loss=True)
    assert set(out.logits_per_pair) == {"image_text"} and out.audio_embeds is None
    out.loss.backward()
    assert not [name for name, p in model.named_parameters() if p.grad is None]
    assert torch.equal(model.audio_projection.weight.grad, torch.zeros_like(model.audio_projection.weight))


# ---- 5. saving and loading --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_contrastive(tmp_path_factory):
    """A sigmoid-loss model with its scale and bias moved from their inits, saved."""
    folder = tmp_path_factory.mktemp("contrastive") / "model"
    model = build(contrastive_loss="sigmoid", contrastive_anchor="text", fused_contrastive_weight=0.25)
    with torch.no_grad():
        model.logit_scale.fill_(3.1)
        model.logit_bias.fill_(-4.0)
    model.save_pretrained(folder)
    return model, folder


def test_save_pretrained_writes_the_contrastive_auto_map(saved_contrastive):
    _, folder = saved_contrastive
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_mm.MMFusionConfig",
                                  "AutoModel": "modeling_mm.MMFusionContrastiveModel"}
    assert config["is_contrastive"] is True and config["architectures"] == ["MMFusionContrastiveModel"]
    assert (config["contrastive_loss"], config["contrastive_anchor"], config["projection_dim"]) == (
        "sigmoid", "text", PROJECTION_DIM)
    assert {"configuration_mm.py", "modeling_mm.py", "model.safetensors"} <= {p.name for p in folder.iterdir()}


@pytest.mark.parametrize("load", [MMFusionContrastiveModel.from_pretrained, AutoModel.from_pretrained],
                         ids=["MMFusionContrastiveModel", "AutoModel"])
def test_from_pretrained_round_trip_is_exact(saved_contrastive, load):
    model, folder = saved_contrastive
    loaded, info = load(folder, output_loading_info=True)
    assert type(loaded) is MMFusionContrastiveModel
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert set(loaded.state_dict()) == set(model.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    batch = batch_with(GAPS)
    with torch.no_grad():
        before, after = model(**batch, return_loss=True), loaded.eval()(**batch, return_loss=True)
    assert before.loss.item() == after.loss.item()
    for name, logits in before.logits_per_pair.items():
        assert torch.equal(logits, after.logits_per_pair[name]), name


def test_auto_model_still_gives_the_base_model_for_other_checkpoints(tmp_path):
    torch.manual_seed(0)
    MMFusionModel(tiny_fusion_config()).save_pretrained(tmp_path)
    assert type(AutoModel.from_pretrained(tmp_path)) is MMFusionModel


def test_loading_a_base_checkpoint_initialises_the_new_head_weights(tmp_path):
    torch.manual_seed(0)
    base = MMFusionModel(tiny_fusion_config())
    base.save_pretrained(tmp_path)
    model, info = MMFusionContrastiveModel.from_pretrained(tmp_path, contrastive_loss="sigmoid",
                                                           projection_dim=PROJECTION_DIM, output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["audio_projection.weight", "fused_projection.weight",
                                            "similarity.logit_bias", "similarity.logit_scale", "text_projection.weight",
                                            "vision_projection.weight"]
    assert abs(model.logit_scale.item() - 2.6592) <= 1e-6 and model.logit_bias.item() == -10.0
    for modality in ("vision", "text", "audio", "fused"):
        weight = getattr(model, f"{modality}_projection").weight
        assert 0.01 < weight.std().item() < 0.03, modality  # normal(0, initializer_range = 0.02)
    for name, tensor in base.state_dict().items():
        assert torch.equal(tensor, model.model.state_dict()[name]), name


def test_trust_remote_code_loads_the_contrastive_model_where_the_project_cannot_be_imported(saved_contrastive,
                                                                                               tmp_path):
    model, folder = saved_contrastive
    copied = tmp_path / "copied"
    shutil.copytree(folder, copied)
    batch = batch_with(GAPS)
    with torch.no_grad():
        expected = model(**batch, return_loss=True)
    torch.save({"batch": batch, "loss": expected.loss, "text_embeds": expected.text_embeds}, tmp_path / "case.pt")
    (tmp_path / "work").mkdir()
    environment = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    environment.pop("PYTHONPATH", None)
    script = WITHOUT_PROJECT + textwrap.dedent(f"""
        import torch
        from transformers import AutoModel
        case = torch.load({str(tmp_path / "case.pt")!r})
        model = AutoModel.from_pretrained({str(copied)!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == "MMFusionContrastiveModel", type(model)
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
        with torch.no_grad():
            out = model(**case["batch"], return_loss=True)
        assert abs(out.loss.item() - case["loss"].item()) <= 1e-6, (out.loss, case["loss"])
        assert (out.text_embeds - case["text_embeds"]).abs().max().item() <= 1e-6
        print("identical")
    """)
    result = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path / "work", env=environment,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "identical" in result.stdout, result.stderr[-3000:]


# ---- 6. settings ------------------------------------------------------------------------------------------------------

def test_the_defaults_build_and_a_contrastive_config_round_trips(tmp_path):
    config = MMFusionConfig()
    assert (config.is_contrastive, config.projection_dim, config.logit_scale_init_value, config.logit_bias_init_value,
            config.contrastive_loss, config.contrastive_anchor, config.fused_contrastive_weight) == (
        False, 256, 2.6592, -10.0, "infonce", None, 0.0)
    assert abs(config.logit_scale_init_value - math.log(1 / 0.07)) <= 1e-4
    config = tiny_fusion_config(projection_dim=8, contrastive_loss="sigmoid", contrastive_anchor="audio",
                                fused_contrastive_weight=0.3, is_contrastive=True)
    config.save_pretrained(tmp_path)
    loaded = MMFusionConfig.from_pretrained(tmp_path)
    assert {**loaded.to_dict(), "_name_or_path": ""} == {**config.to_dict(), "_name_or_path": ""}


BAD_SETTINGS = [
    ({"projection_dim": 0}, r"projection_dim: must be a positive integer, got 0"),
    ({"projection_dim": 2.5}, r"projection_dim: must be a positive integer, got 2\.5"),
    ({"projection_dim": True}, r"projection_dim: must be a positive integer, got True"),
    ({"logit_scale_init_value": float("nan")}, r"logit_scale_init_value: must be a finite number, got nan"),
    ({"logit_scale_init_value": 5.0}, r"logit_scale_init_value: must be <= ln\(100\) = 4\.6052 .* got 5\.0"),
    ({"logit_bias_init_value": float("-inf")}, r"logit_bias_init_value: must be a finite number, got -inf"),
    ({"contrastive_loss": "clip"}, r"contrastive_loss: must be one of \('infonce', 'sigmoid'\), got 'clip'"),
    ({"contrastive_anchor": "image"}, r"contrastive_anchor: must be None or one of \('vision', 'text', 'audio'\)"),
    ({"fused_contrastive_weight": -0.1}, r"fused_contrastive_weight: must be >= 0, got -0\.1"),
    ({"fused_contrastive_weight": float("inf")}, r"fused_contrastive_weight: must be a finite number, got inf"),
    ({"is_contrastive": "yes"}, r"is_contrastive: must be True or False, got 'yes'"),
    ({"is_contrastive": True, "tasks": [{"name": "t", "problem_type": "regression"}]},
     r"is_contrastive, tasks: a contrastive model has no task heads"),
]


@pytest.mark.parametrize("settings, message", BAD_SETTINGS, ids=[m.split(":")[0] + str(i)
                                                                 for i, (_, m) in enumerate(BAD_SETTINGS)])
def test_bad_contrastive_settings_raise_value_error_naming_the_field(settings, message):
    with pytest.raises(ValueError, match=message):
        MMFusionConfig(**settings)


def test_the_model_refuses_an_anchor_without_a_tower_and_task_heads():
    with pytest.raises(ValueError, match=r"contrastive_anchor: 'audio' is not one of this model's towers "
                                         r"\('vision', 'text'\)"):
        MMFusionContrastiveModel(tiny_fusion_config(("vision", "text"), contrastive_anchor="audio"))
    tasks = [{"name": "t", "problem_type": "regression"}]
    with pytest.raises(ValueError, match=r"tasks: MMFusionContrastiveModel has no task heads"):
        MMFusionContrastiveModel(tiny_fusion_config(("text",), tasks=tasks))

