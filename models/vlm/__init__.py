"""Any Hugging Face image-text-to-text model: loading (HSA attention, PEFT adapters, bitsandbytes)
and generation (greedy / sampling / beam, streaming) from ShareGPT conversations."""
from .generation import MODES, GenerationSettings, generate_reply, prompt_inputs, stream_reply
from .loading import QUANTIZATIONS, VLMLoadError, load_vlm, merge_adapter, uses_hsa
from .processor import ImageOnlyQwen2VLProcessor, load_processor, qwen_image_processor

__all__ = [
    "load_vlm", "merge_adapter", "VLMLoadError", "QUANTIZATIONS", "uses_hsa",
    "GenerationSettings", "MODES", "generate_reply", "stream_reply", "prompt_inputs",
    "load_processor", "qwen_image_processor", "ImageOnlyQwen2VLProcessor",
]
