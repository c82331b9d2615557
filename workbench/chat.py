"""The Chat tab's logic without the UI: a conversation of turns (text, images, an HSA role each),
the models it talks to (a small pool with a memory budget), and checks on what people send.

A conversation is kept as our own turns, not as the Chatbot's display value: each turn carries its
role for HSA and, for replies, the model and decoding settings that produced it."""
from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path

from models.hsa import GLOBAL, LANDMARK, ROLE_NAMES, parse_role
from models.data.align import IMAGE_PLACEHOLDER

MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096
DEFAULT_ROLES = {"system": GLOBAL, "user": GLOBAL, "assistant": LANDMARK}


class ChatInputError(ValueError):
    """Something a person sent that cannot be answered; the message says what."""


@dataclass
class ChatTurn:
    speaker: str  # system / user / assistant
    text: str
    images: list[str] = field(default_factory=list)
    role: int | None = None  # HSA role; None: the speaker's default
    model: str | None = None  # for replies: which model answered
    settings: dict | None = None  # for replies: the decoding settings used
    failed: str = ""  # for a user turn no model answered: why (the turn stays out of what models see)

    @property
    def hsa_role(self) -> int:
        return DEFAULT_ROLES[self.speaker] if self.role is None else self.role

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ChatTurn":
        return cls(**data)


def check_image(path: str) -> str:
    """An image a person attached: refused with a reason if missing, unreadable or huge."""
    from PIL import Image

    file = Path(path)
    if not file.is_file():
        raise ChatInputError(f"the image {file.name} is missing")
    if file.stat().st_size > MAX_IMAGE_BYTES:
        raise ChatInputError(f"the image {file.name} is {file.stat().st_size / 2**20:.0f} MB; the limit is "
                             f"{MAX_IMAGE_BYTES // 2**20} MB")
    try:
        with Image.open(file) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ChatInputError(f"the image {file.name} is {width}x{height} pixels; the limit is "
                                     f"{MAX_IMAGE_PIXELS} pixels")
            image.verify()
    except ChatInputError:
        raise
    except Exception as error:  # PIL raises several kinds for a broken file
        raise ChatInputError(f"the file {file.name} is not a readable image ({error})") from None
    return str(file)


def keep_images(turns: list[ChatTurn]) -> None:
    """Mark the conversation's images as in use (their times set to now): uploads are swept a day after
    they last changed (workbench.web, Gradio's delete_cache), and a chat that is still going on needs the
    pictures of its first turns. An image already gone is left to the reply to report."""
    for turn in turns:
        for image in turn.images:
            try:
                os.utime(image)
            except OSError:
                pass


def user_turn(message: dict | str | None, role=None) -> ChatTurn:
    """A MultimodalTextbox value ({"text", "files"}) as a user turn, checked."""
    if isinstance(message, str):
        message = {"text": message, "files": []}
    message = message or {}
    text = (message.get("text") or "").strip()
    files = [f if isinstance(f, str) else (f.get("path") if isinstance(f, dict) else str(f))
             for f in message.get("files") or []]
    if not text and not files:
        raise ChatInputError("the message is empty: type a question or attach an image")
    if not text:
        raise ChatInputError("add a question to go with the image")
    images = [check_image(f) for f in files]
    return ChatTurn("user", text, images, None if role in (None, "") else parse_role(role))


def to_record(turns: list[ChatTurn], system: str | None = None) -> dict:
    """The conversation as a ShareGPT record: images become `<image>` placeholders before their
    turn's text, roles become `semantic_type`."""
    record: dict = {"conversations": [], "images": []}
    if system and system.strip():
        record["system"] = system.strip()
    for turn in turns:
        if turn.failed:  # not answered: retried or removed, never sent as a turn of its own
            continue
        value = IMAGE_PLACEHOLDER * len(turn.images) + turn.text
        record["conversations"].append({"from": {"user": "human", "assistant": "gpt"}.get(turn.speaker, turn.speaker),
                                        "value": value, "semantic_type": turn.hsa_role})
        record["images"].extend(turn.images)
    return record


def preference_pair(a: list[ChatTurn], b: list[ChatTurn], prefer: str, system: str | None = None) -> dict:
    """The two sides' answers to the last user message as a ranking record (LLaMA-Factory's format,
    what `workbench.pairs` trains on): `prefer` ("a" or "b") is the chosen answer, the other the
    rejected one. The prompt is the conversation up to that message as the chosen side holds it
    (earlier replies differ between sides), with its images."""
    if prefer not in ("a", "b"):
        raise ValueError(f"prefer must be 'a' or 'b', not {prefer!r}")
    sides = {"a": without_failed(a), "b": without_failed(b)}
    for side, turns in sides.items():
        if len(turns) < 2 or turns[-1].speaker != "assistant" or turns[-2].speaker != "user":
            raise ChatInputError("both models must have answered the last message first")
        if not turns[-1].text.strip():
            raise ChatInputError(f"the {'first' if side == 'a' else 'second'} model's answer is empty")
    if sides["a"][-2].text != sides["b"][-2].text or sides["a"][-2].images != sides["b"][-2].images:
        raise ChatInputError("the two answers reply to different messages")
    rejected = "b" if prefer == "a" else "a"
    chosen_turns = sides[prefer]
    record = to_record(chosen_turns[:-1], system)
    record["chosen"] = to_record(chosen_turns[-1:])["conversations"][0]
    record["rejected"] = to_record(sides[rejected][-1:])["conversations"][0]
    return record


def history_from_api(history) -> list[ChatTurn]:
    """History given to the API: a list of {"role", "content"} or {"from", "value"} dicts (text)."""
    if history in (None, "", []):
        return []
    if isinstance(history, str):
        history = json.loads(history)
    if not isinstance(history, list):
        raise ChatInputError("history must be a list of {role, content} messages")
    turns = []
    for i, message in enumerate(history):
        if not isinstance(message, dict):
            raise ChatInputError(f"history message {i} must be an object")
        speaker = message.get("role", message.get("from"))
        speaker = {"human": "user", "gpt": "assistant"}.get(speaker, speaker)
        text = message.get("content", message.get("value"))
        if speaker not in DEFAULT_ROLES or not isinstance(text, str):
            raise ChatInputError(f"history message {i} needs role user/assistant/system and text content")
        role = message.get("semantic_type", message.get("hsa_role"))
        turns.append(ChatTurn(speaker, text, [], None if role is None else parse_role(role)))
    return turns


def display_messages(turns: list[ChatTurn]) -> list[dict]:
    """The Chatbot's value: images shown in their turn, noise turns marked."""
    messages = []
    for turn in turns:
        if turn.speaker == "system":
            continue
        content = [{"path": image} for image in turn.images]
        text = turn.text
        if turn.hsa_role != DEFAULT_ROLES[turn.speaker]:
            text = f"{text}\n\n*[{ROLE_NAMES[turn.hsa_role]}]*"
        content.append(text)
        messages.append({"role": turn.speaker, "content": content})
        if turn.failed:  # its own bubble, so that the next message does not join this one
            messages.append({"role": "assistant", "content": [
                f"⚠ **Not answered:** {turn.failed}\n\n*Retry* asks again; *Remove failed* drops this message."]})
    return messages


def turns_table(turns: list[ChatTurn]) -> list[list]:
    """One row per turn: number, speaker, HSA role, text, images, model and settings of replies."""
    rows = []
    for i, turn in enumerate(turns):
        settings = ""
        if turn.settings:
            settings = ", ".join(f"{k}={v}" for k, v in turn.settings.items() if v not in (None, ""))
        rows.append([i, turn.speaker, ROLE_NAMES[turn.hsa_role], turn.text[:80], len(turn.images),
                     turn.model or ("failed" if turn.failed else ""), settings])
    return rows


TABLE_HEADERS = ["#", "speaker", "HSA role", "text", "images", "model", "settings"]


class ModelPool:
    """Loaded models shared by every tab and session, at most `budget` at once (the least recently
    used leaves). A model is keyed by what makes it differ, e.g. (path, adapter, attn_implementation);
    `get(key, load)` calls `load()` when the key is not loaded yet.

    Loading happens outside the lock: two different models load at the same time, while a second
    request for a model that is loading waits for that load instead of starting another. A failed
    load is not kept: the next request tries again."""

    def __init__(self, budget: int = 3):
        self.budget = max(1, budget)
        self._models: OrderedDict = OrderedDict()
        self._loading: dict = {}  # key -> Future of the load in progress
        self._lock = threading.Lock()

    def get(self, key, load):
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            pending = self._loading.get(key)
            owner = pending is None
            if owner:
                pending = self._loading[key] = Future()
        if not owner:
            return pending.result()  # the other request's model, or its error
        try:
            loaded = load()
        except BaseException as error:
            with self._lock:
                del self._loading[key]
            pending.set_exception(error)
            raise
        with self._lock:
            del self._loading[key]
            while len(self._models) >= self.budget:
                self._models.popitem(last=False)
            self._models[key] = loaded
        pending.set_result(loaded)
        return loaded

    def loaded(self) -> list:
        with self._lock:
            return list(self._models)


_shared_pool: ModelPool | None = None
_shared_lock = threading.Lock()


def shared_pool() -> ModelPool:
    """The process's one model pool (Chat, Attention and Annotate load through it); its budget is
    WORKBENCH_MODEL_BUDGET models (default 3)."""
    global _shared_pool
    with _shared_lock:
        if _shared_pool is None:
            _shared_pool = ModelPool(budget=int(os.environ.get("WORKBENCH_MODEL_BUDGET", "3")))
        return _shared_pool


def vlm_key(path, adapter=None, attn_implementation: str = "hsa") -> tuple:
    """The pool key of `load_vlm(path, adapter=adapter, attn_implementation=...)`."""
    return (str(path), str(adapter) if adapter else None, attn_implementation)


def retry_last(turns: list[ChatTurn]) -> list[ChatTurn]:
    """The conversation ready to answer its last user message again: replies after it dropped,
    its failure forgotten."""
    turns = list(turns)
    while turns and turns[-1].speaker == "assistant":
        turns.pop()
    if turns and turns[-1].failed:
        turns[-1] = ChatTurn(**{**asdict(turns[-1]), "failed": ""})
    return turns


def without_failed(turns: list[ChatTurn]) -> list[ChatTurn]:
    return [turn for turn in turns if not turn.failed]


def finished_runs(runs_dir: Path) -> dict[str, tuple[str, str | None]]:
    """Runs that left something to chat with: label -> (model, adapter directory or None).
    A LoRA run's adapter goes on its base ("run: NAME"); a run that saved a whole model (full
    fine-tuning, a composed VLM's align stage) is that model; a merged adapter is "run: NAME · merged", a hybrid's pruned export "run: NAME · pruned"."""
    found = {}
    runs_dir = Path(runs_dir)
    for config_file in sorted(runs_dir.glob("*/*/*config.json")):
        directory, run = config_file.parent, config_file.parent.parent.name
        if config_file.name == "adapter_config.json" and directory.name == "adapter":
            try:
                base = json.loads(config_file.read_text()).get("base_model_name_or_path")
            except (OSError, json.JSONDecodeError):
                continue
            if base:
                found[f"run: {run}"] = (base, str(directory))
        elif config_file.name == "config.json" and directory.name == "model":
            found[f"run: {run}"] = (str(directory), None)
        elif config_file.name == "config.json" and directory.name in ("merged", "pruned"):
            found[f"run: {run} · {directory.name}"] = (str(directory), None)
    return dict(sorted(found.items()))


def is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()
