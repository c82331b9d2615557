"""Import and export: ShareGPT JSON / JSONL in, ShareGPT, LLaMA-Factory or per-token semantic ids out.

A record is checked completely (structure and roles by `models.data.align.normalize_record`, then its
images: present, regular files, readable, not too big) before anything of it is written, and it is
written in one savepoint, so an invalid record leaves nothing behind while the valid ones around it are
stored. A record already in the dataset (same content key: a file imported again after a crash) is
skipped and reported.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from models.hsa import parse_role, sharegpt_name
from models.data.align import AlignError, Conversation, align_record, normalize_record
from models.data.records import (FileError, FileTooLarge, NotRegularFile, RecordError, check_one_turn_list,
                                 read_records, read_regular_file)
from models.data.records import load_records  # noqa: F401  (also the store's: workbench.store.load_records)
from workbench.pairs import PAIR_KEYS, is_pair, split_pair

from . import labels as L
from .db import Batch, Store, StoreBusyError, StoreError, content_key

MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000
RECORD_KEYS = {"conversations", "messages", "system", "images", "labelled"}
FROM_NAMES = {"system": "system", "user": "human", "assistant": "gpt"}
IMAGE_FORMATS = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff"}
FORMATS = ("sharegpt", "llamafactory", "semantic-ids")
INTERNAL_ERROR = "could not be checked (an error in the importer, please report it)"




@dataclass
class PreparedRecord:
    conversation: Conversation
    images: list[tuple[bytes, str]]  # content and file extension, already verified
    extra: dict
    labelled: bool = False  # the record already carries labels (roles or spans), or says so


@dataclass
class ImportReport:
    dataset: str
    stored: int = 0
    errors: list[str] = field(default_factory=list)  # invalid records, each named
    conversation_ids: list[int] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # records already in the dataset, each named
    cleaned: int = 0  # files removed that an interrupted import had left

    @property
    def total(self) -> int:
        return self.stored + len(self.errors) + len(self.skipped)


# --- checking one record ---------------------------------------------------------------------

def prepare_record(record, *, name: str = "record", base_dir=".", confine_to=None,
                   max_image_bytes: int = MAX_IMAGE_BYTES, max_image_pixels: int = MAX_IMAGE_PIXELS) -> PreparedRecord:
    """Check a record fully and read its images; RecordError names the record and the problem.

    Images are paths relative to `base_dir`. With `confine_to` (a folder: what a person uploaded)
    an image must be a relative path that stays inside it, through no symbolic link; an image not
    found at its path is looked up by file name among the uploaded files (when exactly one has it)."""
    if isinstance(record, RecordError):
        raise record
    check_one_turn_list(record, name)
    try:
        conversation = normalize_record(record, index=None)
    except AlignError as e:
        raise RecordError(_rename(str(e), name)) from None
    except Exception as e:  # noqa: BLE001 - whatever the validator trips on, it is this record's fault
        raise RecordError(f"{name}: invalid record ({type(e).__name__}: {e})") from None
    conversation.name = name
    if is_pair(record):  # a preference pair: its chosen and rejected answers are kept as extra fields
        try:
            split_pair(record)
        except AlignError as e:
            raise RecordError(_rename(str(e), name)) from None
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
    images = []
    for k, image in enumerate(conversation.images):
        path = _image_path(image, k, name, Path(base_dir), confine_to)
        images.append(_read_image(path, f"{name}: image {k} ({image!r})", max_image_bytes, max_image_pixels))
    return PreparedRecord(conversation, images, extra, _is_labelled(record))


def _is_labelled(record: dict) -> bool:
    """Labelled already: the record says so (`"labelled": true/false`, as exports write), or else
    one of its turns carries a role (`semantic_type`) or spans."""
    if isinstance(record.get("labelled"), bool):
        return record["labelled"]
    turns = record.get("conversations", record.get("messages")) or []
    return any(isinstance(t, dict) and (t.get("semantic_type") is not None or t.get("spans")) for t in turns)


def _rename(message: str, name: str) -> str:
    return name + message[len("record"):] if message.startswith("record") else f"{name}: {message}"


def _image_path(image, k: int, name: str, base_dir: Path, confine_to) -> Path:
    where = f"{name}: image {k}"
    if not isinstance(image, str) or not image.strip():
        raise RecordError(f"{where} must be a file path, got {image!r}")
    if "\x00" in image:
        raise RecordError(f"{where} ({image!r}): a file path cannot hold a NUL byte")
    if confine_to is None:
        return base_dir / image
    root = Path(confine_to).resolve()
    name_only = Path(image.replace("\\", "/")).name
    return image_in_upload(image, where, root.rglob(glob.escape(name_only) or "*"), at=base_dir, root=root)


def image_in_upload(image, where: str, uploaded, *, at=None, root=None,
                    how: str = "add it to the upload (several files at once, or one .zip with the records and images)",
                    same_name: str = "upload a .zip that keeps the folders") -> Path:
    """The file an image a record names is, when images come from what a person uploaded only (issue 19.3):
    the one rule of Annotate's import and the Masks and Attention tabs. The name must be a relative path
    without '..' (else it is refused by its shape, whatever exists on the disk); it is the file at that path
    under `at` (the record file's folder in an unpacked upload) if there is one, else the one file among
    `uploaded` (the upload's files, an iterable read only then; links and folders skipped) with its file
    name, as a browser sends files without their folders. Under `root` (the unpacked upload) no link is
    followed. `how` says how to add an image, `same_name` what to do when several have its name.
    RecordError (a ValueError) starts with `where`."""
    if not isinstance(image, str) or not image.strip():
        raise RecordError(f"{where} must be a file path, got {image!r}")
    if "\x00" in image:
        raise RecordError(f"{where} ({image!r}): a file path cannot hold a NUL byte")
    relative = Path(image.replace("\\", "/"))
    if relative.is_absolute() or relative.drive or ".." in relative.parts:
        raise RecordError(f"{where} ({image!r}): only paths inside the upload are allowed (no absolute "
                          f"paths, no '..'); {how}")
    try:
        path = Path(at) / relative if at is not None else None
        if path is None or not (path.is_file() or path.is_symlink()):
            found = [Path(p) for p in uploaded if Path(p).name == relative.name and Path(p).is_file()
                     and not Path(p).is_symlink()] if relative.name else []
            if len(found) > 1:
                raise RecordError(f"{where} ({image!r}): {len(found)} uploaded images are called {relative.name!r} "
                                  f"and none is at that path; {same_name}")
            if not found:
                raise RecordError(f"{where} ({image!r}) is not in the upload: {how}")
            path = found[0]
        resolved = path.resolve()
    except OSError as e:  # a name longer than the file system allows, a link loop, ...: never a server path
        raise RecordError(f"{where} ({image!r}) cannot be looked up ({e.strerror or type(e).__name__})") from None
    if root is not None and (path.is_symlink() or not resolved.is_relative_to(Path(root).resolve())):
        raise RecordError(f"{where} ({image!r}) is a link leaving the upload: refused")
    return resolved


def _read_image(path: Path, where: str, max_bytes: int, max_pixels: int) -> tuple[bytes, str]:
    """The bytes and extension of the image at `path`; errors start with `where` (the record and the
    image as the record writes it), never with a server path."""
    from PIL import Image

    try:
        data = read_regular_file(path, max_bytes)
    except FileNotFoundError:
        raise RecordError(f"{where} not found") from None
    except IsADirectoryError:
        raise RecordError(f"{where} is a folder, not an image file") from None
    except FileTooLarge as e:
        raise RecordError(f"{where} is too large ({e.size} bytes, at most {max_bytes})") from None
    except NotRegularFile as e:
        raise RecordError(f"{where} is {e}") from None
    except ValueError:
        raise RecordError(f"{where}: a file path cannot hold a NUL byte") from None
    except OSError as e:
        raise RecordError(f"{where} cannot be read ({e.strerror or type(e).__name__})") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            width, height = im.size
            fmt = im.format
            if width * height > max_pixels:
                raise RecordError(f"{where} is too large ({width}x{height} pixels, at most {max_pixels})")
            im.verify()
    except RecordError:
        raise
    except Image.UnidentifiedImageError:
        raise RecordError(f"{where} is not an image (expected PNG, JPEG, GIF, WebP, BMP or TIFF)") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for damaged files
        raise RecordError(f"{where} is damaged or truncated ({type(e).__name__})") from None
    if fmt not in IMAGE_FORMATS:
        raise RecordError(f"{where} has an unsupported format {fmt} (expected PNG, JPEG, GIF, WebP, BMP or TIFF)")
    return data, IMAGE_FORMATS[fmt]


def save_image(image_dir: Path, data: bytes, ext: str, *, written: list | None = None,
               batch: Batch | None = None) -> tuple[str, str]:
    """Store image bytes content-addressed (written whole, then renamed into place). New files
    are fsynced here, or, when a `written` list is given, collected there for `make_durable`. Inside
    an import batch, new files are journaled first, so that a killed import leaves nothing behind."""
    sha = hashlib.sha256(data).hexdigest()
    relative = f"{sha[:2]}/{sha}.{ext}"
    target = image_dir / relative
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        if batch is not None:
            tmp = batch.new_image(relative)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600)
        else:
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
                   author: str = "import", source: str | None = None, confine_to=None, **limits) -> ImportReport:
    """Store every valid record of `records` ((name, record) pairs) in `dataset`; the report lists
    the invalid ones and those skipped as already present. `progress(done, total)` is called as it
    goes. A new dataset is only created when at least one record is stored.

    Already present: the dataset holds as many conversations with the record's content key as this
    import has met records with it so far, not counting its own. So a file imported again (after a
    crash, or twice) adds only what is missing, and a file that repeats a record on purpose keeps
    every copy. StoreBusyError when another process holds the database for the busy timeout (the
    batches stored before stay, and a new import skips them)."""
    records = list(records)
    report = ImportReport(dataset)
    existed = any(info.name == dataset.strip() for info in store.datasets()) if isinstance(dataset, str) else False
    met: Counter = Counter()       # records of this import per content key, stored or skipped
    inserted: Counter = Counter()  # of which this import stored
    for start in range(0, len(records), batch_size):
        prepared = []
        for name, record in records[start:start + batch_size]:
            try:
                prepared.append((name, prepare_record(record, name=name, base_dir=base_dir, confine_to=confine_to,
                                                      **limits)))
            except RecordError as e:
                report.errors.append(str(e))
            except Exception as e:  # noqa: BLE001 - a bug must cost this record, not the whole import
                report.errors.append(f"{name}: {INTERNAL_ERROR} ({type(e).__name__}: {e})")
        written: list[Path] = []
        if prepared:
            stored_here: list[tuple[int, str, str]] = []  # (conversation id, record name, content key)
            with store.batch(dataset) as batch:
                report.cleaned += batch.removed
                keys = [record_key(item) for _, item in prepared]
                batch.preload(keys)
                for (name, item), key in zip(prepared, keys):
                    present = batch.positions(key)
                    if met[key] < len(present) - inserted[key]:
                        report.skipped.append(f"{name}: already in dataset {dataset.strip()!r} as conversation "
                                              f"#{present[met[key]] + 1}; skipped")
                        met[key] += 1
                        continue
                    images = [save_image(store.image_dir, data, ext, written=written, batch=batch)
                              for data, ext in item.images]
                    try:
                        cid = batch(item.conversation, images=images, extra=item.extra, author=author,
                                    labelled=item.labelled, source=f"{source} {name}" if source else name)
                    except StoreBusyError:
                        raise
                    except (StoreError, ValueError, SQLAlchemyError) as e:
                        report.errors.append(f"{name}: {_first_line(e)}")
                        continue
                    met[key] += 1
                    inserted[key] += 1
                    stored_here.append((cid, name, key))
                make_durable(written)  # the images are on disk before the rows naming them commit
            for cid, name, key in stored_here:  # the batch has ended: its records are written, or refused
                if cid in batch.failed:
                    report.errors.append(f"{name}: {batch.failed[cid]}")
                    met[key] -= 1
                    inserted[key] -= 1
                    continue
                report.stored += 1
                report.conversation_ids.append(cid)
        if progress:
            progress(min(start + batch_size, len(records)), len(records))
    if not report.stored and not existed and any(info.name == dataset.strip() for info in store.datasets()):
        store.delete_dataset(dataset.strip())  # every record failed to insert: leave no empty dataset
    return report


def _first_line(error: Exception) -> str:
    """A database error's own message, without SQLAlchemy's statement and parameters."""
    if isinstance(error, SQLAlchemyError) and getattr(error, "orig", None) is not None:
        error = error.orig
    return str(error).strip().split("\n")[0]


def record_key(item: PreparedRecord) -> str:
    """The content key the store gives this record (see workbench.store.db.content_key)."""
    turns = item.conversation.turns
    return content_key([(t.speaker, t.text) for t in turns], [(parse_role(t.role), L.canonical(t.spans)) for t in turns],
                       [hashlib.sha256(data).hexdigest() for data, _ in item.images], item.extra)


def import_file(store: Store, path, *, dataset: str | None = None, progress=None, author: str = "import",
                **limits) -> ImportReport:
    path = Path(path)
    records = read_records(path)
    return import_records(store, dataset or path.stem, records, base_dir=path.parent, progress=progress,
                          author=author, source=path.name, **limits)


# --- uploads from the browser ------------------------------------------------------------------

RECORD_SUFFIXES = (".json", ".jsonl", ".ndjson")
MAX_UPLOAD_BYTES = 4 * 1024 ** 3  # unpacked, all files together
MAX_UPLOAD_FILES = 200_000


def unpack_upload(files, folder) -> Path:
    """Copy uploaded files into `folder` (empty or new) under their own names, unpacking .zip files
    in place (no absolute paths, no '..', no links, within the size limits); returns the folder.
    `files` are (path on this machine, the name the person gave it) pairs or plain paths."""
    import shutil
    import stat
    import zipfile

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    total = count = 0
    for item in files:
        path, name = (item if isinstance(item, tuple) else (item, Path(item).name))
        name = Path(str(name).replace("\\", "/")).name or "upload"
        if name.lower().endswith(".zip"):
            try:
                archive = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as e:
                raise FileError(f"{name}: not a readable .zip ({e})") from None
            with archive:
                for entry in archive.infolist():
                    parts = Path(entry.filename.replace("\\", "/")).parts
                    if entry.is_dir() or not parts or parts[0].startswith("__MACOSX"):
                        continue
                    if entry.filename.startswith("/") or ".." in parts or ":" in parts[0]:
                        raise FileError(f"{name}: the entry {entry.filename!r} would leave the upload: refused")
                    if stat.S_ISLNK(entry.external_attr >> 16):
                        continue  # links are not followed: an image behind one is reported missing
                    total += entry.file_size
                    count += 1
                    if total > MAX_UPLOAD_BYTES or count > MAX_UPLOAD_FILES:
                        raise FileError(f"{name}: too large unpacked (at most {MAX_UPLOAD_BYTES // 1024 ** 2} MiB "
                                        f"and {MAX_UPLOAD_FILES} files)")
                    target = folder.joinpath(*parts)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        with archive.open(entry) as src, open(target, "wb") as out:
                            shutil.copyfileobj(src, out)
                    except (zipfile.BadZipFile, OSError, RuntimeError) as e:
                        raise FileError(f"{name}: {entry.filename!r} cannot be unpacked ({e})") from None
        else:
            total += Path(path).stat().st_size
            if total > MAX_UPLOAD_BYTES:
                raise FileError(f"the upload is too large (at most {MAX_UPLOAD_BYTES // 1024 ** 2} MiB)")
            shutil.copyfile(path, folder / name)
    return folder


def import_upload(store: Store, files, dataset: str | None, folder, *, author: str = "import",
                  progress=None) -> ImportReport:
    """Import what a person uploaded from the browser: record files (.json/.jsonl) and images, one by
    one or in .zip files (such as the tab's own export), unpacked into `folder`. Images are found
    inside the upload only. The dataset defaults to the name of the first record file; every error
    names the file, record and image as the person knows them. FileError: nothing could be imported."""
    files = list(files or [])
    if not files:
        raise FileError("choose a JSON or JSONL file, or a .zip of records and images")
    root = unpack_upload(files, folder)
    record_files = sorted((p for p in root.rglob("*") if p.suffix.lower() in RECORD_SUFFIXES and p.is_file()
                           and p.name != "dataset_info.json" and not p.name.startswith(".")),
                          key=lambda p: (len(p.relative_to(root).parts), str(p)))
    if not record_files:
        raise FileError("the upload has no .json or .jsonl file of records")
    several = len(record_files) > 1
    named = []
    for path in record_files:
        shown = path.relative_to(root).as_posix()
        for name, record in read_records(path, display=shown):
            if several:
                name = f"{shown} {name}"
                if isinstance(record, RecordError):
                    record = RecordError(f"{shown} {record}")
            named.append((name, record, path.parent))
    name = (dataset or "").strip() or record_files[0].stem
    report = ImportReport(name)
    # records of one file share its folder for relative image paths
    for parent in dict.fromkeys(p for _, _, p in named):
        part = import_records(store, name, [(n, r) for n, r, p in named if p == parent], base_dir=parent,
                              confine_to=root, author=author, source=record_files[0].name, progress=progress)
        report.stored += part.stored
        report.errors += part.errors
        report.conversation_ids += part.conversation_ids
        report.skipped += part.skipped
        report.cleaned += part.cleaned
    return report


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
    if style == "openai":  # a preference pair's answers in the same style as its turns
        for key in PAIR_KEYS:
            answer = record.get(key)
            if isinstance(answer, dict) and "value" in answer:
                answer = {"role": "assistant", "content": answer["value"],
                          **{k: v for k, v in answer.items() if k not in ("from", "value")}}
                record[key] = answer
    if image_paths:
        record["images"] = image_paths
    record["labelled"] = bool(conv.labelled)  # every turn carries a role; this says whether a person set them
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


def export_dataset(store: Store, name: str, fmt: str, out_dir, *, model=None, progress=None,
                   reviewed_only: bool = False) -> ExportReport:
    """Write dataset `name` to `out_dir` as `fmt` (sharegpt / llamafactory / semantic-ids); with
    `reviewed_only`, only its reviewed conversations (their main labels are the ones a reviewer accepted)."""
    if fmt not in FORMATS:
        raise StoreError(f"unknown export format {fmt!r}: expected one of {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = store.conversation_ids(name, status="reviewed" if reviewed_only else "all")
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
    ranking = bool(records) and all(is_pair(r) for r in records)  # LLaMA-Factory's preference (ranking) data
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
    if ranking:
        entry["ranking"] = True
        entry["columns"].update(chosen="chosen", rejected="rejected")
    files = [data_path, _add_dataset_info(out_dir, name, entry)]
    if style == "openai":
        notes = out_dir / LLAMAFACTORY_NOTES
        notes.write_text(LLAMAFACTORY_DIFFERENCES, encoding="utf-8")
        files.append(notes)
    return ExportReport(files, len(records))


LLAMAFACTORY_NOTES = "LLAMAFACTORY_NOTES.md"
LLAMAFACTORY_DIFFERENCES = """\
# Training this export with LLaMA-Factory: what differs from the HSA Workbench

Measured on the workbench's default VLM with the same records, batch order and LoRA (issue 24):

- **Precision.** LLaMA-Factory loads and trains a model in the dtype its `config.json` names unless
  told otherwise. The committed default model's config says `bfloat16`, so LLaMA-Factory trains it in
  bf16, on CPU too; `python -m workbench.train` trains in float32 on CPU (`dtype: auto`). For a like-for-like
  run, set the dtype in a copy of the model's `config.json` to `float32`, or train both in bf16
  (`dtype: bfloat16` in the workbench config).
- **Labelled tokens.** LLaMA-Factory's ChatML templates (qwen, qwen2_vl) also train on the newline
  after each `<|im_end|>`; the workbench labels an answer's text and its `<|im_end|>` only. On the
  default model that is 13% more labelled tokens, and a training loss of 1.69 where the workbench
  reports 0.18 on the same data: compare losses across the two with that in mind.
- **HSA.** LLaMA-Factory does not read `semantic_type` or `spans`: it trains with plain causal attention.
  The roles travel in the records so that the export loads back into the workbench unchanged.
"""


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
