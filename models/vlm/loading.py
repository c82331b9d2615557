"""Loading any Hugging Face image-text-to-text model with its processor, HSA attention, an optional
PEFT adapter and optional bitsandbytes quantization."""
from __future__ import annotations

from pathlib import Path

import torch

import models.hsa  # noqa: F401  (registers attn_implementation="hsa")
import models.hybrid  # noqa: F401  (a composed VLM over the Mamba+attention hybrid loads by its model type)

from .processor import load_processor

QUANTIZATIONS = (None, "4bit", "8bit")


class VLMLoadError(RuntimeError):
    """A model, processor or adapter that cannot be loaded; the message says which and why."""


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _quantization_config(quantization):
    if quantization not in QUANTIZATIONS:
        raise VLMLoadError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if quantization is None:
        return None
    if not torch.cuda.is_available():
        raise VLMLoadError(f"{quantization} quantization (bitsandbytes) needs a CUDA GPU; none is available")
    return bnb_config(quantization, torch.bfloat16)


# the vision tower, the projector and the output head stay in full precision, as in QLoRA for VLMs
UNQUANTIZED_MODULES = ["visual", "vision_tower", "vision_model", "multi_modal_projector", "lm_head"]


def bnb_config(quantization: str, compute_dtype: torch.dtype):
    """The one BitsAndBytesConfig of the project (loading for chat and training): "4bit" is QLoRA's NF4
    with double quantization, "8bit" LLM.int8; `UNQUANTIZED_MODULES` stay in full precision."""
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=UNQUANTIZED_MODULES)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=UNQUANTIZED_MODULES)
    raise ValueError(f"quantization must be 4bit or 8bit, got {quantization!r}")


def load_vlm(path_or_hub_id: str | Path, *, attn_implementation: str = "hsa", adapter: str | Path | None = None,
             quantization: str | None = None, device=None, dtype: torch.dtype | None = None):
    """(model, processor) for a local directory or hub id of an image-text-to-text model.

    On CPU the weights load as float32 (whatever they are stored in); on a GPU as bfloat16.
    `adapter` is a PEFT adapter directory put on top; `quantization` is "4bit"/"8bit" (GPU only).
    Raises VLMLoadError with the reason when something cannot be loaded."""
    from transformers import AutoModelForImageTextToText

    from .hub import ModelNotFound, locate

    try:
        source = locate(path_or_hub_id)
    except ModelNotFound as error:
        raise VLMLoadError(str(error)) from None
    target = _device(device)
    quantization_config = _quantization_config(quantization)
    if dtype is None:
        dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
    try:
        processor = load_processor(source)
    except Exception as error:
        raise VLMLoadError(f"cannot load the processor of {source!r}: {error}") from error
    kwargs = {"attn_implementation": attn_implementation, "dtype": dtype}
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map={"": target.index or 0})
    try:
        model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
    except Exception as error:
        raise VLMLoadError(f"cannot load {source!r} as an image-text-to-text model "
                           f"(attn_implementation={attn_implementation!r}): {error}") from error
    if quantization_config is None:
        model.to(target)
    if adapter is not None:
        try:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter))
        except Exception as error:
            raise VLMLoadError(f"cannot load the adapter {str(adapter)!r} onto {source!r}: {error}") from error
    model.eval()
    return model, processor


def merge_adapter(adapter: str | Path, out_dir: str | Path, *, base: str | Path | None = None) -> Path:
    """Fold a LoRA adapter into its base model (`merge_and_unload`) and save a plain checkpoint, with
    the processor, that loads without peft. The base loads in full precision on the CPU, whatever the
    run trained in (a QLoRA adapter merges into the unquantized weights, as QLoRA's authors do);
    `base` defaults to the one the adapter names. A projector or other module the run trained in
    full (peft's modules_to_save) replaces the base's."""
    import json

    adapter = Path(adapter)
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise VLMLoadError(f"{adapter} is not a PEFT adapter (no adapter_config.json)")
    base = str(base or json.loads(config_file.read_text()).get("base_model_name_or_path") or "")
    if not base:
        raise VLMLoadError(f"{adapter} does not name its base model; give it")
    model, processor = load_vlm(base, adapter=adapter, device="cpu", dtype=torch.float32,
                                attn_implementation="sdpa")
    merged = model.merge_and_unload()
    hsa_trained = getattr(merged.config, "hsa_trained", None)
    run_info = adapter / "workbench_run.json"
    if run_info.is_file():  # the run says whether it trained under the HSA mask
        hsa_trained = bool(json.loads(run_info.read_text()).get("hsa", hsa_trained))
    if hsa_trained is not None:
        merged.config.hsa_trained = hsa_trained
    return save_model(merged, processor, out_dir)


def save_model(model, processor, out_dir: str | Path) -> Path:
    """safetensors + config + processor in one directory, loadable with the Auto classes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def uses_hsa(model) -> bool:
    """Whether the model's attention applies the HSA rule (so generation should pass semantic_ids)."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) == models.hsa.IMPLEMENTATION
