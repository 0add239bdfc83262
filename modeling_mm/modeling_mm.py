"""mm-fusion: pretrained vision, text and audio towers joined by cross-attention fusion layers.

Reads top to bottom: outputs, attention, MLP, fusion layer, query block, pretrained-model base, base model, heads.
Imports only torch and transformers (and its relative config), so this file works flat in a Hub repo.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, logging

from .configuration_mm import (
    DECODER_CONNECTIONS,
    ENCODER_CONFIG_FIELDS,
    MODALITIES,
    MODALITY_NAMES,
    MMFusionConfig,
    resolve_decoder_config,
    resolve_tower_config,
)

logger = logging.get_logger(__name__)

# Presence-mask names of the batch and each tower's inputs (the first one required), from the one table
PRESENCE_KEYS = {modality: names.presence for modality, names in MODALITY_NAMES.items()}
TOWER_INPUT_NAMES = {modality: names.inputs for modality, names in MODALITY_NAMES.items()}
# Everything MMFusionModel.forward reads from a batch: what `generate` hands to the fused encoder, not the decoder
FUSION_INPUT_NAMES = (*(name for names in MODALITY_NAMES.values() for name in (*names.inputs, names.presence)),
                      "tower_states")


def _nested_to_tuple(output: ModelOutput) -> tuple[Any, ...]:
    # the towers' own outputs nest inside ours: flatten them too, as CLIPOutput does
    return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in output.values())


@dataclass
class MMFusionModelOutput(ModelOutput):
    """
    Output of [`MMFusionModel`]. Per-modality fields are None when the model has no such tower or no sample in the
    batch has that modality; rows of samples that lack a modality hold zeros in its fields.

    Args:
        pooler_output (`(batch, fusion_hidden_size)`): the fused vector, the mean of the pooled vectors of the
            streams each sample has.
        vision_pooler_output / text_pooler_output / audio_pooler_output (`(batch, fusion_hidden_size)`):
            each stream pooled over its real tokens (`config.fusion_pooling`), after the last fusion layer.
        vision_last_hidden_state / text_last_hidden_state / audio_last_hidden_state
            (`(batch, tokens, fusion_hidden_size)`): fused token states of each stream.
        vision_token_mask / text_token_mask / audio_token_mask (`(batch, tokens)`, bool): which of those tokens
            are real (sample has the modality and the token is not padding).
        has_image / has_text / has_audio (`(batch,)`, bool): the presence the fusion used (after modality dropout).
        vision_hidden_states / ... (`tuple`): stream states at the fusion input and after each fusion layer
            (with `output_hidden_states=True`).
        vision_attentions / vision_cross_attentions / ... (`tuple`): fusion self-/cross-attention weights per
            layer (with `output_attentions=True` and eager attention).
        vision_model_output / text_model_output / audio_model_output: each tower's own output, for the samples
            that have that modality only (in batch order).
    """

    pooler_output: torch.FloatTensor | None = None
    vision_pooler_output: torch.FloatTensor | None = None
    text_pooler_output: torch.FloatTensor | None = None
    audio_pooler_output: torch.FloatTensor | None = None
    vision_last_hidden_state: torch.FloatTensor | None = None
    text_last_hidden_state: torch.FloatTensor | None = None
    audio_last_hidden_state: torch.FloatTensor | None = None
    vision_token_mask: torch.BoolTensor | None = None
    text_token_mask: torch.BoolTensor | None = None
    audio_token_mask: torch.BoolTensor | None = None
    has_image: torch.BoolTensor | None = None
    has_text: torch.BoolTensor | None = None
    has_audio: torch.BoolTensor | None = None
    vision_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    text_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    audio_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    vision_attentions: tuple[torch.FloatTensor, ...] | None = None
    text_attentions: tuple[torch.FloatTensor, ...] | None = None
    audio_attentions: tuple[torch.FloatTensor, ...] | None = None
    vision_cross_attentions: tuple[torch.FloatTensor, ...] | None = None
    text_cross_attentions: tuple[torch.FloatTensor, ...] | None = None
    audio_cross_attentions: tuple[torch.FloatTensor, ...] | None = None
    vision_model_output: ModelOutput | None = None
    text_model_output: ModelOutput | None = None
    audio_model_output: ModelOutput | None = None

    to_tuple = _nested_to_tuple


@dataclass
class MMFusionSequenceClassifierOutput(ModelOutput):
    """
    Output of [`MMFusionForSequenceClassification`].

    Args:
        loss (`()`): the loss of `config.problem_type`, when `labels` were given.
        logits (`(batch, num_labels)`): classification (or regression) scores.
        pooler_output (`(batch, fusion_hidden_size)`): the fused vector the head read.
        fusion_output ([`MMFusionModelOutput`]): everything the base model returned.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    fusion_output: MMFusionModelOutput | None = None

    to_tuple = _nested_to_tuple


@dataclass
class MMFusionMultiTaskOutput(ModelOutput):
    """
    Output of [`MMFusionForMultiTask`].

    Args:
        loss (`()`): the weighted sum of the task losses (`config.task_weighting`), when `labels` were given.
        logits (`dict[str, (batch, num_outputs)]`): each task's outputs by name, in `config.tasks` order:
            class scores, per-label scores, or regression values in the targets' original units.
        task_losses (`dict[str, ()]`): each task's own loss (over the rows that have its label), with `labels`.
        task_weights (`dict[str, ()]`): the factor each task loss was multiplied by (its `loss_weight`, times
            exp(-s) and c under uncertainty weighting), with `labels`.
        pooler_output (`(batch, fusion_hidden_size)`): the fused vector the heads read.
        fusion_output ([`MMFusionModelOutput`]): everything the base model returned.
    """

    loss: torch.FloatTensor | None = None
    logits: dict[str, torch.FloatTensor] | None = None
    task_losses: dict[str, torch.FloatTensor] | None = None
    task_weights: dict[str, torch.FloatTensor] | None = None
    pooler_output: torch.FloatTensor | None = None
    fusion_output: MMFusionModelOutput | None = None

    to_tuple = _nested_to_tuple


@dataclass
class MMFusionContrastiveOutput(ModelOutput):
    """
    Output of [`MMFusionContrastiveModel`]. Rows of samples that lack a modality hold zeros in its `*_embeds`.

    Args:
        loss (`()`): the contrastive loss (`config.contrastive_loss`), with `return_loss=True`.
        logits_per_pair (`dict[str, (rows_a, rows_b)]`): per pair of modalities present in the batch, named by their
            user names in the order image, text, audio ("image_text", "image_audio", "text_audio"): the scaled
            similarities (plus the bias for the sigmoid loss) between every row that has the first modality and
            every row that has the second, in batch order. `logits_per_pair["image_text"].T` is CLIP's
            `logits_per_text`.
        image_embeds / text_embeds / audio_embeds (`(batch, projection_dim)`): unit-norm embeddings, each computed
            from that modality of its row alone; None when no row has the modality.
        fused_embeds (`(batch, projection_dim)`): unit-norm embeddings of the fused vector of each row with two or
            more modalities (zeros elsewhere), when `config.fused_contrastive_weight > 0`.
        logit_scale (`()`): the scale the logits used, `exp(logit_scale)` clamped at 100.
        logit_bias (`()`): the learned bias of the sigmoid loss (None for InfoNCE).
        has_image / has_text / has_audio (`(batch,)`, bool): which rows have each modality.
    """

    loss: torch.FloatTensor | None = None
    logits_per_pair: dict[str, torch.FloatTensor] | None = None
    image_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    audio_embeds: torch.FloatTensor | None = None
    fused_embeds: torch.FloatTensor | None = None
    logit_scale: torch.FloatTensor | None = None
    logit_bias: torch.FloatTensor | None = None
    has_image: torch.BoolTensor | None = None
    has_text: torch.BoolTensor | None = None
    has_audio: torch.BoolTensor | None = None

    to_tuple = _nested_to_tuple


@dataclass
class MMFusionConditionalGenerationOutput(ModelOutput):
    """
    Output of [`MMFusionForConditionalGeneration`].

    Args:
        loss (`()`): the causal-LM cross-entropy over the target positions (`labels` != -100), each predicted from
            the position before it, when `labels` were given.
        logits (`(batch, decoder_length, vocab_size)`): the decoder's scores, aligned with `decoder_input_ids`
            (`logits[:, t]` predicts the token after `decoder_input_ids[:, t]`); prefix positions are not included.
            Values at padding positions are meaningless.
        cache (`Cache`): the decoder's key/value cache, with `use_cache=True`; it holds each row's real tokens first
            (prefix included), padding last.
        context_states (`(batch, context_tokens, decoder_hidden_size)`): what the decoder read from the fused encoder:
            its `encoder_hidden_states` (cross_attention) or prefix embeddings (prefix). Give
            `(context_states, context_mask)` back as `encoder_outputs` to skip the encoder.
        context_mask (`(batch, context_tokens)`, bool): which context tokens are real (each row's first).
        fusion_output ([`MMFusionModelOutput`]): everything the fused encoder returned (None with `encoder_outputs`).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    context_states: torch.FloatTensor | None = None
    context_mask: torch.BoolTensor | None = None
    fusion_output: MMFusionModelOutput | None = None

    to_tuple = _nested_to_tuple


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (batch, heads, queries, keys)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            attn_weights = attn_weights.masked_fill(~attention_mask, torch.finfo(attn_weights.dtype).min)
        else:
            attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()  # (batch, queries, heads, head_dim)
    return attn_output, attn_weights


class MMFusionAttention(nn.Module):
    """Multi-head attention in a fusion stream, in one of two roles.

    Self-attention projects the stream's tokens with one fused `to_qkv`. Its keys and values are also what the other
    streams' cross-attention reads, so cross-attention only adds `to_q` and `to_out`: no stream projects another
    stream's tokens again (ViLBERT-style co-attention). Cross-attention also has a learned sink key/value that every
    query can attend to, so a sample whose other modalities are all absent still gets a well-defined softmax.

    Dispatches through transformers' attention functions, so `config._attn_implementation` (eager, sdpa, flash)
    applies here as it does in the towers.
    """

    def __init__(self, config: MMFusionConfig, is_cross_attention: bool):
        super().__init__()
        self.config = config
        self.num_heads = config.fusion_num_heads
        self.head_dim = config.fusion_hidden_size // config.fusion_num_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.fusion_attention_dropout
        self.is_causal = False
        self.is_cross_attention = is_cross_attention
        width = config.fusion_hidden_size
        if is_cross_attention:
            self.to_q = nn.Linear(width, width)
            self.sink_key = nn.Parameter(torch.zeros(width))
            self.sink_value = nn.Parameter(torch.zeros(width))
        else:
            self.to_qkv = nn.Linear(width, 3 * width)
        self.to_out = nn.Linear(width, width)

    def split_heads(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # (batch, heads, tokens, head_dim)

    def project_qkv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(self.split_heads(t) for t in self.to_qkv(hidden_states).chunk(3, dim=-1))

    def project_query(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.split_heads(self.to_q(hidden_states))

    def with_sink(
        self, keys: list[torch.Tensor], values: list[torch.Tensor], query: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepend the sink to the other streams' keys and values: (batch, heads, 1 + other tokens, head_dim)."""
        batch = query.shape[0]
        sink_key = self.split_heads(self.sink_key.to(query.dtype).expand(batch, 1, -1))
        sink_value = self.split_heads(self.sink_value.to(query.dtype).expand(batch, 1, -1))
        return torch.cat([sink_key, *keys], dim=2), torch.cat([sink_value, *values], dim=2)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scaling,
            dropout=self.attention_dropout if self.training else 0.0,
        )
        attn_output = attn_output.flatten(2)  # (batch, queries, width)
        return self.to_out(attn_output), attn_weights


class MMFusionMLP(nn.Module):
    def __init__(self, config: MMFusionConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.fusion_hidden_size, config.fusion_intermediate_size)
        self.activation = ACT2FN[config.fusion_hidden_act]
        self.fc_out = nn.Linear(config.fusion_intermediate_size, config.fusion_hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.activation(self.fc_in(hidden_states)))


class MMFusionStreamBlock(nn.Module):
    """The weights of one modality stream in one fusion layer: pre-LN self-attention, pre-LN cross-attention to the
    other streams, pre-LN MLP, each added back to the residual (`x = x + f(norm(x))`)."""

    def __init__(self, config: MMFusionConfig):
        super().__init__()
        width, eps = config.fusion_hidden_size, config.layer_norm_eps
        self.self_attn_norm = nn.LayerNorm(width, eps=eps)
        self.self_attn = MMFusionAttention(config, is_cross_attention=False)
        self.cross_attn_norm = nn.LayerNorm(width, eps=eps)
        self.cross_attn = MMFusionAttention(config, is_cross_attention=True)
        self.mlp_norm = nn.LayerNorm(width, eps=eps)
        self.mlp = MMFusionMLP(config)
        self.dropout = nn.Dropout(config.fusion_dropout)


class MMFusionLayer(GradientCheckpointingLayer):
    """One fusion layer over all streams. Each stream runs self-attention; then cross-attends to the other streams'
    self-attention keys and values of this layer (so the result does not depend on stream order); then its MLP.

    Takes the streams' states positionally and returns one flat tuple: the new states, then the self-attention
    weights, then the cross-attention weights, one per stream each (None without eager `output_attentions`).
    Reentrant activation checkpointing passes gradients only through tensors that are direct positional inputs and
    outputs of the checkpointed call; states nested in a tuple or dict would silently leave the graph."""

    def __init__(self, config: MMFusionConfig, modalities: tuple[str, ...]):
        super().__init__()
        self.streams = nn.ModuleDict({modality: MMFusionStreamBlock(config) for modality in modalities})

    def forward(
        self,
        *stream_states: torch.Tensor,
        modalities: tuple[str, ...],
        self_attn_masks: dict[str, torch.Tensor | None],
        cross_attn_masks: dict[str, torch.Tensor | None],
    ) -> tuple[torch.Tensor | None, ...]:
        states = dict(zip(modalities, stream_states))
        keys, values, self_weights, cross_weights = {}, {}, {}, {}
        for modality in modalities:
            block = self.streams[modality]
            query, keys[modality], values[modality] = block.self_attn.project_qkv(block.self_attn_norm(states[modality]))
            attn_output, self_weights[modality] = block.self_attn(
                query, keys[modality], values[modality], self_attn_masks[modality]
            )
            states[modality] = states[modality] + block.dropout(attn_output)
        for modality in modalities:
            block = self.streams[modality]
            others = [other for other in modalities if other != modality]
            query = block.cross_attn.project_query(block.cross_attn_norm(states[modality]))
            key, value = block.cross_attn.with_sink([keys[o] for o in others], [values[o] for o in others], query)
            attn_output, cross_weights[modality] = block.cross_attn(query, key, value, cross_attn_masks[modality])
            states[modality] = states[modality] + block.dropout(attn_output)
        for modality in modalities:
            block = self.streams[modality]
            states[modality] = states[modality] + block.dropout(block.mlp(block.mlp_norm(states[modality])))
        return (*(states[m] for m in modalities), *(self_weights[m] for m in modalities),
                *(cross_weights[m] for m in modalities))


class MMFusionInputProjection(nn.Module):
    """Maps a tower's token states to the fusion width and marks them with a learned modality embedding."""

    def __init__(self, tower_width: int, config: MMFusionConfig):
        super().__init__()
        self.to_fusion = nn.Linear(tower_width, config.fusion_hidden_size)
        self.modality_embedding = nn.Parameter(torch.zeros(config.fusion_hidden_size))

    def forward(self, tower_states: torch.Tensor) -> torch.Tensor:
        return self.to_fusion(tower_states) + self.modality_embedding


class MMFusionQueryBlock(nn.Module):
    """`config.num_query_tokens` learned queries that read the fused tokens once, a one-block BLIP-2 Q-Former: pre-LN
    cross-attention from the queries to the fused tokens (plus the sink), then a pre-LN MLP, then a final norm. Gives
    the decoder a fixed number of tokens whatever the modalities and lengths of a sample."""

    def __init__(self, config: MMFusionConfig):
        super().__init__()
        width, eps = config.fusion_hidden_size, config.layer_norm_eps
        self.query_tokens = nn.Parameter(torch.zeros(config.num_query_tokens, width))
        self.cross_attn_norm = nn.LayerNorm(width, eps=eps)
        self.cross_attn = MMFusionAttention(config, is_cross_attention=True)
        # the fused tokens are projected here: the fusion layers' own keys and values belong to their streams
        self.to_kv = nn.Linear(width, 2 * width)
        self.mlp_norm = nn.LayerNorm(width, eps=eps)
        self.mlp = MMFusionMLP(config)
        self.final_norm = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(config.fusion_dropout)

    def forward(self, states: torch.Tensor, token_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`states` `(batch, tokens, fusion_hidden)` and their bool mask `(batch, tokens)` -> the queries' states
        `(batch, num_query_tokens, fusion_hidden)` and an all-true mask `(batch, num_query_tokens)`."""
        batch = states.shape[0]
        queries = self.query_tokens.to(states.dtype).expand(batch, -1, -1)  # (batch, queries, width)
        attention = self.cross_attn
        query = attention.project_query(self.cross_attn_norm(queries))
        key, value = (attention.split_heads(t) for t in self.to_kv(states).chunk(2, dim=-1))
        key, value = attention.with_sink([key], [value], query)
        context_mask = torch.cat([token_mask.new_ones(batch, 1), token_mask], dim=1)  # (batch, 1 + tokens)
        mask = create_bidirectional_mask(config=attention.config, inputs_embeds=queries, attention_mask=context_mask,
                                         encoder_hidden_states=states.new_empty(batch, context_mask.shape[1], 1))
        attn_output, _ = attention(query, key, value, mask)
        queries = queries + self.dropout(attn_output)
        queries = queries + self.dropout(self.mlp(self.mlp_norm(queries)))
        return self.final_norm(queries), token_mask.new_ones(batch, queries.shape[1])


class MMFusionPreTrainedModel(PreTrainedModel):
    config: MMFusionConfig
    config_class = MMFusionConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text", "audio")
    supports_gradient_checkpointing = True
    _no_split_modules = ["MMFusionLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Towers are PreTrainedModels and get their own `_init_weights` (transformers dispatches per sub-model);
        # weights loaded from a checkpoint are flagged as initialised and are never touched here.
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, MMFusionInputProjection):
            init.normal_(module.modality_embedding, mean=0.0, std=std)
        elif isinstance(module, MMFusionAttention) and module.is_cross_attention:
            init.normal_(module.sink_key, mean=0.0, std=std)
            init.normal_(module.sink_value, mean=0.0, std=std)
        elif isinstance(module, MMFusionQueryBlock):
            init.normal_(module.query_tokens, mean=0.0, std=std)

    def initialize_weights(self) -> None:
        super().initialize_weights()
        _init_weight_norm_originals(self)

    @classmethod
    def is_custom_code(cls) -> bool:
        # For custom code, transformers skips initialising a module whose own parameters are all set, to protect
        # remote `_init_weights` that write in place; it hands that flag down to the towers, whose parent-level inits
        # (wav2vec2's feature projection and positional conv) are then skipped on a load with missing weights. Our
        # `_init_weights` uses `transformers.initialization` only, which keeps loaded weights, so missing weights get
        # each tower's own init, as `__init__` gives them.
        return False

    def save_pretrained(self, save_directory, *args, **kwargs):
        if self._auto_class is not None:
            # One folder serves both Auto classes: a classifier checkpoint also loads as the base model (and a base
            # checkpoint as a classifier with a new head), also through trust_remote_code.
            module = type(self).__module__.rsplit(".", 1)[-1]
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            if self.config.tasks:  # a multi-task checkpoint: AutoModel gives every head back
                auto_map["AutoModel"] = f"{module}.MMFusionForMultiTask"
                auto_map.pop("AutoModelForSequenceClassification", None)
            elif self.config.is_contrastive:  # a contrastive checkpoint: AutoModel gives the projections back
                auto_map["AutoModel"] = f"{module}.MMFusionContrastiveModel"
                auto_map.pop("AutoModelForSequenceClassification", None)
            elif self.config.decoder_config is not None:  # a generation checkpoint: AutoModel gives the decoder back
                auto_map["AutoModel"] = f"{module}.MMFusionForConditionalGeneration"
                auto_map.pop("AutoModelForSequenceClassification", None)
            else:
                auto_map.setdefault("AutoModel", f"{module}.MMFusionModel")
                auto_map.setdefault("AutoModelForSequenceClassification",
                                    f"{module}.MMFusionForSequenceClassification")
            self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_towers(
        cls,
        vision: str | PreTrainedModel | None = None,
        text: str | PreTrainedModel | None = None,
        audio: str | PreTrainedModel | None = None,
        *,
        tower_kwargs: dict[str, Any] | None = None,
        **config_kwargs: Any,
    ) -> "MMFusionPreTrainedModel":
        """Build a model from pretrained towers: Hub ids, local folders or already loaded models.

        Each tower is loaded with its own class's `from_pretrained` (with `tower_kwargs`, e.g. `dtype`). A full
        dual-encoder checkpoint (CLIP, SigLIP) given as `vision` contributes its vision tower only, and the same
        for `text`. `config_kwargs` are `MMFusionConfig` fields (fusion sizes, `num_labels`, ...).

        Raises `ValueError` naming the argument when a checkpoint is of the wrong modality or its tower weights
        are incomplete.
        """
        towers = load_towers(vision, text, audio, tower_kwargs or {})
        tower_configs = {f"{name.removesuffix('_model')}_config": tower.config for name, tower in towers.items()}
        config = cls.config_class(**tower_configs, **config_kwargs)
        return cls(config, **towers)


@torch.no_grad()
def _init_weight_norm_originals(model: nn.Module) -> None:
    """Give weight-normed convolutions (wav2vec2's positional conv) that were not loaded the init they get when
    built: torch's default conv init, split into magnitude and direction. Towers' `_init_weights` write to the
    computed `weight`, which a parametrization discards, so without this a missing one stays uninitialised memory."""
    for module in model.modules():
        if not (parametrize.is_parametrized(module, "weight") and hasattr(module, "reset_parameters")):
            continue
        originals = module.parametrizations.weight.original0, module.parametrizations.weight.original1
        if all(getattr(t, "_is_hf_initialized", False) for t in originals):
            continue
        weight = torch.empty_like(originals[1])
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # what nn.Conv1d.reset_parameters draws
        for original, value in zip(originals, module.parametrizations.weight[0].right_inverse(weight)):
            original.copy_(value)
            original._is_hf_initialized = True


def _tower_width(tower: PreTrainedModel) -> int:
    """Width of a tower's token states."""
    timm_model = getattr(tower, "timm_model", None)
    if timm_model is not None:
        return timm_model.num_features
    config = tower.config
    if getattr(config, "hidden_size", None):
        return config.hidden_size
    if getattr(config, "hidden_sizes", None):  # CNNs (ResNet, ConvNeXt): the last stage
        return config.hidden_sizes[-1]
    if getattr(config, "dim", None):  # DistilBERT
        return config.dim
    raise ValueError(f"cannot tell the hidden size of tower {type(tower).__name__}")


def _audio_tower_takes_attention_mask(config) -> bool:
    # Group-norm feature encoders (wav2vec2-base, HuBERT-base) normalise over the whole padded signal, and
    # transformers never gives them a mask (their feature extractors set return_attention_mask=False).
    return getattr(config, "feat_extract_norm", "layer") != "group"


def _real_first(
    mask: torch.Tensor, *tensors: torch.Tensor | None, trim: bool = True
) -> tuple[torch.Tensor | None, ...]:
    """Move each row's real entries (mask != 0) to the front, in their order, and (with `trim`) drop the columns no
    row uses.

    Left- and right-padded rows then look alike, so nothing downstream can depend on the padding side or on the
    longest batch partner. `mask` is `(batch, length)`; each tensor is `(batch, length, ...)` or None. Without
    `trim` the shapes stay as given and nothing is read back to the host (the static path)."""
    real = mask != 0
    if trim and bool(real.all()):
        return (mask, *tensors)
    order = _real_first_order(mask)
    if trim:
        order = order[:, : int(real.sum(1).max())]
    return (_reorder(mask, order), *(_reorder(t, order) for t in tensors))


def _real_first_order(mask: torch.Tensor) -> torch.Tensor:
    """`(batch, length)` column order that puts each row's real entries (mask != 0) first, in their order."""
    return torch.sort((mask == 0).to(torch.int8), dim=1, stable=True).indices


def _real_last_order(mask: torch.Tensor) -> torch.Tensor:
    """`(batch, length)` column order that puts each row's real entries (mask != 0) last, in their order: left
    padding, which batched generation with a decoder-only LM needs."""
    return torch.sort((mask != 0).to(torch.int8), dim=1, stable=True).indices


def _reorder(tensor: torch.Tensor | None, order: torch.Tensor) -> torch.Tensor | None:
    """`tensor` `(batch, length, ...)` with its columns taken in `order` `(batch, columns)`, row by row."""
    if tensor is None:
        return None
    index = order.reshape(*order.shape, *([1] * (tensor.dim() - 2))).expand(-1, -1, *tensor.shape[2:])
    return tensor.gather(1, index)


def _accepts(module: nn.Module, argument: str) -> bool:
    return argument in inspect.signature(module.forward).parameters


class MMFusionModel(MMFusionPreTrainedModel):
    r"""
    The mm-fusion base model: up to three pretrained towers (`vision_model`, `text_model`, `audio_model`), a
    projection of each tower's tokens to the fusion width, `config.fusion_num_layers` fusion layers, and a pooled
    vector per stream and fused over the streams each sample has.

    Any subset of modalities works, per batch and per sample (`has_image`, `has_text`, `has_audio`; by default a
    modality is present for every sample when its inputs are given). A tower never runs on samples that lack its
    modality. In training, a modality that no sample of the batch has still puts its trainable weights in the graph
    with a zero weight, so DDP runs with `find_unused_parameters=False`.

    Example:

    ```python
    >>> import torch
    >>> from transformers import BertConfig, ViTConfig
    >>> from modeling_mm import MMFusionConfig, MMFusionModel
    >>> config = MMFusionConfig(
    ...     vision_config=ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
    ...                             image_size=32, patch_size=8),
    ...     text_config=BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37),
    ...     fusion_hidden_size=32, fusion_num_heads=4)
    >>> model = MMFusionModel(config).eval()
    >>> out = model(input_ids=torch.tensor([[101, 2000, 102], [101, 102, 0]]),
    ...             attention_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
    ...             pixel_values=torch.randn(2, 3, 32, 32), has_image=torch.tensor([True, False]))
    >>> out.pooler_output.shape
    torch.Size([2, 32])
    ```
    """

    def __init__(
        self,
        config: MMFusionConfig,
        vision_model: PreTrainedModel | None = None,
        text_model: PreTrainedModel | None = None,
        audio_model: PreTrainedModel | None = None,
    ):
        super().__init__(config)
        if not config.modalities:
            raise ValueError(
                "vision_config, text_config, audio_config: at least one tower config is required to build a model, "
                "all three are None"
            )
        # Built without initialising, then initialised once by `post_init`, tower modules by their own
        # `_init_weights`: the same weights, in the same order, as `from_pretrained` gives missing weights.
        with init.no_init_weights():
            given = {"vision": vision_model, "text": text_model, "audio": audio_model}
            self.modalities = config.modalities
            for modality in MODALITIES:
                tower = given[modality]
                if modality not in self.modalities:
                    if tower is not None:
                        raise ValueError(f"{modality}_model: given, but config.{modality}_config is None")
                    continue
                tower_config = config.tower_config(modality)
                if tower is None:
                    # dtype: sub-configs remember the dtype they were saved in; build in the dtype of the composite
                    # so that `from_pretrained(..., dtype=torch.bfloat16)` reaches the towers too.
                    tower = AutoModel.from_config(tower_config, dtype=torch.get_default_dtype())
                # The tower and the composite share one config object, so attention settings and saved configs agree.
                tower_config._attn_implementation = tower.config._attn_implementation
                # every module of the tower that reads the tower's config (its attention layers do) reads this one
                loaded_config = tower.config
                for module in tower.modules():
                    if getattr(module, "config", None) is loaded_config:
                        module.config = tower_config
                setattr(self, f"{modality}_model", tower)

            self.input_projections = nn.ModuleDict(
                {m: MMFusionInputProjection(_tower_width(self.get_tower(m)), config) for m in self.modalities}
            )
            self.fusion_layers = nn.ModuleList(
                [MMFusionLayer(config, self.modalities) for _ in range(config.fusion_num_layers)]
            )
            self.final_norms = nn.ModuleDict(
                {m: nn.LayerNorm(config.fusion_hidden_size, eps=config.layer_norm_eps) for m in self.modalities}
            )
        self._text_takes_token_type_ids = "text" in self.modalities and _accepts(self.text_model, "token_type_ids")
        self.post_init()

    def get_tower(self, modality: str) -> PreTrainedModel:
        return getattr(self, f"{modality}_model")

    def get_input_embeddings(self) -> nn.Module | None:
        return self.text_model.get_input_embeddings() if "text" in self.modalities else None

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_model.set_input_embeddings(value)

    # ---- forward ---------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        input_values: torch.FloatTensor | None = None,
        audio_attention_mask: torch.LongTensor | None = None,
        has_text: torch.BoolTensor | None = None,
        has_image: torch.BoolTensor | None = None,
        has_audio: torch.BoolTensor | None = None,
        tower_states: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> MMFusionModelOutput | tuple:
        r"""
        tower_states (`dict[str, tuple[torch.Tensor, torch.Tensor]]`, *optional*):
            Per modality (`"vision"`, `"text"`, `"audio"`), the `(states, token_mask)` that [`encode_tower`] returns,
            used instead of running that tower on raw inputs (e.g. a frozen tower's outputs computed once and reused
            every epoch). Shapes `(batch, tokens, tower_width)` and `(batch, tokens)`; give either these or the
            modality's raw inputs, not both.
        """
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        inputs = {
            "vision": {"pixel_values": pixel_values},
            "text": {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids},
            "audio": {"input_values": input_values, "audio_attention_mask": audio_attention_mask},
        }
        main_input = {"vision": pixel_values, "text": input_ids, "audio": input_values}
        presence_given = {"vision": has_image, "text": has_text, "audio": has_audio}
        tower_states = self._check_tower_states(tower_states or {}, main_input)
        main_input.update({modality: states for modality, (states, _) in tower_states.items()})

        batch_size = self._batch_size(main_input)
        device = next(t for t in main_input.values() if t is not None).device
        presence = self._presence(main_input, presence_given, batch_size, device)
        dropping = self.training and self.config.modality_dropout > 0
        if dropping:
            presence = self._drop_modalities(presence)
        static = self._takes_static_path(main_input, presence_given, dropping)

        # 1) towers, each on the samples that have its modality; streams padded back to the whole batch. The static
        #    path runs each tower on the whole batch and masks absent samples out: no host sync, fixed shapes.
        streams, token_masks, tower_outputs = {}, {}, {}
        for modality in self.modalities:
            if static:
                if main_input[modality] is None:
                    continue
                index = None
            else:
                if not bool(presence[modality].any()):
                    continue
                index = presence[modality].nonzero().squeeze(1)
            if modality in tower_states:
                states, tower_mask = (t if index is None else t[index] for t in tower_states[modality])
                tower_mask, states = _real_first(tower_mask, states, trim=not static)
                tower_outputs[modality] = None
            else:
                states, tower_mask, tower_outputs[modality] = self._run_tower(
                    modality, inputs[modality], index, output_attentions, output_hidden_states
                )
            projected = self.input_projections[modality](states)
            if static:
                streams[modality] = projected  # (batch, tokens, fusion_hidden)
                token_masks[modality] = tower_mask & presence[modality].unsqueeze(1)  # (batch, tokens), bool
                continue
            stream = projected.new_zeros(batch_size, *projected.shape[1:])
            streams[modality] = stream.index_put((index,), projected)  # (batch, tokens, fusion_hidden)
            token_mask = tower_mask.new_zeros(batch_size, tower_mask.shape[1])
            token_masks[modality] = token_mask.index_put((index,), tower_mask)  # (batch, tokens), bool
        active = tuple(m for m in self.modalities if m in streams)

        # 2) fusion layers over the streams that at least one sample has
        self_attn_masks, cross_attn_masks = self._fusion_masks(streams, token_masks, active, static)
        all_states = {m: (streams[m],) for m in active} if output_hidden_states else None
        all_self_weights = {m: () for m in active} if output_attentions else None
        all_cross_weights = {m: () for m in active} if output_attentions else None
        stream_states = tuple(streams[m] for m in active)
        streams_count = len(active)
        for layer in self.fusion_layers:
            layer_output = layer(
                *stream_states, modalities=active, self_attn_masks=self_attn_masks, cross_attn_masks=cross_attn_masks
            )
            stream_states = layer_output[:streams_count]
            self_weights = layer_output[streams_count : 2 * streams_count]
            cross_weights = layer_output[2 * streams_count :]
            for i, (modality, states) in enumerate(zip(active, stream_states)):
                if output_hidden_states:
                    all_states[modality] += (states,)
                if output_attentions:
                    all_self_weights[modality] += (self_weights[i],)
                    all_cross_weights[modality] += (cross_weights[i],)

        # 3) pool each stream over its real tokens; fuse over the streams each sample has
        fused = stream_states[0].new_zeros(batch_size, self.config.fusion_hidden_size)
        result: dict[str, Any] = {}
        for modality, states in zip(active, stream_states):
            states = self.final_norms[modality](states)
            token_mask = token_masks[modality]
            if self.config.fusion_pooling == "first":
                pooled = states[:, 0] * token_mask[:, :1]
            else:
                weights = token_mask.unsqueeze(-1).to(states.dtype)
                pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            fused = fused + pooled
            result[f"{modality}_pooler_output"] = pooled
            result[f"{modality}_last_hidden_state"] = states
            result[f"{modality}_token_mask"] = token_mask
            result[f"{modality}_model_output"] = tower_outputs[modality]
            if output_hidden_states:
                result[f"{modality}_hidden_states"] = all_states[modality]
            if output_attentions:
                result[f"{modality}_attentions"] = all_self_weights[modality]
                result[f"{modality}_cross_attentions"] = all_cross_weights[modality]
        streams_per_sample = torch.stack([presence[m] for m in active], dim=1).sum(1, keepdim=True)
        fused = fused / streams_per_sample.clamp(min=1).to(fused.dtype)
        if self.training and torch.is_grad_enabled():
            fused = fused + self._unused_parameter_anchor(active)

        output = MMFusionModelOutput(
            pooler_output=fused,
            has_image=presence["vision"],
            has_text=presence["text"],
            has_audio=presence["audio"],
            **result,
        )
        return output if return_dict else output.to_tuple()

    @torch.no_grad()
    def encode_tower(self, modality: str, **inputs: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """What fusion reads from one tower, for every sample of a batch: its token states (with the tower's pooled
        summary first where it has one), `(batch, tokens, tower_width)`, and the bool mask of real tokens,
        `(batch, tokens)`. `inputs` are that modality's processor outputs (`pixel_values`; `input_ids`,
        `attention_mask`, `token_type_ids`; `input_values`, `audio_attention_mask`). Give the result back to
        `forward` as `tower_states` to skip the tower: for a frozen tower (which runs in eval mode, see `train`),
        the model's outputs are then the same as from raw inputs."""
        if modality not in self.modalities:
            raise ValueError(f"modality: {modality!r} is not one of this model's towers {self.modalities}")
        names = TOWER_INPUT_NAMES[modality]
        unknown = sorted(set(inputs) - set(names))
        if unknown or inputs.get(names[0]) is None:
            raise ValueError(f"inputs: the {modality} tower takes {names} ({names[0]} required); got {sorted(inputs)}")
        tower_inputs = {name: inputs.get(name) for name in names}
        index = torch.arange(inputs[names[0]].shape[0], device=inputs[names[0]].device)
        states, token_mask, _ = self._run_tower(modality, tower_inputs, index, False, False)
        return states, token_mask

    def train(self, mode: bool = True) -> "MMFusionModel":
        super().train(mode)
        # A tower with nothing to train is a fixed feature extractor: no dropout, so its outputs are the same in
        # training and evaluation, and can be computed once (`encode_tower`) and reused every epoch.
        for modality in self.modalities:
            tower = self.get_tower(modality)
            if not any(parameter.requires_grad for parameter in tower.parameters()):
                tower.eval()
        return self

    # ---- forward helpers, in the order forward uses them ------------------------------------------------------------

    def _takes_static_path(self, main_input, presence_given, dropping: bool) -> bool:
        """The static path (see `config.static_shapes`) when asked for, or when no presence mask was given, so every
        sample has every modality whose inputs were given, and no modality dropout is at work. Decided from Python
        facts only: looking at mask values would itself be a host sync."""
        if self.config.static_shapes:
            return True
        if dropping or any(mask is not None for mask in presence_given.values()):
            return False
        # A group-norm audio tower takes no mask, so padding beyond the longest sample would change its output: the
        # dynamic path trims it (and runs samples alone with `exact_audio_lengths`), which needs lengths on the host
        return main_input["audio"] is None or _audio_tower_takes_attention_mask(self.audio_model.config)

    def _check_tower_states(self, tower_states, main_input) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        for modality, value in tower_states.items():
            if modality not in self.modalities:
                raise ValueError(f"tower_states: has {modality!r}, but this model's towers are {self.modalities}")
            if main_input[modality] is not None:
                raise ValueError(
                    f"tower_states[{modality!r}] and {TOWER_INPUT_NAMES[modality][0]}: give one of them, not both"
                )
            if not (isinstance(value, (tuple, list)) and len(value) == 2):
                raise ValueError(f"tower_states[{modality!r}]: expected (states, token_mask) as encode_tower returns")
            states, token_mask = value
            width = _tower_width(self.get_tower(modality))
            if states.dim() != 3 or states.shape[-1] != width or tuple(token_mask.shape) != tuple(states.shape[:2]):
                raise ValueError(
                    f"tower_states[{modality!r}]: expected states (batch, tokens, {width}) and token_mask "
                    f"(batch, tokens); got {tuple(states.shape)} and {tuple(token_mask.shape)}"
                )
        return {modality: (states, token_mask.bool()) for modality, (states, token_mask) in tower_states.items()}


    def _batch_size(self, main_input: dict[str, torch.Tensor | None]) -> int:
        sizes = {}
        for modality, tensor in main_input.items():
            if tensor is None:
                continue
            if modality not in self.modalities:
                raise ValueError(f"{TOWER_INPUT_NAMES[modality][0]}: given, but this model has no {modality} tower "
                                 f"(it has {self.modalities})")
            sizes[modality] = tensor.shape[0]
        if not sizes:
            raise ValueError("pixel_values, input_ids, input_values: at least one modality's inputs are required")
        if len(set(sizes.values())) > 1:
            raise ValueError(f"batch sizes differ between modalities: {sizes}")
        return next(iter(sizes.values()))

    def _presence(self, main_input, presence_given, batch_size, device) -> dict[str, torch.Tensor]:
        presence = {}
        for modality in MODALITIES:
            given = presence_given[modality]
            key = PRESENCE_KEYS[modality]
            if main_input[modality] is None:
                if given is not None and bool(torch.as_tensor(given).any()):
                    raise ValueError(f"{key}: marks samples as present, but no {modality} inputs were given")
                presence[modality] = torch.zeros(batch_size, dtype=torch.bool, device=device)
            elif given is None:
                presence[modality] = torch.ones(batch_size, dtype=torch.bool, device=device)
            else:
                given = torch.as_tensor(given, device=device).bool()
                if given.shape != (batch_size,):
                    raise ValueError(f"{key}: expected shape ({batch_size},), got {tuple(given.shape)}")
                presence[modality] = given
        if all(mask is None for mask in presence_given.values()) or torch.compiler.is_compiling():
            return presence  # every sample has every given modality (or, compiled, a check would break the graph)
        has_any = torch.stack(list(presence.values()), dim=1).any(1)
        if not bool(has_any.all()):
            missing = (~has_any).nonzero().flatten().tolist()
            raise ValueError(f"has_image, has_text, has_audio: samples {missing} have no modality at all")
        return presence

    def _drop_modalities(self, presence: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Modality dropout: drop each present modality with probability p; a sample always keeps one."""
        stacked = torch.stack([presence[m] for m in MODALITIES], dim=1)  # (batch, 3)
        kept = stacked & (torch.rand(stacked.shape, device=stacked.device) >= self.config.modality_dropout)
        # where a sample lost everything, keep one of its modalities, chosen at random
        random_pick = torch.rand(stacked.shape, device=stacked.device).masked_fill(~stacked, -1.0).argmax(1)
        rescue = nn.functional.one_hot(random_pick, len(MODALITIES)).bool() & ~kept.any(1, keepdim=True)
        kept = kept | rescue
        return {m: kept[:, i] for i, m in enumerate(MODALITIES)}

    def _run_tower(self, modality, inputs, index, output_attentions, output_hidden_states):
        """Run one tower on the samples in `index`. Returns its token states with the tower's pooled summary
        prepended where it has one, a bool mask of real tokens, and the tower's own output."""
        tower = self.get_tower(modality)
        flags = {"output_attentions": output_attentions or None, "output_hidden_states": output_hidden_states or None}
        trim = index is not None  # the static path (index None) keeps every row and every column
        if index is None:
            index = slice(None)
        if modality == "vision":
            output = tower(pixel_values=inputs["pixel_values"][index], return_dict=True, **flags)
            states = output.last_hidden_state
            if states.dim() == 4:  # CNN feature maps (batch, channels, h, w) -> tokens (batch, h*w, channels)
                states = states.flatten(2).transpose(1, 2)
            token_mask = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        elif modality == "text":
            input_ids, attention_mask = inputs["input_ids"][index], inputs["attention_mask"]
            attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask[index]
            token_type_ids = inputs["token_type_ids"]
            token_type_ids = token_type_ids[index] if self._text_takes_token_type_ids and token_type_ids is not None else None
            # Real tokens first (left padding moved right), then no column that no present sample uses: the tower
            # then sees each sample at positions 0.. whatever the padding side and the batch partners
            attention_mask, input_ids, token_type_ids = _real_first(attention_mask, input_ids, token_type_ids, trim=trim)
            tower_kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                tower_kwargs["token_type_ids"] = token_type_ids
            output = tower(**tower_kwargs, return_dict=True, **flags)
            states, token_mask = output.last_hidden_state, attention_mask.bool()
        else:
            output, states, token_mask = self._run_audio_tower(tower, inputs, index, flags, trim)
        pooled = getattr(output, "pooler_output", None)
        if pooled is not None and pooled.dim() == 2 and pooled.shape[-1] == states.shape[-1]:
            # The tower's own pooled summary (BERT/ViT pooler, CLIP post-layernorm, SigLIP head) becomes the first
            # token: it carries information, and it keeps those weights in the graph (DDP needs every one used).
            states = torch.cat([pooled.unsqueeze(1), states], dim=1)
            token_mask = torch.cat([token_mask.new_ones(token_mask.shape[0], 1), token_mask], dim=1)
        return states, token_mask, output

    def _run_audio_tower(self, tower, inputs, index, flags, trim: bool):
        input_values = inputs["input_values"][index]
        sample_mask = inputs["audio_attention_mask"]
        sample_mask = torch.ones_like(input_values, dtype=torch.long) if sample_mask is None else sample_mask[index]
        sample_mask, input_values = _real_first(sample_mask, input_values, trim=trim)  # left-padded audio too
        lengths = sample_mask.sum(1)
        frame_lengths = tower._get_feat_extract_output_lengths(lengths)
        takes_mask = _audio_tower_takes_attention_mask(tower.config)
        if not takes_mask and self.config.exact_audio_lengths and trim:
            # one sample at a time on its true length: exact for group-norm encoders, at the cost of batching
            outputs = [tower(input_values[i : i + 1, : int(n)], return_dict=True, **flags) for i, n in enumerate(lengths)]
            frames = int(frame_lengths.max())

            def padded(tensors: list[torch.Tensor], dims: tuple[int, ...]) -> torch.Tensor:
                # zero-pad each sample's (1, ..., its frames, ...) to the longest along `dims`, then batch them
                rows = []
                for tensor in tensors:
                    pad = [0] * (2 * tensor.dim())
                    for dim in dims:
                        pad[2 * (tensor.dim() - 1 - dim) + 1] = frames - tensor.shape[dim]
                    rows.append(nn.functional.pad(tensor, pad))
                return torch.cat(rows)

            def per_layer(name: str, dims: tuple[int, ...]) -> tuple[torch.Tensor, ...] | None:
                layers = [getattr(o, name, None) for o in outputs]
                if layers[0] is None:
                    return None
                return tuple(padded([sample[j] for sample in layers], dims) for j in range(len(layers[0])))

            output = BaseModelOutput(
                last_hidden_state=padded([o.last_hidden_state for o in outputs], (1,)),
                hidden_states=per_layer("hidden_states", (1,)),  # (batch, frames, width) per layer
                attentions=per_layer("attentions", (2, 3)),  # (batch, heads, frames, frames) per layer
            )
            states = output.last_hidden_state
        else:
            output = tower(input_values, attention_mask=sample_mask if takes_mask else None, return_dict=True, **flags)
            states = output.last_hidden_state
        frame_index = torch.arange(states.shape[1], device=states.device)
        token_mask = frame_index.unsqueeze(0) < frame_lengths.to(states.device).unsqueeze(1)
        return output, states, token_mask

    def _fusion_masks(self, streams, token_masks, active, static: bool):
        """Attention masks in the format of `config._attn_implementation` (built once, shared by all layers). On the
        static path the masks are always built: skipping an all-ones mask would read it back to the host."""
        self_attn_masks, cross_attn_masks = {}, {}
        for modality in active:
            mask = token_masks[modality]
            # A sample without this modality has no real token; let its rows see their first (zero) token so the
            # softmax stays finite. Nothing reads those rows: pooling and the other streams mask them out.
            mask = mask.clone()
            mask[:, 0] |= ~mask.any(1)
            self_attn_masks[modality] = create_bidirectional_mask(
                config=self.config, inputs_embeds=streams[modality], attention_mask=mask,
                allow_is_bidirectional_skip=not static,
            )
        for modality in active:
            others = [m for m in active if m != modality]
            batch_size = streams[modality].shape[0]
            sink = token_masks[modality].new_ones(batch_size, 1)
            context_mask = torch.cat([sink, *[token_masks[m] for m in others]], dim=1)  # (batch, 1 + other tokens)
            context_shape = streams[modality].new_empty(batch_size, context_mask.shape[1], 1)
            cross_attn_masks[modality] = create_bidirectional_mask(
                config=self.config,
                inputs_embeds=streams[modality],
                attention_mask=context_mask,
                encoder_hidden_states=context_shape,
                allow_is_bidirectional_skip=not static,
            )
        return self_attn_masks, cross_attn_masks

    def _unused_parameter_anchor(self, active: tuple[str, ...]) -> torch.Tensor:
        """Zero, but computed from every trainable weight this step might otherwise leave out of the graph: all
        weights of modalities no sample has, and the parts of audio towers that LayerDrop or SpecAugment skip at
        random. DDP with `find_unused_parameters=False` needs every trainable parameter to get a gradient each step
        (a zero gradient is what `find_unused_parameters=True` would fill in)."""
        left_out: list[nn.Parameter] = []
        for modality in self.modalities:
            if modality in active:
                left_out += _stochastic_parameters(self.get_tower(modality))
                continue
            modules = [self.get_tower(modality), self.input_projections[modality], self.final_norms[modality]]
            modules += [layer.streams[modality] for layer in self.fusion_layers]
            left_out += [p for module in modules for p in module.parameters()]
        left_out = [p for p in left_out if p.requires_grad]
        if not left_out:
            return torch.zeros((), device=self.device)
        return sum(p.sum() for p in left_out) * 0.0


def _stochastic_parameters(tower: PreTrainedModel) -> list[nn.Parameter]:
    """Weights a tower uses only on some training steps, or only in pre-training: wav2vec2-family SpecAugment's
    mask embedding, the encoder layers when LayerDrop may skip them, and masked-image-modelling mask tokens
    (DINOv2, ViT with `use_mask_token`), which a forward without `bool_masked_pos` never reads."""
    parameters = []
    if isinstance(getattr(tower, "masked_spec_embed", None), nn.Parameter):
        parameters.append(tower.masked_spec_embed)
    if isinstance(getattr(getattr(tower, "embeddings", None), "mask_token", None), nn.Parameter):
        parameters.append(tower.embeddings.mask_token)
    if getattr(tower.config, "layerdrop", 0.0) > 0:
        layers = getattr(getattr(tower, "encoder", None), "layers", None)
        parameters += list((layers if layers is not None else tower).parameters())
    return parameters


def load_towers(vision: str | PreTrainedModel | None, text: str | PreTrainedModel | None,
                audio: str | PreTrainedModel | None, tower_kwargs: dict[str, Any]) -> dict[str, PreTrainedModel]:
    """The given towers loaded (`load_tower`), by attribute name (`vision_model`, ...); raises without any."""
    towers = {}
    for modality, source in (("vision", vision), ("text", text), ("audio", audio)):
        if source is not None:
            towers[f"{modality}_model"] = load_tower(modality, source, tower_kwargs)
    if not towers:
        raise ValueError("vision, text, audio: at least one tower is required, all three are None")
    return towers


def load_tower(modality: str, source: str | PreTrainedModel, tower_kwargs: dict[str, Any]) -> PreTrainedModel:
    """Load one tower with its own class's from_pretrained; from a dual-encoder checkpoint, take this modality's."""
    if isinstance(source, PreTrainedModel):
        resolve_tower_config(f"{modality}_config", source.config)  # raises for the wrong modality
        return source
    config = AutoConfig.from_pretrained(source, **{k: v for k, v in tower_kwargs.items() if k in ("revision", "token")})
    try:
        tower_config = resolve_tower_config(f"{modality}_config", config)
    except ValueError as error:
        message = str(error).split(": ", 1)[-1]
        raise ValueError(f"{modality}: checkpoint {source!r} ({message})") from None
    model_class = AutoModel._model_mapping[type(tower_config)]
    tower, loading_info = model_class.from_pretrained(
        source, config=tower_config, output_loading_info=True, **tower_kwargs
    )
    missing = sorted(loading_info["missing_keys"])
    encoder_missing = [key for key in missing if not _is_pooling_head_weight(key)]
    if encoder_missing:
        raise ValueError(
            f"{modality}: checkpoint {source!r} lacks weights of its {modality} tower "
            f"({len(encoder_missing)} missing, e.g. {encoder_missing[:3]})"
        )
    if missing:
        # A *ForImageClassification / fine-tuned classifier checkpoint (ViT, DeiT, BEiT, ...) saves its base model
        # without the pooler: transformers initialises it, it trains with the fusion, and the encoder is the checkpoint's.
        logger.warning(
            f"{modality}: checkpoint {source!r} has no weights for the tower's pooling head ({', '.join(missing)}); "
            "they are newly initialised and train with the fusion (a frozen tower keeps them as initialised)."
        )
    return tower


# Module names of towers' pooling heads (BERT/ViT `pooler`, SigLIP's attention-pooling `head`): the only weights a
# tower checkpoint may lack, as classifier checkpoints drop them.
POOLING_HEAD_MODULES = ("pooler", "head")


def _is_pooling_head_weight(key: str) -> bool:
    return any(part in POOLING_HEAD_MODULES for part in key.split(".")[:-1])


def is_cross_attention_name(name: str) -> bool:
    # what transformers' decoders call the layers `add_cross_attention` adds: `crossattention` (BERT family, GPT-2),
    # `ln_cross_attn` (GPT-2), `encoder_attn` (BART family, TrOCR)
    return any("cross" in part or part.startswith("encoder_attn") for part in name.split("."))


def check_decoder(decoder: PreTrainedModel, connection: str) -> None:
    """Raise `ValueError`, naming the connection to use instead, when `decoder` cannot be joined by `connection`:
    "cross_attention" needs a forward that takes `encoder_hidden_states` and cross-attention layers that were really
    built; "prefix" needs `inputs_embeds` and no cross-attention layers (they would receive no gradient)."""
    name = type(decoder).__name__
    has_cross_attention = any(is_cross_attention_name(n) for n, _ in decoder.named_modules())
    if connection == "cross_attention":
        if not _accepts(decoder, "encoder_hidden_states"):
            raise ValueError(f"decoder: {name} has no cross-attention; use decoder_connection='prefix'")
        if not has_cross_attention:
            raise ValueError(f"decoder: {name} was built without cross-attention layers (add_cross_attention=False); "
                             "build it with add_cross_attention=True or use decoder_connection='prefix'")
    else:
        if not _accepts(decoder, "inputs_embeds"):
            raise ValueError(f"decoder: {name} takes no inputs_embeds, which decoder_connection='prefix' needs; "
                             "use decoder_connection='cross_attention'")
        if has_cross_attention:
            raise ValueError(f"decoder: {name} has cross-attention layers, which decoder_connection='prefix' would "
                             "leave untrained; use decoder_connection='cross_attention' or build it with "
                             "add_cross_attention=False")


def load_decoder(source: str | PreTrainedModel, connection: str, load_kwargs: dict[str, Any]) -> PreTrainedModel:
    """The decoder LM of a generation model: a loaded model as it is (the model checks it), or a checkpoint (Hub id or
    folder) loaded with the `AutoModelForCausalLM` class of its config, marked as a decoder and, for
    "cross_attention", with cross-attention layers, newly initialised where the checkpoint lacks them (as
    `EncoderDecoderModel.from_encoder_decoder_pretrained` does). Raises `ValueError` naming `decoder` for a checkpoint
    that is not a causal LM or has no cross-attention to add, before loading its weights."""
    if isinstance(source, PreTrainedModel):
        return source
    config = AutoConfig.from_pretrained(source, **{k: v for k, v in load_kwargs.items() if k in ("revision", "token")})
    try:
        config = resolve_decoder_config(config, connection)
    except ValueError as error:
        message = str(error).split(": ", 1)[-1]
        raise ValueError(f"decoder: checkpoint {source!r} ({message})") from None
    model_class = AutoModelForCausalLM._model_mapping[type(config)]
    if connection == "cross_attention" and not _accepts(model_class, "encoder_hidden_states"):
        raise ValueError(f"decoder: {model_class.__name__} has no cross-attention; use decoder_connection='prefix'")
    decoder, loading_info = model_class.from_pretrained(source, config=config, output_loading_info=True, **load_kwargs)
    new = sorted(key for key in loading_info["missing_keys"] if is_cross_attention_name(key))
    if new:
        logger.info(f"decoder: checkpoint {source!r} has no cross-attention layers; their {len(new)} weights are newly "
                    "initialised and train with the fusion")
    return decoder


def _generation_defaults(decoder_generation_config: GenerationConfig) -> GenerationConfig:
    """The decoder's generation settings, plus a pad token (its eos where it has none: batched generation pads the
    rows that finish first) and a start token for `generate` without a prompt (`decoder_start_token_id`: its bos)."""
    generation_config = copy.deepcopy(decoder_generation_config)
    eos = generation_config.eos_token_id
    if generation_config.pad_token_id is None and eos is not None:
        generation_config.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos
    if generation_config.decoder_start_token_id is None:
        generation_config.decoder_start_token_id = generation_config.bos_token_id
    generation_config._from_model_config = False  # saved with the model as its own settings
    return generation_config


# ---- heads -------------------------------------------------------------------------------------------------------------
# One loss definition for every head: a target that a row lacks (-100 for a class id, NaN for a per-label 0/1 or a
# regression value) is masked out, never read as class 0 or as a zero target.

IGNORE_INDEX = -100


def infer_problem_type(num_labels: int, labels: torch.Tensor | None) -> str:
    """What transformers' sequence-classification loss infers when `problem_type` is unset."""
    if num_labels == 1:
        return "regression"
    if labels is not None and labels.dtype in (torch.long, torch.int):
        return "single_label_classification"
    return "multi_label_classification" if labels is not None else "single_label_classification"


def to_original_units(head_output: torch.Tensor, mean: list[float] | None, std: list[float] | None) -> torch.Tensor:
    """A regression head's standardised output in the targets' units (unchanged without a stored mean and std)."""
    if mean is None:
        return head_output
    return head_output * head_output.new_tensor(std) + head_output.new_tensor(mean)


def count_targets(labels: torch.Tensor, problem_type: str) -> torch.Tensor:
    """How many targets `labels` holds (what `task_loss` averages over): class ids other than -100, or entries that
    are not NaN."""
    if problem_type == "single_label_classification":
        return (labels != IGNORE_INDEX).sum()
    return (~torch.isnan(labels.float())).sum()


def task_loss(head_output: torch.Tensor, labels: torch.Tensor, problem_type: str,
              mean: list[float] | None = None, std: list[float] | None = None,
              num_items: torch.Tensor | float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of one task over the rows (entries) that have a target, and what it was averaged over.

    `head_output` `(batch, num_outputs)` is the head's raw output (standardised for regression); `labels` are class
    ids `(batch,)` (-100 = none) for single-label, 0/1 `(batch, labels)` (NaN = none) for multi-label, values in the
    original units `(batch,)` or `(batch, num_outputs)` (NaN = none) for regression, standardised here with `mean`
    and `std`. Cross-entropy, binary cross-entropy with logits, or MSE: summed over the targets present and divided
    by `num_items` (default: their count here; a training loop passes this process's share of the count over all
    processes, as transformers' `num_items_in_batch`, so that uneven counts still average over the global batch).
    With no target present the loss is an exact zero that keeps the head in the graph (DDP needs every parameter
    used)."""
    if problem_type == "single_label_classification":
        labels = labels.reshape(-1).long()
        present = labels != IGNORE_INDEX
        total = F.cross_entropy(head_output.float(), labels.clamp_min(0), reduction="none")
    else:
        labels = labels.to(head_output.device, torch.float32).reshape(head_output.shape)
        present = ~torch.isnan(labels)
        target = torch.where(present, labels, torch.zeros_like(labels))
        if problem_type == "regression":
            if mean is not None:
                target = (target - target.new_tensor(mean)) / target.new_tensor(std)
            total = F.mse_loss(head_output.float(), target, reduction="none")
        else:
            total = F.binary_cross_entropy_with_logits(head_output.float(), target, reduction="none")
    count = present.sum().float() if num_items is None else torch.as_tensor(num_items, dtype=torch.float32,
                                                                             device=head_output.device)
    masked = torch.where(present, total, torch.zeros_like(total))
    # the count is 0 only where no target is present: the sum is then an exact 0 that any positive divisor keeps
    return masked.sum() / count.clamp_min(1e-12), count


class MMFusionHeadModel(MMFusionPreTrainedModel):
    """What every task head shares: the fused encoder as `self.model`, dropout on the fused vector, and the tower
    accessors. A head class adds its modules in `_build_heads` and its `forward`; `head_modules` are pretrained
    modules of the head given ready-made (the generation head's `decoder`), passed on to `_build_heads`."""

    def __init__(
        self,
        config: MMFusionConfig,
        vision_model: PreTrainedModel | None = None,
        text_model: PreTrainedModel | None = None,
        audio_model: PreTrainedModel | None = None,
        **head_modules: nn.Module | None,
    ):
        super().__init__(config)
        with init.no_init_weights():  # initialised once by post_init, see MMFusionModel.__init__
            self.model = MMFusionModel(config, vision_model=vision_model, text_model=text_model, audio_model=audio_model)
            self.dropout = nn.Dropout(config.classifier_dropout)
            self._build_heads(config, **head_modules)
        self.post_init()

    def _build_heads(self, config: MMFusionConfig, **head_modules: nn.Module | None) -> None:
        raise NotImplementedError

    def get_input_embeddings(self) -> nn.Module | None:
        return self.model.get_input_embeddings()

    def encode_tower(self, modality: str, **inputs: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """See [`MMFusionModel.encode_tower`]; give the result back to `forward` as `tower_states`."""
        return self.model.encode_tower(modality, **inputs)


class MMFusionForSequenceClassification(MMFusionHeadModel):
    r"""
    mm-fusion with a classification (or regression) head on the fused vector. `config.problem_type` selects
    single-label (cross-entropy), multi-label (BCE with logits) or regression (MSE) as in transformers' own
    `*ForSequenceClassification` heads (inferred the same way when unset); with `labels` the output carries the
    loss. Targets a row lacks (-100, or NaN for multi-label and regression) are masked out (`task_loss`). A regression
    model with `config.target_mean`/`target_std` learns standardised targets and returns logits in the original units.

    Example:

    ```python
    >>> import torch
    >>> from transformers import BertConfig
    >>> from modeling_mm import MMFusionConfig, MMFusionForSequenceClassification
    >>> config = MMFusionConfig(text_config=BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
    ...     intermediate_size=37), fusion_hidden_size=32, fusion_num_heads=4, num_labels=3)
    >>> model = MMFusionForSequenceClassification(config)
    >>> out = model(input_ids=torch.tensor([[101, 2000, 102]]), labels=torch.tensor([2]))
    >>> out.logits.shape, out.loss.shape
    (torch.Size([1, 3]), torch.Size([]))
    ```
    """

    def _build_heads(self, config: MMFusionConfig) -> None:
        self.num_labels = config.num_labels
        self.classifier = nn.Linear(config.fusion_hidden_size, config.num_labels)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        input_values: torch.FloatTensor | None = None,
        audio_attention_mask: torch.LongTensor | None = None,
        has_text: torch.BoolTensor | None = None,
        has_image: torch.BoolTensor | None = None,
        has_audio: torch.BoolTensor | None = None,
        tower_states: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> MMFusionSequenceClassifierOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        fusion_output = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            pixel_values=pixel_values,
            input_values=input_values,
            audio_attention_mask=audio_attention_mask,
            has_text=has_text,
            has_image=has_image,
            has_audio=has_audio,
            tower_states=tower_states,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        head_output = self.classifier(self.dropout(fusion_output.pooler_output))
        problem_type = self.config.problem_type or infer_problem_type(self.num_labels, labels)
        logits = head_output
        if problem_type == "regression":
            logits = to_original_units(head_output, self.config.target_mean, self.config.target_std)
        loss = None
        if labels is not None:
            self.config.problem_type = problem_type  # as transformers' own heads do at the first loss
            loss, _ = task_loss(head_output, labels, problem_type, self.config.target_mean, self.config.target_std)
        output = MMFusionSequenceClassifierOutput(
            loss=loss, logits=logits, pooler_output=fusion_output.pooler_output, fusion_output=fusion_output
        )
        return output if return_dict else output.to_tuple()


class MMFusionTaskWeighting(nn.Module):
    """Learned homoscedastic-uncertainty task weights (Kendall, Gal & Cipolla, CVPR 2018): one log-variance
    s = log(sigma^2) per task, initialised at 0 (every task weighted 1)."""

    def __init__(self, num_tasks: int):
        super().__init__()
        self.log_variance = nn.Parameter(torch.zeros(num_tasks))


class MMFusionForMultiTask(MMFusionHeadModel):
    r"""
    mm-fusion with several named heads on one fused vector: each task of `config.tasks` has a problem type
    (single-label, multi-label or regression), its labels or output size, and a loss weight. `labels` is a dict
    `{task name: targets}` (any subset of tasks); a row lacking a task's target (-100 for a class id, NaN otherwise)
    adds nothing to that task. The loss is the weighted sum of the task losses: fixed `loss_weight`s, or learned
    uncertainty weights (`config.task_weighting="uncertainty"`). Regression tasks with `target_mean`/`target_std`
    return their outputs in the original units.

    Example:

    ```python
    >>> import torch
    >>> from transformers import BertConfig
    >>> from modeling_mm import MMFusionConfig, MMFusionForMultiTask
    >>> config = MMFusionConfig(text_config=BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
    ...     intermediate_size=37), fusion_hidden_size=32, fusion_num_heads=4, tasks=[
    ...     {"name": "sentiment", "problem_type": "single_label_classification", "labels": ["neg", "pos"]},
    ...     {"name": "intensity", "problem_type": "regression", "target_mean": 5.0, "target_std": 2.0}])
    >>> model = MMFusionForMultiTask(config)
    >>> out = model(input_ids=torch.tensor([[101, 2000, 102], [101, 2001, 102]]),
    ...             labels={"sentiment": torch.tensor([1, -100]), "intensity": torch.tensor([7.5, float("nan")])})
    >>> {name: tuple(logits.shape) for name, logits in out.logits.items()}, out.loss.shape
    ({'sentiment': (2, 2), 'intensity': (2, 1)}, torch.Size([]))
    ```
    """

    def _build_heads(self, config: MMFusionConfig) -> None:
        if not config.tasks:
            raise ValueError("tasks: MMFusionForMultiTask needs at least one task in config.tasks")
        self.heads = nn.ModuleDict({task["name"]: nn.Linear(config.fusion_hidden_size, task["num_outputs"])
                                    for task in config.tasks})
        self.task_weighting = (MMFusionTaskWeighting(len(config.tasks))
                               if config.task_weighting == "uncertainty" else None)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(task["name"] for task in self.config.tasks)

    def forward(
        self,
        labels: dict[str, torch.Tensor] | None = None,
        num_items_in_batch: dict[str, torch.Tensor | float] | None = None,
        return_dict: bool | None = None,
        **model_inputs: Any,
    ) -> MMFusionMultiTaskOutput | tuple:
        r"""
        model_inputs: what [`MMFusionModel.forward`] takes (`input_ids`, `pixel_values`, `input_values`, their masks,
            `has_*`, `tower_states`, `output_attentions`, `output_hidden_states`), passed on as they are.
        labels (`dict[str, torch.Tensor]`, *optional*): targets by task name (any subset of the tasks), as
            `task_loss` takes them; -100 (class ids) or NaN (otherwise) where a row lacks a target.
        num_items_in_batch (`dict[str, float]`, *optional*): per task, what its summed loss is divided by instead of
            its number of targets here (transformers' convention): a DDP loop passes the count over all processes
            divided by their number, so that processes with more labelled rows weigh more, as in one big batch.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if labels is not None and (not isinstance(labels, dict) or set(labels) - set(self.task_names)):
            unknown = sorted(set(labels) - set(self.task_names)) if isinstance(labels, dict) else type(labels).__name__
            raise ValueError(f"labels: expected a dict keyed by task name {list(self.task_names)}, got {unknown}")
        fusion_output = self.model(**model_inputs, return_dict=True)
        pooled = self.dropout(fusion_output.pooler_output)
        head_outputs, logits = {}, {}
        for task in self.config.tasks:
            head_outputs[task["name"]] = self.heads[task["name"]](pooled)
            logits[task["name"]] = (to_original_units(head_outputs[task["name"]], task["target_mean"], task["target_std"])
                                    if task["problem_type"] == "regression" else head_outputs[task["name"]])
        loss = task_losses = task_weights = None
        if labels is not None:
            loss, task_losses, task_weights = self._weighted_loss(head_outputs, labels, num_items_in_batch or {})
        output = MMFusionMultiTaskOutput(loss=loss, logits=logits, task_losses=task_losses, task_weights=task_weights,
                                         pooler_output=fusion_output.pooler_output, fusion_output=fusion_output)
        return output if return_dict else output.to_tuple()

    def _weighted_loss(self, head_outputs: dict[str, torch.Tensor], labels: dict[str, torch.Tensor],
                       num_items: dict[str, torch.Tensor | float]):
        """sum over tasks of weight * task loss; a task without any target in the batch adds an exact zero (its
        uncertainty term too, so its log-variance does not drift where it has nothing to learn from)."""
        total = None
        task_losses, task_weights = {}, {}
        for index, task in enumerate(self.config.tasks):
            name = task["name"]
            head_output = head_outputs[name]
            if name in labels and labels[name] is not None:
                loss, count = task_loss(head_output, labels[name], task["problem_type"], task["target_mean"],
                                        task["target_std"], num_items.get(name))
            else:
                loss, count = head_output.sum() * 0.0, head_output.new_zeros(())
            present = (count > 0).float()
            if self.task_weighting is None:
                weight = head_output.new_tensor(task["loss_weight"])
                term = weight * loss
            else:
                log_variance = self.task_weighting.log_variance[index]
                scale = 0.5 if task["problem_type"] == "regression" else 1.0
                weight = task["loss_weight"] * scale * torch.exp(-log_variance)
                term = weight * loss + task["loss_weight"] * 0.5 * log_variance * present
            task_losses[name], task_weights[name] = loss, weight.detach()
            total = term if total is None else total + term
        return total, task_losses, task_weights



def contrastive_pair_loss(logits: torch.Tensor, loss_type: str) -> torch.Tensor:
    """The contrastive loss of `n` aligned pairs from their logits `(n, n)`, where row i and column i are one item.

    "infonce": the symmetric cross-entropy `(CE(logits, arange) + CE(logits.T, arange)) / 2` (CLIP). "sigmoid": an
    independent binary decision per pair, `-sum(logsigmoid(labels * logits)) / n` with labels +1 on the diagonal and
    -1 elsewhere (SigLIP; its bias is already in `logits`). Computed in float32."""
    logits = logits.float()
    n = logits.shape[0]
    if loss_type == "sigmoid":
        labels = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1
        return -F.logsigmoid(labels * logits).sum() / n
    target = torch.arange(n, device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


class MMFusionSimilarity(nn.Module):
    """The learned temperature `logit_scale` (CLIP) and, for the sigmoid loss only, the bias `logit_bias` (SigLIP).
    A module of their own, so that peft's `modules_to_save` trains them and saves them with an adapter (peft wraps
    modules, not bare parameters)."""

    def __init__(self, config: MMFusionConfig):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        # only the sigmoid loss reads a bias: an InfoNCE model has none, so no parameter is left out of the graph
        self.logit_bias = (nn.Parameter(torch.tensor(float(config.logit_bias_init_value)))
                           if config.contrastive_loss == "sigmoid" else None)


class MMFusionContrastiveModel(MMFusionHeadModel):
    r"""
    mm-fusion as a joint embedding model, in the manner of CLIP and `VisionTextDualEncoderModel`: each modality of an
    item is embedded alone (the fusion model run with only that modality, its pooled vector projected to
    `config.projection_dim` by `vision_projection`, `text_projection` or `audio_projection`), so an item's embedding
    depends on that item alone and any two modalities can be compared (retrieval, zero-shot classification).
    `get_fused_features` embeds a row with several modalities together (`fused_projection`).

    With `return_loss=True` the loss is, for every pair of modalities present in the batch (only the pairs with
    `config.contrastive_anchor` when set), the contrastive loss (`config.contrastive_loss`: symmetric InfoNCE or
    SigLIP's sigmoid loss) over the rows that have both, averaged over the pairs that have a row; plus
    `config.fused_contrastive_weight` times the same loss between the fused embedding of each row with two or more
    modalities and each of its single-modality embeddings (averaged over the modalities). The logits are
    `exp(logit_scale)` (clamped at 100) times the cosine similarities, plus the learned `logit_bias` for the sigmoid
    loss. A pair without a row adds an exact zero, and every head weight stays in the graph (DDP needs every
    parameter used). Under torch.distributed the loss is that of the global batch, with every process's rows as
    negatives (`_gathered`), so several processes train as one with their batches put together.

    Example:

    ```python
    >>> import torch
    >>> from transformers import BertConfig, ViTConfig
    >>> from modeling_mm import MMFusionConfig, MMFusionContrastiveModel
    >>> config = MMFusionConfig(
    ...     vision_config=ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
    ...                             image_size=32, patch_size=8),
    ...     text_config=BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37),
    ...     fusion_hidden_size=32, fusion_num_heads=4, projection_dim=16)
    >>> model = MMFusionContrastiveModel(config).eval()
    >>> out = model(input_ids=torch.tensor([[101, 2000, 102], [101, 2001, 102], [101, 102, 0]]),
    ...             attention_mask=torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0]]),
    ...             pixel_values=torch.randn(3, 3, 32, 32), has_image=torch.tensor([True, True, False]),
    ...             return_loss=True)
    >>> tuple(out.logits_per_pair["image_text"].shape), tuple(out.text_embeds.shape), out.loss.shape
    ((2, 3), (3, 16), torch.Size([]))
    ```
    """

    def _build_heads(self, config: MMFusionConfig) -> None:
        if config.tasks is not None:
            raise ValueError("tasks: MMFusionContrastiveModel has no task heads; config.tasks must be None")
        if config.contrastive_anchor is not None and config.contrastive_anchor not in config.modalities:
            raise ValueError(f"contrastive_anchor: {config.contrastive_anchor!r} is not one of this model's towers "
                             f"{config.modalities}")
        # marks the checkpoint, so that save_pretrained maps AutoModel to this class. (The shared `dropout` is not
        # applied: embeddings are compared with each other, not classified.)
        self.config.is_contrastive = True
        width = config.fusion_hidden_size
        for modality in config.modalities:
            setattr(self, f"{modality}_projection", nn.Linear(width, config.projection_dim, bias=False))
        self.fused_projection = nn.Linear(width, config.projection_dim, bias=False)
        self.similarity = MMFusionSimilarity(config)

    @property
    def logit_scale(self) -> nn.Parameter:
        """The learned log temperature (the logits use `exp(logit_scale)`, clamped at 100), as in CLIPModel."""
        return self.similarity.logit_scale

    @property
    def logit_bias(self) -> nn.Parameter | None:
        """The sigmoid loss's learned bias (None for InfoNCE), as in SiglipModel."""
        return self.similarity.logit_bias

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MMFusionSimilarity):  # a load without them (e.g. from a classifier checkpoint)
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)
            if module.logit_bias is not None:
                init.constant_(module.logit_bias, self.config.logit_bias_init_value)

    # ---- embeddings --------------------------------------------------------------------------------------------------

    def get_image_features(
        self,
        pixel_values: torch.FloatTensor | None = None,
        tower_states: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        normalize: bool = True,
    ) -> torch.FloatTensor:
        """Image embeddings `(batch, projection_dim)`, each from its image alone; unit vectors with `normalize`.
        `tower_states={"vision": encode_tower("vision", ...)}` replaces `pixel_values` (a cached frozen tower)."""
        return self._embed("vision", {"pixel_values": pixel_values}, tower_states, normalize)

    def get_text_features(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        tower_states: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        normalize: bool = True,
    ) -> torch.FloatTensor:
        """Text embeddings `(batch, projection_dim)`, each from its text alone; unit vectors with `normalize`.
        `tower_states={"text": ...}` replaces the token inputs."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return self._embed("text", inputs, tower_states, normalize)

    def get_audio_features(
        self,
        input_values: torch.FloatTensor | None = None,
        audio_attention_mask: torch.LongTensor | None = None,
        tower_states: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        normalize: bool = True,
    ) -> torch.FloatTensor:
        """Audio embeddings `(batch, projection_dim)`, each from its audio alone; unit vectors with `normalize`.
        `tower_states={"audio": ...}` replaces `input_values`."""
        inputs = {"input_values": input_values, "audio_attention_mask": audio_attention_mask}
        return self._embed("audio", inputs, tower_states, normalize)

    def get_fused_features(self, normalize: bool = True, **model_inputs: Any) -> torch.FloatTensor:
        """Embeddings `(batch, projection_dim)` of the fused vector over the modalities each row has (`model_inputs`
        as [`MMFusionModel.forward`] takes them, `has_*` masks included), projected by `fused_projection`; unit
        vectors with `normalize`."""
        pooled = self.model(**model_inputs, return_dict=True).pooler_output
        embeds = self.fused_projection(pooled)
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def _embed(self, modality: str, inputs: dict[str, torch.Tensor | None],
               tower_states: dict[str, tuple[torch.Tensor, torch.Tensor]] | None, normalize: bool) -> torch.Tensor:
        """The fusion model run on one modality only, its pooled vector projected (and normalised)."""
        main_name = TOWER_INPUT_NAMES[modality][0]
        if modality not in self.model.modalities:
            raise ValueError(f"{main_name}: this model has no {modality} tower (it has {self.model.modalities})")
        if set(tower_states or {}) - {modality}:
            raise ValueError(f"tower_states: get_{MODALITY_NAMES[modality].user}_features takes only "
                             f"{modality!r}, got {sorted(tower_states)}")
        if inputs[main_name] is None and not tower_states:
            raise ValueError(f"{main_name}: required (or tower_states[{modality!r}])")
        # With one modality, the fused vector is that stream's pooled vector; it also carries the base model's zero
        # anchor that keeps the other towers in the graph (DDP), which `{modality}_pooler_output` does not
        pooled = self.model(**inputs, tower_states=tower_states, return_dict=True).pooler_output
        embeds = getattr(self, f"{modality}_projection")(pooled)
        return F.normalize(embeds, dim=-1) if normalize else embeds

    def _gathered(self, embeds: dict[str, torch.Tensor], fused: torch.Tensor | None,
                  presence: dict[str, torch.Tensor], batch_size: int):
        """Every process's rows, in rank order, for the loss (open_clip's `gather_features` with
        `gather_with_grad`): under torch.distributed with more than one process, each process computes the loss of
        the global batch, so its negatives come from every process. The gather keeps the gradient (its backward sums
        the gradients of all processes into each one's own rows, and DDP's mean over processes then gives exactly
        the gradient of the global batch's loss). Processes may hold different numbers of rows and lack different
        modalities: every process sends every modality of the model (zeros where it has none), padded to the
        largest batch, so all take part in the same collectives. Returns (embeds, fused, presence, several) over
        the global batch; unchanged (with `several` computed) on a single process."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not distributed or torch.distributed.get_world_size() == 1:
            several = torch.stack([presence[m] for m in MODALITIES], dim=1).sum(1) >= 2  # (batch,)
            return embeds, fused, presence, several
        import torch.distributed.nn.functional as dist_functional

        world_size = torch.distributed.get_world_size()
        device = next(iter(presence.values())).device
        sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size)]
        torch.distributed.all_gather(sizes, torch.tensor([batch_size], device=device))
        sizes = [int(size) for size in sizes]
        longest, dim = max(sizes), self.config.projection_dim
        reference = next(iter(self._head_parameters()))

        def gather(tensor: torch.Tensor, with_grad: bool) -> torch.Tensor:
            padded = F.pad(tensor, (0, 0) * (tensor.dim() - 1) + (0, longest - tensor.shape[0]))
            if with_grad:
                parts = dist_functional.all_gather(padded)
            else:
                parts = [torch.empty_like(padded) for _ in range(world_size)]
                torch.distributed.all_gather(parts, padded)
            return torch.cat([part[:size] for part, size in zip(parts, sizes)])

        def rows_or_zeros(tensor: torch.Tensor | None) -> torch.Tensor:
            # every process must run the backward of every gather (its collective), also for the zeros it sends
            # for a modality it lacks, so those zeros take part in autograd too
            if tensor is None:
                tensor = reference.new_zeros(batch_size, dim).requires_grad_(torch.is_grad_enabled())
            return tensor

        all_presence = {m: gather(presence[m].long(), with_grad=False).bool() for m in MODALITIES}
        all_embeds = {m: gather(rows_or_zeros(embeds.get(m)), with_grad=True) for m in self.model.modalities}
        all_embeds = {m: e for m, e in all_embeds.items() if bool(all_presence[m].any())}
        all_fused = None
        if self.config.fused_contrastive_weight > 0:
            all_fused = gather(rows_or_zeros(fused), with_grad=True)
        several = torch.stack([all_presence[m] for m in MODALITIES], dim=1).sum(1) >= 2  # (global batch,)
        return all_embeds, all_fused, all_presence, several

    def _logits(self, embeds_a: torch.Tensor, embeds_b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        logits = scale * embeds_a @ embeds_b.t()  # (rows_a, rows_b)
        return logits + self.logit_bias if self.logit_bias is not None else logits

    def _head_parameters(self) -> list[nn.Parameter]:
        modules = [getattr(self, f"{m}_projection") for m in self.model.modalities] + [self.fused_projection]
        return [p for module in modules + [self.similarity] for p in module.parameters()]

    # ---- forward -----------------------------------------------------------------------------------------------------

    def forward(
        self,
        return_loss: bool = False,
        return_dict: bool | None = None,
        **model_inputs: Any,
    ) -> MMFusionContrastiveOutput | tuple:
        r"""
        Embeds each modality of each row alone, each tower and the fusion run once per modality on the rows that
        have it (`has_*`; by default every row has the modalities whose inputs are given), and compares every pair of
        modalities (`logits_per_pair`).

        model_inputs: what [`MMFusionModel.forward`] takes (`input_ids`, `pixel_values`, `input_values`, their masks,
            `has_*`, `tower_states`), by the names of `MODALITY_NAMES`.
        return_loss (`bool`): also return the contrastive loss (see the class docstring).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        inputs = {m: {name: model_inputs.get(name) for name in MODALITY_NAMES[m].inputs} for m in MODALITIES}
        main_input = {m: inputs[m][MODALITY_NAMES[m].inputs[0]] for m in MODALITIES}
        tower_states = self.model._check_tower_states(model_inputs.get("tower_states") or {}, main_input)
        main_input.update({modality: states for modality, (states, _) in tower_states.items()})
        batch_size = self.model._batch_size(main_input)
        device = next(t for t in main_input.values() if t is not None).device
        presence = self.model._presence(main_input, {m: model_inputs.get(MODALITY_NAMES[m].presence)
                                                     for m in MODALITIES}, batch_size, device)

        def rows_of(tensors: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
            return {name: None if t is None else t[rows] for name, t in tensors.items()}

        # 1) each modality alone, on the rows that have it; zeros in the rows that lack it
        embeds: dict[str, torch.Tensor] = {}
        for modality in self.model.modalities:
            rows = presence[modality].nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            states = ({modality: tuple(t[rows] for t in tower_states[modality])}
                      if modality in tower_states else None)
            projected = self._embed(modality, rows_of(inputs[modality], rows), states, normalize=True)
            embeds[modality] = projected.new_zeros(batch_size, projected.shape[-1]).index_put((rows,), projected)
        present = tuple(embeds)

        # 2) the fused embedding of the rows with two or more modalities, when the loss has a term for it
        fused = None
        several = torch.stack([presence[m] for m in MODALITIES], dim=1).sum(1) >= 2  # (batch,)
        if self.config.fused_contrastive_weight > 0 and bool(several.any()):
            rows = several.nonzero().squeeze(1)
            fused_inputs = {name: value for modality in self.model.modalities
                            for name, value in rows_of(inputs[modality], rows).items()}
            # every given modality says which rows have it (a modality no row of this batch has is given as all
            # absent, never left to the default "present wherever its inputs are")
            fused_inputs.update({PRESENCE_KEYS[m]: presence[m][rows] for m in self.model.modalities
                                 if main_input[m] is not None})
            fused_inputs["tower_states"] = {m: tuple(t[rows] for t in pair) for m, pair in tower_states.items()}
            projected = self.get_fused_features(**fused_inputs)
            fused = projected.new_zeros(batch_size, projected.shape[-1]).index_put((rows,), projected)

        # 3) logits of every pair of modalities present, and the loss
        scale = self.logit_scale.exp().clamp(max=100)
        pairs = list(itertools.combinations(present, 2))
        logits_per_pair = {
            f"{MODALITY_NAMES[a].user}_{MODALITY_NAMES[b].user}":
                self._logits(embeds[a][presence[a]], embeds[b][presence[b]], scale)
            for a, b in pairs
        }
        loss = None
        if return_loss:
            loss = self._loss(embeds, fused, presence, batch_size, scale)
        output = MMFusionContrastiveOutput(
            loss=loss,
            logits_per_pair=logits_per_pair,
            image_embeds=embeds.get("vision"),
            text_embeds=embeds.get("text"),
            audio_embeds=embeds.get("audio"),
            fused_embeds=fused,
            logit_scale=scale,
            logit_bias=self.logit_bias,
            has_image=presence["vision"],
            has_text=presence["text"],
            has_audio=presence["audio"],
        )
        return output if return_dict else output.to_tuple()

    def _loss(self, embeds, fused, presence, batch_size, scale) -> torch.Tensor:
        loss_type, anchor = self.config.contrastive_loss, self.config.contrastive_anchor
        # Exactly zero, but computed from every embedding and head weight: a pair without a row, an unused projection
        # or an unused bias still gets its (zero) gradient, as DDP with find_unused_parameters=False needs.
        total = (sum(e.sum() for e in embeds.values()) + sum(p.sum() for p in self._head_parameters())) * 0.0
        embeds, fused, presence, several = self._gathered(embeds, fused, presence, batch_size)

        def pair_loss(embeds_a: torch.Tensor, embeds_b: torch.Tensor) -> torch.Tensor:
            return contrastive_pair_loss(self._logits(embeds_a, embeds_b, scale), loss_type)

        terms = []
        for a, b in itertools.combinations(embeds, 2):
            if anchor is not None and anchor not in (a, b):
                continue
            both = presence[a] & presence[b]
            if bool(both.any()):  # a pair without a row drops out of the average
                terms.append(pair_loss(embeds[a][both], embeds[b][both]))
        if terms:
            total = total + torch.stack(terms).mean()
        if fused is not None:
            fused_terms = [pair_loss(fused[several & presence[m]], embeds[m][several & presence[m]])
                           for m in embeds if bool((several & presence[m]).any())]
            if fused_terms:
                total = total + self.config.fused_contrastive_weight * torch.stack(fused_terms).mean()
        return total


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor,
                   num_items_in_batch: torch.Tensor | float | None = None) -> torch.Tensor:
    """The cross-entropy of each token of `labels` `(batch, length)` other than -100, predicted by `logits`
    `(batch, length, vocab)` at the position before it (the shift of transformers' causal LMs), in float32: summed and
    divided by `num_items_in_batch` (default: the number of such tokens here; a training loop passes this process's
    share of the global count, as transformers does). Exactly zero, with the graph kept, when no token counts."""
    shift_logits = logits[:, :-1].float()  # (batch, length - 1, vocab)
    shift_labels = labels[:, 1:].to(logits.device)  # (batch, length - 1)
    total = F.cross_entropy(shift_logits.flatten(0, 1), shift_labels.flatten(), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    if num_items_in_batch is None:
        count = (shift_labels != IGNORE_INDEX).sum().float()
    else:
        count = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=logits.device)
    return total / count.clamp_min(1e-12)



class MMFusionForConditionalGeneration(MMFusionHeadModel, GenerationMixin):
    r"""
    mm-fusion with a decoder language model: text generated from any subset of image, text and audio per sample
    (captioning, spoken or visual question answering, dialogue), in the manner of BLIP-2 and VisionEncoderDecoderModel.

    The decoder (`self.decoder`, any `AutoModelForCausalLM`) reads the fused token states of every stream a sample has
    (the `*_last_hidden_state` rows where `*_token_mask`, each row's real tokens first), summarised by
    `config.num_query_tokens` learned queries (`decoder_queries`) when set, and projected to its width
    (`decoder_input_projection`), in the way `config.decoder_connection` says:
    - "cross_attention": as the `encoder_hidden_states` of its own cross-attention layers (GPT-2, BERT or BART-style
      decoders); a decoder without them (Llama) is refused with a `ValueError`;
    - "prefix": as embeddings placed before the prompt's token embeddings (any causal LM: Llama, Qwen2, SmolLM, GPT-2).

    `decoder_input_ids` hold, per row, [prompt tokens, target tokens, eos], padded on either side
    (`decoder_attention_mask`); `labels` are the same ids with -100 on the prompt and the padding. The loss is the
    cross-entropy of each target token predicted from the position before it (in prefix mode the first one from the
    last prefix position). Each row is laid out alone (its real tokens from position 0, prefix first), so neither
    the padding side nor the batch partners change its loss, logits or generated tokens.

    `generate` runs the towers and the fusion once, then hands the decoder's own `generate` the context, as BLIP-2
    does: greedy and beam search, sampling, the KV cache and streamers are transformers' own. It returns only the new
    tokens.

    Example:

    ```python
    >>> import torch
    >>> from transformers import BertConfig, GPT2Config, ViTConfig
    >>> from modeling_mm import MMFusionConfig, MMFusionForConditionalGeneration
    >>> config = MMFusionConfig(
    ...     vision_config=ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37,
    ...                             image_size=32, patch_size=8),
    ...     text_config=BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37),
    ...     decoder_config=GPT2Config(vocab_size=100, n_embd=48, n_layer=1, n_head=4, bos_token_id=1, eos_token_id=2),
    ...     decoder_connection="prefix", num_query_tokens=4, fusion_hidden_size=32, fusion_num_heads=4)
    >>> model = MMFusionForConditionalGeneration(config).eval()
    >>> pixel_values, question = torch.randn(2, 3, 32, 32), torch.tensor([[101, 2054, 102], [101, 2129, 102]])
    >>> out = model(pixel_values=pixel_values, input_ids=question,
    ...             decoder_input_ids=torch.tensor([[1, 5, 6, 2], [1, 7, 2, 0]]),
    ...             decoder_attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
    ...             labels=torch.tensor([[-100, 5, 6, 2], [-100, 7, 2, -100]]))
    >>> tuple(out.logits.shape), out.loss.shape
    ((2, 4, 100), torch.Size([]))
    >>> model.generate(pixel_values=pixel_values, input_ids=question, max_new_tokens=5, min_new_tokens=5).shape
    torch.Size([2, 5])
    ```
    """

    def _build_heads(self, config: MMFusionConfig, decoder: PreTrainedModel | None = None) -> None:
        if config.decoder_config is None:
            raise ValueError("decoder_config: MMFusionForConditionalGeneration needs a decoder: the config of a causal "
                             "LM, or from_towers(..., decoder=...)")
        if decoder is None:
            # dtype: as for the towers (see MMFusionModel.__init__)
            decoder = AutoModelForCausalLM.from_config(config.decoder_config, dtype=torch.get_default_dtype())
        # The decoder and the composite share one config object, as the towers do (attention settings, saved config)
        config.decoder_config._attn_implementation = decoder.config._attn_implementation
        loaded_config = decoder.config
        for module in decoder.modules():
            if getattr(module, "config", None) is loaded_config:
                module.config = config.decoder_config
        check_decoder(decoder, config.decoder_connection)
        self.decoder = decoder
        width = decoder.get_input_embeddings().embedding_dim
        # which part of the context a token is: the fused vector, or a token of one of the modalities' streams
        self.decoder_context_embedding = nn.Embedding(1 + len(MODALITIES), config.fusion_hidden_size)
        self.decoder_queries = MMFusionQueryBlock(config) if config.num_query_tokens else None
        # Cross-attention layers project their context themselves and need only the widths to agree; a prefix must
        # also land among the LM's token embeddings, which only a learned map can find.
        if config.decoder_connection == "prefix" or width != config.fusion_hidden_size:
            self.decoder_input_projection = nn.Linear(config.fusion_hidden_size, width)
        else:
            self.decoder_input_projection = nn.Identity()
        self.generation_config = _generation_defaults(decoder.generation_config)

    @classmethod
    def from_towers(
        cls,
        vision: str | PreTrainedModel | None = None,
        text: str | PreTrainedModel | None = None,
        audio: str | PreTrainedModel | None = None,
        *,
        decoder: str | PreTrainedModel,
        tower_kwargs: dict[str, Any] | None = None,
        **config_kwargs: Any,
    ) -> "MMFusionForConditionalGeneration":
        """Build a generation model from pretrained towers and a pretrained decoder LM: Hub ids, local folders or
        loaded models. The decoder is loaded by [`load_decoder`] (its `AutoModelForCausalLM` class, cross-attention
        layers added for "cross_attention"); `tower_kwargs` (e.g. `dtype`) apply to it too. `config_kwargs` are
        `MMFusionConfig` fields (`decoder_connection`, `num_query_tokens`, fusion sizes). The model's
        `generation_config` starts from the decoder's (its `generation_config.json` where the checkpoint has one).

        Raises `ValueError` naming `decoder` for a checkpoint that is no causal LM or, with "cross_attention", has no
        cross-attention (before loading its weights), and naming the tower argument as [`from_towers`] does.
        """
        connection = config_kwargs.get("decoder_connection", cls.config_class.decoder_connection)
        if connection not in DECODER_CONNECTIONS:
            raise ValueError(f"decoder_connection: must be one of {DECODER_CONNECTIONS}, got {connection!r}")
        decoder_model = load_decoder(decoder, connection, tower_kwargs or {})
        towers = load_towers(vision, text, audio, tower_kwargs or {})
        tower_configs = {f"{name.removesuffix('_model')}_config": tower.config for name, tower in towers.items()}
        config = cls.config_class(**tower_configs, decoder_config=decoder_model.config, **config_kwargs)
        return cls(config, **towers, decoder=decoder_model)

    @classmethod
    def from_encoder(
        cls,
        encoder: str | MMFusionPreTrainedModel,
        *,
        decoder: str | PreTrainedModel,
        tower_kwargs: dict[str, Any] | None = None,
        **config_kwargs: Any,
    ) -> "MMFusionForConditionalGeneration":
        """Build a generation model whose towers and fusion are those of a trained mm-fusion model (a classifier,
        multi-task, contrastive or base model: a folder, Hub id or loaded model), with a new decoder LM and
        connection: BLIP-2's second stage, where an encoder trained to match and compare modalities learns to talk.
        The encoder's head is left out; `config_kwargs` set the connection (`decoder_connection`,
        `num_query_tokens`). Raises `ValueError` naming `encoder` for a model that already has a decoder."""
        if isinstance(encoder, MMFusionPreTrainedModel):
            base = encoder if isinstance(encoder, MMFusionModel) else encoder.model
        else:
            # this class's config: also where only its remote code has registered the model type
            hub_kwargs = {k: v for k, v in (tower_kwargs or {}).items() if k in ("revision", "token")}
            encoder_config = cls.config_class.from_pretrained(encoder, **hub_kwargs)
            if getattr(encoder_config, "decoder_config", None) is not None:
                raise ValueError(f"encoder: {encoder!r} is a generation model already; load it with from_pretrained")
            base = MMFusionModel.from_pretrained(encoder, **(tower_kwargs or {}))
        if base.config.decoder_config is not None:
            raise ValueError("encoder: a generation model already; load it with from_pretrained")
        connection = config_kwargs.get("decoder_connection", cls.config_class.decoder_connection)
        if connection not in DECODER_CONNECTIONS:
            raise ValueError(f"decoder_connection: must be one of {DECODER_CONNECTIONS}, got {connection!r}")
        decoder_model = load_decoder(decoder, connection, tower_kwargs or {})
        encoder_fields = {name: copy.deepcopy(getattr(base.config, name)) for name in ENCODER_CONFIG_FIELDS}
        config = cls.config_class(**{**encoder_fields, **config_kwargs}, decoder_config=decoder_model.config)
        model = cls(config, decoder=decoder_model)
        model.model.load_state_dict(base.state_dict())  # strict: every encoder weight, nothing else
        # where the encoder came from: an adapter trained on this model names it as its base (peft)
        model.config.name_or_path = model.name_or_path = base.config.name_or_path
        return model

    # ---- the decoder's vocabulary ------------------------------------------------------------------------------------

    def get_input_embeddings(self) -> nn.Module:
        return self.decoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.decoder.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.decoder.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.decoder.set_output_embeddings(value)

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """Resize the decoder's vocabulary (input and output embeddings, tied again where they were) and
        `config.decoder_config.vocab_size`; the text tower's vocabulary is its own."""
        return self.decoder.resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)

    # ---- the context the decoder reads -------------------------------------------------------------------------------

    def get_decoder_context(self, **model_inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """What the decoder reads from the fused encoder: its states `(batch, context_tokens, decoder_hidden_size)`
        (the `encoder_hidden_states` of cross-attention, or the prefix embeddings) and their bool mask
        `(batch, context_tokens)`, each row's real tokens first. `model_inputs` as [`MMFusionModel.forward`] takes
        them. Give the pair back as `encoder_outputs` (to `forward` or `generate`) to skip the encoder."""
        states, mask, _ = self._context(model_inputs)
        return states, mask

    def _context(self, model_inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, MMFusionModelOutput]:
        fusion_output = self.model(**model_inputs, return_dict=True)
        streams = [m for m in self.model.modalities if getattr(fusion_output, f"{m}_last_hidden_state") is not None]
        # The fused vector leads the context: what a classifier head reads (a comparison of the modalities, say) is
        # one token away, and an encoder trained for classification (from_encoder) hands it over as it learnt it.
        # Each part is marked with its own learned embedding: cross-attention has no positions, and the mean vector
        # alone looks like any of the tokens it averages.
        kinds = self.decoder_context_embedding.weight
        fused = fusion_output.pooler_output[:, None] + kinds[0]
        states = torch.cat([fused, *(getattr(fusion_output, f"{m}_last_hidden_state") + kinds[1 + MODALITIES.index(m)]
                                     for m in streams)], dim=1)
        mask = torch.cat([torch.ones_like(fused[..., 0], dtype=torch.bool),
                          *(getattr(fusion_output, f"{m}_token_mask").bool() for m in streams)], dim=1)
        # each row's real tokens first, then no column that no row uses: a row's context is its own
        mask, states = _real_first(mask, states, trim=not self.config.static_shapes)
        if self.decoder_queries is not None:
            states, mask = self.decoder_queries(states, mask)  # (batch, num_query_tokens, fusion_hidden)
        states = self.decoder_input_projection(states)  # (batch, context_tokens, decoder_hidden)
        return states, mask, fusion_output

    def _checked_encoder_outputs(self, encoder_outputs: Any, model_inputs: dict[str, Any],
                                 batch_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        given = sorted(name for name in FUSION_INPUT_NAMES if model_inputs.get(name) is not None)
        if given:
            raise ValueError(f"encoder_outputs and {', '.join(given)}: give one of them, not both")
        width = self.get_input_embeddings().embedding_dim
        if not (isinstance(encoder_outputs, (tuple, list)) and len(encoder_outputs) == 2):
            raise ValueError("encoder_outputs: expected (context_states, context_mask) as get_decoder_context returns")
        states, mask = encoder_outputs
        if states.dim() != 3 or states.shape[-1] != width or tuple(mask.shape) != tuple(states.shape[:2]):
            raise ValueError(f"encoder_outputs: expected states (batch, tokens, {width}) and mask (batch, tokens); got "
                             f"{tuple(states.shape)} and {tuple(mask.shape)}")
        if batch_size is not None and states.shape[0] != batch_size:
            raise ValueError(f"encoder_outputs: {states.shape[0]} rows for {batch_size} rows of decoder_input_ids")
        return states, mask.bool()

    def _new_cross_attention_cache(self) -> EncoderDecoderCache:
        # transformers' generate builds a self-attention-only DynamicCache for a decoder-only model; BERT-style
        # cross-attention layers need the encoder-decoder pair (GPT-2 wraps one itself, BERT does not). Without a
        # config the layers are made as they are used: a BART config's layer count is its encoder's.
        return EncoderDecoderCache(DynamicCache(), DynamicCache())

    # ---- forward -----------------------------------------------------------------------------------------------------

    def forward(
        self,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        encoder_outputs: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        num_items_in_batch: torch.Tensor | float | None = None,
        return_dict: bool | None = None,
        **model_inputs: Any,
    ) -> MMFusionConditionalGenerationOutput | tuple:
        r"""
        decoder_input_ids (`(batch, length)`): per row [prompt tokens, target tokens, eos], padded on either side.
        decoder_attention_mask (`(batch, length)`, *optional*): 1 for real tokens, 0 for padding (default: all real).
        labels (`(batch, length)`, *optional*): `decoder_input_ids` with -100 where no loss is wanted (prompt,
            padding); shifted inside, as in transformers' causal LMs. Padding never counts, whatever its label.
        encoder_outputs (`(context_states, context_mask)`, *optional*): what [`get_decoder_context`] returned, instead
            of the fusion inputs (e.g. to score several targets for one input).
        cache (`Cache`, *optional*; `past_key_values` is accepted too): a cache holding earlier positions. When it is
            not empty, `decoder_input_ids` are the tokens after the cached ones, used in the layout given, with
            `decoder_attention_mask` covering every cached position (the prefix's too) and the new ones; positions
            follow the cache length, so rows must be unpadded (batched decoding goes through `generate`).
        use_cache (`bool`, *optional*): return the decoder's cache (default False: training needs none).
        num_items_in_batch (*optional*): what the summed loss is divided by instead of this batch's count of target
            tokens (transformers' convention for gradient accumulation and DDP).
        model_inputs: what [`MMFusionModel.forward`] takes (`input_ids`, `pixel_values`, `input_values`, their masks,
            `has_*`, `tower_states`, `output_attentions`, `output_hidden_states`), passed to the fused encoder.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        cache = cache if cache is not None else model_inputs.pop("past_key_values", None)
        if decoder_input_ids is None:
            raise ValueError("decoder_input_ids: required (per row [prompt tokens, target tokens, eos]); "
                             "use generate() to produce text")
        prefix = self.config.decoder_connection == "prefix"
        cached = cache.get_seq_length() if cache is not None else 0
        continuing = cached > 0
        batch_size, length = decoder_input_ids.shape
        if decoder_attention_mask is None:
            decoder_attention_mask = decoder_input_ids.new_ones(batch_size, cached + length)
        if tuple(decoder_attention_mask.shape) != (batch_size, cached + length):
            raise ValueError(f"decoder_attention_mask: expected {(batch_size, cached + length)} ({cached} cached and "
                             f"{length} new positions), got {tuple(decoder_attention_mask.shape)}")
        if labels is not None and tuple(labels.shape) != (batch_size, length):
            raise ValueError(f"labels: expected the shape of decoder_input_ids {(batch_size, length)}, "
                             f"got {tuple(labels.shape)}")
        fusion_output = context_states = context_mask = None
        if encoder_outputs is not None:
            context_states, context_mask = self._checked_encoder_outputs(encoder_outputs, model_inputs,
                                                                         decoder_input_ids.shape[0])
        elif not (prefix and continuing):  # a prefix already in the cache is not computed again
            context_states, context_mask, fusion_output = self._context(model_inputs)
            if context_states.shape[0] != decoder_input_ids.shape[0]:
                raise ValueError(f"decoder_input_ids: {decoder_input_ids.shape[0]} rows for {context_states.shape[0]} "
                                 "rows of fusion inputs")

        decoder_kwargs: dict[str, Any] = {"use_cache": bool(use_cache), "return_dict": True}
        if not prefix:
            decoder_kwargs.update(encoder_hidden_states=context_states, encoder_attention_mask=context_mask.long())
        if use_cache:
            decoder_kwargs["cache"] = cache if cache is not None or prefix else self._new_cross_attention_cache()
        embed = self.get_input_embeddings()
        if continuing:
            inputs = {"inputs_embeds": embed(decoder_input_ids)} if prefix else {"input_ids": decoder_input_ids}
            decoder_output = self.decoder(**inputs, attention_mask=decoder_attention_mask, **decoder_kwargs)
            scores = logits = decoder_output.logits
            targets, cache = labels, decoder_output.cache
        else:
            mask, targets = decoder_attention_mask, labels
            if prefix:
                sequence = torch.cat([context_states, embed(decoder_input_ids)], dim=1)  # (batch, all, width)
                mask = torch.cat([context_mask.to(mask.dtype), mask], dim=1)
                if targets is not None:
                    targets = torch.cat([targets.new_full(context_mask.shape, IGNORE_INDEX), targets], dim=1)
            else:
                sequence = decoder_input_ids
            # Each row's real tokens (its prefix first) from position 0, padding last: the decoder's default positions
            # are then each row's own, whatever the padding side and the batch partners.
            order = _real_first_order(mask)
            mask, targets = _reorder(mask, order), _reorder(targets, order)
            inputs = {"inputs_embeds" if prefix else "input_ids": _reorder(sequence, order)}
            decoder_output = self.decoder(**inputs, attention_mask=mask, **decoder_kwargs)
            scores, cache = decoder_output.logits, decoder_output.cache  # (batch, context + length, vocab), that layout
            # back to the caller's layout, prefix positions dropped
            logits = _reorder(scores, order.argsort(dim=1))[:, -decoder_input_ids.shape[1]:]
            if targets is not None:
                targets = targets.masked_fill(mask == 0, IGNORE_INDEX)
        loss = causal_lm_loss(scores, targets, num_items_in_batch) if labels is not None else None
        output = MMFusionConditionalGenerationOutput(loss=loss, logits=logits, cache=cache if use_cache else None,
                                                     context_states=context_states, context_mask=context_mask,
                                                     fusion_output=fusion_output)
        return output if return_dict else output.to_tuple()

    # ---- generate ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.LongTensor | None = None,
        encoder_outputs: tuple[torch.Tensor, torch.Tensor] | None = None,
        generation_config: GenerationConfig | None = None,
        **kwargs: Any,
    ) -> torch.LongTensor | ModelOutput:
        r"""
        Generate text for each row. The towers and the fusion run once; the decoder's `generate` (transformers'
        `GenerationMixin`) then decodes with the context as `encoder_hidden_states` (cross_attention, expanded for
        beams by transformers) or as the start of `inputs_embeds` (prefix).

        decoder_input_ids (`(batch, length)`, *optional*): the prompt of each row, what its training
            `decoder_input_ids` begin with (e.g. [bos, question tokens]); padded on either side
            (`decoder_attention_mask`), re-laid out to the left padding that batched decoding needs. Default: one
            `generation_config.decoder_start_token_id` (the decoder's bos) per row; none in prefix mode when there is
            no such token. Cross-attention decoding needs at least one prompt token per row.
        encoder_outputs (*optional*): what [`get_decoder_context`] returned, instead of the fusion inputs.
        generation_config (`GenerationConfig`, *optional*): default `self.generation_config` (saved with the model).
        kwargs: the fusion inputs, by the names [`MMFusionModel.forward`] takes (`pixel_values`, `input_ids`,
            `input_values`, their masks, `has_*`, `tower_states`), and anything transformers' `generate` takes
            (`max_new_tokens`, `num_beams`, `do_sample`, `streamer`, `use_cache`, `return_dict_in_generate`, ...).

        Decoders whose forward takes no `position_ids` (the BART family) decode only rows of equal length together.
        In prefix mode the decoder is given embeddings, not ids, so logits processors that read the prompt
        (`repetition_penalty`, `no_repeat_ngram_size`) see the new tokens only (transformers says so when it applies).

        Returns: the new tokens only, `(batch * num_return_sequences, new_tokens)` in batch order (a row's sequences
        next to each other), `pad_token_id` after a row's eos; with `return_dict_in_generate=True`, transformers'
        output whose `sequences` are those new tokens. In prefix mode transformers always decodes with the KV cache
        (it needs it to feed `inputs_embeds` once); `use_cache=False` applies to cross-attention decoding.
        """
        fusion_inputs = {name: kwargs.pop(name) for name in FUSION_INPUT_NAMES if name in kwargs}
        if generation_config is None:
            generation_config = self.generation_config
        generation_config = copy.deepcopy(generation_config)
        decoder_kwargs = generation_config.update(**kwargs)  # generation settings in; what is left goes to generate
        if encoder_outputs is not None:
            context_states, context_mask = self._checked_encoder_outputs(encoder_outputs, fusion_inputs, None)
        else:
            context_states, context_mask, _ = self._context(fusion_inputs)
        prompt, prompt_mask = self._prompt(decoder_input_ids, decoder_attention_mask, context_states, generation_config)
        if self.config.decoder_connection == "prefix":
            sequence = torch.cat([context_states, self.get_input_embeddings()(prompt)], dim=1)
            mask = torch.cat([context_mask.to(prompt_mask.dtype), prompt_mask], dim=1)
            order = _real_last_order(mask)  # left padding: each row's prefix and prompt end where generation starts
            inputs = {"inputs_embeds": _reorder(sequence, order), "attention_mask": _reorder(mask, order)}
            prompt_length = 0  # transformers returns only the new tokens when given inputs_embeds alone
        else:
            empty = (~prompt_mask.bool().any(dim=1)).nonzero().flatten().tolist()
            if empty:
                raise ValueError(f"decoder_attention_mask: rows {empty} have no prompt token; cross-attention decoding "
                                 "starts from at least one (e.g. the bos token)")
            order = _real_last_order(prompt_mask)
            inputs = {"input_ids": _reorder(prompt, order), "attention_mask": _reorder(prompt_mask, order),
                      "encoder_hidden_states": context_states, "encoder_attention_mask": context_mask.long()}
            if generation_config.use_cache and decoder_kwargs.get("cache") is None:
                inputs["cache"] = self._new_cross_attention_cache()
            prompt_length = prompt.shape[1]
        if not _accepts(self.decoder, "position_ids") and not bool(inputs["attention_mask"].bool().all()):
            # transformers derives each row's positions from the mask only for decoders that take position_ids
            raise ValueError(f"decoder_attention_mask: {type(self.decoder).__name__} takes no position_ids, so rows of "
                             "different lengths (prompt, and prefix) would be decoded at shifted positions; generate "
                             "rows of equal length together")
        output = self.decoder.generate(**inputs, generation_config=generation_config, **decoder_kwargs)
        if isinstance(output, torch.Tensor):
            return output[:, prompt_length:]
        output.sequences = output.sequences[:, prompt_length:]
        return output

    def _prompt(self, decoder_input_ids: torch.Tensor | None, decoder_attention_mask: torch.Tensor | None,
                context_states: torch.Tensor, generation_config: GenerationConfig) -> tuple[torch.Tensor, torch.Tensor]:
        batch_size, device = context_states.shape[0], context_states.device
        if decoder_input_ids is None:
            start = generation_config.decoder_start_token_id
            start = generation_config.bos_token_id if start is None else start
            if start is None and self.config.decoder_connection == "cross_attention":
                raise ValueError("decoder_input_ids: required: cross-attention decoding starts from a token, and "
                                 "generation_config has no decoder_start_token_id or bos_token_id")
            length, start = (0, 0) if start is None else (1, start)
            decoder_input_ids = torch.full((batch_size, length), start, dtype=torch.long, device=device)
        if decoder_input_ids.dim() != 2 or decoder_input_ids.shape[0] != batch_size:
            raise ValueError(f"decoder_input_ids: expected ({batch_size}, length) for {batch_size} rows of fusion "
                             f"inputs, got {tuple(decoder_input_ids.shape)}")
        if decoder_attention_mask is None:
            decoder_attention_mask = torch.ones_like(decoder_input_ids)
        if tuple(decoder_attention_mask.shape) != tuple(decoder_input_ids.shape):
            raise ValueError(f"decoder_attention_mask: expected the shape of decoder_input_ids "
                             f"{tuple(decoder_input_ids.shape)}, got {tuple(decoder_attention_mask.shape)}")
        return decoder_input_ids.to(device), decoder_attention_mask.to(device)


__all__ = [
    "MMFusionPreTrainedModel",
    "MMFusionModel",
    "MMFusionForSequenceClassification",
    "MMFusionForMultiTask",
    "MMFusionContrastiveModel",
    "MMFusionContrastiveOutput",
    "MMFusionSimilarity",
    "MMFusionForConditionalGeneration",
    "MMFusionConditionalGenerationOutput",
    "MMFusionQueryBlock",
    "MMFusionModelOutput",
    "MMFusionMultiTaskOutput",
    "MMFusionSequenceClassifierOutput",
]
