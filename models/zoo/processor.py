"""The default model's tokenizer and processor, built here from nothing.

The tokenizer is a byte-level BPE (any text encodes; frequent shapes-world words are one token)
trained with the `tokenizers` library on shapes conversations, with Qwen2-VL's special tokens and
its ChatML chat template. The processor uses Qwen2-VL's image processor (PIL implementation) with
the pixel budget of a 56x56 image, so any picture becomes at most four image tokens.

The processor is saved as a `Qwen2VLProcessor` (what the model is). transformers' Qwen2-VL video
processor needs torchvision, which this CPU environment lacks; `models.vlm.load_processor` then
assembles the same processor without its video part (`ImageOnlyQwen2VLProcessor`), and with
torchvision `AutoProcessor` loads it as it is. Its pixel budget is saved as `min_pixels` =
`max_pixels` = 56x56, so any image, whatever its size, becomes the 2x2 token grid the model was
trained on.
"""
from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from models.vlm.processor import ImageOnlyQwen2VLProcessor, qwen_image_processor

from . import shapes

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL's chat template (without the vision-id option), so prompts look like the real model's.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB_SIZE = 640
# Pixel normalisation centred on the white background: a blank region becomes zeros, so the patch
# embedding (a convolution without bias) responds to the shapes alone. With CLIP's statistics the
# mostly-white images are far from zero mean, the first layer's updates all go into that common
# direction, and the vision tower loses colour within a few dozen steps.
IMAGE_MEAN = [1.0, 1.0, 1.0]
IMAGE_STD = [0.5, 0.5, 0.5]
# One 56x56 image: 4x4 patches of 14 pixels, merged 2x2 into 4 tokens.
IMAGE_PIXELS = shapes.IMAGE_SIZE * shapes.IMAGE_SIZE


def training_corpus(n_conversations: int = 400, seed: int = 0) -> list[str]:
    """Text of shapes conversations with every noise kind, plus the template words."""
    samples = shapes.generate(n_conversations, seed=seed, split="tokenizer",
                              noise=shapes.NoiseSpec(rate=0.5, kinds=shapes.NOISE_KINDS, max_run=2))
    texts = ["system user assistant You are a helpful assistant.", shapes.SYSTEM_PROMPT]
    for sample in samples:
        texts.extend(t["value"].replace("<image>", "") for t in sample.record["conversations"])
    return texts


def build_tokenizer(vocab_size: int = VOCAB_SIZE, seed: int = 0) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(training_corpus(seed=seed), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
        model_max_length=4096)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> ImageOnlyQwen2VLProcessor:
    tokenizer = tokenizer or build_tokenizer()
    image_processor = qwen_image_processor(min_pixels=IMAGE_PIXELS, max_pixels=IMAGE_PIXELS, patch_size=14,
                                           merge_size=2, temporal_patch_size=2, image_mean=IMAGE_MEAN,
                                           image_std=IMAGE_STD)
    return ImageOnlyQwen2VLProcessor(image_processor, tokenizer, chat_template=CHAT_TEMPLATE)
