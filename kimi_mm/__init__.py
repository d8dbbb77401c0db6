"""kimi_mm: a multimodal long-chain-of-thought model in Hugging Face style.

Importing the package registers the classes with the transformers Auto classes, and marks them for
export so that `save_pretrained` writes `auto_map` plus the code files (loadable with
`trust_remote_code=True` where kimi_mm is not installed).
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .configuration_kimi_mm import KimiMMConfig, KimiMMVisionConfig
from .image_processing_kimi_mm import ImageInputError, KimiMMImageProcessor, smart_resize
from .modeling_kimi_mm import (
    KimiMMForConditionalGeneration,
    KimiMMModel,
    KimiMMPreTrainedModel,
    KimiMMVisionModel,
)
from .processing_kimi_mm import KimiMMProcessor

AutoConfig.register("kimi_mm", KimiMMConfig, exist_ok=True)
AutoConfig.register("kimi_mm_vision", KimiMMVisionConfig, exist_ok=True)
AutoModel.register(KimiMMConfig, KimiMMModel, exist_ok=True)
AutoModel.register(KimiMMVisionConfig, KimiMMVisionModel, exist_ok=True)
AutoModelForImageTextToText.register(KimiMMConfig, KimiMMForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(KimiMMConfig, image_processor_classes={"pil": KimiMMImageProcessor}, exist_ok=True)
AutoProcessor.register(KimiMMConfig, KimiMMProcessor, exist_ok=True)

KimiMMConfig.register_for_auto_class()
KimiMMModel.register_for_auto_class("AutoModel")
KimiMMForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
KimiMMImageProcessor.register_for_auto_class("AutoImageProcessor")
KimiMMProcessor.register_for_auto_class("AutoProcessor")

__version__ = "0.1.0"

__all__ = [
    "ImageInputError",
    "KimiMMConfig",
    "KimiMMForConditionalGeneration",
    "KimiMMImageProcessor",
    "KimiMMModel",
    "KimiMMPreTrainedModel",
    "KimiMMProcessor",
    "KimiMMVisionConfig",
    "KimiMMVisionModel",
    "smart_resize",
]
