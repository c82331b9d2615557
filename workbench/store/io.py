"""Import and export: ShareGPT JSON / JSONL in, ShareGPT, LLaMA-Factory or per-token semantic ids out.

A record is checked completely (structure and roles by `workbench.align.normalize_record`, then its
images: present, readable, not too big) before anything of it is written, and it is written in one
savepoint, so an invalid record leaves nothing behind while the valid ones around it are stored.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from models.hsa import sharegpt_name
from workbench.align import AlignError, Conversation, align_record, normalize_record

from .db import Store, StoreError

MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000
RECORD_KEYS = {"conversations", "messages", "system", "images"}
FROM_NAMES = {"system": "system", "user": "human", "assistant": "gpt"}
IMAGE_FORMATS = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff"}
FORMATS = ("sharegpt", "llamafactory", "semantic-ids")


class RecordError(ValueError):
    """One record that cannot be stored; the message names the record and the problem."""


class FileError(ValueError):
    """A whole input file that cannot be read (missing, not UTF-8, malformed JSON)."""


@dataclass
class PreparedRecord:
    conversation: Conversation
    images: list[tuple[bytes, str]]  # content and file extension, already verified
    extra: dict


@dataclass
class ImportReport:
    dataset: str
    stored: int = 0
    errors: list[str] = field(default_factory=list)
    conversation_ids: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.stored + len(self.errors)


# --- reading files -----------------------------------------------------------------------------

def read_records(path) -> list[tuple[str, object]]:
    """(name, record) pairs of a JSON list (or one JSON object) or a JSONL file. In JSONL a
    malformed line becomes a RecordError in place of its record; in JSON the whole file fails."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise FileError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise FileError(f"{path}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise FileError(f"{path}: cannot be read ({e.strerror or e})") from None
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return _read_jsonl(text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise FileError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise FileError(f"{path}: malformed JSON: nested too deeply") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise FileError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return [(f"record {i}", record) for i, record in enumerate(data)]


def _read_jsonl(text: str) -> list[tuple[str, object]]:
    records = []
    # Only "\n" ends a record: str.splitlines would also split at U+2028 etc. inside JSON strings.
    for line_no, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        name = f"record {len(records)} (line {line_no})"
        try:
            records.append((name, json.loads(line)))
        except json.JSONDecodeError as e:
            records.append((name, RecordError(f"{name}: malformed JSON at column {e.colno}: {e.msg}")))
        except RecursionError:
            records.append((name, RecordError(f"{name}: malformed JSON: nested too deeply")))
    return records


# --- checking one record ---------------------------------------------------------------------

def prepare_record(record, *, name: str = "record", base_dir=".", max_image_bytes: int = MAX_IMAGE_BYTES,
                   max_image_pixels: int = MAX_IMAGE_PIXELS) -> PreparedRecord:
    """Check a record fully and read its images; RecordError names the record and the problem."""
    if isinstance(record, RecordError):
        raise record
    try:
        conversation = normalize_record(record, index=None)
    except AlignError as e:
        raise RecordError(_rename(str(e), name)) from None
    except Exception as e:  # noqa: BLE001 - whatever the validator trips on, it is this record's fault
        raise RecordError(f"{name}: invalid record ({type(e).__name__}: {e})") from None
    conversation.name = name
    for t, turn in enumerate(conversation.turns):
        try:
            turn.text.encode("utf-8")
        except UnicodeEncodeError:
            raise RecordError(f"{name}, turn {t}: the text is not valid Unicode (a lone surrogate)") from None
    extra = {k: v for k, v in record.items() if k not in RECORD_KEYS}
    try:
        json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise RecordError(f"{name}: extra fields cannot be stored as JSON ({e})") from None
    images = [_read_image(image, k, name, Path(base_dir), max_image_bytes, max_image_pixels)
              for k, image in enumerate(conversation.images)]
    return PreparedRecord(conversation, images, extra)


def _rename(message: str, name: str) -> str:
    return name + message[len("record"):] if message.startswith("record") else f"{name}: {message}"


def _read_image(image, k: int, name: str, base_dir: Path, max_bytes: int, max_pixels: int) -> tuple[bytes, str]:
    from PIL import Image

    if not isinstance(image, str) or not image.strip():
        raise RecordError(f"{name}: image {k} must be a file path, got {image!r}")
    path = base_dir / image
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise RecordError(f"{name}: image {k} is not a file: {path}")
        if size > max_bytes:
            raise RecordError(f"{name}: image {k} is too large ({size} bytes, at most {max_bytes}): {path}")
        data = path.read_bytes()
    except FileNotFoundError:
        raise RecordError(f"{name}: image {k} not found: {path}") from None
    except OSError as e:
        raise RecordError(f"{name}: image {k} cannot be read ({e.strerror or e}): {path}") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            fmt = im.format
            if width * height > max_pixels:
                raise RecordError(f"{name}: image {k} is too large ({width}x{height} pixels, at most "
                                  f"{max_pixels}): {path}")
            im.verify()
    except RecordError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types for files that are not images
        raise RecordError(f"{name}: image {k} cannot be read as an image ({path}): {e}") from None
    if fmt not in IMAGE_FORMATS:
        raise RecordError(f"{name}: image {k} has an unsupported format {fmt}: {path}")
    return data, IMAGE_FORMATS[fmt]


def save_image(image_dir: Path, data: bytes, ext: str, *, written: list | None = None) -> tuple[str, str]:
    """Store image bytes content-addressed (written whole, then renamed into place). New files
    are fsynced here, or, when a `written` list is given, collected there for `make_durable`."""
    sha = hashlib.sha256(data).hexdigest()
    relative = f"{sha[:2]}/{sha}.{ext}"
    target = image_dir / relative
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            if written is None:
                out.flush()
                os.fsync(out.fileno())
        os.replace(tmp, target)
        if written is not None:
            written.append(target)
    return sha, relative


def make_durable(paths) -> None:
    """Flush newly written files to disk before the database commits rows that name them: one
    syncfs(2) of their file system on Linux (much cheaper than an fsync per image), else fsyncs."""
    paths = list(paths)
    if not paths:
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(paths[0].parent, os.O_RDONLY)
        try:
            if libc.syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        pass
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --- import ----------------------------------------------------------------------------------

def import_records(store: Store, dataset: str, records, *, base_dir=".", progress=None, batch_size: int = 256,
                   author: str = "import", source: str | None = None, **limits) -> ImportReport:
    """Store every valid record of `records` ((name, record) pairs) in `dataset`; the report lists
    the invalid ones. `progress(done, total)` is called as it goes."""
    records = list(records)
    report = ImportReport(dataset)
    for start in range(0, len(records), batch_size):
        prepared = []
        for name, record in records[start:start + batch_size]:
            try:
                prepared.append((name, prepare_record(record, name=name, base_dir=base_dir, **limits)))
            except RecordError as e:
                report.errors.append(str(e))
        written: list[Path] = []
        with store.batch(dataset) as add:
            for name, item in prepared:
                images = [save_image(store.image_dir, data, ext, written=written) for data, ext in item.images]
                try:
                    cid = add(item.conversation, images=images, extra=item.extra, author=author,
                              source=f"{source} {name}" if source else name)
                except (StoreError, ValueError, sqlite3.Error) as e:
                    report.errors.append(f"{name}: {e}")
                    continue
                report.stored += 1
                report.conversation_ids.append(cid)
            make_durable(written)  # the images are on disk before the rows naming them commit
        if progress:
            progress(min(start + batch_size, len(records)), len(records))
    return report


def import_file(store: Store, path, *, dataset: str | None = None, progress=None, author: str = "import",
                **limits) -> ImportReport:
    path = Path(path)
    records = read_records(path)
    return import_records(store, dataset or path.stem, records, base_dir=path.parent, progress=progress,
                          author=author, source=path.name, **limits)


# --- export ----------------------------------------------------------------------------------

def conversation_record(conv, image_paths: list[str], *, style: str = "sharegpt") -> dict:
    """A stored conversation as a ShareGPT record keeping `semantic_type` and `spans`; style
    'openai' writes role/content messages instead of from/value conversations."""
    turns = []
    for turn in conv.turns:
        if style == "openai":
            item = {"role": turn.speaker, "content": turn.text}
        else:
            item = {"from": FROM_NAMES[turn.speaker], "value": turn.text}
        item["semantic_type"] = sharegpt_name(turn.role)
        if turn.spans:
            item["spans"] = [{"start": s.start, "end": s.end, "role": sharegpt_name(s.role)} for s in turn.spans]
        turns.append(item)
    record = {**conv.extra, ("messages" if style == "openai" else "conversations"): turns}
    if image_paths:
        record["images"] = image_paths
    return record


def _file_stem(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "dataset"


def _copy_images(conv, out_dir: Path) -> list[str]:
    paths = []
    for image in conv.images:
        target = out_dir / "images" / image.name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(image.read_bytes())
        paths.append(f"images/{image.name}")
    return paths


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def _add_dataset_info(out_dir: Path, name: str, entry: dict) -> Path:
    info_path = out_dir / "dataset_info.json"
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.exists() else {}
    info[name] = entry
    _write_json(info_path, info)
    return info_path


@dataclass
class ExportReport:
    files: list[Path]
    exported: int
    errors: list[str] = field(default_factory=list)


def export_dataset(store: Store, name: str, fmt: str, out_dir, *, model=None, progress=None) -> ExportReport:
    """Write dataset `name` to `out_dir` as `fmt` (sharegpt / llamafactory / semantic-ids)."""
    if fmt not in FORMATS:
        raise StoreError(f"unknown export format {fmt!r}: expected one of {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = store.conversation_ids(name)
    stem = _file_stem(name)
    if fmt == "semantic-ids":
        return _export_semantic_ids(store, ids, out_dir / f"{stem}.semantic_ids.jsonl", model, progress)
    style = "openai" if fmt == "llamafactory" else "sharegpt"
    records = []
    for k, cid in enumerate(ids):
        conv = store.conversation(cid)
        records.append(conversation_record(conv, _copy_images(conv, out_dir), style=style))
        if progress and (k % 200 == 0 or k == len(ids) - 1):
            progress(k + 1, len(ids))
    data_path = out_dir / f"{stem}.json"
    _write_json(data_path, records)
    if style == "openai":
        entry = {"file_name": data_path.name, "formatting": "sharegpt",
                 "columns": {"messages": "messages", "images": "images"},
                 "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                          "assistant_tag": "assistant", "system_tag": "system"}}
    else:
        entry = {"file_name": data_path.name, "formatting": "sharegpt",
                 "columns": {"messages": "conversations", "images": "images"},
                 "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                          "assistant_tag": "gpt", "system_tag": "system"}}
    return ExportReport([data_path, _add_dataset_info(out_dir, name, entry)], len(records))


def load_tokenizer(model):
    """The processor (for VLMs) or tokenizer saved at `model` (a local directory; nothing is downloaded)."""
    from models.vlm.processor import load_processor

    path = Path(model)
    if not path.exists():
        raise StoreError(f"no model at {path}")
    try:
        return load_processor(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - a tokenizer-only directory has no processor config
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception:  # noqa: BLE001
            raise StoreError(f"cannot load a tokenizer from {path}: {e}") from None


def _export_semantic_ids(store: Store, ids, path: Path, model, progress) -> ExportReport:
    if model is None:
        raise StoreError("the semantic-ids export needs a model (its tokenizer decides the tokens)")
    processor = model if hasattr(model, "apply_chat_template") else load_tokenizer(model)
    errors, exported = [], 0
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        for k, cid in enumerate(ids):
            conv = store.conversation(cid)
            try:
                aligned = align_record(conv.as_conversation(), processor)
            except AlignError as e:
                errors.append(str(e))
                continue
            out.write(json.dumps({"conversation_id": cid, "position": conv.position,
                                  "input_ids": aligned.input_ids.tolist(),
                                  "semantic_ids": aligned.semantic_ids.tolist(),
                                  "labels": aligned.labels.tolist()}) + "\n")
            exported += 1
            if progress and (k % 50 == 0 or k == len(ids) - 1):
                progress(k + 1, len(ids))
    os.replace(tmp, path)
    return ExportReport([path], exported, errors)
