"""The annotation store: SQLite (WAL) or PostgreSQL through SQLAlchemy Core, one transaction per edit.

Tables: datasets; conversations (a version number for optimistic concurrency, a `labelled` flag, who
reviewed it and when); turns (speaker, text, the turn's default role); spans (character offsets, Python
code points, into one turn's text, each with a role); images (content-addressed files under `image_dir`);
revisions (who, what, when, which copy, and the labels before and after: they back undo/redo); copies
(an annotator's own labels of a conversation, with their own version and done flag); assignments
(which annotators a conversation is given to). The schema is versioned by Alembic migrations
(workbench/store/migrations), run when a Store opens a database that is behind (workbench.store.migrate).

Where it lives: a path (SQLite) or a URL, `sqlite:///PATH` or `postgresql://USER@HOST/DB`
(workbench.store.engine). The guarantees are the same on both:

- Every edit names the version it was made against. A save against an older version is refused with
  StaleVersionError and nothing changes, so two browser tabs (or two app processes on one PostgreSQL
  database) cannot silently overwrite each other. The check and the write are one transaction that
  holds the conversation: SQLite's write lock (BEGIN IMMEDIATE), PostgreSQL's row lock (SELECT ... FOR
  UPDATE on the conversation, or on the annotator's copy).
- Undo/redo and the history are revisions written in the same transaction as the labels.
- Import is atomic per record (a savepoint each) and skips records already stored (content keys); an
  import killed mid-batch leaves no files behind once the next import starts.
- A lock waited out for the busy timeout is StoreBusyError, a clear "try again". Opening the store only
  reads (the schema upgrade, when one is needed, takes the lock).

Annotators: `annotator=None` (the default everywhere) means the conversation's main labels, what
training and export use. A name means that annotator's copy: it starts from the labels as imported,
has its own version, undo/redo, history and done flag, and is written (with an 'import' revision
saying so) at the annotator's first edit; reading a copy that was never edited writes nothing.
A reviewer's `accept` writes the main labels (a 'review' revision) and marks the conversation reviewed.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import bindparam, text

from models.hsa import parse_role, role_name
from models.data.align import Conversation, Span, Turn

from . import labels as L
from . import migrate
from . import schema as T
from .engine import Location, LocationError, create_engine, decode_text, default_image_dir, locate

# An import batch journals the image files it creates in a marker file in image_dir (removed once it
# commits). A marker of a batch that is no longer running means an import died mid-batch: the files it
# lists that no row names, and their temporaries, are removed. One database's batches never touch
# other files. SQLite: a batch holds the write lock, so the next batch finds only dead markers.
# PostgreSQL: every batch holds a shared advisory lock; markers are cleaned by a batch that gets it
# exclusively (no batch of this database running), before its own batch starts.
IMPORT_MARKER = ".importing-"
JOURNAL_LINE = re.compile(r"[0-9a-f]{2}/[0-9a-f]{64}\.[a-z]{2,4}")  # what save_image writes: sha[:2]/sha.ext
OLD_TEMPORARY_S = 600  # a `.tmp-` file this old (by mtime) belongs to no live import
BATCH_LOCK = 0x4853_4157_4232  # PostgreSQL advisory lock: shared by running batches, exclusive to clean
STATUSES = ("all", "labelled", "unlabelled", "reviewed", "unreviewed")
QUEUE_STATUSES = ("todo", "done", "all")
MAX_NAME = 200  # characters in an annotator's name


class StoreError(ValueError):
    """A request the store refuses; the message says why."""


class NotFoundError(StoreError):
    pass


class StoreBusyError(StoreError):
    """Another process held a lock the request needed for the whole busy timeout."""


class StaleVersionError(StoreError):
    """A save made against an older version of a conversation (or copy); the newer version is kept."""

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
    version: int  # of the main labels, or of the annotator's copy
    labelled: bool  # main: a person set labels; a copy: its annotator marked it done
    turns: list[Turn]
    images: list[Path]  # the stored files
    extra: dict = field(default_factory=dict)
    source: str | None = None
    updated_at: float = 0.0
    updated_by: str = ""
    annotator: str | None = None  # None: the main labels; a name: that annotator's copy
    reviewed_by: str | None = None  # who accepted the main labels (None: not reviewed)
    reviewed_at: float | None = None
    copy_stored: bool = False  # an annotator's copy: written already (False: the labels as imported, unsaved)

    def labels(self) -> Labels:
        return [(t.role, list(t.spans)) for t in self.turns]

    @property
    def reviewed(self) -> bool:
        return self.reviewed_at is not None

    def as_conversation(self) -> Conversation:
        """The align module's view: images as absolute paths (so no image_root is needed)."""
        return Conversation([Turn(t.speaker, t.text, t.role, list(t.spans)) for t in self.turns],
                            [str(p) for p in self.images], f"conversation {self.id}")


@dataclass
class ConversationSummary:
    id: int
    position: int
    version: int
    labelled: bool  # in a queue: the annotator marked their copy done
    preview: str
    updated_by: str = ""
    updated_at: float = 0.0
    reviewed: bool = False


@dataclass
class Revision:
    id: int
    conversation_id: int
    version: int
    kind: str  # import, edit, undo, redo, review
    state: int
    action: str
    author: str
    created_at: float
    annotator: str | None = None  # the copy it belongs to; None: the main labels


@dataclass
class DatasetInfo:
    name: str
    total: int
    labelled: int
    reviewed: int = 0


@dataclass
class AnnotatorCopy:
    annotator: str
    labels: Labels
    version: int
    done: bool
    updated_at: float
    updated_by: str = ""


def _preview(turns) -> str:
    for speaker, words in turns:
        if speaker == "user":
            return " ".join(words.split())[:80]
    return " ".join(turns[0][1].split())[:80] if turns else ""


def _copy_filter(annotator: str | None) -> str:
    """The revisions of the main labels (annotator NULL) or of one copy (bound as :annotator)."""
    return "annotator IS NULL" if annotator is None else "annotator = :annotator"


class Store:
    """The annotation store at `location`: a SQLite file path (created if missing), or a `sqlite:///`
    or `postgresql://` URL (see workbench.store.engine). Images live under `image_dir` (default: the
    URL's `?image_dir=`, else for SQLite an `images` folder beside the file, for PostgreSQL
    $WORKBENCH_IMAGES or the app's workspace/images)."""

    def __init__(self, location, *, image_dir=None, synchronous: str = "FULL", busy_timeout_s: float = 30.0,
                 pool_size: int = 5, max_overflow: int = 20):
        try:
            self.location: Location = locate(location)
        except LocationError as e:
            raise StoreError(str(e)) from None
        self.kind = self.location.kind
        self._pg = self.kind == "postgresql"
        self.path: Path | None = self.location.path  # the SQLite file (None on PostgreSQL)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._default_images = image_dir is None and self.location.image_dir is None
        self.image_dir = Path(image_dir).expanduser() if image_dir else (
            self.location.image_dir or (self.path.parent / "images" if self.path is not None else default_image_dir()))
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be OFF/NORMAL/FULL/EXTRA, got {synchronous!r}")
        self.synchronous = synchronous.upper()
        self.busy_timeout_s = busy_timeout_s
        self.engine = create_engine(self.location, synchronous=self.synchronous, busy_timeout_s=busy_timeout_s,
                                    pool_size=pool_size, max_overflow=max_overflow)
        try:
            self._open()
        except BaseException:  # busy while creating the tables, interrupted: no connection left open
            self.close()
            raise

    @property
    def name(self) -> str:
        """How messages name this database: the file's name, or the URL without a password."""
        return self.location.display

    @property
    def url(self) -> str:
        """A string that opens this store, images included, in another process (Store(store.url)): a
        SQLite file's path (as a URL when its images are not beside it), a PostgreSQL URL with
        ?image_dir=."""
        if self.path is not None and self._default_images:
            return str(self.path)
        if self.path is not None:
            return sa.engine.URL.create("sqlite", database=str(self.path), query={"image_dir": str(self.image_dir)}) \
                .render_as_string(hide_password=False)
        return self.location.as_string(image_dir=self.image_dir)

    def __repr__(self) -> str:
        return f"Store({self.name!r})"

    # --- connections, transactions, errors ---------------------------------------------------------

    def _open(self) -> None:
        try:
            with self._reading() as db:
                behind = migrate.behind(db)
            if behind:
                with self._write() as db:  # a new or older database: create or migrate, once
                    upgraded = migrate.upgrade(db)
                if upgraded:
                    self._remove_old_temporaries()  # what interrupted imports of older versions left
        except migrate.SchemaTooNew as e:
            raise StoreError(f"cannot open the annotation database {self.name}: {e}") from None

    @contextmanager
    def _errors(self):
        """Database errors as the store's: busy (a lock waited out), not a database, unreachable."""
        try:
            yield
        except sa.exc.DBAPIError as e:
            translated = self._translate(e)
            if translated is None:
                raise
            raise translated from None
        except sa.exc.TimeoutError:  # every connection of this process's pool stayed in use
            raise StoreBusyError(f"the annotation database {self.name} is busy: every connection this process may "
                                 "open was in use; try again") from None

    def _translate(self, e: sa.exc.DBAPIError) -> StoreError | None:
        orig = e.orig
        message = str(orig).strip().split("\n")[0]
        busy = StoreBusyError(f"the annotation database {self.name} is busy: another process held "
                              f"{'its write lock' if not self._pg else 'a lock it needed'} for "
                              f"{self.busy_timeout_s:g} s; try again")
        if not self._pg:
            if "locked" in message or "busy" in message:
                return busy
            if "not a database" in message or "malformed" in message:
                return StoreError(f"{self.name} is not an annotation database ({message})")
            if isinstance(e, sa.exc.OperationalError):
                return StoreError(f"cannot open the annotation database {self.name}: {message}")
            return None
        state = getattr(orig, "sqlstate", None) or ""
        if state in ("55P03", "40P01", "40001"):  # lock_not_available, deadlock_detected, serialization_failure
            return busy
        if isinstance(e, sa.exc.OperationalError) and (not state or state.startswith("08") or state in ("3D000", "28000", "28P01", "53300", "57P03")):
            return StoreError(f"cannot reach the annotation database {self.name}: {message}")
        return None

    @contextmanager
    def _reading(self, snapshot: bool = False):
        """A read transaction; with `snapshot`, every statement in it sees the same commit (PostgreSQL:
        REPEATABLE READ; SQLite: a read transaction in WAL mode always does)."""
        with self._errors(), self.engine.connect() as db:
            if snapshot and self._pg:
                db.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
            with db.begin():
                yield db

    @contextmanager
    def _write(self):
        """A write transaction. SQLite: BEGIN IMMEDIATE takes the write lock up front, so a
        read-check-write sequence inside it cannot interleave with another writer. PostgreSQL: READ
        COMMITTED, and each read-check-write locks the rows it checks (FOR UPDATE). StoreBusyError after
        the busy timeout."""
        with self._errors(), self.engine.connect() as db:
            if not self._pg:
                db.execution_options(store_write=True)
            with db.begin():
                yield db

    @property
    def _for_update(self) -> str:
        return " FOR UPDATE" if self._pg else ""

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
        return f"{IMPORT_MARKER}{hashlib.sha256(self.location.identity.encode()).hexdigest()[:12]}-"

    def _clean_after_interrupted_batches(self, db) -> int:
        """With no batch of this database running (see IMPORT_MARKER): remove what dead batches
        journaled and no row names. Returns how many files were removed."""
        markers = list(self.image_dir.glob(self._marker_prefix + "*")) if self.image_dir.is_dir() else []
        if not markers:
            return 0
        named = {file for (file,) in db.execute(text("SELECT DISTINCT file FROM images"))}
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
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.dispose()

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

    def _dataset_id(self, db, name: str, create: bool = False, lock: bool = False) -> int:
        """The dataset's id; with `lock`, its row is locked until the transaction ends (PostgreSQL: it
        serializes the writers that number its conversations or hand them out)."""
        query = text("SELECT id FROM datasets WHERE name = :name" + (self._for_update if lock else ""))
        row = db.execute(query, {"name": name}).first()
        if row:
            return row[0]
        if not create:
            raise NotFoundError(f"no dataset named {name!r}")
        db.execute(text("INSERT INTO datasets (name, created_at) VALUES (:name, :now) ON CONFLICT (name) DO NOTHING"),
                   {"name": name, "now": time.time()})
        return db.execute(query, {"name": name}).scalar_one()

    def datasets(self) -> list[DatasetInfo]:
        with self._reading() as db:
            rows = db.execute(text(
                "SELECT d.name, COUNT(c.id), COALESCE(SUM(c.labelled), 0), COUNT(c.reviewed_at) FROM datasets d "
                "LEFT JOIN conversations c ON c.dataset_id = d.id GROUP BY d.id, d.name ORDER BY d.name")).all()
        return [DatasetInfo(name, int(total), int(labelled), int(reviewed)) for name, total, labelled, reviewed in rows]

    def dataset(self, name: str) -> DatasetInfo:
        for info in self.datasets():
            if info.name == name:
                return info
        raise NotFoundError(f"no dataset named {name!r}")

    def delete_dataset(self, name: str) -> None:
        """Delete a dataset with its conversations and their history (image files stay: they are
        shared by content)."""
        with self._write() as db:
            dataset_id = self._dataset_id(db, name, lock=True)
            db.execute(text("DELETE FROM datasets WHERE id = :id"), {"id": dataset_id})

    def rename_dataset(self, name: str, new_name: str) -> str:
        """Give dataset `name` the name `new_name` (refused when another dataset has it)."""
        new_name = _dataset_name(new_name)
        taken = StoreError(f"a dataset named {new_name!r} exists already")
        try:
            with self._write() as db:
                dataset_id = self._dataset_id(db, name, lock=True)
                if new_name == name:
                    return new_name
                if db.execute(text("SELECT 1 FROM datasets WHERE name = :name"), {"name": new_name}).first():
                    raise taken
                db.execute(text("UPDATE datasets SET name = :name WHERE id = :id"), {"name": new_name, "id": dataset_id})
        except sa.exc.IntegrityError:  # PostgreSQL: another process took the name meanwhile
            raise taken from None
        return new_name

    # --- adding conversations ----------------------------------------------------------------

    def add_conversation(self, dataset: str, conversation: Conversation, *, images=(), extra=None,
                         source: str | None = None, labelled: bool | None = None, author: str = "import") -> int:
        """Store one validated conversation in its own transaction; `images` are (sha256, file)
        pairs already in `image_dir` (see workbench.store.io)."""
        with self._write() as db:
            dataset_id = self._dataset_id(db, _dataset_name(dataset), create=True, lock=True)
            [cid] = self._reserve_ids(db, 1)
            record = self._record(cid, dataset_id, self._next_position(db, dataset_id), conversation, images, extra,
                                  source, labelled, author)
            self._insert_records(db, [record])
            return cid

    @contextmanager
    def batch(self, dataset: str):
        """Many inserts in one transaction (for imports); yields a Batch: `batch(conversation, ...)`
        adds one (in a savepoint, so a record that fails to insert leaves nothing behind),
        `batch.positions(key)` finds conversations of the dataset with a content key, and
        `batch.new_image(relative)` journals an image file about to be written (see save_image in
        workbench.store.io). Starting, it removes what batches killed before their commit left
        (`batch.removed` counts the files)."""
        name = _dataset_name(dataset)
        removed = 0
        if self._pg:
            with self._write() as db:  # clean only while no batch of this database runs
                if db.execute(text("SELECT pg_try_advisory_xact_lock(:key)"), {"key": BATCH_LOCK}).scalar():
                    removed = self._clean_after_interrupted_batches(db)
        with self._write() as db:
            if self._pg:
                db.execute(text("SELECT pg_advisory_xact_lock_shared(:key)"), {"key": BATCH_LOCK})
            else:
                removed = self._clean_after_interrupted_batches(db)
            dataset_id = self._dataset_id(db, name, create=True, lock=True)
            self.image_dir.mkdir(parents=True, exist_ok=True)
            batch_id = uuid.uuid4().hex
            marker = self.image_dir / f"{self._marker_prefix}{batch_id}"
            with open(marker, "a", encoding="ascii") as journal:
                batch = Batch(self, db, dataset_id, removed, batch_id, journal, self._next_position(db, dataset_id))
                yield batch
                batch.flush()
        marker.unlink(missing_ok=True)  # committed (after an error it stays: its files go next time)

    def _record(self, cid: int, dataset_id: int, position: int, conversation: Conversation, images, extra, source,
                labelled, author) -> "_Record":
        """The rows of one conversation to insert (checked here, written by _insert_records)."""
        now = time.time()
        turns = [(t.speaker, t.text) for t in conversation.turns]
        search = "\n".join(text_ for _, text_ in turns).casefold().replace("\x00", "")
        spans = [L.canonical(t.spans) for t in conversation.turns]
        if labelled is None:
            labelled = any(spans)
        roles = [parse_role(t.role) for t in conversation.turns]
        key = content_key(turns, list(zip(roles, spans)), [sha for sha, _ in images], extra)
        source = source.replace("\x00", "") if isinstance(source, str) else source
        author = _author(author)
        return _Record(
            cid, position, key,
            {"id": cid, "dataset_id": dataset_id, "position": position, "source": source,
             "extra": json.dumps(extra or {}, ensure_ascii=False), "search_text": search, "version": 1,
             "labelled": int(labelled), "created_at": now, "updated_at": now, "updated_by": author,
             "content_key": key, "reviewed_by": None, "reviewed_at": None},
            [{"conversation_id": cid, "turn": i, "speaker": speaker, "text": text_, "role": role}
             for i, ((speaker, text_), role) in enumerate(zip(turns, roles))],
            [{"conversation_id": cid, "turn": i, "start": s.start, "end": s.end, "role": s.role}
             for i, ss in enumerate(spans) for s in ss],
            [{"conversation_id": cid, "position": k, "sha256": sha, "file": str(file)} for k, (sha, file) in enumerate(images)],
            {"conversation_id": cid, "version": 1, "kind": "import", "state": 0,
             "action": f"imported from {source}" if source else "imported", "author": author, "created_at": now,
             "before": None, "after": labels_to_json(list(zip(roles, spans))), "annotator": None})

    @staticmethod
    def _insert_records(db, records: list["_Record"]) -> None:
        """Insert whole records, many rows at once: SQLite's executemany; PostgreSQL's COPY (psycopg's
        executemany sends a statement per row: an import took 3x as long as on SQLite)."""
        for table, rows in ((T.conversations, [r.conversation for r in records]),
                            (T.turns, [row for r in records for row in r.turns]),
                            (T.spans, [row for r in records for row in r.spans]),
                            (T.images, [row for r in records for row in r.images]),
                            (T.revisions, [r.revision for r in records])):
            if not rows:
                continue
            if db.dialect.name == "postgresql":
                _copy_rows(db, table, rows)
            else:
                db.execute(table.insert(), rows)

    def _reserve_ids(self, db, n: int, above: int = 0) -> list[int]:
        """Ids for `n` new conversations, all greater than `above` (the last id handed out and not yet
        written). SQLite: inside the write transaction, MAX(id) stays ours; PostgreSQL: the sequence hands
        each id out once."""
        if self._pg:
            return [i for (i,) in db.execute(text(
                "SELECT nextval(pg_get_serial_sequence('conversations', 'id')) FROM generate_series(1, :n)"), {"n": n})]
        start = max(db.execute(text("SELECT COALESCE(MAX(id), 0) + 1 FROM conversations")).scalar_one(), above + 1)
        return list(range(start, start + n))

    @staticmethod
    def _next_position(db, dataset_id: int) -> int:
        return db.execute(text("SELECT COALESCE(MAX(position), -1) + 1 FROM conversations WHERE dataset_id = :d"),
                          {"d": dataset_id}).scalar_one()

    # --- reading -----------------------------------------------------------------------------

    def conversation(self, conversation_id: int, *, annotator: str | None = None) -> StoredConversation:
        """A conversation with its main labels, or with `annotator`'s copy of them (the labels as
        imported, version 1, while they have not edited it)."""
        cid, annotator = _id(conversation_id), _annotator(annotator)
        # One read transaction, so the turns, spans and version all come from the same commit.
        with self._reading(snapshot=True) as db:
            if annotator is None:
                return self._read(db, cid)
            return self._read_copy(db, cid, annotator)

    def _read(self, db, cid: int, lock: bool = False) -> StoredConversation:
        row = db.execute(text(
            "SELECT c.id, d.name, c.position, c.version, c.labelled, c.extra, c.source, c.updated_at, c.updated_by, "
            "c.reviewed_by, c.reviewed_at FROM conversations c JOIN datasets d ON d.id = c.dataset_id WHERE c.id = :cid"
            # NO KEY UPDATE: writers of the main labels wait for each other, while rows that only refer to the
            # conversation (an annotator's copy and its revisions) are written meanwhile without waiting
            + (" FOR NO KEY UPDATE OF c" if lock and self._pg else "")), {"cid": cid}).first()
        if row is None:
            raise NotFoundError(f"no conversation with id {cid}")
        spans: dict[int, list[Span]] = {}
        for turn, start, end, role in db.execute(_SPANS, {"cid": cid}):
            spans.setdefault(turn, []).append(Span(start, end, role))
        turns = [Turn(speaker, text_, role, spans.get(i, [])) for i, speaker, text_, role in db.execute(_TURNS, {"cid": cid})]
        images = [self.image_dir / file for (file,) in db.execute(_IMAGES, {"cid": cid})]
        return StoredConversation(row[0], row[1], row[2], row[3], bool(row[4]), turns, images, json.loads(row[5]),
                                  row[6], row[7], row[8], None, row[9], row[10])

    def _read_copy(self, db, cid: int, annotator: str, lock: bool = False) -> StoredConversation:
        """The conversation with `annotator`'s copy of the labels (created by nothing here: a copy that
        does not exist reads as the labels as imported, version 1, not done)."""
        conv = self._read(db, cid)
        row = db.execute(text("SELECT version, done, labels, updated_at, updated_by FROM copies "
                              "WHERE conversation_id = :cid AND annotator = :annotator" + (self._for_update if lock else "")),
                         {"cid": cid, "annotator": annotator}).first()
        conv.copy_stored = row is not None
        if row is None:
            labels, conv.version, conv.labelled, conv.updated_at, conv.updated_by = \
                self._imported_labels(db, conv), 1, False, 0.0, ""
        else:
            labels = labels_from_json(row[2])
            conv.version, conv.labelled, conv.updated_at, conv.updated_by = row[0], bool(row[1]), row[3], row[4]
        for turn, (role, spans) in zip(conv.turns, labels):
            turn.role, turn.spans = role, list(spans)
        conv.annotator = annotator
        return conv

    @staticmethod
    def _imported_labels(db, conv: StoredConversation) -> Labels:
        """The labels a conversation was imported with (where a copy starts); its main labels when the
        import revision is missing or does not fit."""
        after = db.execute(text("SELECT after FROM revisions WHERE conversation_id = :cid AND kind = 'import' "
                                "AND annotator IS NULL ORDER BY id LIMIT 1"), {"cid": conv.id}).scalar()
        labels = labels_from_json(after) if after else None
        if labels is None or len(labels) != len(conv.turns):
            labels = conv.labels()
        return labels

    def conversations(self, dataset: str, *, status: str = "all", search: str = "") -> list[ConversationSummary]:
        """The conversations of a dataset in order; `status` all / labelled / unlabelled / reviewed /
        unreviewed; `search` keeps those whose text contains it (case-insensitive)."""
        with self._reading(snapshot=True) as db:
            rows = self._select(db, "id, position, version, labelled, updated_by, updated_at, reviewed_at", dataset,
                                status, search)
            previews = self._previews(db, [r[0] for r in rows])
        return [ConversationSummary(cid, pos, ver, bool(lab), previews.get(cid, ""), by, at, reviewed is not None)
                for cid, pos, ver, lab, by, at, reviewed in rows]

    def conversation_ids(self, dataset: str, *, status: str = "all", search: str = "") -> list[int]:
        """Like `conversations`, ids only (cheap enough to run on every navigation click)."""
        with self._reading() as db:
            return [row[0] for row in self._select(db, "id", dataset, status, search)]

    def _select(self, db, columns: str, dataset: str, status: str, search: str):
        if status not in STATUSES:
            raise StoreError(f"status must be {', '.join(STATUSES[:-1])} or {STATUSES[-1]}, got {status!r}")
        query = f"SELECT {columns} FROM conversations WHERE dataset_id = :d"
        args: dict = {"d": self._dataset_id(db, dataset)}
        if status in ("labelled", "unlabelled"):
            query += " AND labelled = :labelled"
            args["labelled"] = int(status == "labelled")
        elif status != "all":
            query += f" AND reviewed_at IS {'NOT ' if status == 'reviewed' else ''}NULL"
        needle = (search or "").casefold().replace("\x00", "")
        if needle:
            query += f" AND {'strpos' if self._pg else 'instr'}(search_text, :needle) > 0"
            args["needle"] = needle
        return db.execute(text(query + " ORDER BY position"), args).all()

    def _previews(self, db, ids) -> dict[int, str]:
        found: dict[int, list] = {}
        for start in range(0, len(ids), 500):
            for cid, speaker, text_ in db.execute(_PREVIEWS, {"ids": list(ids[start:start + 500])}):
                found.setdefault(cid, []).append((speaker, decode_text(text_) if self._pg else text_))
        return {cid: _preview(turns) for cid, turns in found.items()}

    def history(self, conversation_id: int, *, annotator: str | None = None,
                every_copy: bool = False) -> list[Revision]:
        """Every change to a conversation's main labels (or to `annotator`'s copy; with `every_copy`,
        to both the main labels and all copies), oldest first: who, what, when."""
        cid, annotator = _id(conversation_id), _annotator(annotator)
        where = "" if every_copy else f" AND {_copy_filter(annotator)}"
        with self._reading() as db:
            return [Revision(*row) for row in db.execute(text(
                "SELECT id, conversation_id, version, kind, state, action, author, created_at, annotator "
                f"FROM revisions WHERE conversation_id = :cid{where} ORDER BY id"), {"cid": cid, "annotator": annotator})]

    def can_undo(self, conversation_id: int, *, annotator: str | None = None) -> bool:
        with self._reading() as db:
            return self._undoable(db, _id(conversation_id), _annotator(annotator)) is not None

    def can_redo(self, conversation_id: int, *, annotator: str | None = None) -> bool:
        with self._reading() as db:
            return self._redoable(db, _id(conversation_id), _annotator(annotator)) is not None

    # --- edits -------------------------------------------------------------------------------

    def set_span(self, conversation_id: int, turn: int, start: int, end: int, role, *, expected_version: int,
                 author: str = "anonymous", annotator: str | None = None) -> StoredConversation:
        """Give characters [start, end) of a turn's text the role `role`."""
        role = _role(role)

        def change(labels, conv, db):
            _check_range(conv, turn, start, end)
            turn_role, spans = labels[turn]
            labels[turn] = (turn_role, L.paint(spans, start, end, role))
            return f"turn {turn} chars {start}..{end} → {role_name(role)}"

        return self._edit(conversation_id, expected_version, author, change, annotator=annotator)

    def clear_span(self, conversation_id: int, turn: int, start: int, end: int, *, expected_version: int,
                   author: str = "anonymous", annotator: str | None = None) -> StoredConversation:
        """Remove span labels from characters [start, end): they take the turn's role again."""
        def change(labels, conv, db):
            _check_range(conv, turn, start, end)
            turn_role, spans = labels[turn]
            labels[turn] = (turn_role, L.erase(spans, start, end))
            return f"turn {turn} chars {start}..{end} cleared"

        return self._edit(conversation_id, expected_version, author, change, annotator=annotator)

    def set_turn_role(self, conversation_id: int, turn: int, role, *, expected_version: int,
                      author: str = "anonymous", keep_spans: bool = False,
                      annotator: str | None = None) -> StoredConversation:
        """Set a turn's role; its spans go unless `keep_spans` (then they still override it)."""
        role = _role(role)

        def change(labels, conv, db):
            _check_turn(conv, turn)
            labels[turn] = (role, labels[turn][1] if keep_spans else [])
            return f"turn {turn} → {role_name(role)}"

        return self._edit(conversation_id, expected_version, author, change, annotator=annotator)

    def set_labels(self, conversation_id: int, new_labels: Labels, *, expected_version: int,
                   author: str = "anonymous", action: str = "labels replaced",
                   annotator: str | None = None) -> StoredConversation:
        """Replace all labels at once (e.g. accepting suggestions)."""
        return self._edit(conversation_id, expected_version, author, _replace(new_labels, action), annotator=annotator)

    def mark_labelled(self, conversation_id: int, labelled: bool, *, author: str = "anonymous",
                      annotator: str | None = None) -> None:
        """Main labels: set the conversation's labelled flag. A copy: its annotator's done flag (the copy
        is made if it was not)."""
        cid, annotator = _id(conversation_id), _annotator(annotator)
        with self._write() as db:
            if annotator is None:
                db.execute(text("UPDATE conversations SET labelled = :labelled WHERE id = :cid"),
                           {"labelled": int(labelled), "cid": cid})
                return
            self._copy_for_edit(db, cid, annotator, author)
            db.execute(text("UPDATE copies SET done = :done WHERE conversation_id = :cid AND annotator = :annotator"),
                       {"done": int(labelled), "cid": cid, "annotator": annotator})

    def _copy_for_edit(self, db, cid: int, annotator: str, author: str) -> StoredConversation:
        """`annotator`'s copy, locked until the transaction ends; made (from the labels as imported, with
        an 'import' revision at version 1) if it did not exist."""
        conv = self._read_copy(db, cid, annotator, lock=True)
        if conv.copy_stored:
            return conv
        now = time.time()
        made = db.execute(text(
            "INSERT INTO copies (conversation_id, annotator, version, done, labels, created_at, updated_at, updated_by) "
            "VALUES (:cid, :annotator, 1, 0, :labels, :now, :now, :author) ON CONFLICT (conversation_id, annotator) "
            "DO NOTHING"), {"cid": cid, "annotator": annotator, "labels": labels_to_json(conv.labels()), "now": now,
                            "author": _author(author)}).rowcount
        if made:
            db.execute(T.revisions.insert().values(
                conversation_id=cid, version=1, kind="import", state=0, action="copy made from the labels as imported",
                author=_author(author), created_at=now, after=labels_to_json(conv.labels()), annotator=annotator))
        return self._read_copy(db, cid, annotator, lock=True)  # another process may have made it first

    def _edit(self, conversation_id, expected_version, author: str, change, kind: str = "edit",
              annotator: str | None = None, reviewer: str | None = None) -> StoredConversation:
        cid, annotator, author = _id(conversation_id), _annotator(annotator), _author(author)
        with self._write() as db:
            conv = self._read(db, cid, lock=True) if annotator is None else self._copy_for_edit(db, cid, annotator, author)
            if expected_version is not None and conv.version != expected_version:
                whose = f"{annotator}'s copy of conversation {cid}" if annotator else f"conversation {cid}"
                raise StaleVersionError(
                    f"{whose} was changed by {conv.updated_by or 'someone'} at "
                    f"{time.strftime('%H:%M:%S', time.localtime(conv.updated_at))} (now version {conv.version}, "
                    f"this view was at version {expected_version}); your change was not saved",
                    conv.version)
            before = conv.labels()
            after = [(role, list(spans)) for role, spans in before]
            action = change(after, conv, db)
            if after == before and kind != "review":
                return conv
            version, now = conv.version + 1, time.time()
            if annotator is None:
                self._write_labels(db, cid, before, after)
                # a review marks the conversation reviewed; any later change of the main labels unmarks it
                db.execute(text("UPDATE conversations SET version = :version, labelled = 1, updated_at = :now, "
                                "updated_by = :author, reviewed_by = :reviewer, reviewed_at = :reviewed WHERE id = :cid"),
                           {"version": version, "now": now, "author": author, "cid": cid, "reviewer": reviewer,
                            "reviewed": now if reviewer else None})
            else:
                db.execute(text("UPDATE copies SET labels = :labels, version = :version, updated_at = :now, "
                                "updated_by = :author WHERE conversation_id = :cid AND annotator = :annotator"),
                           {"labels": labels_to_json(after), "version": version, "now": now, "author": author,
                            "cid": cid, "annotator": annotator})
            where = f"conversation_id = :cid AND {_copy_filter(annotator)}"
            if kind == "edit":  # a new edit ends what could be redone
                db.execute(text(f"UPDATE revisions SET state = 2 WHERE {where} AND state = 1"),
                           {"cid": cid, "annotator": annotator})
            elif kind == "review":  # what was edited before a review is not undone past it
                db.execute(text(f"UPDATE revisions SET state = CASE WHEN state = 0 THEN 3 ELSE 2 END WHERE {where} "
                                "AND kind = 'edit' AND state IN (0, 1)"), {"cid": cid, "annotator": annotator})
            db.execute(T.revisions.insert().values(
                conversation_id=cid, version=version, kind=kind, state=0, action=action, author=author, created_at=now,
                before=labels_to_json(before), after=labels_to_json(after), annotator=annotator))
            conv.version, conv.updated_at, conv.updated_by = version, now, author
            if annotator is None:
                conv.labelled, conv.reviewed_by, conv.reviewed_at = True, reviewer, now if reviewer else None
            for turn, (role, spans) in zip(conv.turns, after):
                turn.role, turn.spans = role, spans
            return conv

    @staticmethod
    def _write_labels(db, cid: int, before: Labels, after: Labels) -> None:
        for i, (old, new) in enumerate(zip(before, after)):
            if old == new:
                continue
            if old[0] != new[0]:
                db.execute(text("UPDATE turns SET role = :role WHERE conversation_id = :cid AND turn = :turn"),
                           {"role": new[0], "cid": cid, "turn": i})
            if old[1] != new[1]:
                db.execute(text("DELETE FROM spans WHERE conversation_id = :cid AND turn = :turn"), {"cid": cid, "turn": i})
                if new[1]:
                    db.execute(T.spans.insert(), [{"conversation_id": cid, "turn": i, "start": s.start, "end": s.end,
                                                   "role": s.role} for s in new[1]])

    @staticmethod
    def _undoable(db, cid, annotator):
        return db.execute(text(f"SELECT id, action, before FROM revisions WHERE conversation_id = :cid AND "
                               f"{_copy_filter(annotator)} AND kind = 'edit' AND state = 0 ORDER BY id DESC LIMIT 1"),
                          {"cid": cid, "annotator": annotator}).first()

    @staticmethod
    def _redoable(db, cid, annotator):
        # Undone edits form a suffix of the edit list (a new edit drops them), so the next one to
        # redo is the oldest of them: the one undone last.
        return db.execute(text(f"SELECT id, action, after FROM revisions WHERE conversation_id = :cid AND "
                               f"{_copy_filter(annotator)} AND kind = 'edit' AND state = 1 ORDER BY id ASC LIMIT 1"),
                          {"cid": cid, "annotator": annotator}).first()

    def undo(self, conversation_id: int, *, expected_version: int | None = None,
             author: str = "anonymous", annotator: str | None = None) -> StoredConversation:
        """Take back the latest edit still in effect (a new revision; history keeps both)."""
        return self._undo_redo(conversation_id, expected_version, author, annotator, undo=True)

    def redo(self, conversation_id: int, *, expected_version: int | None = None,
             author: str = "anonymous", annotator: str | None = None) -> StoredConversation:
        return self._undo_redo(conversation_id, expected_version, author, annotator, undo=False)

    def _undo_redo(self, cid, expected_version, author, annotator, undo: bool) -> StoredConversation:
        word = "undo" if undo else "redo"
        annotator = _annotator(annotator)

        def change(labels, conv, db):
            # Runs inside _edit's transaction: finding the revision, flipping its state and
            # writing the labels commit together or not at all.
            row = (self._undoable if undo else self._redoable)(db, conv.id, annotator)
            if row is None:
                raise StoreError(f"nothing to {word} in conversation {conv.id}"
                                 + (f" ({annotator}'s copy)" if annotator else ""))
            db.execute(text("UPDATE revisions SET state = :state WHERE id = :id"), {"state": 1 if undo else 0, "id": row[0]})
            labels[:] = labels_from_json(row[2])
            return f"{word}: {row[1]}"

        return self._edit(cid, expected_version, author, change, kind=word, annotator=annotator)

    # --- annotators: copies, assignments, review ----------------------------------------------------

    def copies(self, conversation_id: int) -> dict[str, AnnotatorCopy]:
        """Every annotator's copy of a conversation's labels (those who edited it or marked it done), by name."""
        with self._reading() as db:
            rows = db.execute(text("SELECT annotator, labels, version, done, updated_at, updated_by FROM copies "
                                   "WHERE conversation_id = :cid ORDER BY annotator"), {"cid": _id(conversation_id)})
            return {name: AnnotatorCopy(name, labels_from_json(labels), version, bool(done), updated_at, by)
                    for name, labels, version, done, updated_at, by in rows}

    def dataset_copies(self, dataset: str) -> dict[int, dict[str, AnnotatorCopy]]:
        """`copies` of every conversation of `dataset` that has any, by conversation id, in one read."""
        found: dict[int, dict[str, AnnotatorCopy]] = {}
        with self._reading(snapshot=True) as db:
            rows = db.execute(text(
                "SELECT p.conversation_id, p.annotator, p.labels, p.version, p.done, p.updated_at, p.updated_by "
                "FROM copies p JOIN conversations c ON c.id = p.conversation_id WHERE c.dataset_id = :d "
                "ORDER BY c.position, p.annotator"), {"d": self._dataset_id(db, dataset)})
            for cid, name, labels, version, done, updated_at, by in rows:
                found.setdefault(cid, {})[name] = AnnotatorCopy(name, labels_from_json(labels), version, bool(done),
                                                                updated_at, by)
        return found

    def assign(self, dataset: str, annotators: list[str], per_conversation: int, *, author: str = "anonymous") -> dict[str, int]:
        """Give every conversation of `dataset` to `per_conversation` distinct annotators of `annotators`.
        Idempotent: assignments already made stay; a conversation with fewer than `per_conversation`
        annotators is topped up, one with enough is left alone. The assignments a call adds are
        balanced: each goes to whoever of the conversation's candidates got fewest in this call (then
        has fewest in the dataset, then comes first in `annotators`), so from scratch the loads differ
        by at most one, and an annotator added later gets a fair share of what is added, not of what
        was assigned before. Returns how many assignments each annotator got in this call."""
        names = list(dict.fromkeys(_annotator(a, required=True) for a in annotators))
        if not names:
            raise StoreError("name at least one annotator to assign conversations to")
        if not isinstance(per_conversation, int) or isinstance(per_conversation, bool) or per_conversation < 1:
            raise StoreError(f"each conversation goes to at least 1 annotator, got {per_conversation!r}")
        if per_conversation > len(names):
            raise StoreError(f"each conversation should go to {per_conversation} different annotators, but only "
                             f"{len(names)} were named")
        author = _author(author)
        with self._write() as db:
            dataset_id = self._dataset_id(db, dataset, lock=True)
            ids = [cid for (cid,) in db.execute(text("SELECT id FROM conversations WHERE dataset_id = :d ORDER BY position"),
                                                {"d": dataset_id})]
            have: dict[int, set] = {}
            load: Counter = Counter()
            for cid, name in db.execute(text("SELECT a.conversation_id, a.annotator FROM assignments a JOIN conversations c "
                                             "ON c.id = a.conversation_id WHERE c.dataset_id = :d"), {"d": dataset_id}):
                have.setdefault(cid, set()).add(name)
                load[name] += 1
            order = {name: i for i, name in enumerate(names)}
            added: Counter = Counter()
            rows, now = [], time.time()
            for cid in ids:
                given = have.get(cid, set())
                need = per_conversation - len(given)
                if need <= 0:
                    continue
                for name in sorted((n for n in names if n not in given), key=lambda n: (added[n], load[n], order[n]))[:need]:
                    added[name] += 1
                    load[name] += 1
                    rows.append({"conversation_id": cid, "annotator": name, "assigned_at": now, "assigned_by": author})
            if rows:
                db.execute(T.assignments.insert(), rows)
        return {name: added[name] for name in names}

    def assignees(self, conversation_id: int) -> list[str]:
        """The annotators a conversation is assigned to, by name."""
        with self._reading() as db:
            return [name for (name,) in db.execute(text(
                "SELECT annotator FROM assignments WHERE conversation_id = :cid ORDER BY annotator"),
                {"cid": _id(conversation_id)})]

    def queue(self, dataset: str, annotator: str, status: str = "todo") -> list[ConversationSummary]:
        """The conversations of `dataset` assigned to `annotator`, in order: `status` todo (their copy not
        marked done), done, or all. Version, labelled (= done) and last change are their copy's."""
        if status not in QUEUE_STATUSES:
            raise StoreError(f"status must be todo, done or all, got {status!r}")
        annotator = _annotator(annotator, required=True)
        done = {"todo": " AND COALESCE(p.done, 0) = 0", "done": " AND p.done = 1", "all": ""}[status]
        with self._reading(snapshot=True) as db:
            rows = db.execute(text(
                "SELECT c.id, c.position, COALESCE(p.version, 1), COALESCE(p.done, 0), COALESCE(p.updated_by, ''), "
                "COALESCE(p.updated_at, 0), c.reviewed_at FROM assignments a JOIN conversations c ON c.id = a.conversation_id "
                "LEFT JOIN copies p ON p.conversation_id = a.conversation_id AND p.annotator = a.annotator "
                f"WHERE c.dataset_id = :d AND a.annotator = :annotator{done} ORDER BY c.position"),
                {"d": self._dataset_id(db, dataset), "annotator": annotator}).all()
            previews = self._previews(db, [r[0] for r in rows])
        return [ConversationSummary(cid, pos, ver, bool(d), previews.get(cid, ""), by, at, reviewed is not None)
                for cid, pos, ver, d, by, at, reviewed in rows]

    def progress(self, dataset: str) -> dict[str, tuple[int, int]]:
        """Per annotator with assignments in `dataset`: (conversations marked done, conversations assigned)."""
        with self._reading() as db:
            rows = db.execute(text(
                "SELECT a.annotator, COALESCE(SUM(CASE WHEN p.done = 1 THEN 1 ELSE 0 END), 0), COUNT(*) "
                "FROM assignments a JOIN conversations c ON c.id = a.conversation_id "
                "LEFT JOIN copies p ON p.conversation_id = a.conversation_id AND p.annotator = a.annotator "
                "WHERE c.dataset_id = :d GROUP BY a.annotator ORDER BY a.annotator"),
                {"d": self._dataset_id(db, dataset)}).all()
        return {name: (int(done), int(assigned)) for name, done, assigned in rows}

    def accept(self, conversation_id: int, labels: Labels, *, reviewer: str, expected_version: int,
               source: str, expected_copies: dict[str, int] | None = None) -> StoredConversation:
        """A reviewer accepts `labels` (e.g. one annotator's copy, or a merge of several) as the
        conversation's main labels, against the main labels' `expected_version`: a 'review' revision
        (author: the reviewer; action: `source`, e.g. "accepted alice" or "merged alice+bob"), always a
        new version, and the conversation is marked reviewed by `reviewer` now. Edits before the review
        can no longer be undone; a later edit of the main labels unmarks the review.
        `expected_copies` ({annotator: version}, the copies the reviewer saw) are checked in the same
        transaction: a copy changed since is StaleVersionError, and nothing is accepted."""
        reviewer = _annotator(reviewer, required=True)
        if not isinstance(source, str) or not source.strip():
            raise StoreError("say where the accepted labels come from (source), e.g. 'accepted alice'")
        replace = _replace(labels, source.strip())

        def change(current, conv, db):
            for name, seen in (expected_copies or {}).items():
                now = self._read_copy(db, conv.id, _annotator(name, required=True), lock=True)
                if now.version != seen:
                    raise StaleVersionError(f"{name}'s copy changed since it was shown (by {now.updated_by or 'someone'}"
                                            f", now version {now.version}, shown at {seen})", conv.version)
            return replace(current, conv, db)

        return self._edit(conversation_id, expected_version, reviewer, change, kind="review", reviewer=reviewer)


_TURNS = sa.select(T.turns.c.turn, T.turns.c.speaker, T.turns.c.text, T.turns.c.role) \
    .where(T.turns.c.conversation_id == bindparam("cid")).order_by(T.turns.c.turn)
_SPANS = text('SELECT turn, start, "end", role FROM spans WHERE conversation_id = :cid ORDER BY turn, start')
_IMAGES = text("SELECT file FROM images WHERE conversation_id = :cid ORDER BY position")
_PREVIEWS = text("SELECT conversation_id, speaker, substr(text, 1, 200) FROM turns WHERE conversation_id IN :ids "
                 "ORDER BY conversation_id, turn").bindparams(bindparam("ids", expanding=True))


def _copy_rows(db, table: sa.Table, rows: list[dict]) -> None:
    """COPY rows into a PostgreSQL table on `db`'s connection, inside its transaction; the columns' types
    prepare the values (SafeText); a refusal is raised as SQLAlchemy's error, as an INSERT's would be."""
    import psycopg

    columns = [c for c in table.columns if c.name in rows[0]]
    binds = [c.type.bind_processor(db.dialect) if isinstance(c.type, sa.types.TypeDecorator) else None for c in columns]
    statement = f"COPY {table.name} ({', '.join(db.dialect.identifier_preparer.quote(c.name) for c in columns)}) FROM STDIN"
    try:
        with db.connection.driver_connection.cursor() as cursor, cursor.copy(statement) as copy:
            for row in rows:
                copy.write_row([bind(row[c.name]) if bind else row[c.name] for c, bind in zip(columns, binds)])
    except psycopg.Error as e:
        raise sa.exc.DBAPIError.instance(statement, None, e, psycopg.Error) from None


def _replace(new_labels: Labels, action: str):
    """An edit that replaces all labels (checked against the conversation's turns)."""
    def change(labels, conv, db):
        if len(new_labels) != len(labels):
            raise StoreError(f"{len(new_labels)} turn labels given for {len(labels)} turns")
        for i, (role, spans) in enumerate(new_labels):
            for s in spans:
                _check_range(conv, i, s.start, s.end)
            labels[i] = (_role(role), L.canonical(Span(s.start, s.end, _role(s.role)) for s in spans))
        return action

    return change


@dataclass
class _Record:
    """One conversation's rows, ready to insert."""
    id: int
    position: int
    key: str
    conversation: dict
    turns: list
    spans: list
    images: list
    revision: dict


class Batch:
    """Inserts into one dataset inside one write transaction (see Store.batch). Records are checked and
    given their id when added, and written together (many rows per statement) when the batch ends or
    holds FLUSH_AT records; should the database refuse that write, each record is written again in a
    savepoint of its own, and those it refuses are in `failed` (id: why), nothing of them stored."""

    FLUSH_AT = 1000

    def __init__(self, store: Store, db, dataset_id: int, removed: int, batch_id: str, journal, position: int):
        self.store, self.db, self.dataset_id, self.removed = store, db, dataset_id, removed
        self.id, self._journal, self._position = batch_id, journal, position
        self._pending: list[_Record] = []
        self._ids: list[int] = []
        self._last_id = 0
        self._stored: dict[str, list[int]] = {}  # positions by content key, looked up beforehand (preload)
        self.failed: dict[int, str] = {}

    def new_image(self, relative: str) -> Path:
        """Journal the image file `relative` (sha[:2]/sha.ext under image_dir) before it is written;
        returns the temporary path to write it to (then rename it into place)."""
        self._journal.write(relative + "\n")
        self._journal.flush()  # the page cache outlives a killed process; no fsync needed for that
        folder, name = relative.split("/")
        return self.store.image_dir / folder / f".tmp-{self.id}-{name}"

    def __call__(self, conversation, *, images=(), extra=None, source=None, labelled=None, author="import") -> int:
        """Add one conversation; returns its id (see `failed` once the batch has ended)."""
        if not self._ids:
            with self.store._errors():
                self._ids = self.store._reserve_ids(self.db, 64, above=self._last_id)
        record = self.store._record(self._ids[0], self.dataset_id, self._position, conversation, images, extra, source,
                                    labelled, author)  # raises for a record it cannot store: nothing of it is kept
        self._last_id = self._ids.pop(0)
        self._pending.append(record)
        self._position += 1
        if len(self._pending) >= self.FLUSH_AT:
            self.flush()
        return record.id

    def flush(self) -> None:
        """Write the records added since the last flush (see the class's doc)."""
        records, self._pending = self._pending, []
        if not records:
            return
        with self.store._errors():  # a lock waited out is StoreBusyError, not a record's fault
            savepoint = self.db.begin_nested()
            try:
                self.store._insert_records(self.db, records)
                savepoint.commit()
                return
            except sa.exc.DBAPIError as e:
                savepoint.rollback()
                if self.store._translate(e) is not None:
                    raise
            for record in records:  # one by one: which record did the database refuse?
                savepoint = self.db.begin_nested()
                try:
                    self.store._insert_records(self.db, [record])
                    savepoint.commit()
                except sa.exc.DBAPIError as e:
                    savepoint.rollback()
                    if self.store._translate(e) is not None:
                        raise
                    self.failed[record.id] = str(e.orig).strip().split("\n")[0]

    def positions(self, key: str) -> list[int]:
        """Positions of the dataset's conversations imported with content key `key` (those added to
        this batch included), in order."""
        # sorted here: an ORDER BY position lets SQLite walk the dataset's position index instead of the
        # key index, a scan of the whole dataset per record (10,000 records: import 14 s, re-import 25 s; now 1.6 s and 0.5 s)
        if key in self._stored:
            stored = self._stored[key]
        else:
            with self.store._errors():
                stored = [p for (p,) in self.db.execute(_POSITIONS, {"d": self.dataset_id, "key": key})]
        return sorted(stored + [r.position for r in self._pending if r.key == key])

    def preload(self, keys) -> None:
        """Look up the stored positions of many content keys at once (`positions` then asks nothing more
        of the database for them): one query per 500 keys instead of one per record."""
        keys = list(dict.fromkeys(keys))
        with self.store._errors():
            for start in range(0, len(keys), 500):
                part = keys[start:start + 500]
                found: dict[str, list[int]] = {key: [] for key in part}
                for key, position in self.db.execute(_POSITIONS_MANY, {"d": self.dataset_id, "keys": part}):
                    found[key].append(position)
                self._stored.update(found)


_POSITIONS = text("SELECT position FROM conversations WHERE dataset_id = :d AND content_key = :key") \
    .bindparams(bindparam("d", type_=sa.Integer), bindparam("key", type_=sa.Text))
_POSITIONS_MANY = text("SELECT content_key, position FROM conversations WHERE dataset_id = :d AND content_key IN :keys") \
    .bindparams(bindparam("d", type_=sa.Integer), bindparam("keys", expanding=True, type_=sa.Text))


def _dataset_name(name) -> str:
    if not isinstance(name, str) or not name.strip():
        raise StoreError("a dataset needs a non-empty name")
    if "\x00" in name:
        raise StoreError("a dataset name cannot hold a NUL character")
    return name.strip()


def _annotator(name, required: bool = False) -> str | None:
    """An annotator's (or reviewer's) name, checked; None stays None (the main labels) unless required."""
    if name is None and not required:
        return None
    if not isinstance(name, str) or not name.strip():
        raise StoreError("an annotator needs a non-empty name")
    if "\x00" in name or len(name.strip()) > MAX_NAME:
        raise StoreError(f"an annotator's name has at most {MAX_NAME} characters and no NUL: {name[:40]!r}")
    return name.strip()


def _author(author) -> str:
    return str(author).replace("\x00", "") if author is not None else ""


def _id(conversation_id) -> int:
    try:
        return int(conversation_id)
    except (TypeError, ValueError):
        raise NotFoundError(f"no conversation with id {conversation_id!r}") from None


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
           "Revision", "ConversationSummary", "DatasetInfo", "AnnotatorCopy", "Labels", "Batch", "content_key",
           "labels_to_json", "labels_from_json"]
