"""MMFusionConfig: every supported tower type is accepted for its own modality, invalid settings raise ValueError
naming the field, and the config survives a save/load round trip."""

import pytest
from transformers import (
    AutoConfig,
    BertConfig,
    CLIPConfig,
    CLIPVisionConfig,
    Dinov2Config,
    DistilBertConfig,
    HubertConfig,
    RobertaConfig,
    SiglipConfig,
    SiglipVisionConfig,
    ViTConfig,
    Wav2Vec2Config,
    WavLMConfig,
)

from conftest import tiny_bert_config, tiny_timm_config, tiny_vit_config, tiny_wav2vec2_config
from modeling_mm import MMFusionConfig

SUPPORTED_TOWERS = [
    ("vision_config", ViTConfig(), "vit"),
    ("vision_config", CLIPVisionConfig(), "clip_vision_model"),
    ("vision_config", CLIPConfig(), "clip_vision_model"),  # a full dual encoder contributes its vision tower
    ("vision_config", SiglipVisionConfig(), "siglip_vision_model"),
    ("vision_config", SiglipConfig(), "siglip_vision_model"),
    ("vision_config", Dinov2Config(), "dinov2"),
    ("vision_config", tiny_timm_config(), "timm_wrapper"),
    ("text_config", BertConfig(), "bert"),
    ("text_config", RobertaConfig(), "roberta"),
    ("text_config", DistilBertConfig(), "distilbert"),
    ("text_config", CLIPConfig(), "clip_text_model"),
    ("audio_config", Wav2Vec2Config(), "wav2vec2"),
    ("audio_config", HubertConfig(), "hubert"),
    ("audio_config", WavLMConfig(), "wavlm"),
]


@pytest.mark.parametrize("field, tower_config, model_type", SUPPORTED_TOWERS)
def test_each_supported_tower_is_accepted_for_its_modality(field, tower_config, model_type):
    config = MMFusionConfig(**{field: tower_config})
    assert getattr(config, field).model_type == model_type
    assert config.modalities == (field.removesuffix("_config"),)


def test_round_trip_through_dict_and_folder(tmp_path):
    config = MMFusionConfig(
        vision_config=tiny_vit_config(), text_config=tiny_bert_config().to_dict(), audio_config=tiny_wav2vec2_config(),
        fusion_hidden_size=48, fusion_num_heads=6, fusion_pooling="first", modality_dropout=0.25, num_labels=3,
    )
    config.save_pretrained(tmp_path)
    for loaded in (MMFusionConfig.from_dict(config.to_dict()), AutoConfig.from_pretrained(tmp_path)):
        assert isinstance(loaded, MMFusionConfig)
        assert {**loaded.to_dict(), "_name_or_path": ""} == config.to_dict()
        assert type(loaded.text_config).__name__ == "BertConfig"
        assert list(loaded.audio_config.conv_stride) == list(config.audio_config.conv_stride)


def test_absent_towers_stay_absent_after_round_trip(tmp_path):
    MMFusionConfig(text_config=tiny_bert_config()).save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert loaded.vision_config is None and loaded.audio_config is None
    assert loaded.modalities == ("text",)


BAD_SETTINGS = [
    ({}, "at least one tower"),
    ({"vision_config": None, "text_config": None, "audio_config": None}, "at least one tower"),
    ({"text_config": BertConfig(), "fusion_hidden_size": 30, "fusion_num_heads": 4}, "fusion_hidden_size"),
    ({"text_config": BertConfig(), "fusion_num_heads": 0}, "fusion_num_heads"),
    ({"text_config": BertConfig(), "fusion_num_layers": -1}, "fusion_num_layers"),
    ({"text_config": BertConfig(), "fusion_intermediate_size": 2.5}, "fusion_intermediate_size"),
    ({"text_config": {"model_type": "no_such_model"}}, "text_config: unknown tower model_type 'no_such_model'"),
    ({"text_config": {"hidden_size": 32}}, "text_config: a dict needs a 'model_type'"),
    ({"vision_config": BertConfig()}, "vision_config: model_type 'bert' is a text model"),
    ({"vision_config": Wav2Vec2Config()}, "vision_config: model_type 'wav2vec2' is a audio model"),
    ({"text_config": ViTConfig()}, "text_config: model_type 'vit' is a vision model"),
    ({"audio_config": RobertaConfig()}, "audio_config: model_type 'roberta' is a text model"),
    ({"audio_config": {"model_type": "gpt2"}}, "audio_config: model_type 'gpt2' is not a known audio encoder"),
    ({"text_config": "bert"}, "text_config: expected a transformers config or a dict"),
    ({"text_config": BertConfig(), "fusion_pooling": "max"}, "fusion_pooling"),
    ({"text_config": BertConfig(), "modality_dropout": 1.0}, "modality_dropout"),
    ({"text_config": BertConfig(), "fusion_dropout": -0.1}, "fusion_dropout"),
    ({"text_config": BertConfig(), "fusion_attention_dropout": 1.5}, "fusion_attention_dropout"),
    ({"text_config": BertConfig(), "fusion_hidden_act": "nope"}, "fusion_hidden_act"),
]


@pytest.mark.parametrize("settings, expected", BAD_SETTINGS, ids=[e for _, e in BAD_SETTINGS])
def test_invalid_settings_raise_value_error_naming_the_field(settings, expected):
    with pytest.raises(ValueError, match=expected.replace("(", r"\(")):
        MMFusionConfig(**settings)
