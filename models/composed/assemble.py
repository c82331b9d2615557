"""A VLM composed from parts, the LLaVA way: a pretrained vision encoder, a 2-layer GELU projector and
a pretrained causal language model, as transformers' own `LlavaForConditionalGeneration`.

`assemble(vision, lm)` loads both parts (local directories or hub ids), copies their weights into a
Llava model whose `text_config` is the language model's own config (so any causal LM that the
library can build from a config -- Qwen3, Llama, the hybrid of `models.hybrid` once registered --
becomes the language model), adds the image token to the tokenizer, and pairs the vision part's
image processor with the tokenizer in a `LlavaProcessor` with a ChatML template. The projector is
fresh: the "align" training stage is what teaches it.
"""
from __future__ import annotations

from pathlib import Path

import torch

IMAGE_TOKEN = "<image>"
# LLaVA's defaults: the penultimate layer's patch features, the CLS token dropped.
FEATURE_LAYER = -2
SELECT_STRATEGIES = ("default", "full")  # "default" drops the CLS token, "full" keeps every position
CHATML = ("<|im_start|>", "<|im_end|>")
# ChatML with images as the image token, as the Qwen family writes chats; content may be a string or
# a list of {"type": "text"/"image"} parts (what models.data.align renders).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}<image>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ComposeError(ValueError):
    """Parts that cannot be composed; the message says which part and why."""


def _vision_parts(source: str):
    """(vision config, vision model with weights, has CLS token) for a vision checkpoint: a vision-only
    model (CLIPVisionModel, SiglipVisionModel, ...) or a two-tower one whose `vision_config` is taken."""
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ComposeError(f"vision encoder {source!r}: cannot read its config: {error}") from error
    vision_config = getattr(config, "vision_config", None) or config
    tower = AutoModel.from_config(vision_config)
    loaded = AutoModel.from_pretrained(source, dtype=torch.float32)
    wanted = tower.state_dict()
    have = loaded.state_dict()
    if set(wanted) - set(have):  # a two-tower checkpoint: its vision half sits under the same key prefix
        missing = sorted(set(wanted) - set(have))
        raise ComposeError(f"vision encoder {source!r}: its checkpoint lacks {missing[:3]} "
                           f"({len(missing)} tensors) of a {type(tower).__name__}")
    tower.load_state_dict({key: have[key] for key in wanted})
    if not hasattr(tower.config, "patch_size") or not hasattr(tower.config, "image_size"):
        raise ComposeError(f"vision encoder {source!r} ({vision_config.model_type}) does not output patch "
                           "features of a fixed grid (no patch_size / image_size in its config)")
    # CLIP-style towers prepend a CLS embedding; SigLIP-style ones have only patches.
    has_cls = hasattr(getattr(tower, "vision_model", tower).embeddings, "class_embedding")
    return vision_config, tower, has_cls


def _image_processor(source: str, vision_config):
    from transformers import AutoImageProcessor, CLIPImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError):
        size = vision_config.image_size
        return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _tokenizer(source: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    added = [token for token in (IMAGE_TOKEN, *CHATML) if token not in tokenizer.get_vocab()]
    if added:
        tokenizer.add_special_tokens({"additional_special_tokens": added}, replace_extra_special_tokens=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or CHATML[1]
    return tokenizer


def assemble(vision: str | Path, lm: str | Path, *, vision_feature_layer: int = FEATURE_LAYER,
             select_strategy: str | None = None, projector_act: str = "gelu"):
    """(LlavaForConditionalGeneration, LlavaProcessor) from a pretrained vision encoder and a causal LM.

    `select_strategy` None picks LLaVA's "default" (drop CLS) for towers with a CLS token and "full"
    for towers without one (SigLIP)."""
    from transformers import AutoModelForCausalLM, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    import models.hsa  # noqa: F401  (registers "hsa")
    import models.hybrid  # noqa: F401  (the hsa_hybrid language model loads by its type)

    vision, lm = str(vision), str(lm)
    vision_config, tower, has_cls = _vision_parts(vision)
    if select_strategy is None:
        select_strategy = "default" if has_cls else "full"
    if select_strategy not in SELECT_STRATEGIES:
        raise ComposeError(f"select strategy must be one of {SELECT_STRATEGIES}, got {select_strategy!r}")
    if select_strategy == "default" and not has_cls:
        raise ComposeError(f"vision encoder {vision!r} has no CLS token to drop: use select strategy 'full'")
    layers = vision_config.num_hidden_layers
    if not -layers - 1 <= vision_feature_layer <= layers:
        raise ComposeError(f"vision feature layer {vision_feature_layer} is outside the tower's hidden states "
                           f"(-{layers + 1} .. {layers})")
    try:
        language_model = AutoModelForCausalLM.from_pretrained(lm, dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise ComposeError(f"language model {lm!r}: cannot load it as a causal LM: {error}") from error
    try:  # HSA reaches the language model through its attention implementation
        language_model.set_attn_implementation("hsa")
    except (ValueError, ImportError) as error:
        raise ComposeError(f"language model {lm!r} ({language_model.config.model_type}) cannot take "
                           f"attn_implementation='hsa': {error}") from error
    tokenizer = _tokenizer(lm)

    config = LlavaConfig(vision_config=vision_config.to_dict(), text_config=language_model.config.to_dict(),
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_layer=vision_feature_layer, vision_feature_select_strategy=select_strategy,
                         projector_hidden_act=projector_act,
                         image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2
                         + (1 if select_strategy == "full" and has_cls else 0),
                         tie_word_embeddings=bool(getattr(language_model.config, "tie_word_embeddings", False)))
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(tower.state_dict())
    model.model.language_model.load_state_dict(language_model.get_decoder().state_dict())
    model.lm_head.load_state_dict(language_model.get_output_embeddings().state_dict())
    if len(tokenizer) > config.text_config.vocab_size:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    end = tokenizer.convert_tokens_to_ids(CHATML[1])
    model.generation_config.eos_token_id = [end]
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    processor = LlavaProcessor(image_processor=_image_processor(vision, vision_config), tokenizer=tokenizer,
                               patch_size=vision_config.patch_size, vision_feature_select_strategy=select_strategy,
                               num_additional_image_tokens=1 if has_cls else 0, chat_template=CHAT_TEMPLATE,
                               image_token=IMAGE_TOKEN)
    return model, processor


def save(model, processor, out_dir: str | Path) -> Path:
    """safetensors + config + processor, loadable with AutoModelForImageTextToText / AutoProcessor."""
    from models.vlm.loading import save_model

    return save_model(model, processor, out_dir)
