"""MMFusion configuration: three optional tower configs plus the fusion settings."""

from __future__ import annotations

import copy
import math
from typing import Any, NamedTuple

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto import modeling_auto

MODALITIES = ("vision", "text", "audio")


class ModalityNames(NamedTuple):
    """Every name one modality goes by outside the tower's own (`{modality}_config`, `{modality}_model`)."""

    user: str  # data column, demo input, report and card: "image", "text", "audio"
    processor_argument: str  # MMFusionProcessor.__call__ keyword: "images", "text", "audio"
    processor_component: str  # MMFusionProcessor attribute: "image_processor", "tokenizer", "feature_extractor"
    inputs: tuple[str, ...]  # the model's inputs for this tower, as the processor names them (the first required)
    presence: str  # the per-sample presence mask: "has_image", "has_text", "has_audio"


# The one table of modality names (transformers keeps such tables next to the config, as here).
MODALITY_NAMES = {
    "vision": ModalityNames("image", "images", "image_processor", ("pixel_values",), "has_image"),
    "text": ModalityNames("text", "text", "tokenizer", ("input_ids", "attention_mask", "token_type_ids"), "has_text"),
    "audio": ModalityNames("audio", "audio", "feature_extractor", ("input_values", "audio_attention_mask"), "has_audio"),
}
POOLING_MODES = ("mean", "first")
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")
TASK_WEIGHTINGS = ("fixed", "uncertainty")
CONTRASTIVE_LOSSES = ("infonce", "sigmoid")
DECODER_CONNECTIONS = ("cross_attention", "prefix")
# The fields that describe the towers and the fusion, not a head: what a generation model built on a trained encoder
# (`MMFusionForConditionalGeneration.from_encoder`) takes from it
ENCODER_CONFIG_FIELDS = (
    "vision_config", "text_config", "audio_config", "fusion_hidden_size", "fusion_num_layers", "fusion_num_heads",
    "fusion_intermediate_size", "fusion_hidden_act", "fusion_dropout", "fusion_attention_dropout", "fusion_pooling",
    "modality_dropout", "classifier_dropout", "exact_audio_lengths", "static_shapes", "layer_norm_eps",
    "initializer_range",
)
# what a task of `MMFusionConfig.tasks` may say: the head's shape and loss, plus where mm-train read its targets
TASK_KEYS = ("name", "problem_type", "labels", "num_outputs", "loss_weight", "target_mean", "target_std", "thresholds",
             "column", "label_separator")


def tower_modality(model_type: str) -> str | None:
    """The modality a transformers `model_type` encodes ("vision", "text", "audio"), or None if it is none of them.

    Read from transformers' own Auto mappings, so any image/text/audio encoder that transformers knows is accepted
    without a list of ours to keep up to date.
    """
    if model_type in modeling_auto.MODEL_FOR_CTC_MAPPING_NAMES or (
        model_type in modeling_auto.MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES
        and model_type not in modeling_auto.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES
    ):
        return "audio"
    if (
        model_type in modeling_auto.MODEL_FOR_IMAGE_MAPPING_NAMES
        or model_type in modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
        or model_type.endswith("_vision_model")
    ):
        return "vision"
    if (
        model_type in modeling_auto.MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES
        or model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
        or model_type.endswith("_text_model")
    ):
        return "text"
    return None


def resolve_tower_config(field: str, value: Any) -> PreTrainedConfig | None:
    """Turn a dict/config given for `field` into the config of one tower of the right modality, or raise."""
    if value is None:
        return None
    modality = field.removesuffix("_config")
    if isinstance(value, dict):
        model_type = value.get("model_type")
        if not model_type:
            raise ValueError(f"{field}: a dict needs a 'model_type' key (e.g. 'vit', 'bert', 'wav2vec2')")
        try:
            value = AutoConfig.for_model(**value)
        except (ValueError, KeyError):
            raise ValueError(f"{field}: unknown tower model_type {model_type!r}: transformers has no such model") from None
    if not isinstance(value, PreTrainedConfig):
        raise ValueError(f"{field}: expected a transformers config or a dict, got {type(value).__name__}")
    # a copy: the composite sets attention/dtype settings on its sub-configs, which must not leak into the caller's
    value = copy.deepcopy(value)
    # A full dual-encoder config (CLIP, SigLIP, CLAP) contributes the tower of this field's modality only.
    inner = getattr(value, field, None)
    if isinstance(inner, PreTrainedConfig):
        value = inner
    found = tower_modality(value.model_type)
    if found is None:
        raise ValueError(
            f"{field}: model_type {value.model_type!r} is not a known {modality} encoder "
            f"(transformers has no image, text or audio encoder mapping for it)"
        )
    if found != modality:
        raise ValueError(f"{field}: model_type {value.model_type!r} is a {found} model, not a {modality} model")
    return value


def resolve_decoder_config(value: Any, connection: str) -> PreTrainedConfig | None:
    """Turn a dict/config given as `decoder_config` into a causal-LM config set up for `connection`, or raise.

    A copy: it is marked `is_decoder=True` (causal self-attention, which BERT-like decoders need to be told) and gets
    `add_cross_attention=True` for "cross_attention" and `False` for "prefix" (a prefix decoder with cross-attention
    layers would leave them untrained, and DDP needs every weight used). Whether the built decoder really has
    cross-attention is checked by the model, which builds it.
    """
    if value is None:
        return None
    if isinstance(value, dict):
        model_type = value.get("model_type")
        if not model_type:
            raise ValueError("decoder_config: a dict needs a 'model_type' key (e.g. 'gpt2', 'llama', 'bert')")
        try:
            value = AutoConfig.for_model(**value)
        except (ValueError, KeyError):
            raise ValueError(f"decoder_config: unknown model_type {model_type!r}: transformers has no such "
                             "model") from None
    if not isinstance(value, PreTrainedConfig):
        raise ValueError(f"decoder_config: expected a transformers config or a dict, got {type(value).__name__}")
    if value.model_type not in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"decoder_config: model_type {value.model_type!r} is not a causal language model "
                         f"(transformers' AutoModelForCausalLM has no class for it)")
    value = copy.deepcopy(value)
    value.is_decoder = True
    value.add_cross_attention = connection == "cross_attention"
    return value


class MMFusionConfig(PreTrainedConfig):
    r"""
    Configuration of an mm-fusion model: up to three pretrained towers (any transformers image, text and audio
    encoder) joined by `fusion_num_layers` cross-attention fusion layers of width `fusion_hidden_size`.

    Args:
        vision_config / text_config / audio_config (`PreTrainedConfig` or `dict`, *optional*):
            The tower configs. Any may be absent; a model needs at least one and refuses a config without.
            (The config itself, like every transformers config, can be built with no arguments, which config
            diffing and `from_dict` of a partial dict rely on.) A full dual-encoder config (CLIP, SigLIP) given
            as `vision_config` contributes its vision tower, and likewise for text.
        fusion_hidden_size (`int`): width of the fusion streams; must be divisible by `fusion_num_heads`.
        fusion_num_layers (`int`): number of fusion layers (self-attn -> cross-attn -> MLP per stream).
        fusion_num_heads (`int`): attention heads in fusion self- and cross-attention.
        fusion_intermediate_size (`int`): hidden size of the fusion MLP.
        fusion_hidden_act (`str`): activation of the fusion MLP (a key of transformers' `ACT2FN`).
        fusion_dropout (`float`): dropout on fusion residual branches.
        fusion_attention_dropout (`float`): dropout on fusion attention probabilities.
        fusion_pooling (`str`): how a stream is pooled: "mean" over its real tokens, or "first" (its first token,
            the tower's own pooled summary where the tower has one).
        modality_dropout (`float`): in training, the probability of dropping each present modality of a sample
            (a sample always keeps at least one).
        classifier_dropout (`float`): dropout before the classification head.
        exact_audio_lengths (`bool`): run audio towers that cannot take an attention mask (group-norm wav2vec2,
            such as wav2vec2-base) one sample at a time on its true length, so zero-padding cannot change the
            result. Slower; off by default, as in transformers, where such towers see the padding.
        static_shapes (`bool`): always take the static path: every tower runs on the whole batch at the given
            padded length and samples without a modality are masked out, so the forward has no host sync and no
            data-dependent shape (`torch.compile(fullgraph=True)`, `torch.export`, CUDA graphs). Without it, the static
            path is still taken when no `has_*` mask is given (every sample has every given modality), no modality
            dropout is at work and the audio tower (if any) takes an attention mask; otherwise each tower runs only on the samples that have its modality (less compute).
        target_mean / target_std (`list[float]`, *optional*): for `problem_type="regression"`, the training targets'
            mean and std per output. The head then learns standardised targets and its logits come back in the
            original units (`head * std + mean`); the loss is the MSE of the standardised values.
        tasks (`list[dict]`, *optional*): the heads of [`MMFusionForMultiTask`], one dict per task: `name` (a
            Python-identifier-like string, unique), `problem_type` (one of `PROBLEM_TYPES`), `labels` (the class
            names, for classification) or `num_outputs` (regression, default 1), `loss_weight` (default 1.0),
            `target_mean`/`target_std` (regression, as above), `thresholds` (multi-label: a decision probability
            per label, mm-train tunes them on validation; 0.5 when absent), and what mm-train read it from: `column`,
            `label_separator`. Normalised on construction (every key present).
        task_weighting (`str`): how [`MMFusionForMultiTask`] sums its task losses: "fixed" (`loss_weight` times the
            task loss) or "uncertainty" (Kendall, Gal & Cipolla 2018: a learned log-variance s per task, the term
            `loss_weight * (c * exp(-s) * loss + s / 2)` with c = 1/2 for regression and 1 for classification).
        is_contrastive (`bool`): marks a [`MMFusionContrastiveModel`] checkpoint, so that its `auto_map` (and
            `AutoModel`) give that class back; set by the class itself. Cannot be combined with `tasks`.
        projection_dim (`int`): width of the joint embedding space of [`MMFusionContrastiveModel`] (read by that class
            only).
        logit_scale_init_value (`float`): initial value of the contrastive model's learned log temperature; the scale
            used is `exp(logit_scale)` clamped at 100, so at most ln(100) = 4.605. Default ln(1/0.07), as in CLIP.
        logit_bias_init_value (`float`): initial value of the learned logit bias of the sigmoid loss (SigLIP: -10).
        contrastive_loss (`str`): "infonce" (symmetric cross-entropy over the batch, CLIP) or "sigmoid" (an independent
            binary decision per pair with a learned bias, SigLIP).
        contrastive_anchor (`str`, *optional*): a modality ("vision", "text" or "audio"): only the pairs that include
            it are trained (ImageBind-style binding to one modality). None trains every pair of modalities.
        fused_contrastive_weight (`float`): weight (>= 0) of an extra term between the fused embedding of each row with
            two or more modalities and each of its single-modality embeddings (BridgeTower-style); 0 turns it off.
        decoder_config (`PreTrainedConfig` or `dict`, *optional*): the language model of
            [`MMFusionForConditionalGeneration`]: the config of any causal LM that `AutoModelForCausalLM` builds (GPT-2,
            Llama, Qwen2, SmolLM, BERT as a decoder, BART's decoder, ...). Marked `is_decoder=True`, and given
            `add_cross_attention` according to `decoder_connection`. None for every other head. Its presence marks a
            generation checkpoint (its `auto_map` and `AutoModel` give that class back); it cannot be combined with
            `tasks` or `is_contrastive`.
        decoder_connection (`str`): how the decoder reads the fused encoder: "cross_attention" (the decoder's own
            cross-attention layers attend to the fused tokens, passed as `encoder_hidden_states`: GPT-2, BERT, BART
            decoders; a decoder without cross-attention, such as Llama, is refused) or "prefix" (the fused tokens, as
            decoder-width embeddings, are placed before the prompt's token embeddings: any causal LM).
        num_query_tokens (`int`): 0: the decoder reads every fused token of every stream a sample has. N > 0: N learned
            queries cross-attend to those tokens once (a one-block BLIP-2 Q-Former) and the decoder reads the N
            results, a fixed-length summary whatever the inputs' lengths.
        layer_norm_eps (`float`): epsilon of fusion layer norms.
        initializer_range (`float`): std of the normal init of fusion and head weights.

    Example:

    ```python
    >>> from transformers import BertConfig, ViTConfig
    >>> from modeling_mm import MMFusionConfig, MMFusionModel
    >>> config = MMFusionConfig(vision_config=ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
    ...     intermediate_size=37, image_size=32, patch_size=8), text_config=BertConfig(hidden_size=32,
    ...     num_hidden_layers=1, num_attention_heads=4, intermediate_size=37), fusion_hidden_size=32, fusion_num_heads=4)
    >>> model = MMFusionModel(config)
    >>> sorted(model.modalities)
    ['text', 'vision']
    ```
    """

    model_type = "mm_fusion"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="vit", optional=True),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="bert", optional=True),
        "audio_config": SubConfigSpec(config_class=AutoConfig, model_type="wav2vec2", optional=True),
        "decoder_config": SubConfigSpec(config_class=AutoConfig, model_type="gpt2", optional=True),
    }

    vision_config: PreTrainedConfig | dict | None = None
    text_config: PreTrainedConfig | dict | None = None
    audio_config: PreTrainedConfig | dict | None = None
    fusion_hidden_size: int = 256
    fusion_num_layers: int = 2
    fusion_num_heads: int = 4
    fusion_intermediate_size: int = 1024
    fusion_hidden_act: str = "gelu"
    fusion_dropout: float = 0.1
    fusion_attention_dropout: float = 0.0
    fusion_pooling: str = "mean"
    modality_dropout: float = 0.0
    classifier_dropout: float = 0.1
    exact_audio_lengths: bool = False
    static_shapes: bool = False
    target_mean: list[float] | None = None
    target_std: list[float] | None = None
    tasks: list[dict] | None = None
    task_weighting: str = "fixed"
    is_contrastive: bool = False
    projection_dim: int = 256
    logit_scale_init_value: float = 2.6592
    logit_bias_init_value: float = -10.0
    contrastive_loss: str = "infonce"
    contrastive_anchor: str | None = None
    fused_contrastive_weight: float = 0.0
    decoder_config: PreTrainedConfig | dict | None = None
    decoder_connection: str = "prefix"
    num_query_tokens: int = 0
    layer_norm_eps: float = 1e-6
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        # Resolve the towers ourselves first: transformers' resolution would turn a dict of the wrong kind into a
        # config without complaint, and full dual-encoder configs need their one tower picked out.
        for field in ("vision_config", "text_config", "audio_config"):
            setattr(self, field, resolve_tower_config(field, getattr(self, field)))
        if self.decoder_connection not in DECODER_CONNECTIONS:
            raise ValueError(f"decoder_connection: must be one of {DECODER_CONNECTIONS}, "
                             f"got {self.decoder_connection!r}")
        self.decoder_config = resolve_decoder_config(self.decoder_config, self.decoder_connection)
        super().__post_init__(**kwargs)
        # [] rather than None: AutoModel chooses among our registered classes by iterating `architectures`, which
        # transformers does without a None check (AutoModel.from_config of a fresh config would raise TypeError)
        if self.architectures is None:
            self.architectures = []
        self._validate_fusion_settings()
        self.target_mean, self.target_std = _checked_scaling("", self.target_mean, self.target_std)
        if self.task_weighting not in TASK_WEIGHTINGS:
            raise ValueError(f"task_weighting: must be one of {TASK_WEIGHTINGS}, got {self.task_weighting!r}")
        if self.tasks is not None:
            self.tasks = normalised_tasks(self.tasks)
        self._validate_contrastive_settings()
        self._validate_generation_settings()

    def _validate_fusion_settings(self) -> None:
        for name in ("fusion_hidden_size", "fusion_num_layers", "fusion_num_heads", "fusion_intermediate_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "fusion_num_layers" else 1):
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.fusion_hidden_size % self.fusion_num_heads:
            raise ValueError(
                f"fusion_hidden_size: {self.fusion_hidden_size} is not divisible by "
                f"fusion_num_heads={self.fusion_num_heads}"
            )
        for name in ("fusion_dropout", "fusion_attention_dropout", "modality_dropout", "classifier_dropout"):
            value = getattr(self, name)
            upper_ok = value < 1.0 if name == "modality_dropout" else value <= 1.0
            if not isinstance(value, (int, float)) or not (0.0 <= value and upper_ok):
                raise ValueError(f"{name}: must be a probability in [0, 1{')' if name == 'modality_dropout' else ']'}"
                                 f", got {value!r}")
        if self.static_shapes and self.exact_audio_lengths:
            raise ValueError(
                "static_shapes, exact_audio_lengths: choose one; exact lengths run each audio sample alone on its own "
                "length, which static shapes rule out"
            )
        if self.fusion_pooling not in POOLING_MODES:
            raise ValueError(f"fusion_pooling: must be one of {POOLING_MODES}, got {self.fusion_pooling!r}")
        from transformers.activations import ACT2FN

        if self.fusion_hidden_act not in ACT2FN:
            raise ValueError(f"fusion_hidden_act: unknown activation {self.fusion_hidden_act!r}")

    def _validate_contrastive_settings(self) -> None:
        if not isinstance(self.is_contrastive, bool):
            raise ValueError(f"is_contrastive: must be True or False, got {self.is_contrastive!r}")
        if self.is_contrastive and self.tasks is not None:
            raise ValueError("is_contrastive, tasks: a contrastive model has no task heads; give one of them")
        if isinstance(self.projection_dim, bool) or not isinstance(self.projection_dim, int) or self.projection_dim < 1:
            raise ValueError(f"projection_dim: must be a positive integer, got {self.projection_dim!r}")
        for name in ("logit_scale_init_value", "logit_bias_init_value", "fused_contrastive_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name}: must be a finite number, got {value!r}")
        # above ln(100) the clamp of exp(logit_scale) at 100 holds from the start, and the scale gets no gradient
        if self.logit_scale_init_value > math.log(100.0):
            raise ValueError(f"logit_scale_init_value: must be <= ln(100) = {math.log(100.0):.4f} (the scale "
                             f"exp(value) is clamped at 100), got {self.logit_scale_init_value!r}")
        if self.fused_contrastive_weight < 0:
            raise ValueError(f"fused_contrastive_weight: must be >= 0, got {self.fused_contrastive_weight!r}")
        if self.contrastive_loss not in CONTRASTIVE_LOSSES:
            raise ValueError(f"contrastive_loss: must be one of {CONTRASTIVE_LOSSES}, got {self.contrastive_loss!r}")
        if self.contrastive_anchor is not None and self.contrastive_anchor not in MODALITIES:
            raise ValueError(f"contrastive_anchor: must be None or one of {MODALITIES}, "
                             f"got {self.contrastive_anchor!r}")

    def _validate_generation_settings(self) -> None:
        value = self.num_query_tokens
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"num_query_tokens: must be an integer >= 0 (0 = every fused token), got {value!r}")
        if self.decoder_config is not None and self.tasks is not None:
            raise ValueError("decoder_config, tasks: a generation model has no task heads; give one of them")
        if self.decoder_config is not None and self.is_contrastive:
            raise ValueError("decoder_config, is_contrastive: a generation model is not a contrastive model; "
                             "give one of them")

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> PreTrainedConfig:
        """With `decoder=True`, the decoder's config where there is one (generation reads its token ids and sizes
        there); otherwise as transformers does (`text_config`, the text tower)."""
        if decoder and not encoder and self.decoder_config is not None:
            return self.decoder_config
        return super().get_text_config(decoder=decoder, encoder=encoder)

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities this model has towers for, in the fixed order vision, text, audio."""
        return tuple(m for m in MODALITIES if getattr(self, f"{m}_config", None) is not None)

    def tower_config(self, modality: str) -> PreTrainedConfig:
        return getattr(self, f"{modality}_config")


def _checked_scaling(prefix: str, mean: Any, std: Any, outputs: int | None = None) -> tuple[list | None, list | None]:
    """`target_mean`/`target_std` as lists of floats (a number is one output), both or neither, std > 0."""
    if mean is None and std is None:
        return None, None
    if mean is None or std is None:
        raise ValueError(f"{prefix}target_mean, {prefix}target_std: give both or neither")
    mean = [float(v) for v in (mean if isinstance(mean, (list, tuple)) else [mean])]
    std = [float(v) for v in (std if isinstance(std, (list, tuple)) else [std])]
    if len(mean) != len(std) or (outputs is not None and len(mean) != outputs):
        raise ValueError(f"{prefix}target_mean, {prefix}target_std: need one value per output "
                         f"({outputs if outputs is not None else len(mean)}), got {len(mean)} and {len(std)}")
    if not all(math.isfinite(m) for m in mean) or not all(math.isfinite(s) and s > 0 for s in std):
        raise ValueError(f"{prefix}target_std: must be finite and > 0 (and target_mean finite), got {std}, {mean}")
    return mean, std


def normalised_tasks(tasks: Any) -> list[dict]:
    """`MMFusionConfig.tasks` checked, with every key of `TASK_KEYS` filled in (see `MMFusionConfig`). Raises
    `ValueError` naming `tasks[i].<key>` for a bad task."""
    if not isinstance(tasks, (list, tuple)) or not tasks:
        raise ValueError(f"tasks: need a non-empty list of task dicts, got {tasks!r}")
    result, names = [], set()
    for i, task in enumerate(tasks):
        where = f"tasks[{i}]"
        if not isinstance(task, dict):
            raise ValueError(f"{where}: expected a dict, got {type(task).__name__}")
        if unknown := sorted(set(task) - set(TASK_KEYS)):
            raise ValueError(f"{where}: unknown keys {unknown}; known are {list(TASK_KEYS)}")
        name = task.get("name")
        if not isinstance(name, str) or not name.replace("_", "a").replace("-", "a").isalnum():
            raise ValueError(f"{where}.name: need letters, digits, '_' or '-' (it names a head module and metrics "
                             f"such as 'name/rmse'), got {name!r}")
        if name in names:
            raise ValueError(f"{where}.name: {name!r} is used by two tasks")
        names.add(name)
        problem_type = task.get("problem_type")
        if problem_type not in PROBLEM_TYPES:
            raise ValueError(f"{where}.problem_type: must be one of {PROBLEM_TYPES}, got {problem_type!r}")
        labels = task.get("labels")
        if problem_type == "regression":
            if labels is not None:
                raise ValueError(f"{where}.labels: a regression task has no labels; give num_outputs")
            outputs = task.get("num_outputs", 1)
        else:
            if not isinstance(labels, (list, tuple)) or len(labels) < (2 if problem_type.startswith("single") else 1):
                raise ValueError(f"{where}.labels: a {problem_type} task needs its label names "
                                 f"(>= {2 if problem_type.startswith('single') else 1}), got {labels!r}")
            labels = [str(label) for label in labels]
            if len(set(labels)) != len(labels):
                raise ValueError(f"{where}.labels: names repeat: {labels}")
            outputs = task.get("num_outputs", len(labels))
            if outputs != len(labels):
                raise ValueError(f"{where}.num_outputs: {outputs} for {len(labels)} labels")
        if isinstance(outputs, bool) or not isinstance(outputs, int) or outputs < 1:
            raise ValueError(f"{where}.num_outputs: must be a positive integer, got {outputs!r}")
        weight = task.get("loss_weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"{where}.loss_weight: must be a finite number >= 0, got {weight!r}")
        mean, std = _checked_scaling(f"{where}.", task.get("target_mean"), task.get("target_std"), outputs)
        if mean is not None and problem_type != "regression":
            raise ValueError(f"{where}.target_mean: only a regression task is standardised")
        thresholds = task.get("thresholds")
        if thresholds is not None:
            if problem_type != "multi_label_classification":
                raise ValueError(f"{where}.thresholds: only a multi-label task has decision thresholds")
            if (not isinstance(thresholds, (list, tuple)) or len(thresholds) != outputs
                    or not all(isinstance(t, (int, float)) and 0.0 <= t <= 1.0 for t in thresholds)):
                raise ValueError(f"{where}.thresholds: need one probability in [0, 1] per label ({outputs}), "
                                 f"got {thresholds!r}")
            thresholds = [float(t) for t in thresholds]
        result.append({"name": name, "problem_type": problem_type, "labels": labels, "num_outputs": outputs,
                       "loss_weight": float(weight), "target_mean": mean, "target_std": std, "thresholds": thresholds,
                       "column": task.get("column"), "label_separator": task.get("label_separator")})
    return result


# Here, where the class is defined: a config saved by code that imports only this module still writes `auto_map`.
MMFusionConfig.register_for_auto_class()

__all__ = ["MMFusionConfig", "tower_modality", "resolve_tower_config", "resolve_decoder_config", "normalised_tasks",
           "MODALITIES", "MODALITY_NAMES", "ModalityNames", "PROBLEM_TYPES", "TASK_WEIGHTINGS", "CONTRASTIVE_LOSSES",
           "DECODER_CONNECTIONS"]
