"""Processing for mm-fusion models: safe media decoding (`media`) and the `MMFusionProcessor` (an AutoProcessor).

Importing this package registers `MMFusionProcessor` with `AutoProcessor` for `model_type="mm_fusion"` and marks it
for `register_for_auto_class`, so that a processor saved on its own carries its code (see `modeling_mm`).
"""

from .media import MediaLimits, load_audio, load_image, resample_audio
from .processing_mm import MMFusionProcessor

# The processor's sub-loaders read a model folder's config.json (model_type "mm_fusion", with an `auto_map`): unless
# the config is registered with AutoConfig, transformers asks whether to run the folder's code and reads the config
# as a model of type ``. `modeling_mm` registers the config, the models and this processor with the Auto classes.
# It imports this package back, so it comes last, after the names it takes from here.
import modeling_mm  # noqa: E402, F401

__all__ = ["MMFusionProcessor", "MediaLimits", "load_audio", "load_image", "resample_audio"]
