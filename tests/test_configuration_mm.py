"""MMFusionConfig: every supported tower type is accepted for its own modality, invalid settings raise ValueError
naming the field, and the config survives a save/load round trip. Like every transformers config it builds with no
arguments; a model built from it refuses."""

import pytest
from transformers import (
    AutoConfig,
    AutoModel,
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
from transformers.configuration_utils import recursive_diff_dict

from conftest import tiny_bert_config, tiny_timm_config, tiny_vit_config, tiny_wav2vec2_config
from modeling_mm import MMFusionConfig, MMFusionForSequenceClassification, MMFusionModel

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


def test_a_config_without_towers_builds_with_the_defaults_and_round_trips(tmp_path):
    config = MMFusionConfig()
    assert config.modalities == ()
    assert (config.vision_config, config.text_config, config.audio_config) == (None, None, None)
    assert (config.fusion_hidden_size, config.fusion_num_layers, config.fusion_pooling) == (256, 2, "mean")
    assert MMFusionConfig.from_dict({}).to_dict() == config.to_dict()
    diff = config.to_diff_dict()
    assert diff["model_type"] == "mm_fusion" and diff["text_config"] is None
    assert MMFusionConfig.from_dict(diff).to_dict() == config.to_dict()
    # what transformers does when an mm-fusion config sits inside another config: diff it against MMFusionConfig()
    assert recursive_diff_dict(config.to_dict(), {}, config_obj=config)["fusion_hidden_size"] == 256
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, MMFusionConfig) and loaded.modalities == ()
    assert {**loaded.to_dict(), "_name_or_path": ""} == {**config.to_dict(), "_name_or_path": ""}


def test_from_dict_of_a_partial_config_fills_the_defaults_and_diffs_back():
    partial = {"text_config": {"model_type": "bert", "hidden_size": 32, "num_attention_heads": 4},
               "fusion_num_heads": 8}
    config = MMFusionConfig.from_dict(partial)
    assert config.modalities == ("text",) and config.text_config.hidden_size == 32
    assert config.fusion_num_heads == 8 and config.fusion_hidden_size == MMFusionConfig().fusion_hidden_size
    diff = config.to_diff_dict()
    assert diff["fusion_num_heads"] == 8 and diff["text_config"]["hidden_size"] == 32
    assert MMFusionConfig.from_dict(diff).to_dict() == config.to_dict()


@pytest.mark.parametrize("build", [MMFusionModel, MMFusionForSequenceClassification, AutoModel.from_config],
                         ids=["MMFusionModel", "MMFusionForSequenceClassification", "AutoModel.from_config"])
def test_a_model_from_a_config_without_towers_refuses_naming_the_fields(build):
    with pytest.raises(ValueError, match="vision_config, text_config, audio_config: at least one tower config is "
                                         "required to build a model, all three are None"):
        build(MMFusionConfig())


BAD_SETTINGS = [
    ({"fusion_hidden_size": 30, "fusion_num_heads": 4}, "fusion_hidden_size"),  # validated without towers too
    ({"fusion_pooling": "max"}, "fusion_pooling"),
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
