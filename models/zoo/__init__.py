"""The embedded default models: the synthetic shapes task (`shapes`), the default VLM's tokenizer
and processor (`processor`), its config and training (`build`), the composed (LLaVA-style) default
(`composed`), evaluation (`evaluate`) and the HSA experiment (`experiment`).
`python -m models.zoo --help` lists the commands."""
from pathlib import Path

ZOO_DIR = Path(__file__).resolve().parent
DEFAULT_VLM_DIR = ZOO_DIR / "default_vlm"  # a tiny Qwen2-VL
DEFAULT_COMPOSED_DIR = ZOO_DIR / "default_composed"  # a tiny vision encoder + projector + Qwen3 (Llava)
DEFAULT_HYBRID_DIR = ZOO_DIR / "default_hybrid"  # the same, over the Mamba+attention hybrid LM
DEFAULT_HYBRID_PRUNED_DIR = ZOO_DIR / "default_hybrid_pruned"  # that, pruned by its gates' plan
# The names the UI and the commands accept for the embedded models.
EMBEDDED = {"default": DEFAULT_VLM_DIR, "composed": DEFAULT_COMPOSED_DIR, "hybrid": DEFAULT_HYBRID_DIR,
            "hybrid-pruned": DEFAULT_HYBRID_PRUNED_DIR}


def embedded_model(name_or_path) -> Path | str:
    """The directory of an embedded model's name ("default", "composed", "hybrid", "hybrid-pruned");
    anything else unchanged."""
    return EMBEDDED.get(str(name_or_path), name_or_path)
