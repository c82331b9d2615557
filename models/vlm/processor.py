"""Loading a model's processor, including Qwen2-VL-family processors on machines without torchvision.

transformers builds Qwen2-VL's processor with a video processor, and its video processors need
torchvision (which has no CPU build beside this project's torch). Images alone need only the PIL
image processor, so where AutoProcessor fails for that reason, the same processor is assembled
without its video part. Videos are then refused with a clear error; everything else is identical.
"""
from __future__ import annotations

from transformers import AutoConfig, AutoProcessor, AutoTokenizer, ProcessorMixin, Qwen2VLProcessor

# model types whose processors are Qwen2VLProcessor-compatible (same image tokens and grid logic)
QWEN_VL_TYPES = {"qwen2_vl", "qwen2_5_vl"}


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without a video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
        self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
        self.video_processor = None

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            raise ValueError("videos need torchvision, which is not installed; this processor handles images only")
        return super().__call__(images=images, text=text, **kwargs)


def qwen_image_processor(**kwargs):
    """Qwen2-VL's image processor in its PIL implementation (no torchvision needed)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**kwargs)


def _model_type(path_or_id: str, **kwargs) -> str | None:
    try:
        return AutoConfig.from_pretrained(path_or_id, **kwargs).model_type
    except (OSError, ValueError):
        return None


def load_processor(path_or_id: str, **kwargs):
    """AutoProcessor, or for Qwen2-VL-family checkpoints the image-only processor where AutoProcessor
    cannot give one: without torchvision, or when the saved processor class is not importable
    (AutoProcessor then falls back to a bare tokenizer). A name that is neither a local path nor a
    reachable or cached hub id raises hub.ModelNotFound at once."""
    from .hub import locate

    path_or_id = locate(path_or_id)
    try:
        processor = AutoProcessor.from_pretrained(path_or_id, **kwargs)
        if getattr(processor, "image_processor", None) is not None or \
                _model_type(path_or_id, **kwargs) not in QWEN_VL_TYPES:
            return processor
    except ImportError as error:
        if "torchvision" not in str(error).lower() or _model_type(path_or_id, **kwargs) not in QWEN_VL_TYPES:
            raise
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(path_or_id, **kwargs)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path_or_id, **kwargs)
    chat_template = getattr(tokenizer, "chat_template", None)
    return ImageOnlyQwen2VLProcessor(image_processor, tokenizer, chat_template=chat_template)
