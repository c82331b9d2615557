"""Reading ShareGPT / LLaMA-Factory record files: the one reader of JSON and JSONL that the store's import,
training, evaluation and the attention command share. Only regular files are read (a FIFO or device is
refused unread); in JSONL only "\n" ends a record; a malformed record is named with its line."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path


class RecordError(ValueError):
    """One record that cannot be stored; the message names the record and the problem."""


class FileError(ValueError):
    """A whole input file that cannot be read (missing, not UTF-8, malformed JSON)."""


def read_records(path, *, display: str | None = None) -> list[tuple[str, object]]:
    """(name, record) pairs of a JSON list (or one JSON object) or a JSONL file. In JSONL a
    malformed line becomes a RecordError in place of its record; in JSON the whole file fails.
    Messages name the file as `display` (what the person called it; default: the path)."""
    path = Path(path)
    shown = display or str(path)
    try:
        text = read_regular_file(path).decode("utf-8-sig")
    except FileNotFoundError:
        raise FileError(f"{shown}: no such file") from None
    except IsADirectoryError:
        raise FileError(f"{shown}: is a folder, not a file") from None
    except NotRegularFile as e:
        raise FileError(f"{shown}: {e}") from None
    except ValueError:  # a NUL byte in the path
        raise FileError(f"{shown}: not a valid file name") from None
    except UnicodeDecodeError as e:
        raise FileError(f"{shown}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise FileError(f"{shown}: cannot be read ({e.strerror or e})") from None
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return _read_jsonl(text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise FileError(f"{shown}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise FileError(f"{shown}: malformed JSON: nested too deeply") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise FileError(f"{shown}: expected a JSON list of records, got {type(data).__name__}")
    return [(f"record {i}", record) for i, record in enumerate(data)]


def load_records(path) -> list:
    """The records of a JSON or JSONL file as a plain list (for training): the same reader as
    import, but the first malformed line (or record with two lists of turns) fails the whole file
    (FileError names file and line)."""
    records = []
    for name, record in read_records(path):
        try:
            if isinstance(record, RecordError):
                raise record
            check_one_turn_list(record, name)
        except RecordError as e:
            raise FileError(f"{path}: {e}") from None
        records.append(record)
    return records


class NotRegularFile(OSError):
    """A FIFO, device or socket where a file was expected."""


def read_regular_file(path, max_bytes: int | None = None) -> bytes:
    """The bytes of the regular file at `path`. Anything else is refused without being read: a FIFO
    would block the reader until someone writes to it, a device may never end. Opened without
    blocking, then checked on the open file (no window for a swap). OSError (FileNotFoundError,
    IsADirectoryError, NotRegularFile) or ValueError (a NUL byte in the path) otherwise; with
    `max_bytes`, a larger file raises FileTooLarge."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as file:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(f"{path} is a folder")
        if not stat.S_ISREG(mode):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) \
                else "a socket" if stat.S_ISSOCK(mode) else "a special file"
            raise NotRegularFile(f"not a regular file ({kind}): refused")
        if max_bytes is None:
            return file.read()
        data = file.read(max_bytes + 1)  # the file may have grown since it was measured
        if len(data) > max_bytes:
            raise FileTooLarge(max(len(data), os.fstat(fd).st_size))
        return data


class FileTooLarge(OSError):
    def __init__(self, size: int):
        super().__init__(f"{size} bytes")
        self.size = size


def check_one_turn_list(record, name: str) -> None:
    """A record holds its turns under 'conversations' or 'messages', never both: one list would be
    silently dropped."""
    if isinstance(record, dict) and "conversations" in record and "messages" in record:
        raise RecordError(f"{name}: has both 'conversations' and 'messages'; give one")


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
