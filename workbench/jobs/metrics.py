"""Reading what a run writes, incrementally: metrics.jsonl and the log file.

A browser polls every second or two; rereading whole files on every poll grows with the run's
length, so `MetricsTail` remembers its file offset and parses only the bytes appended since."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path


class MetricsTail:
    """The records of a JSON-lines file, read incrementally. A partial last line (the writer is
    mid-write) is left for the next read; a file that shrank (was recreated) is read again."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: list[dict] = []
        self.offset = 0
        self._lock = threading.Lock()

    def read_new(self) -> list[dict]:
        """Parse what was appended since the last call; returns the new records."""
        with self._lock:
            try:
                size = self.path.stat().st_size
            except FileNotFoundError:
                return []
            if size < self.offset:
                self.records, self.offset = [], 0
            if size == self.offset:
                return []
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read(size - self.offset)
            end = chunk.rfind(b"\n")
            if end < 0:
                return []
            self.offset += end + 1
            new = []
            for line in chunk[: end + 1].splitlines():
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn line from a killed writer; the rest of the file is still good
                if isinstance(record, dict):
                    new.append(record)
            self.records.extend(new)
            return new

    def all(self) -> list[dict]:
        self.read_new()
        with self._lock:
            return list(self.records)


def tail_text(path: Path, max_lines: int = 200, max_bytes: int = 256_000) -> str:
    """The last lines of a text file, reading at most max_bytes from its end."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", errors="replace").replace("\r\n", "\n")
    # progress bars redraw with bare carriage returns: keep the last state of each line
    lines = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]
    if size > max_bytes:
        lines = lines[1:]  # the first line is probably cut
    if lines and lines[-1] == "":
        lines = lines[:-1]
    return "\n".join(lines[-max_lines:])


def error_summary(log_text: str, max_lines: int = 40) -> str:
    """What to show for a failed run: its last Python traceback if it has one, else the last lines."""
    lines = log_text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if starts:
        block = lines[starts[-1]:]
        if len(block) > max_lines:
            block = block[:5] + ["..."] + block[-(max_lines - 6):]
        return "\n".join(block)
    return "\n".join(lines[-max_lines:])
