"""The annotation store: SQLite in WAL mode, one transaction per edit.

Tables: datasets; conversations (a version number for optimistic concurrency, a `labelled` flag);
turns (speaker, text, the turn's default role); spans (character offsets, Python code points, into
one turn's text, each with a role); images (content-addressed files under `image_dir`); revisions
(who, what, when, and the labels before and after: they back undo/redo).

Every edit names the version it was made against. A save against an older version is refused with
StaleVersionError and nothing changes, so two browser tabs cannot silently overwrite each other.

Each conversation keeps the content key of what was imported (turns, import-time labels, images,
extra fields), so importing a file again after a crash skips the records already stored. Opening the
store only reads (the write lock is taken to create or migrate the schema, `PRAGMA user_version`);
a write that waits out the busy timeout is StoreBusyError, a clear "try again".
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from models.hsa import parse_role, role_name
from models.data.align import Conversation, Span, Turn
from workbench.sqlite import DatabaseBusy, write_transaction

from . import labels as L

SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY,
    dataset_id INTEGER NOT NULL REFERENCES datasets(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    source TEXT,
    extra TEXT NOT NULL DEFAULT '{}',
    search_text TEXT NOT NULL DEFAULT '',
    version INTEGER NOT NULL DEFAULT 1,
    labelled INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    updated_by TEXT NOT NULL DEFAULT '',
    content_key TEXT,  -- what was imported (see content_key), unchanged by edits
    UNIQUE (dataset_id, position)
);
CREATE TABLE IF NOT EXISTS turns (
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    turn INTEGER NOT NULL,
    speaker TEXT NOT NULL CHECK (speaker IN ('system', 'user', 'assistant')),
    text TEXT NOT NULL,
    role INTEGER NOT NULL CHECK (role IN (0, 1, 2)),
    PRIMARY KEY (conversation_id, turn)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS spans (
    conversation_id INTEGER NOT NULL,
    turn INTEGER NOT NULL,
    start INTEGER NOT NULL,
    "end" INTEGER NOT NULL,
    role INTEGER NOT NULL CHECK (role IN (0, 1, 2)),
    CHECK (0 <= start AND start < "end"),
    PRIMARY KEY (conversation_id, turn, start),
    FOREIGN KEY (conversation_id, turn) REFERENCES turns(conversation_id, turn) ON DELETE CASCADE
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS images (
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    file TEXT NOT NULL,
    PRIMARY KEY (conversation_id, position)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS revisions (
    id INTEGER PRIMARY KEY,
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    version INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('import', 'edit', 'undo', 'redo')),
    -- edits only: 0 = in effect, 1 = undone (can be redone), 2 = undone and superseded
    state INTEGER NOT NULL DEFAULT 0,
    action TEXT NOT NULL,
    author TEXT NOT NULL,
    created_at REAL NOT NULL,
    before TEXT,
    after TEXT
);
CREATE INDEX IF NOT EXISTS revisions_by_conversation ON revisions (conversation_id, kind, state);
CREATE INDEX IF NOT EXISTS conversations_by_dataset ON conversations (dataset_id, position);
"""
# Version 1: conversations.content_key (older databases are keyed when first opened).
SCHEMA_VERSION = 1
KEY_INDEX = "CREATE INDEX IF NOT EXISTS conversations_by_key ON conversations (dataset_id, content_key)"
# An import batch journals the image files it creates in a marker file in image_dir (removed once it
# commits). A marker found by the next batch means an import died mid-batch: the files it lists that
# no row names, and their temporaries, are removed. One database's batches never touch other files.
IMPORT_MARKER = ".importing-"
JOURNAL_LINE = re.compile(r"[0-9a-f]{2}/[0-9a-f]{64}\.[a-z]{2,4}")  # what save_image writes: sha[:2]/sha.ext
OLD_TEMPORARY_S = 600  # a `.tmp-` file this old (by mtime) belongs to no live import


class StoreError(ValueError):
    """A request the store refuses; the message says why."""


class NotFoundError(StoreError):
    pass


class StoreBusyError(StoreError):
    """Another process held the database's write lock for the whole busy timeout."""


class StaleVersionError(StoreError):
    """A save made against an older version of a conversation; the newer version is kept."""

    def __init__(self, message: str, current_version: int):
        super().__init__(message)
        self.current_version = current_version


# Labels of a conversation: per turn, its role and its canonical spans.
Labels = list[tuple[int, list[Span]]]


def labels_to_json(labels: Labels) -> str:
    return json.dumps([[role, [[s.start, s.end, s.role] for s in spans]] for role, spans in labels])


def labels_from_json(text: str) -> Labels:
    return [(role, [Span(*s) for s in spans]) for role, spans in json.loads(text)]


def content_key(turns, labels: Labels, image_shas, extra) -> str:
    """The identity of an imported record: its turns (speaker, text), their labels as imported (role
    and canonical spans), its images' sha256 and its extra fields. `turns` are (speaker, text) pairs."""
    payload = [[[speaker, text, role, [[s.start, s.end, s.role] for s in spans]]
                for (speaker, text), (role, spans) in zip(turns, labels, strict=True)],
               list(image_shas), extra or {}]
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
                          .encode("utf-8")).hexdigest()


@dataclass
class StoredConversation:
    id: int
    dataset: str
    position: int
    version: int
    labelled: bool
    turns: list[Turn]
    images: list[Path]  # the stored files
    extra: dict = field(default_factory=dict)
    source: str | None = None
    updated_at: float = 0.0
    updated_by: str = ""

    def labels(self) -> Labels:
        return [(t.role, list(t.spans)) for t in self.turns]

    def as_conversation(self) -> Conversation:
        """The align module's view: images as absolute paths (so no image_root is needed)."""
        return Conversation([Turn(t.speaker, t.text, t.role, list(t.spans)) for t in self.turns],
                            [str(p) for p in self.images], f"conversation {self.id}")


@dataclass
class ConversationSummary:
    id: int
    position: int
    version: int
    labelled: bool
    preview: str
    updated_by: str = ""
    updated_at: float = 0.0


@dataclass
class Revision:
    id: int
    conversation_id: int
    version: int
    kind: str
    state: int
    action: str
    author: str
    created_at: float


@dataclass
class DatasetInfo:
    name: str
    total: int
    labelled: int


def _preview(turns) -> str:
    for speaker, text in turns:
        if speaker == "user":
            return " ".join(text.split())[:80]
    return " ".join(turns[0][1].split())[:80] if turns else ""


class Store:
    """The annotation database at `path` (created if missing); images live under `image_dir`
    (default: an `images` folder beside the database)."""

    def __init__(self, path, *, image_dir=None, synchronous: str = "FULL", busy_timeout_s: float = 30.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.image_dir = Path(image_dir) if image_dir else self.path.parent / "images"
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be OFF/NORMAL/FULL/EXTRA, got {synchronous!r}")
        self.synchronous = synchronous.upper()
        self.busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        try:
            if self._db().execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                with self._write() as db:  # a new or older database: create or migrate, once
                    self._migrate(db)
        except sqlite3.DatabaseError as e:
            self.close()
            if isinstance(e, sqlite3.OperationalError) and "not a database" not in str(e):
                raise StoreError(f"cannot open the annotation database {self.path.name}: {e}") from None
            raise StoreError(f"{self.path.name} is not an annotation database ({e})") from None
        except BaseException:  # busy while creating the tables, interrupted: no connection left open
            self.close()
            raise

    # --- connections and transactions ---------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        """One connection per thread (Gradio runs handlers on worker threads)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self.synchronous}")
            db.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
            with self._lock:
                self._all.append(db)
        return db

    @contextmanager
    def _write(self, db=None):
        """A write transaction: BEGIN IMMEDIATE takes the write lock up front, so a read-check-write
        sequence inside it cannot interleave with another writer. StoreBusyError after the busy timeout."""
        try:
            with write_transaction(db or self._db()) as db:
                yield db
        except DatabaseBusy:
            raise StoreBusyError(f"the annotation database {self.path.name} is busy: another process held its "
                                 f"write lock for {self.busy_timeout_s:g} s; try again") from None

    def _migrate(self, db) -> None:
        """Create the tables, or bring an older database to SCHEMA_VERSION (inside a write transaction)."""
        if db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
            return  # another process got there first
        for statement in SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        if "content_key" not in {row[1] for row in db.execute("PRAGMA table_info(conversations)")}:
            db.execute("ALTER TABLE conversations ADD COLUMN content_key TEXT")
        self._key_unkeyed(db)
        db.execute(KEY_INDEX)
        self._remove_old_temporaries()  # what interrupted imports of older versions left
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _key_unkeyed(self, db, chunk: int = 500) -> None:
        """Content keys for conversations stored before keys existed: their labels as imported (the
        import revision), or their current ones when it is missing."""
        ids = [cid for (cid,) in db.execute("SELECT id FROM conversations WHERE content_key IS NULL ORDER BY id")]
        for start in range(0, len(ids), chunk):
            part = ids[start:start + chunk]
            marks = ",".join("?" * len(part))
            turns: dict[int, list] = {cid: [] for cid in part}
            for cid, speaker, text, role in db.execute(
                    f"SELECT conversation_id, speaker, text, role FROM turns WHERE conversation_id IN ({marks}) "
                    "ORDER BY conversation_id, turn", part):
                turns[cid].append((speaker, text, role))
            spans: dict[tuple, list] = {}
            for cid, turn, start_, end, role in db.execute(
                    f'SELECT conversation_id, turn, start, "end", role FROM spans WHERE conversation_id IN ({marks}) '
                    "ORDER BY conversation_id, turn, start", part):
                spans.setdefault((cid, turn), []).append(Span(start_, end, role))
            imported = dict(db.execute(
                f"SELECT conversation_id, after FROM revisions WHERE kind = 'import' AND conversation_id IN ({marks}) "
                "ORDER BY id DESC", part).fetchall())
            shas: dict[int, list] = {cid: [] for cid in part}
            for cid, sha in db.execute(f"SELECT conversation_id, sha256 FROM images WHERE conversation_id IN ({marks}) "
                                       "ORDER BY conversation_id, position", part):
                shas[cid].append(sha)
            extras = dict(db.execute(f"SELECT id, extra FROM conversations WHERE id IN ({marks})", part).fetchall())
            keys = []
            for cid in part:
                labels = labels_from_json(imported[cid]) if imported.get(cid) else None
                if labels is None or len(labels) != len(turns[cid]):
                    labels = [(role, spans.get((cid, i), [])) for i, (_, _, role) in enumerate(turns[cid])]
                keys.append((content_key([(sp, text) for sp, text, _ in turns[cid]], labels, shas[cid],
                                         json.loads(extras[cid])), cid))
            db.executemany("UPDATE conversations SET content_key = ? WHERE id = ?", keys)

    def _remove_old_temporaries(self) -> int:
        """Delete `.tmp-` files older than OLD_TEMPORARY_S in image_dir (older versions named them at
        random, journaling nothing): no live import keeps one that long."""
        removed = 0
        if self.image_dir.is_dir():
            for path in self.image_dir.glob("[0-9a-f][0-9a-f]/.tmp-*"):
                try:
                    if path.is_file() and not path.is_symlink() and time.time() - path.stat().st_mtime > OLD_TEMPORARY_S:
                        path.unlink()
                        removed += 1
                except OSError:
                    pass
        return removed

    @property
    def _marker_prefix(self) -> str:
        """Markers name their database: a folder of images shared by two databases is cleaned by neither
        for the other."""
        return f"{IMPORT_MARKER}{hashlib.sha256(str(self.path.resolve()).encode()).hexdigest()[:12]}-"

    def _clean_after_interrupted_batches(self, db) -> int:
        """Under the write lock (no batch of this database is running): remove what dead batches
        journaled and no row names. Returns how many files were removed."""
        markers = list(self.image_dir.glob(self._marker_prefix + "*")) if self.image_dir.is_dir() else []
        if not markers:
            return 0
        named = {file for (file,) in db.execute("SELECT DISTINCT file FROM images")}
        removed = 0
        for marker in markers:
            batch_id = marker.name[len(self._marker_prefix):]
            try:
                lines = marker.read_text(encoding="ascii", errors="replace").split("\n")
            except OSError:
                lines = []
            for line in lines:
                if not JOURNAL_LINE.fullmatch(line):
                    continue  # a line cut short by the kill (or not ours): nothing to remove
                folder, name = line.split("/")
                stray = [self.image_dir / folder / f".tmp-{batch_id}-{name}"]
                if line not in named:
                    stray.append(self.image_dir / line)
                for path in stray:
                    if path.is_file() and not path.is_symlink():
                        path.unlink()
                        removed += 1
            marker.unlink(missing_ok=True)
        return removed

    def close(self) -> None:
        with self._lock:
            for db in self._all:
                db.close()
            self._all.clear()
        self._local = threading.local()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- datasets ----------------------------------------------------------------------------

    def create_dataset(self, name: str) -> int:
        """The id of dataset `name`, created if new."""
        name = _dataset_name(name)
        with self._write() as db:
            return self._dataset_id(db, name, create=True)

    def _dataset_id(self, db, name: str, create: bool = False) -> int:
        row = db.execute("SELECT id FROM datasets WHERE name = ?", (name,)).fetchone()
        if row:
            return row[0]
        if not create:
            raise NotFoundError(f"no dataset named {name!r}")
        return db.execute("INSERT INTO datasets (name, created_at) VALUES (?, ?)", (name, time.time())).lastrowid

    def datasets(self) -> list[DatasetInfo]:
        rows = self._db().execute(
            "SELECT d.name, COUNT(c.id), COALESCE(SUM(c.labelled), 0) FROM datasets d "
            "LEFT JOIN conversations c ON c.dataset_id = d.id GROUP BY d.id ORDER BY d.name").fetchall()
        return [DatasetInfo(*row) for row in rows]

    def dataset(self, name: str) -> DatasetInfo:
        for info in self.datasets():
            if info.name == name:
                return info
        raise NotFoundError(f"no dataset named {name!r}")

    def delete_dataset(self, name: str) -> None:
        """Delete a dataset with its conversations and their history (image files stay: they are
        shared by content)."""
        with self._write() as db:
            dataset_id = self._dataset_id(db, name)
            db.execute("DELETE FROM datasets WHERE id = ?", (dataset_id,))

    def rename_dataset(self, name: str, new_name: str) -> str:
        """Give dataset `name` the name `new_name` (refused when another dataset has it)."""
        new_name = _dataset_name(new_name)
        with self._write() as db:
            dataset_id = self._dataset_id(db, name)
            if new_name == name:
                return new_name
            if db.execute("SELECT 1 FROM datasets WHERE name = ?", (new_name,)).fetchone():
                raise StoreError(f"a dataset named {new_name!r} exists already")
            db.execute("UPDATE datasets SET name = ? WHERE id = ?", (new_name, dataset_id))
        return new_name

    # --- adding conversations ----------------------------------------------------------------

    def add_conversation(self, dataset: str, conversation: Conversation, *, images=(), extra=None,
                         source: str | None = None, labelled: bool | None = None, author: str = "import") -> int:
        """Store one validated conversation in its own transaction; `images` are (sha256, file)
        pairs already in `image_dir` (see workbench.store.io)."""
        with self._write() as db:
            return self._insert(db, self._dataset_id(db, _dataset_name(dataset), create=True), conversation,
                                images, extra, source, labelled, author)

    @contextmanager
    def batch(self, dataset: str):
        """Many inserts in one transaction (for imports); yields a Batch: `batch(conversation, ...)`
        adds one (in a savepoint, so a record that fails to insert leaves nothing behind),
        `batch.positions(key)` finds conversations of the dataset with a content key, and
        `batch.new_image(relative)` journals an image file about to be written (see save_image in
        workbench.store.io). Starting, it removes what batches killed before their commit left
        (`batch.removed` counts the files)."""
        with self._write() as db:
            removed = self._clean_after_interrupted_batches(db)
            self.image_dir.mkdir(parents=True, exist_ok=True)
            batch_id = uuid.uuid4().hex
            marker = self.image_dir / f"{self._marker_prefix}{batch_id}"
            with open(marker, "a", encoding="ascii") as journal:
                yield Batch(self, db, self._dataset_id(db, _dataset_name(dataset), create=True), removed,
                            batch_id, journal)
        marker.unlink(missing_ok=True)  # committed (after an error it stays: its files go next time)

    def _insert(self, db, dataset_id, conversation: Conversation, images, extra, source, labelled, author) -> int:
        now = time.time()
        position = db.execute("SELECT COALESCE(MAX(position), -1) + 1 FROM conversations WHERE dataset_id = ?",
                              (dataset_id,)).fetchone()[0]
        turns = [(t.speaker, t.text) for t in conversation.turns]
        search = "\n".join(text for _, text in turns).casefold()
        spans = [L.canonical(t.spans) for t in conversation.turns]
        if labelled is None:
            labelled = any(spans)
        key = content_key(turns, [(parse_role(t.role), s) for t, s in zip(conversation.turns, spans)],
                          [sha for sha, _ in images], extra)
        cid = db.execute(
            "INSERT INTO conversations (dataset_id, position, source, extra, search_text, version, labelled, "
            "created_at, updated_at, updated_by, content_key) VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?)",
            (dataset_id, position, source, json.dumps(extra or {}, ensure_ascii=False), search, int(labelled),
             now, now, author, key)).lastrowid
        db.executemany("INSERT INTO turns (conversation_id, turn, speaker, text, role) VALUES (?, ?, ?, ?, ?)",
                       [(cid, i, t.speaker, t.text, parse_role(t.role)) for i, t in enumerate(conversation.turns)])
        db.executemany('INSERT INTO spans (conversation_id, turn, start, "end", role) VALUES (?, ?, ?, ?, ?)',
                       [(cid, i, s.start, s.end, s.role) for i, ss in enumerate(spans) for s in ss])
        db.executemany("INSERT INTO images (conversation_id, position, sha256, file) VALUES (?, ?, ?, ?)",
                       [(cid, k, sha, str(file)) for k, (sha, file) in enumerate(images)])
        after = [(parse_role(t.role), s) for t, s in zip(conversation.turns, spans)]
        db.execute("INSERT INTO revisions (conversation_id, version, kind, action, author, created_at, after) "
                   "VALUES (?, 1, 'import', ?, ?, ?, ?)",
                   (cid, f"imported from {source}" if source else "imported", author, now, labels_to_json(after)))
        return cid

    # --- reading -----------------------------------------------------------------------------

    def conversation(self, conversation_id: int) -> StoredConversation:
        db = self._db()
        # One read transaction, so the turns, spans and version all come from the same commit.
        db.execute("BEGIN")
        try:
            return self._read(db, conversation_id)
        finally:
            db.execute("COMMIT")

    def _read(self, db, cid: int) -> StoredConversation:
        row = db.execute(
            "SELECT c.id, d.name, c.position, c.version, c.labelled, c.extra, c.source, c.updated_at, c.updated_by "
            "FROM conversations c JOIN datasets d ON d.id = c.dataset_id WHERE c.id = ?", (cid,)).fetchone()
        if row is None:
            raise NotFoundError(f"no conversation with id {cid}")
        spans: dict[int, list[Span]] = {}
        for turn, start, end, role in db.execute(
                'SELECT turn, start, "end", role FROM spans WHERE conversation_id = ? ORDER BY turn, start', (cid,)):
            spans.setdefault(turn, []).append(Span(start, end, role))
        turns = [Turn(speaker, text, role, spans.get(i, []))
                 for i, speaker, text, role in db.execute(
                     "SELECT turn, speaker, text, role FROM turns WHERE conversation_id = ? ORDER BY turn", (cid,))]
        images = [self.image_dir / file for (file,) in db.execute(
            "SELECT file FROM images WHERE conversation_id = ? ORDER BY position", (cid,))]
        return StoredConversation(row[0], row[1], row[2], row[3], bool(row[4]), turns, images, json.loads(row[5]),
                                  row[6], row[7], row[8])

    def conversations(self, dataset: str, *, status: str = "all", search: str = "") -> list[ConversationSummary]:
        """The conversations of a dataset in order; `status` all / labelled / unlabelled; `search`
        keeps those whose text contains it (case-insensitive)."""
        db = self._db()
        rows = self._select(db, "id, position, version, labelled, updated_by, updated_at", dataset, status, search)
        previews = self._previews(db, [r[0] for r in rows])
        return [ConversationSummary(cid, pos, ver, bool(lab), previews.get(cid, ""), by, at)
                for cid, pos, ver, lab, by, at in rows]

    def conversation_ids(self, dataset: str, *, status: str = "all", search: str = "") -> list[int]:
        """Like `conversations`, ids only (cheap enough to run on every navigation click)."""
        return [row[0] for row in self._select(self._db(), "id", dataset, status, search)]

    def _select(self, db, columns: str, dataset: str, status: str, search: str):
        if status not in ("all", "labelled", "unlabelled"):
            raise StoreError(f"status must be all, labelled or unlabelled, got {status!r}")
        query = f"SELECT {columns} FROM conversations WHERE dataset_id = ?"
        args: list = [self._dataset_id(db, dataset)]
        if status != "all":
            query += " AND labelled = ?"
            args.append(int(status == "labelled"))
        if search:
            query += " AND instr(search_text, ?) > 0"
            args.append(search.casefold())
        return db.execute(query + " ORDER BY position", args).fetchall()

    def _previews(self, db, ids) -> dict[int, str]:
        found: dict[int, list] = {}
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for cid, speaker, text in db.execute(
                    f"SELECT conversation_id, speaker, substr(text, 1, 200) FROM turns "
                    f"WHERE conversation_id IN ({marks}) ORDER BY conversation_id, turn", chunk):
                found.setdefault(cid, []).append((speaker, text))
        return {cid: _preview(turns) for cid, turns in found.items()}

    def history(self, conversation_id: int) -> list[Revision]:
        """Every change to a conversation, oldest first: who, what, when."""
        return [Revision(*row) for row in self._db().execute(
            "SELECT id, conversation_id, version, kind, state, action, author, created_at FROM revisions "
            "WHERE conversation_id = ? ORDER BY id", (conversation_id,))]

    def can_undo(self, conversation_id: int) -> bool:
        return self._undoable(self._db(), conversation_id) is not None

    def can_redo(self, conversation_id: int) -> bool:
        return self._redoable(self._db(), conversation_id) is not None

    # --- edits -------------------------------------------------------------------------------

    def set_span(self, conversation_id: int, turn: int, start: int, end: int, role, *, expected_version: int,
                 author: str = "anonymous") -> StoredConversation:
        """Give characters [start, end) of a turn's text the role `role`."""
        role = _role(role)

        def change(labels, conv):
            _check_range(conv, turn, start, end)
            turn_role, spans = labels[turn]
            labels[turn] = (turn_role, L.paint(spans, start, end, role))
            return f"turn {turn} chars {start}..{end} → {role_name(role)}"

        return self._edit(conversation_id, expected_version, author, change)

    def clear_span(self, conversation_id: int, turn: int, start: int, end: int, *, expected_version: int,
                   author: str = "anonymous") -> StoredConversation:
        """Remove span labels from characters [start, end): they take the turn's role again."""
        def change(labels, conv):
            _check_range(conv, turn, start, end)
            turn_role, spans = labels[turn]
            labels[turn] = (turn_role, L.erase(spans, start, end))
            return f"turn {turn} chars {start}..{end} cleared"

        return self._edit(conversation_id, expected_version, author, change)

    def set_turn_role(self, conversation_id: int, turn: int, role, *, expected_version: int,
                      author: str = "anonymous", keep_spans: bool = False) -> StoredConversation:
        """Set a turn's role; its spans go unless `keep_spans` (then they still override it)."""
        role = _role(role)

        def change(labels, conv):
            _check_turn(conv, turn)
            labels[turn] = (role, labels[turn][1] if keep_spans else [])
            return f"turn {turn} → {role_name(role)}"

        return self._edit(conversation_id, expected_version, author, change)

    def set_labels(self, conversation_id: int, new_labels: Labels, *, expected_version: int,
                   author: str = "anonymous", action: str = "labels replaced") -> StoredConversation:
        """Replace all labels at once (e.g. accepting suggestions)."""
        def change(labels, conv):
            if len(new_labels) != len(labels):
                raise StoreError(f"{len(new_labels)} turn labels given for {len(labels)} turns")
            for i, (role, spans) in enumerate(new_labels):
                for s in spans:
                    _check_range(conv, i, s.start, s.end)
                labels[i] = (_role(role), L.canonical(Span(s.start, s.end, _role(s.role)) for s in spans))
            return action

        return self._edit(conversation_id, expected_version, author, change)

    def mark_labelled(self, conversation_id: int, labelled: bool, *, author: str = "anonymous") -> None:
        with self._write() as db:
            db.execute("UPDATE conversations SET labelled = ? WHERE id = ?", (int(labelled), conversation_id))

    def _edit(self, cid: int, expected_version, author: str, change, kind: str = "edit") -> StoredConversation:
        with self._write() as db:
            conv = self._read(db, cid)
            if expected_version is not None and conv.version != expected_version:
                raise StaleVersionError(
                    f"conversation {cid} was changed by {conv.updated_by or 'someone'} at "
                    f"{time.strftime('%H:%M:%S', time.localtime(conv.updated_at))} (now version {conv.version}, "
                    f"this view was at version {expected_version}); your change was not saved",
                    conv.version)
            before = conv.labels()
            after = [(role, list(spans)) for role, spans in before]
            action = change(after, conv)
            if after == before:
                return conv
            self._write_labels(db, cid, before, after)
            version, now = conv.version + 1, time.time()
            db.execute("UPDATE conversations SET version = ?, labelled = 1, updated_at = ?, updated_by = ? "
                       "WHERE id = ?", (version, now, author, cid))
            if kind == "edit":  # a new edit ends what could be redone
                db.execute("UPDATE revisions SET state = 2 WHERE conversation_id = ? AND state = 1", (cid,))
            db.execute("INSERT INTO revisions (conversation_id, version, kind, action, author, created_at, before, "
                       "after) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (cid, version, kind, action, author, now, labels_to_json(before), labels_to_json(after)))
            conv.version, conv.updated_at, conv.updated_by, conv.labelled = version, now, author, True
            for turn, (role, spans) in zip(conv.turns, after):
                turn.role, turn.spans = role, spans
            return conv

    @staticmethod
    def _write_labels(db, cid: int, before: Labels, after: Labels) -> None:
        for i, (old, new) in enumerate(zip(before, after)):
            if old == new:
                continue
            if old[0] != new[0]:
                db.execute("UPDATE turns SET role = ? WHERE conversation_id = ? AND turn = ?", (new[0], cid, i))
            if old[1] != new[1]:
                db.execute("DELETE FROM spans WHERE conversation_id = ? AND turn = ?", (cid, i))
                db.executemany('INSERT INTO spans (conversation_id, turn, start, "end", role) VALUES (?, ?, ?, ?, ?)',
                               [(cid, i, s.start, s.end, s.role) for s in new[1]])

    @staticmethod
    def _undoable(db, cid):
        return db.execute("SELECT id, action, before FROM revisions WHERE conversation_id = ? AND kind = 'edit' "
                          "AND state = 0 ORDER BY id DESC LIMIT 1", (cid,)).fetchone()

    @staticmethod
    def _redoable(db, cid):
        # Undone edits form a suffix of the edit list (a new edit drops them), so the next one to
        # redo is the oldest of them: the one undone last.
        return db.execute("SELECT id, action, after FROM revisions WHERE conversation_id = ? AND kind = 'edit' "
                          "AND state = 1 ORDER BY id ASC LIMIT 1", (cid,)).fetchone()

    def undo(self, conversation_id: int, *, expected_version: int | None = None,
             author: str = "anonymous") -> StoredConversation:
        """Take back the latest edit still in effect (a new revision; history keeps both)."""
        return self._undo_redo(conversation_id, expected_version, author, undo=True)

    def redo(self, conversation_id: int, *, expected_version: int | None = None,
             author: str = "anonymous") -> StoredConversation:
        return self._undo_redo(conversation_id, expected_version, author, undo=False)

    def _undo_redo(self, cid, expected_version, author, undo: bool) -> StoredConversation:
        word = "undo" if undo else "redo"

        def change(labels, conv):
            # Runs inside _edit's transaction: finding the revision, flipping its state and
            # writing the labels commit together or not at all.
            db = self._db()
            row = (self._undoable if undo else self._redoable)(db, cid)
            if row is None:
                raise StoreError(f"nothing to {word} in conversation {cid}")
            db.execute("UPDATE revisions SET state = ? WHERE id = ?", (1 if undo else 0, row[0]))
            labels[:] = labels_from_json(row[2])
            return f"{word}: {row[1]}"

        return self._edit(cid, expected_version, author, change, kind=word)


class Batch:
    """Inserts into one dataset inside one write transaction (see Store.batch)."""

    def __init__(self, store: Store, db, dataset_id: int, removed: int, batch_id: str, journal):
        self.store, self.db, self.dataset_id, self.removed = store, db, dataset_id, removed
        self.id, self._journal = batch_id, journal

    def new_image(self, relative: str) -> Path:
        """Journal the image file `relative` (sha[:2]/sha.ext under image_dir) before it is written;
        returns the temporary path to write it to (then rename it into place)."""
        self._journal.write(relative + "\n")
        self._journal.flush()  # the page cache outlives a killed process; no fsync needed for that
        folder, name = relative.split("/")
        return self.store.image_dir / folder / f".tmp-{self.id}-{name}"

    def __call__(self, conversation, *, images=(), extra=None, source=None, labelled=None, author="import") -> int:
        db = self.db
        db.execute("SAVEPOINT record")
        try:
            cid = self.store._insert(db, self.dataset_id, conversation, images, extra, source, labelled, author)
        except BaseException:
            db.execute("ROLLBACK TO record")
            db.execute("RELEASE record")
            raise
        db.execute("RELEASE record")
        return cid

    def positions(self, key: str) -> list[int]:
        """Positions of the dataset's conversations imported with content key `key`, in order."""
        # sorted here: an ORDER BY position lets SQLite walk the dataset's position index instead of the
        # key index, a scan of the whole dataset per record (10,000 records: import 14 s, re-import 25 s; now 1.6 s and 0.5 s)
        return sorted(p for (p,) in self.db.execute(
            "SELECT position FROM conversations WHERE dataset_id = ? AND content_key = ?", (self.dataset_id, key)))


def _dataset_name(name) -> str:
    if not isinstance(name, str) or not name.strip():
        raise StoreError("a dataset needs a non-empty name")
    return name.strip()


def _role(role) -> int:
    try:
        return parse_role(role)
    except ValueError as e:
        raise StoreError(str(e)) from None


def _check_turn(conv: StoredConversation, turn: int) -> None:
    if not isinstance(turn, int) or not 0 <= turn < len(conv.turns):
        raise StoreError(f"conversation {conv.id} has no turn {turn} (it has {len(conv.turns)})")


def _check_range(conv: StoredConversation, turn: int, start: int, end: int) -> None:
    _check_turn(conv, turn)
    length = len(conv.turns[turn].text)
    if not (isinstance(start, int) and isinstance(end, int)) or not 0 <= start < end <= length:
        raise StoreError(f"span {start}..{end} is outside turn {turn} of conversation {conv.id} "
                         f"(its text has {length} characters)")


__all__ = ["Store", "StoreError", "StoreBusyError", "NotFoundError", "StaleVersionError", "StoredConversation",
           "Revision", "ConversationSummary", "DatasetInfo", "Labels", "Batch", "content_key"]
