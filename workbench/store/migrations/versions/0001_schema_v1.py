"""Schema version 1: datasets, conversations (with their content key), turns, spans, images, revisions.

Also brings a SQLite database made before migrations to this version in place: version 0 (no content
key: the column is added and every conversation keyed from its import revision) or version 1 (`PRAGMA
user_version = 1`: nothing to change). A new database gets the tables.

Revision ID: 0001
Revises:
"""
import json

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    sqlite = bind.dialect.name == "sqlite"
    without_rowid = {"sqlite_with_rowid": False} if sqlite else {}
    if "conversations" not in sa.inspect(bind).get_table_names():
        op.create_table(
            "datasets",
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("name", sa.Text, nullable=False, unique=True),
            sa.Column("created_at", sa.Float, nullable=False))
        op.create_table(
            "conversations",
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("dataset_id", sa.Integer, sa.ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False),
            sa.Column("position", sa.Integer, nullable=False),
            sa.Column("source", sa.Text),
            sa.Column("extra", sa.Text, nullable=False, server_default="{}"),
            sa.Column("search_text", sa.Text, nullable=False, server_default=""),
            sa.Column("version", sa.Integer, nullable=False, server_default="1"),
            sa.Column("labelled", sa.Integer, nullable=False, server_default="0"),
            sa.Column("created_at", sa.Float, nullable=False),
            sa.Column("updated_at", sa.Float, nullable=False),
            sa.Column("updated_by", sa.Text, nullable=False, server_default=""),
            sa.Column("content_key", sa.Text),  # what was imported (workbench.store.db.content_key)
            sa.UniqueConstraint("dataset_id", "position"))
        op.create_table(
            "turns",
            sa.Column("conversation_id", sa.Integer, sa.ForeignKey("conversations.id", ondelete="CASCADE"),
                      nullable=False),
            sa.Column("turn", sa.Integer, nullable=False),
            sa.Column("speaker", sa.Text, sa.CheckConstraint("speaker IN ('system', 'user', 'assistant')"),
                      nullable=False),
            sa.Column("text", sa.Text, nullable=False),
            sa.Column("role", sa.Integer, sa.CheckConstraint("role IN (0, 1, 2)"), nullable=False),
            sa.PrimaryKeyConstraint("conversation_id", "turn"),
            **without_rowid)
        op.create_table(
            "spans",
            sa.Column("conversation_id", sa.Integer, nullable=False),
            sa.Column("turn", sa.Integer, nullable=False),
            sa.Column("start", sa.Integer, nullable=False),
            sa.Column("end", sa.Integer, nullable=False),
            sa.Column("role", sa.Integer, sa.CheckConstraint("role IN (0, 1, 2)"), nullable=False),
            sa.CheckConstraint('0 <= start AND start < "end"'),
            sa.PrimaryKeyConstraint("conversation_id", "turn", "start"),
            sa.ForeignKeyConstraint(["conversation_id", "turn"], ["turns.conversation_id", "turns.turn"],
                                    ondelete="CASCADE"),
            **without_rowid)
        op.create_table(
            "images",
            sa.Column("conversation_id", sa.Integer, sa.ForeignKey("conversations.id", ondelete="CASCADE"),
                      nullable=False),
            sa.Column("position", sa.Integer, nullable=False),
            sa.Column("sha256", sa.Text, nullable=False),
            sa.Column("file", sa.Text, nullable=False),
            sa.PrimaryKeyConstraint("conversation_id", "position"),
            **without_rowid)
        op.create_table(
            "revisions",
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("conversation_id", sa.Integer, sa.ForeignKey("conversations.id", ondelete="CASCADE"),
                      nullable=False),
            sa.Column("version", sa.Integer, nullable=False),
            sa.Column("kind", sa.Text, nullable=False),
            # edits only: 0 = in effect, 1 = undone (can be redone), 2 = undone and superseded
            sa.Column("state", sa.Integer, nullable=False, server_default="0"),
            sa.Column("action", sa.Text, nullable=False),
            sa.Column("author", sa.Text, nullable=False),
            sa.Column("created_at", sa.Float, nullable=False),
            sa.Column("before", sa.Text),
            sa.Column("after", sa.Text),
            sa.CheckConstraint("kind IN ('import', 'edit', 'undo', 'redo')", name="revisions_kind"))
        op.create_index("revisions_by_conversation", "revisions", ["conversation_id", "kind", "state"])
        op.create_index("conversations_by_dataset", "conversations", ["dataset_id", "position"])
    else:  # a SQLite database made before migrations: version 1 as it is, version 0 without content keys
        columns = {c["name"] for c in sa.inspect(bind).get_columns("conversations")}
        if "content_key" not in columns:
            op.add_column("conversations", sa.Column("content_key", sa.Text))
        key_unkeyed(bind)
    op.create_index("conversations_by_key", "conversations", ["dataset_id", "content_key"], if_not_exists=True)
    if sqlite:
        op.execute("PRAGMA user_version = 1")


def key_unkeyed(bind, chunk: int = 500) -> None:
    """Content keys for conversations stored before keys existed: their labels as imported (the import
    revision), or their current ones when it is missing."""
    from models.data.align import Span
    from workbench.store.db import content_key, labels_from_json

    ids = [cid for (cid,) in bind.execute(sa.text(
        "SELECT id FROM conversations WHERE content_key IS NULL ORDER BY id"))]
    for start in range(0, len(ids), chunk):
        part = ids[start:start + chunk]
        params = {"ids": part}

        def rows(sql):
            return bind.execute(sa.text(sql).bindparams(sa.bindparam("ids", expanding=True)), params)

        turns: dict[int, list] = {cid: [] for cid in part}
        for cid, speaker, text, role in rows("SELECT conversation_id, speaker, text, role FROM turns "
                                             "WHERE conversation_id IN :ids ORDER BY conversation_id, turn"):
            turns[cid].append((speaker, text, role))
        spans: dict[tuple, list] = {}
        for cid, turn, start_, end, role in rows('SELECT conversation_id, turn, start, "end", role FROM spans '
                                                 "WHERE conversation_id IN :ids ORDER BY conversation_id, turn, start"):
            spans.setdefault((cid, turn), []).append(Span(start_, end, role))
        imported = dict(rows("SELECT conversation_id, after FROM revisions WHERE kind = 'import' "
                             "AND conversation_id IN :ids ORDER BY id DESC").fetchall())
        shas: dict[int, list] = {cid: [] for cid in part}
        for cid, sha in rows("SELECT conversation_id, sha256 FROM images WHERE conversation_id IN :ids "
                             "ORDER BY conversation_id, position"):
            shas[cid].append(sha)
        extras = dict(rows("SELECT id, extra FROM conversations WHERE id IN :ids").fetchall())
        keys = []
        for cid in part:
            labels = labels_from_json(imported[cid]) if imported.get(cid) else None
            if labels is None or len(labels) != len(turns[cid]):
                labels = [(role, spans.get((cid, i), [])) for i, (_, _, role) in enumerate(turns[cid])]
            keys.append({"key": content_key([(sp, text) for sp, text, _ in turns[cid]], labels, shas[cid],
                                            json.loads(extras[cid])), "id": cid})
        if keys:
            bind.execute(sa.text("UPDATE conversations SET content_key = :key WHERE id = :id"), keys)


def downgrade() -> None:
    raise NotImplementedError("the store's schema is not downgraded")
