"""Which weights train: a mode per tower (`lora`, `full`, `frozen`), LoRA targets per tower type, and saving and
loading what was trained.

- `lora`: peft LoRA on the tower's attention projections (a preset per transformers `model_type`, or your own
  `*_lora_targets`); the tower's own weights stay bit-identical.
- `full`: every weight of the tower trains.
- `frozen`: nothing in the tower trains.
The head always trains in full; the fusion layers too, unless `fusion_mode` is `frozen` (an encoder trained before,
kept as it is while a new head or decoder learns to read it).

LoRA targets are scoped to their tower: the peft `target_modules` is one regular expression (peft full-matches it
against each module name) whose every branch starts with the tower's own path, e.g.
`model\\.text_model\\.(?:.*\\.)?(?:attention\\.self\\.query|...)`. So a projection name that several towers share
(`q_proj` in CLIP and wav2vec2) is only hit in the towers in `lora` mode, and never in the fusion layers, whose
names repeat no tower's.

With a tower in `lora` mode the result is a `PeftModel`. Fusion, head and `full` towers are peft `modules_to_save`:
peft trains a copy of each and saves it in the adapter, so the adapter folder alone, loaded on top of the untrained
base model, restores everything that trained; `merge_and_unload` puts the trained copies back in place.

Example:

```python
>>> from training.lora import LoraSettings, apply_lora, lora_target_modules
>>> settings = LoraSettings(vision_mode="frozen", text_mode="lora", audio_mode="full", lora_r=8)
>>> lora_target_modules(model, settings)[:2]   # doctest: +SKIP
['model.text_model.encoder.layer.0.attention.self.query', 'model.text_model.encoder.layer.0.attention.self.key']
>>> model = apply_lora(model, settings)        # doctest: +SKIP
```
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

import modeling_mm  # noqa: F401  (registers the Auto classes, so merged folders get auto_map and code files)
from modeling_mm import (
    MMFusionContrastiveModel,
    MMFusionForConditionalGeneration,
    MMFusionForMultiTask,
    MMFusionForSequenceClassification,
    MMFusionModel,
)
from modeling_mm.configuration_mm import MODALITIES
from modeling_mm.modeling_mm import is_cross_attention_name, load_decoder, load_tower

# the classes a saved folder's `architectures` may name
SAVED_CLASSES = {cls.__name__: cls for cls in (MMFusionModel, MMFusionForSequenceClassification, MMFusionForMultiTask,
                                                MMFusionContrastiveModel, MMFusionForConditionalGeneration)}

TOWER_MODES = ("lora", "full", "frozen")
FUSION_MODES = ("full", "frozen")

# Module-name suffixes LoRA targets in each tower type: the attention's query, key, value and output projections.
# Checked against the module trees of transformers 5.23 (ViT-family models there name them q_proj/k_proj/v_proj/o_proj,
# no longer query/key/value). A preset that matches nothing in a tower is an error, never a silent no-op.
_BERT_LIKE = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
_VIT_LIKE = ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj")
_CLIP_LIKE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
_WAV2VEC2_LIKE = ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.out_proj")
LORA_PRESETS: dict[str, tuple[str, ...]] = {
    # text
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "camembert": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "distilbert": ("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin"),
    "mpnet": ("attn.q", "attn.k", "attn.v", "attn.o"),
    "deberta-v2": ("self.query_proj", "self.key_proj", "self.value_proj", "attention.output.dense"),
    "clip_text_model": _CLIP_LIKE,
    # vision
    "vit": _VIT_LIKE,
    "deit": _VIT_LIKE,
    "dinov2": _VIT_LIKE,
    "beit": _VIT_LIKE,
    "clip_vision_model": _CLIP_LIKE,
    "siglip_vision_model": _CLIP_LIKE,
    "timm_wrapper": ("attn.qkv", "attn.proj"),  # timm ViTs; `proj` alone would also hit the patch-embedding conv
    # audio
    "wav2vec2": _WAV2VEC2_LIKE,
    "hubert": _WAV2VEC2_LIKE,
    "wavlm": _WAV2VEC2_LIKE,
    "data2vec-audio": _WAV2VEC2_LIKE,
}


# The same for decoder LMs (`--task generation`): the query and value projections, as peft's own defaults for these
# architectures. GPT-2's fused c_attn is a transformers Conv1D, which peft adapts with fan_in_fan_out.
_DECODER_QUERY_VALUE = ("self_attn.q_proj", "self_attn.v_proj")
DECODER_LORA_PRESETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("attn.c_attn",),
    "llama": _DECODER_QUERY_VALUE,
    "mistral": _DECODER_QUERY_VALUE,
    "qwen2": _DECODER_QUERY_VALUE,
    "qwen3": _DECODER_QUERY_VALUE,
    "gemma": _DECODER_QUERY_VALUE,
    "phi3": ("self_attn.qkv_proj",),
    "bart": _DECODER_QUERY_VALUE,
    "bert": ("attention.self.query", "attention.self.value"),
    "roberta": ("attention.self.query", "attention.self.value"),
}


@dataclass
class LoraSettings:
    vision_mode: str = field(default="lora", metadata={
        "help": "How the vision tower trains: lora (adapters on its attention projections), full, or frozen."})
    text_mode: str = field(default="lora", metadata={"help": "How the text tower trains: lora, full or frozen."})
    audio_mode: str = field(default="lora", metadata={"help": "How the audio tower trains: lora, full or frozen."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator: updates are scaled by alpha/r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA branch input."})
    vision_lora_targets: list[str] | None = field(default=None, metadata={
        "help": "Module-name suffixes to adapt in the vision tower instead of its type's preset, e.g. "
                "'attention.q_proj attention.v_proj'. Required for tower types without a preset."})
    text_lora_targets: list[str] | None = field(default=None, metadata={
        "help": "Module-name suffixes to adapt in the text tower instead of its preset, e.g. 'query value'."})
    audio_lora_targets: list[str] | None = field(default=None, metadata={
        "help": "Module-name suffixes to adapt in the audio tower instead of its preset."})
    decoder_mode: str = field(default="lora", metadata={
        "help": "--task generation: how the decoder LM trains: lora (presets: GPT-2 c_attn, Llama-family "
                "q_proj/v_proj, BERT query/value), full, or frozen. The decoder's input projection (and queries) "
                "always train, the fusion unless --fusion_mode is frozen."})
    decoder_lora_targets: list[str] | None = field(default=None, metadata={
        "help": "Module-name suffixes to adapt in the decoder instead of its type's preset."})
    fusion_mode: str = field(default="full", metadata={
        "help": "How the fusion layers (with their input projections) train: full, or frozen, to keep an encoder "
                "trained before (--model) as it is while a new head or decoder learns to read it (BLIP-2's second "
                "stage)."})

    def __post_init__(self):
        for modality in (*MODALITIES, "decoder"):
            mode = getattr(self, f"{modality}_mode")
            if mode not in TOWER_MODES:
                raise ValueError(f"{modality}_mode: {mode!r} is not one of {TOWER_MODES}")
            targets = getattr(self, f"{modality}_lora_targets")
            if isinstance(targets, str):  # from YAML/JSON or Python: "query,value"
                setattr(self, f"{modality}_lora_targets", [t for t in re.split(r"[,\s]+", targets) if t])
        if self.fusion_mode not in FUSION_MODES:
            raise ValueError(f"fusion_mode: {self.fusion_mode!r} is not one of {FUSION_MODES}")
        if self.lora_r < 1:
            raise ValueError(f"lora_r: {self.lora_r} must be >= 1")
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha: {self.lora_alpha} must be > 0")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout: {self.lora_dropout} must be in [0, 1)")

    def mode(self, modality: str) -> str:
        return getattr(self, f"{modality}_mode")


# ---- what trains ---------------------------------------------------------------------------------------------------

def lora_target_modules(model: PreTrainedModel, settings: LoraSettings) -> list[str]:
    """The names of the modules LoRA will adapt in `model` (before `apply_lora`), in module order.

    Raises `ValueError` naming the setting when a tower in `lora` mode has no preset for its type and no
    `*_lora_targets`, when its targets match no module of that tower, or when they match a module that is not an
    `nn.Linear`.
    """
    pattern = _target_pattern(model, settings)
    if pattern is None:
        return []
    names = [name for name, _ in model.named_modules() if re.fullmatch(pattern, name)]
    base = _fusion_model(model)
    for modality in base.modalities:
        if settings.mode(modality) != "lora":
            continue
        tower_name = _module_names(model)[id(base.get_tower(modality))]
        hits = [name for name in names if name.startswith(tower_name + ".")]
        argument = f"{modality}_lora_targets"
        if not hits:
            raise ValueError(f"{argument}: {list(_tower_targets(base, modality, settings))} match no module of "
                             f"{tower_name} ({base.get_tower(modality).config.model_type}); give module-name "
                             f"suffixes of its nn.Linear layers")
        for name in hits:
            module = model.get_submodule(name)
            if not isinstance(module, nn.Linear):
                raise ValueError(f"{argument}: {name} is a {type(module).__name__}; LoRA targets must be nn.Linear")
    decoder = _decoder(model)
    if decoder is not None and settings.decoder_mode == "lora":
        decoder_name = _module_names(model)[id(decoder)]
        hits = [name for name in names if name.startswith(decoder_name + ".")]
        if not hits:
            raise ValueError(f"decoder_lora_targets: {list(_decoder_targets(decoder, settings))} match no module of "
                             f"{decoder_name} ({decoder.config.model_type}); give module-name suffixes of its "
                             "nn.Linear (or GPT-2 Conv1D) layers")
        for name in hits:
            module = model.get_submodule(name)
            if not isinstance(module, (nn.Linear, Conv1D)):
                raise ValueError(f"decoder_lora_targets: {name} is a {type(module).__name__}; LoRA targets must be "
                                 "nn.Linear (or GPT-2's Conv1D)")
    return names


def _decoder(model: nn.Module) -> PreTrainedModel | None:
    """The decoder LM of a generation model (`MMFusionForConditionalGeneration.decoder`), else None."""
    decoder = getattr(model, "decoder", None)
    return decoder if isinstance(decoder, PreTrainedModel) else None


def _cross_attention_modules(decoder: PreTrainedModel, prefix: str) -> list[str]:
    """The names (under `prefix`) of the outermost modules of `decoder` that `add_cross_attention` added (GPT-2's
    `crossattention` and `ln_cross_attn`, BERT's `crossattention`, BART's `encoder_attn`): a causal LM checkpoint has
    no weights for them, so they train in full whatever `decoder_mode` says."""
    found: list[str] = []
    for name, _ in decoder.named_modules():
        if name and is_cross_attention_name(name.rsplit(".", 1)[-1]) and not any(
            name.startswith(outer + ".") for outer in found
        ):
            found.append(name)
    return [f"{prefix}.{name}" for name in found]


def _decoder_targets(decoder: PreTrainedModel, settings: LoraSettings) -> tuple[str, ...]:
    if settings.decoder_lora_targets:
        return tuple(settings.decoder_lora_targets)
    model_type = decoder.config.model_type
    if model_type not in DECODER_LORA_PRESETS:
        raise ValueError(f"decoder_lora_targets: no LoRA preset for decoder type {model_type!r} (presets: "
                         f"{sorted(DECODER_LORA_PRESETS)}); give the module-name suffixes to adapt, or set "
                         "decoder_mode to full or frozen")
    return DECODER_LORA_PRESETS[model_type]


def apply_lora(model: PreTrainedModel, settings: LoraSettings) -> PreTrainedModel | PeftModel:
    """Set what trains in an mm-fusion model (`MMFusionForSequenceClassification` or `MMFusionModel`).

    Returns a `PeftModel` wrapping `model` (changed in place) when any of its towers is in `lora` mode: LoRA on those
    towers, and the fusion layers, the head and `full` towers as `modules_to_save` (peft trains and saves a copy of
    each, so a `full` tower takes twice its memory). Otherwise returns `model` itself with `requires_grad` set: fusion,
    head and `full` towers train, `frozen` towers do not. Raises `ValueError` as `lora_target_modules` does.
    """
    base = _fusion_model(model)
    for modality in base.modalities:
        base.get_tower(modality).requires_grad_(settings.mode(modality) != "frozen")
    for module in _fusion_modules(base):
        module.requires_grad_(settings.fusion_mode != "frozen")
    decoder = _decoder(model)
    if decoder is not None:
        decoder.requires_grad_(settings.decoder_mode != "frozen")
    trained_in_full = _trained_in_full(model, settings)
    for name in trained_in_full:
        model.get_submodule(name).requires_grad_(True)
    decoder_lora = decoder is not None and settings.decoder_mode == "lora"
    if not any(settings.mode(m) == "lora" for m in base.modalities) and not decoder_lora:
        return model
    lora_target_modules(model, settings)  # raises for targets that are missing or not nn.Linear
    config = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=_target_pattern(model, settings),
        modules_to_save=_modules_to_save(model, trained_in_full),
        bias="none",
    )
    return get_peft_model(model, config)


def _fusion_model(model: PreTrainedModel) -> MMFusionModel:
    base = getattr(model, "base_model", None)
    if not isinstance(base, MMFusionModel):
        raise ValueError(f"model: expected an mm-fusion model (MMFusionModel or a head on it), got "
                         f"{type(model).__name__}; apply_lora takes the model before it is wrapped")
    return base


def _fusion_modules(base: MMFusionModel) -> list[nn.Module]:
    """The children of the base model that are not towers: the fusion layers, input projections and norms."""
    towers = {id(base.get_tower(m)) for m in base.modalities}
    return [child for child in base.children() if id(child) not in towers]


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in model.named_modules()}


def _tower_targets(base: MMFusionModel, modality: str, settings: LoraSettings) -> tuple[str, ...]:
    override = getattr(settings, f"{modality}_lora_targets")
    if override:
        return tuple(override)
    model_type = base.get_tower(modality).config.model_type
    if model_type not in LORA_PRESETS:
        raise ValueError(f"{modality}_lora_targets: no LoRA preset for {modality} tower type {model_type!r} "
                         f"(presets: {sorted(LORA_PRESETS)}); give the module-name suffixes to adapt, or set "
                         f"{modality}_mode to full or frozen")
    return LORA_PRESETS[model_type]


def _target_pattern(model: PreTrainedModel, settings: LoraSettings) -> str | None:
    """One regex for peft's `target_modules`: a branch per `lora` tower, each anchored at the tower's path."""
    base = _fusion_model(model)
    names = _module_names(model)
    branches = []
    for modality in base.modalities:
        if settings.mode(modality) != "lora":
            continue
        suffixes = "|".join(re.escape(suffix) for suffix in _tower_targets(base, modality, settings))
        branches.append(rf"{re.escape(names[id(base.get_tower(modality))])}\.(?:.*\.)?(?:{suffixes})")
    decoder = _decoder(model)
    if decoder is not None and settings.decoder_mode == "lora":
        suffixes = "|".join(re.escape(suffix) for suffix in _decoder_targets(decoder, settings))
        # anchored at the decoder's own path: BERT's LM head holds a Linear named `decoder` too
        branches.append(rf"{re.escape(names[id(decoder)])}\.(?:.*\.)?(?:{suffixes})")
    return "|".join(f"(?:{branch})" for branch in branches) or None


def _trained_in_full(model: PreTrainedModel, settings: LoraSettings) -> list[str]:
    """Module names that train in full: every child of the base model and of the head model that is not a tower
    (fusion layers, projections, norms: unless `fusion_mode` is frozen; the head), and the towers in `full` mode."""
    base = _fusion_model(model)
    names = _module_names(model)
    towers = {id(base.get_tower(m)): m for m in base.modalities}
    decoder = _decoder(model)
    result = []
    for parent in (base, model) if model is not base else (base,):
        for child in parent.children():
            if child is base or (settings.fusion_mode == "frozen" and parent is base and id(child) not in towers):
                continue
            if child is decoder:
                if settings.decoder_mode == "full":
                    result.append(names[id(child)])
                else:  # its cross-attention layers are new (the LM was trained without them): they train in full
                    result += _cross_attention_modules(decoder, names[id(child)])
                continue
            modality = towers.get(id(child))
            if modality is None or settings.mode(modality) == "full":
                result.append(names[id(child)])
    return result


def _modules_to_save(model: nn.Module, roots: list[str]) -> list[str]:
    """peft `modules_to_save` names covering every parameter under `roots`.

    peft wraps each module whose name *ends with* an entry, and cannot wrap ModuleDict/ModuleList. So containers
    are replaced by their children, and so is a module whose name is also the tail of a longer module name (a CLIP
    tower `model.vision_model` holds `model.vision_model.vision_model`): peft would wrap both, one inside the other.
    """
    all_names = [name for name, _ in model.named_modules(remove_duplicate=False)]
    result = []

    def add(name: str) -> None:
        module = model.get_submodule(name)
        if next(module.parameters(), None) is None:
            return
        also_matched = [other for other in all_names if other != name and other.endswith(name)]
        if not also_matched and not isinstance(module, (nn.ModuleDict, nn.ModuleList)):
            result.append(name)
            return
        if next(module.parameters(recurse=False), None) is not None:
            raise ValueError(f"model: cannot save the weights of {name} with the adapter: it holds parameters of its "
                             f"own and peft would also match {also_matched}")
        for child, _ in module.named_children():
            add(f"{name}.{child}")

    for root in roots:
        add(root)
    return result


# ---- saving and loading --------------------------------------------------------------------------------------------

def save_trained_model(model: PreTrainedModel | PeftModel, output_dir: str | os.PathLike, merge: bool) -> Path:
    """Write a trained model to `output_dir` and return the path.

    - `merge=True`, or a model without LoRA: a plain mm-fusion folder (config with `auto_map`, weights, our code
      files) that `AutoModelForSequenceClassification.from_pretrained` loads without peft. LoRA is merged into a
      copy of the model (`merge_and_unload`, which also puts the trained `modules_to_save` copies in place), so
      `model` itself stays usable.
    - `merge=False` with LoRA: the peft adapter (`adapter_config.json`, `adapter_model.safetensors`: LoRA weights and
      the fully trained fusion, head and `full` towers) plus the model's `config.json` (labels, tower configs), which
      `load_trained_model` uses to rebuild the base: from the mm-fusion checkpoint the model was loaded from
      (peft's `base_model_name_or_path`), else from each tower's checkpoint (its config's `_name_or_path`).
      Raises `ValueError` when neither is known (a tower built from a config only): save merged instead.
    """
    output_dir = Path(output_dir)
    if not isinstance(model, PeftModel):
        model.save_pretrained(output_dir)
        return output_dir
    if merge:
        copy.deepcopy(model).merge_and_unload().save_pretrained(output_dir)
        return output_dir
    base = model.get_base_model()
    config = copy.deepcopy(base.config)
    if not base.name_or_path:
        parts = {modality: config.tower_config(modality) for modality in config.modalities}
        if getattr(config, "decoder_config", None) is not None:
            parts["decoder"] = config.decoder_config
        for part, part_config in parts.items():
            if not part_config._name_or_path:
                raise ValueError(f"merge: an adapter needs a base model to load onto, but the {part} "
                                 f"{'tower ' if part != 'decoder' else ''}was not loaded from a checkpoint, so the base "
                                 "cannot be rebuilt; use merge=True")
            part_config._name_or_path = _absolute_if_local(part_config._name_or_path)
    config.architectures = [type(base).__name__]
    peft_config = model.peft_config[model.active_adapter]
    peft_config.base_model_name_or_path = _absolute_if_local(base.name_or_path) or None
    model.save_pretrained(output_dir)
    config.save_pretrained(output_dir)
    if getattr(config, "decoder_config", None) is not None:  # how the model decodes travels with the adapter too
        base.generation_config.save_pretrained(output_dir)
    return output_dir


def _absolute_if_local(source: str) -> str:
    # a relative folder would only resolve from the working directory the model was trained in
    return str(Path(source).resolve()) if source and Path(source).exists() else source


def checkpoint_has_decoder(source: str | os.PathLike) -> bool:
    """Whether the mm-fusion checkpoint `source` (a folder or Hub id) is a generation model: its config has a decoder
    LM. Raises `OSError` where it cannot be read."""
    return getattr(AutoConfig.from_pretrained(source), "decoder_config", None) is not None


def load_trained_model(path: str | os.PathLike) -> PreTrainedModel | PeftModel:
    """Load what `save_trained_model` wrote, in eval mode, as the class it was saved from (`MMFusionModel`,
    `MMFusionForSequenceClassification`, `MMFusionForMultiTask` or `MMFusionContrastiveModel`, per the config's `architectures`): a `PeftModel`
    from an adapter folder (its base rebuilt as described there), else the plain model."""
    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    architecture = (config.architectures or [MMFusionForSequenceClassification.__name__])[0]
    model_class = SAVED_CLASSES.get(architecture, MMFusionForSequenceClassification)
    if not (path / "adapter_config.json").exists():
        return model_class.from_pretrained(path)
    base_path = PeftConfig.from_pretrained(path).base_model_name_or_path
    generation = getattr(config, "decoder_config", None) is not None
    if base_path and generation and not checkpoint_has_decoder(base_path):
        # a decoder trained on the encoder of another model (mm-train --task generation --model): that encoder with
        # the decoder LM from its own checkpoint, as they were before training
        base = model_class.from_encoder(base_path, decoder=config.decoder_config._name_or_path,
                                        decoder_connection=config.decoder_connection,
                                        num_query_tokens=config.num_query_tokens)
    elif base_path:
        # the head may have other labels than the checkpoint's; its trained weights come from the adapter
        base = model_class.from_pretrained(base_path, config=config, ignore_mismatched_sizes=True)
    else:
        towers = {f"{m}_model": load_tower(m, config.tower_config(m)._name_or_path, {}) for m in config.modalities}
        if generation:  # the decoder LM, from its own checkpoint too
            towers["decoder"] = load_decoder(config.decoder_config._name_or_path, config.decoder_connection, {})
        base = model_class(config, **towers)
    if (path / "generation_config.json").exists():
        from transformers import GenerationConfig

        base.generation_config = GenerationConfig.from_pretrained(path)
    return PeftModel.from_pretrained(base, path).eval()
