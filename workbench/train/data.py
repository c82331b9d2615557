"""Records aligned once, kept on disk: what a training run feeds its model.

`models.data.align.align_record` turns a conversation into input_ids, labels and semantic_ids through
the chat template. A run used to do that in the collator, for every record at every step of every
epoch. Here each dataset is aligned once per processor, and the result (token ids, labels,
semantic_ids, per-token extras such as mm_token_type_ids, the image references and, when the whole
dataset's come to at most PIXEL_BUDGET bytes, the image processor's output for them) is written to
one file in a cache folder whose name is a hash of everything the result depends on:

- the data: the records themselves (a file's parsed records or a store dataset's conversations) and
  the bytes of every image they name (an image's size decides how many image tokens it gets);
- the processor: its tokenizer (vocabulary, normalizer, added tokens), chat templates and image
  processor settings, read from the loaded processor, so a copy of a model elsewhere shares the entry;
- the alignment code: the source of models/data/align.py, of the role definitions (models.hsa) and of
  this module, the project's own processor class where one is used, the library versions;
- max_length.

Epochs, resumes and later runs on the same data and processor read the file back; `PadCollator` then
only pads (and, for image sets over the budget, runs the image processor on the batch's images). A file is written to a
temporary name and renamed into place when complete, so a killed writer leaves no entry to read; an
entry that does not read back whole is rebuilt. `tests/test_align_cache.py` holds the cached path to
the uncached one batch by batch (`HSACollator` on raw records), its slow, obviously-correct twin.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import models.data.align as align
from models.data.align import (IGNORE_INDEX, Aligned, AlignError, Conversation, HSACollator, align_record, pad_batch,
                               pad_token_id)

FORMAT = 2  # the layout of a cache file; the source hash below changes with it anyway
# The image processor's output (pixel patches, grids) is kept with the items, and in the cache file, when the
# whole dataset's comes to at most this many bytes: then a step's data is padding alone. Larger image sets
# (real photos at full resolution: megabytes a picture) are processed in the collator, batch by batch.
PIXEL_BUDGET = 256 * 2 ** 20
PROJECT_ROOT = Path(__file__).resolve().parents[2]
SUFFIX = ".pt"


def default_cache_dir() -> Path:
    """$WORKBENCH_CACHE/align, else ~/.cache/hsa-workbench/align ($XDG_CACHE_HOME respected)."""
    root = os.environ.get("WORKBENCH_CACHE") or \
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hsa-workbench"
    return Path(root) / "align"


@dataclass
class Item:
    """One aligned record as the collator needs it: tokens and roles, and the images to load."""
    input_ids: torch.Tensor
    labels: torch.Tensor
    semantic_ids: torch.Tensor
    extras: dict = field(default_factory=dict)  # per-token model inputs (mm_token_type_ids, ...)
    images: list = field(default_factory=list)  # as the record names them (relative to image_root)
    pixels: dict | None = None  # the image processor's output for `images`, when the dataset's fits PIXEL_BUDGET

    def __len__(self) -> int:
        return len(self.input_ids)


# ---- the key ----------------------------------------------------------------------------------

def _record_json(record) -> object:
    if isinstance(record, Conversation):
        return {"turns": [dataclasses.asdict(t) for t in record.turns], "images": [str(i) for i in record.images],
                "name": record.name}
    return record


def _image_refs(record, index: int) -> list:
    conv = record if isinstance(record, Conversation) else align.normalize_record(record, index=index)
    return list(conv.images)


def processor_fingerprint(processor) -> str:
    """A hash of what the processor does to text and images, read from the loaded processor."""
    tokenizer = align._tokenizer_of(processor)
    h = hashlib.sha256()

    def add(label: str, value) -> None:
        h.update(label.encode() + b"\0" + str(value).encode() + b"\0")

    add("processor", type(processor).__name__)
    add("tokenizer", type(tokenizer).__name__)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        add("backend", backend.to_str())
    else:  # a slow tokenizer: its vocabulary and added tokens
        add("vocab", json.dumps(sorted(tokenizer.get_vocab().items())))
    add("added", sorted((k, str(v)) for k, v in getattr(tokenizer, "added_tokens_decoder", {}).items()))
    for owner in (processor, tokenizer):
        add("chat_template", json.dumps(getattr(owner, "chat_template", None), sort_keys=True, default=str))
    settings = {k: v for k, v in getattr(tokenizer, "init_kwargs", {}).items()
                if k not in ("name_or_path", "tokenizer_file", "vocab_file", "merges_file")}
    add("tokenizer_settings", json.dumps(settings, sort_keys=True, default=str))
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is not None:
        add("image_processor", image_processor.to_json_string())
    for attr in ("image_token", "image_token_id", "video_token", "num_image_tokens"):
        add(attr, getattr(processor, attr, None))
    # the processor's own code where it is this project's (models.vlm.processor's image-only Qwen2-VL
    # processor decides the image grid); library classes are covered by the library versions
    for module in sorted({type(processor).__module__, type(tokenizer).__module__, type(image_processor).__module__}):
        source = getattr(sys.modules.get(module), "__file__", None)
        if source and Path(source).resolve().is_relative_to(PROJECT_ROOT) and "site-packages" not in Path(source).parts:
            add(module, Path(source).read_bytes())
    return h.hexdigest()


def code_fingerprint() -> str:
    """The alignment code: align.py and this module, and the libraries whose behaviour they rely on."""
    import tokenizers
    import transformers

    h = hashlib.sha256()
    roles = sys.modules[align.parse_role.__module__].__file__  # the role names and numbers (models.hsa)
    for source in (align.__file__, roles, __file__):
        h.update(Path(source).read_bytes())
    h.update(f"{FORMAT} {transformers.__version__} {tokenizers.__version__}".encode())
    return h.hexdigest()


def cache_key(records: list, processor, *, image_root=None, max_length: int | None) -> str | None:
    """The hash naming a dataset's cache entry; None when a record holds an in-memory image (nothing on
    disk to key it by: such a dataset is aligned without the cache)."""
    h = hashlib.sha256()
    h.update(json.dumps([_record_json(r) for r in records], sort_keys=True, ensure_ascii=False,
                        default=str).encode())
    root = Path(image_root or ".")
    digests: dict[str, str] = {}
    for index, record in enumerate(records):
        for image in _image_refs(record, index):
            if not isinstance(image, (str, Path)):
                return None
            if str(image) not in digests:
                try:
                    digests[str(image)] = hashlib.sha256((root / image).read_bytes()).hexdigest()
                except OSError:
                    digests[str(image)] = "missing"  # alignment names the record and the image
    h.update(json.dumps(digests, sort_keys=True).encode())
    h.update(processor_fingerprint(processor).encode())
    h.update(code_fingerprint().encode())
    h.update(f"max_length={max_length}".encode())
    return h.hexdigest()


# ---- aligning and the cache file --------------------------------------------------------------

def to_item(aligned: Aligned, images: list) -> Item:
    extras = {k: v for k, v in aligned.model_inputs.items()
              if isinstance(v, torch.Tensor) and v.dim() == 1 and len(v) == len(aligned)}
    return Item(aligned.input_ids, aligned.labels, aligned.semantic_ids, extras, [str(i) for i in images])


def align_all(records: list, processor, *, image_root=None, max_length: int | None) -> list[Item]:
    """Every record aligned (AlignError names the first that cannot be)."""
    items = []
    for index, record in enumerate(records):
        aligned = align_record(record, processor, image_root=image_root, max_length=max_length, index=index)
        items.append(to_item(aligned, _image_refs(record, index)))
    return items


def _pack(items: list[Item], key: str) -> dict:
    lengths = torch.tensor([len(i) for i in items], dtype=torch.long)
    offsets = torch.zeros(len(items) + 1, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)
    cat = lambda name: torch.cat([getattr(i, name) for i in items]) if items else torch.zeros(0)  # noqa: E731
    extras = {}
    for name in sorted({k for i in items for k in i.extras}):
        has = torch.tensor([name in i.extras for i in items])
        values = torch.cat([i.extras[name] if name in i.extras else torch.zeros(len(i), dtype=torch.long)
                            for i in items])
        extras[name] = {"has": has, "values": values}
    return {"format": FORMAT, "key": key, "offsets": offsets, "input_ids": cat("input_ids"),
            "labels": cat("labels"), "semantic_ids": cat("semantic_ids"), "extras": extras,
            "images": [list(i.images) for i in items], "pixels": [i.pixels for i in items]}


def _unpack(data: dict, key: str) -> list[Item]:
    if data.get("format") != FORMAT or data.get("key") != key:
        raise ValueError("not this entry")
    offsets = data["offsets"].tolist()
    n = len(offsets) - 1
    if len(data["images"]) != n or len(data["pixels"]) != n or len(data["input_ids"]) != offsets[-1]:
        raise ValueError("incomplete entry")
    items = []
    for k in range(n):
        a, b = offsets[k], offsets[k + 1]
        extras = {name: e["values"][a:b] for name, e in data["extras"].items() if bool(e["has"][k])}
        items.append(Item(data["input_ids"][a:b], data["labels"][a:b], data["semantic_ids"][a:b], extras,
                          list(data["images"][k]), data["pixels"][k]))
    return items


def read_entry(path: Path, key: str) -> list[Item] | None:
    """The items of a complete entry; None when there is none, or it does not read back whole."""
    try:
        return _unpack(torch.load(path, weights_only=True), key)
    except FileNotFoundError:
        return None
    except Exception as error:  # noqa: BLE001 - truncated, corrupt, another format: rebuilt
        print(f"align cache: ignoring unreadable entry {path.name} ({type(error).__name__}); aligning again",
              flush=True)
        return None


def write_entry(path: Path, key: str, items: list[Item]) -> None:
    """Written under a temporary name, flushed to disk and renamed into place: an entry is whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.stem}.*.tmp"):  # left by killed writers
        pid = stale.name.rsplit(".", 2)[-2]
        if not (pid.isdigit() and _alive(int(pid))):
            stale.unlink(missing_ok=True)
    tmp = path.parent / f".{path.stem}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(_pack(items, key), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Prepared:
    items: list[Item]
    source: str  # "cache" (read back), "aligned" (and written), "aligned, not cached" (with the reason)
    seconds: float
    path: Path | None = None


def prepare(records: list, processor, *, image_root=None, max_length: int | None, cache_dir=None) -> Prepared:
    """The records aligned: read from the cache entry for this data, processor and code, or aligned now
    and written there. A cache folder that cannot be written costs the reuse, not the run."""
    start = time.perf_counter()
    key = cache_key(records, processor, image_root=image_root, max_length=max_length)
    if key is None:
        items = align_all(records, processor, image_root=image_root, max_length=max_length)
        return Prepared(items, "aligned, not cached (in-memory images)", time.perf_counter() - start)
    path = Path(cache_dir or default_cache_dir()) / f"{key}{SUFFIX}"
    items = read_entry(path, key)
    if items is not None:
        return Prepared(items, "cache", time.perf_counter() - start, path)
    items = align_all(records, processor, image_root=image_root, max_length=max_length)
    check_image_inputs(records, items, processor, image_root)
    keep_pixels(items, processor, image_root)
    try:
        write_entry(path, key, items)
        source = "aligned"
    except OSError as error:
        source = f"aligned, not cached ({error})"
    return Prepared(items, source, time.perf_counter() - start, path)


def check_image_inputs(records, items: list[Item], processor, image_root) -> None:
    """The collator makes pixel inputs with the image processor alone; for the first record with images,
    they must equal what the whole processor made while aligning (else the cache would change batches)."""
    for index, item in enumerate(items):
        if item.images:
            aligned = align_record(records[index], processor, image_root=image_root, index=index)
            made = image_inputs(processor, item.images, image_root, f"record {index}")
            kept = {k: v for k, v in aligned.model_inputs.items() if k not in item.extras}
            if kept.keys() != made.keys() or not all(torch.equal(kept[k], made[k]) for k in kept):
                raise AlignError(f"record {index}: this processor's image inputs ({sorted(kept)}) cannot be "
                                 "made from the images alone; the aligned-records cache does not support it")
            return


def keep_pixels(items: list[Item], processor, image_root, budget: int = None) -> bool:
    """Each item's image inputs made now, once, if all of them fit `budget` bytes (PIXEL_BUDGET); else none
    are kept (the collator makes them per batch). Returns whether they were kept."""
    budget = PIXEL_BUDGET if budget is None else budget
    total, made = 0, []
    for index, item in enumerate(items):
        inputs = image_inputs(processor, item.images, image_root, f"record {index}") if item.images else None
        total += sum(v.numel() * v.element_size() for v in (inputs or {}).values())
        if total > budget:
            return False
        made.append(inputs)
    for item, inputs in zip(items, made):
        item.pixels = inputs
    return True


def image_inputs(processor, images: list, image_root, name: str) -> dict:
    loaded = align._load_images(Conversation([], list(images), name), image_root)
    out = processor.image_processor(images=loaded, return_tensors="pt")
    return {k: v for k, v in out.items()}


# ---- feeding the model ------------------------------------------------------------------------

class AlignedRecords(torch.utils.data.Dataset):
    def __init__(self, items: list[Item]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i) -> Item:
        return self.items[i]


class PadCollator:
    """Aligned items -> a batch: the items' image inputs (kept with them, or made now from their images by the
    image processor) and padding (models.data.align.pad_batch), nothing else. Without HSA the batch has no
    semantic_ids.

    With `positions` (`record_positions(model)`), the batch is padding-free: its records one after another in
    a single row, each with the position ids it has alone, and no attention mask, from which transformers
    builds attention within each record only; the first label of each record is ignored (it would be predicted
    from the record before; alone, nothing predicts it). Same loss and gradients as the padded batch, without
    computing the padding (a quarter of the tokens of a batch of 4 shapes conversations); only dropout draws
    its random masks for the row's shape instead of the padded batch's."""

    def __init__(self, processor, *, image_root=None, hsa: bool = True, padding_side: str = "right",
                 positions=None):
        self.processor, self.image_root, self.hsa = processor, image_root, hsa
        self.pad_id, self.padding_side = pad_token_id(processor), padding_side
        self.positions = positions
        self._kept_positions, self._kept_bytes = {}, 0  # id(item) -> (item, position ids): made once a run

    def __call__(self, items: list[Item]) -> dict:
        aligned = []
        for k, item in enumerate(items):
            inputs = dict(item.extras)
            if item.pixels is not None:
                inputs.update(item.pixels)
            elif item.images:
                inputs.update(image_inputs(self.processor, item.images, self.image_root, f"batch item {k}"))
            aligned.append(Aligned(item.input_ids.long(), torch.ones(len(item), dtype=torch.long),
                                   item.labels.long(), item.semantic_ids.long(), inputs, [], [], [], []))
        if self.positions is not None:
            batch = padding_free_batch(aligned, [self._positions_of(item, a) for item, a in zip(items, aligned)])
        else:
            batch = pad_batch(aligned, pad_token_id=self.pad_id, padding_side=self.padding_side)
        if not self.hsa:
            batch.pop("semantic_ids")
        return batch


    def _positions_of(self, item: Item, a: Aligned) -> torch.Tensor:
        kept = self._kept_positions.get(id(item))
        if kept is not None and kept[0] is item:
            return kept[1]
        ids = self.positions(a)
        if self._kept_bytes + ids.numel() * ids.element_size() <= POSITIONS_BUDGET:
            self._kept_positions[id(item)] = (item, ids)
            self._kept_bytes += ids.numel() * ids.element_size()
        return ids


POSITIONS_BUDGET = 64 * 2 ** 20  # bytes of position ids a collator keeps (Qwen2-VL's: 32 bytes a token)


def padding_free_batch(aligned: list[Aligned], positions: list[torch.Tensor]) -> dict:
    """The records one after another in one row, no padding (see PadCollator); `positions`: each one's [R, n]."""
    labels = []
    for a in aligned:
        own = a.labels.clone()
        own[0] = IGNORE_INDEX
        labels.append(own)
    batch = {"input_ids": torch.cat([a.input_ids for a in aligned])[None], "labels": torch.cat(labels)[None],
             "semantic_ids": torch.cat([a.semantic_ids for a in aligned])[None]}
    for key in sorted({k for a in aligned for k in a.model_inputs}):
        with_key = [a for a in aligned if key in a.model_inputs]
        if all(a.model_inputs[key].dim() == 1 and len(a.model_inputs[key]) == len(a) for a in with_key):
            batch[key] = torch.cat([a.model_inputs[key] if key in a.model_inputs
                                    else torch.zeros(len(a), dtype=torch.long) for a in aligned])[None]
        else:  # per-image inputs (pixel patches, grids) are concatenated along their first dimension
            batch[key] = torch.cat([a.model_inputs[key] for a in with_key], dim=0)
    ids = torch.cat(positions, dim=-1)  # [R, N]
    batch["position_ids"] = ids if len(ids) == 1 else ids[:, None]  # [1, N], or [R, 1, N] (Qwen2-VL: text + mrope)
    return batch


# model types whose attention masks transformers builds from packed position ids (a new record where they restart),
# checked by tests/test_train_padding_free.py; the hybrid's Mamba branch would carry state from one record to the next
TEXT_POSITIONS = {"llama", "qwen2", "qwen3"}
MROPE_POSITIONS = {"qwen2_vl"}


def record_positions(model):
    """A function giving one aligned record's position ids alone ([R, n]) for padding-free batches, or None where
    the model cannot take them. Qwen2-VL: the text positions (from which the mask is built) over its three
    rotary position rows, from the model's own get_rope_index."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(base.config, "model_type", None)
    if model_type in TEXT_POSITIONS:
        return _text_positions
    if model_type in MROPE_POSITIONS:
        return _MropePositions(base.model.get_rope_index)
    return None


def _text_positions(a: Aligned) -> torch.Tensor:
    return torch.arange(len(a))[None]


class _MropePositions:
    def __init__(self, rope_index):
        self.rope_index = rope_index

    def __call__(self, a: Aligned) -> torch.Tensor:
        n = len(a)
        types = a.model_inputs.get("mm_token_type_ids")
        rope, _ = self.rope_index(a.input_ids[None],
                                  mm_token_type_ids=(types if types is not None else torch.zeros(n, dtype=torch.long))[None],
                                  image_grid_thw=a.model_inputs.get("image_grid_thw"),
                                  attention_mask=torch.ones(1, n, dtype=torch.long))
        return torch.cat([torch.arange(n)[None], rope[:, 0].to(torch.long)], 0)


def uncached_collator(processor, *, image_root=None, max_length: int | None, hsa: bool = True):
    """The path the cache replaces (alignment in the collator, every step): for tests and benchmarks."""
    inner = HSACollator(processor, image_root=image_root, max_length=max_length)

    def collate(records):
        batch = inner(records)
        if not hsa:
            batch.pop("semantic_ids")
        return batch
    return collate


def default_workers(cuda: bool | None = None, cores: int | None = None) -> int:
    """DataLoader workers when the config leaves it to the machine: with a GPU, a few processes load
    pixels while it computes; on CPU the training step already uses every core, and a worker would take
    one from it (the collator only pads and loads pixels), so none."""
    if cuda is None:
        cuda = torch.cuda.is_available()
    if not cuda:
        return 0
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    gpus = max(1, torch.cuda.device_count())
    return max(1, min(4, cores // (2 * gpus)))
