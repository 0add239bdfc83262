"""Processing for mm-fusion models: safe media decoding (`media`) and the `MMFusionProcessor` (an AutoProcessor)."""

from .media import MediaLimits, load_audio, load_image, resample_audio
from .processing_mm import MMFusionProcessor

__all__ = ["MMFusionProcessor", "MediaLimits", "load_audio", "load_image", "resample_audio"]
