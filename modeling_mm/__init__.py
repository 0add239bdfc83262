"""mm-fusion: tri-modal (vision + text + audio) fusion models for transformers.

Importing this package registers the classes with transformers' Auto classes, so that `AutoConfig`,
`AutoModel`, `AutoModelForSequenceClassification` and `AutoProcessor` resolve `model_type="mm_fusion"`,
and marks them for `register_for_auto_class`, so that `save_pretrained` writes `auto_map` and copies the code
files: a saved folder then loads with `trust_remote_code=True` where only transformers is installed.
`MMFusionConfig` and `MMFusionProcessor` are marked in the modules that define them, so a config or processor
saved by code that never imports this package carries its code too; importing `processors` imports this package.
"""

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoProcessor
from transformers.pipelines import PIPELINE_REGISTRY

# processors imports this package back (for the registrations below); it takes nothing from here at import time
from processors.processing_mm import MMFusionProcessor

from .configuration_mm import MMFusionConfig
from .modeling_mm import (
    MMFusionConditionalGenerationOutput,
    MMFusionContrastiveModel,
    MMFusionContrastiveOutput,
    MMFusionForConditionalGeneration,
    MMFusionForMultiTask,
    MMFusionForSequenceClassification,
    MMFusionModel,
    MMFusionModelOutput,
    MMFusionMultiTaskOutput,
    MMFusionPreTrainedModel,
    MMFusionSequenceClassifierOutput,
)
from .pipeline_mm import (
    FEATURE_EXTRACTION_TASK,
    GENERATION_TASK,
    PIPELINE_TASK,
    ZERO_SHOT_TASK,
    MMFusionClassificationPipeline,
    MMFusionFeatureExtractionPipeline,
    MMFusionTextGenerationPipeline,
    MMFusionZeroShotClassificationPipeline,
)

AutoConfig.register(MMFusionConfig.model_type, MMFusionConfig, exist_ok=True)
# AutoModel picks among these by `config.architectures` (the first without one): a folder saved by the multi-task, the
# contrastive or the generation class loads as it, anything else as the base model
AutoModel.register(MMFusionConfig, (MMFusionModel, MMFusionForMultiTask, MMFusionContrastiveModel,
                                    MMFusionForConditionalGeneration), exist_ok=True)
AutoModelForSequenceClassification.register(MMFusionConfig, MMFusionForSequenceClassification, exist_ok=True)
AutoProcessor.register(MMFusionConfig, MMFusionProcessor, exist_ok=True)
MMFusionModel.register_for_auto_class("AutoModel")
MMFusionForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
MMFusionForMultiTask.register_for_auto_class("AutoModel")
MMFusionContrastiveModel.register_for_auto_class("AutoModel")
MMFusionForConditionalGeneration.register_for_auto_class("AutoModel")
PIPELINE_REGISTRY.register_pipeline(PIPELINE_TASK, pipeline_class=MMFusionClassificationPipeline,
                                    pt_model=AutoModelForSequenceClassification, type="multimodal")
# the joint embedding pipelines load the model with AutoModel, which gives a contrastive checkpoint back as its class
PIPELINE_REGISTRY.register_pipeline(ZERO_SHOT_TASK, pipeline_class=MMFusionZeroShotClassificationPipeline,
                                    pt_model=AutoModel, type="multimodal")
PIPELINE_REGISTRY.register_pipeline(FEATURE_EXTRACTION_TASK, pipeline_class=MMFusionFeatureExtractionPipeline,
                                    pt_model=AutoModel, type="multimodal")
# a generation checkpoint loads through AutoModel as MMFusionForConditionalGeneration (by its architectures)
PIPELINE_REGISTRY.register_pipeline(GENERATION_TASK, pipeline_class=MMFusionTextGenerationPipeline,
                                    pt_model=AutoModel, type="multimodal")

__all__ = [
    "MMFusionConfig",
    "MMFusionPreTrainedModel",
    "MMFusionModel",
    "MMFusionForSequenceClassification",
    "MMFusionForMultiTask",
    "MMFusionContrastiveModel",
    "MMFusionContrastiveOutput",
    "MMFusionForConditionalGeneration",
    "MMFusionConditionalGenerationOutput",
    "MMFusionModelOutput",
    "MMFusionMultiTaskOutput",
    "MMFusionSequenceClassifierOutput",
    "MMFusionProcessor",
    "MMFusionClassificationPipeline",
    "MMFusionZeroShotClassificationPipeline",
    "MMFusionFeatureExtractionPipeline",
    "MMFusionTextGenerationPipeline",
]
