"""Replies from a VLM to a ShareGPT conversation: the prompt comes from `models.data.align.align_record`
(the same chat template and roles as training), decoding is greedy, sampling or beam search, and
`semantic_ids` go with it when the model uses HSA attention. No UI here: the Chat tab calls this."""
from __future__ import annotations

from dataclasses import dataclass
from threading import Event, Thread
from typing import Iterator

import torch

from models.hsa import generate as hsa_generate
from models.data.align import align_record, pad_batch, pad_token_id

from .loading import uses_hsa

MODES = ("greedy", "sample", "beam")


@dataclass
class GenerationSettings:
    mode: str = "greedy"
    max_new_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    num_beams: int = 4
    repetition_penalty: float = 1.0
    seed: int | None = None  # for sampling: the same seed gives the same reply

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"generation mode must be one of {MODES}, got {self.mode!r}")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.mode == "sample" and self.temperature <= 0:
            raise ValueError("sampling needs a temperature above 0")
        if self.mode == "beam" and self.num_beams < 2:
            raise ValueError("beam search needs num_beams >= 2")

    def generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.mode == "greedy":
            kwargs.update(do_sample=False, num_beams=1)
        elif self.mode == "sample":
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                          num_beams=1)
        else:
            # No early_stopping=True: it ends the search once num_beams hypotheses have finished, and
            # with a confident model those are the runners-up that stopped early ("There are shapes."
            # at log p -12.6) while the best beam ("There are two shapes.", -0.001) is still going.
            kwargs.update(do_sample=False, num_beams=self.num_beams)
        return kwargs


def prompt_inputs(model, processor, record, *, image_root=None, hsa: bool | None = None) -> dict:
    """The model inputs for a reply to `record` (a ShareGPT dict ending with a user turn)."""
    aligned = align_record(record, processor, image_root=image_root, add_generation_prompt=True)
    batch = pad_batch([aligned], pad_token_id=pad_token_id(processor), padding_side="left")
    batch.pop("labels")
    inputs = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            value = value.to(model.device)
            if value.is_floating_point():
                value = value.to(model.dtype)
        inputs[key] = value
    if not (uses_hsa(model) if hsa is None else hsa):
        inputs.pop("semantic_ids")
    return inputs


def _stop_ids(model, processor) -> list[int]:
    tokenizer = getattr(processor, "tokenizer", processor)
    ids = set()
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    for token in ("<|im_end|>", "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def _generate_kwargs(model, processor, settings: GenerationSettings) -> dict:
    tokenizer = getattr(processor, "tokenizer", processor)
    kwargs = settings.generate_kwargs()
    kwargs["eos_token_id"] = _stop_ids(model, processor)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else kwargs["eos_token_id"][0]
    kwargs["pad_token_id"] = pad
    return kwargs


def _generate(model, inputs: dict, kwargs: dict):
    """model.generate, with the roles passed through models.hsa.generate when there are any
    (generate itself refuses keyword arguments that forward does not name)."""
    inputs = dict(inputs)
    semantic_ids = inputs.pop("semantic_ids", None)
    return hsa_generate(model, semantic_ids=semantic_ids, **inputs, **kwargs)


def generate_reply(model, processor, record, *, settings: GenerationSettings | None = None, image_root=None,
                   hsa: bool | None = None) -> str:
    """The model's next assistant turn for `record`, as text."""
    settings = settings or GenerationSettings()
    inputs = prompt_inputs(model, processor, record, image_root=image_root, hsa=hsa)
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    with torch.no_grad():
        output = _generate(model, inputs, _generate_kwargs(model, processor, settings))
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    tokenizer = getattr(processor, "tokenizer", processor)
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def stream_reply(model, processor, record, *, settings: GenerationSettings | None = None, image_root=None,
                 hsa: bool | None = None) -> Iterator[str]:
    """The same reply as pieces of text as they are generated (generation runs in a thread).
    Beam search cannot stream: it yields the whole reply once. Closing the iterator early (a
    Stop button) stops the generation at its next token instead of letting it run on."""
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    settings = settings or GenerationSettings()
    if settings.mode == "beam":
        yield generate_reply(model, processor, record, settings=settings, image_root=image_root, hsa=hsa)
        return
    inputs = prompt_inputs(model, processor, record, image_root=image_root, hsa=hsa)
    tokenizer = getattr(processor, "tokenizer", processor)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300.0)
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    failure: list[BaseException] = []
    stop = Event()

    class StopWhenClosed(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    def run():
        try:
            with torch.no_grad():
                _generate(model, inputs, {**_generate_kwargs(model, processor, settings), "streamer": streamer,
                                          "stopping_criteria": StoppingCriteriaList([StopWhenClosed()])})
        except BaseException as error:  # surfaced in the caller's thread below
            failure.append(error)
            streamer.end()

    thread = Thread(target=run, daemon=True)
    thread.start()
    first = True
    try:
        for piece in streamer:
            if first:
                piece = piece.lstrip()
                first = not piece
            if piece:
                yield piece
    finally:
        stop.set()
        thread.join()
    if failure:
        raise failure[0]
