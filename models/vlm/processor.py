"""Loading a model's processor, including Qwen2-VL-family processors on machines without torchvision.

transformers builds Qwen2-VL's processor with a video processor, and its video processors need
torchvision (which has no CPU build beside this project's torch). Images alone need only the PIL
image processor, so where AutoProcessor fails for that reason, the same processor is assembled
without its video part. Videos are then refused with a clear error; everything else is identical.
"""
from __future__ import annotations

import json
from pathlib import Path

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

    def to_dict(self) -> dict:
        # saved as what it is to every other reader: a Qwen2-VL processor (which loads it with its video part
        # where torchvision is installed, and load_processor without it where not)
        return {**super().to_dict(), "processor_class": "Qwen2VLProcessor"}

    def save_pretrained(self, save_directory, *args, **kwargs):
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        import json
        from pathlib import Path

        for name in ("tokenizer_config.json", "processor_config.json", "preprocessor_config.json"):
            path = Path(save_directory) / name
            if path.is_file():
                data = json.loads(path.read_text())
                if data.get("processor_class") == type(self).__name__:
                    data["processor_class"] = "Qwen2VLProcessor"
                    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        return saved

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            raise ValueError("videos need torchvision, which is not installed; this processor handles images only")
        return super().__call__(images=self._fixed_grid(images), text=text, **kwargs)

    def _fixed_grid(self, images):
        """With a fixed pixel budget (min = max pixels, as the embedded default is saved), every image is
        first made the square of that many pixels, so that its token grid is the one the model knows
        whatever the image's size or shape (Qwen2-VL would otherwise keep the aspect ratio)."""
        size = getattr(self.image_processor, "size", None) or {}
        low, high = (size.get("shortest_edge"), size.get("longest_edge")) if isinstance(size, dict) else \
            (getattr(size, "shortest_edge", None), getattr(size, "longest_edge", None))
        if images is None or not low or low != high:
            return images
        from PIL import Image

        side = int(round(low ** 0.5))

        def square(image):
            if isinstance(image, Image.Image) and image.size != (side, side):
                return image.convert("RGB").resize((side, side), Image.BICUBIC)
            if isinstance(image, (list, tuple)):
                return type(image)(square(i) for i in image)
            return image

        return square(images)


def qwen_image_processor(**kwargs):
    """Qwen2-VL's image processor in its PIL implementation (no torchvision needed)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**kwargs)


def _model_type(path_or_id: str, **kwargs) -> str | None:
    try:
        return AutoConfig.from_pretrained(path_or_id, **kwargs).model_type
    except (OSError, ValueError):
        return None


def _is_qwen_vl(path_or_id: str, **kwargs) -> bool:
    """A Qwen2-VL-family checkpoint by its model config, or (a processor saved alone, without the
    model) by the processor class its processor_config.json names."""
    if _model_type(path_or_id, **kwargs) in QWEN_VL_TYPES:
        return True
    saved = Path(path_or_id) / "processor_config.json"
    try:
        return json.loads(saved.read_text()).get("processor_class") in ("Qwen2VLProcessor", "Qwen2_5_VLProcessor")
    except (OSError, ValueError):
        return False


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
    except (ImportError, OSError) as error:
        # no torchvision for the video processor, or a checkpoint saved without one (images only)
        reason = str(error).lower()
        if not ("torchvision" in reason or "video processor" in reason) or not _is_qwen_vl(path_or_id, **kwargs):
            raise
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(path_or_id, **kwargs)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path_or_id, **kwargs)
    chat_template = getattr(tokenizer, "chat_template", None)
    return ImageOnlyQwen2VLProcessor(image_processor, tokenizer, chat_template=chat_template)
