"""Schema version 2: annotators' own copies of a conversation's labels, assignments, review.

- copies: one row per (conversation, annotator) with that annotator's labels (JSON, as revisions keep
  them), its own version and done flag.
- assignments: which annotators a conversation is given to.
- revisions.annotator: which copy a revision belongs to (NULL: the conversation's main labels); a new
  kind 'review' (a reviewer accepted labels into the main ones).
- conversations.reviewed_by / reviewed_at: set by a review, cleared by a later edit of the main labels.

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

KINDS = "kind IN ('import', 'edit', 'undo', 'redo', 'review')"


def upgrade() -> None:
    bind = op.get_bind()
    sqlite = bind.dialect.name == "sqlite"
    without_rowid = {"sqlite_with_rowid": False} if sqlite else {}
    op.add_column("conversations", sa.Column("reviewed_by", sa.Text))
    op.add_column("conversations", sa.Column("reviewed_at", sa.Float))
    if sqlite:
        # SQLite cannot change a CHECK constraint: the table is made again (nothing refers to it)
        op.execute("""
            CREATE TABLE revisions_new (
                id INTEGER PRIMARY KEY,
                conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
                version INTEGER NOT NULL,
                kind TEXT NOT NULL,
                state INTEGER NOT NULL DEFAULT 0,
                action TEXT NOT NULL,
                author TEXT NOT NULL,
                created_at FLOAT NOT NULL,
                before TEXT,
                after TEXT,
                annotator TEXT,
                CONSTRAINT revisions_kind CHECK (%s)
            )""" % KINDS)
        op.execute("INSERT INTO revisions_new (id, conversation_id, version, kind, state, action, author, created_at, "
                   "before, after) SELECT id, conversation_id, version, kind, state, action, author, created_at, "
                   "before, after FROM revisions")
        op.execute("DROP TABLE revisions")
        op.execute("ALTER TABLE revisions_new RENAME TO revisions")
    else:
        op.add_column("revisions", sa.Column("annotator", sa.Text))
        op.drop_constraint("revisions_kind", "revisions", type_="check")
        op.create_check_constraint("revisions_kind", "revisions", KINDS)
        op.drop_index("revisions_by_conversation", "revisions")
    # undo / redo look up a copy's (or the main labels': annotator NULL) latest edits
    op.create_index("revisions_by_conversation", "revisions", ["conversation_id", "annotator", "kind", "state"])
    op.create_table(
        "copies",
        sa.Column("conversation_id", sa.Integer, sa.ForeignKey("conversations.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("annotator", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False, server_default="1"),
        sa.Column("done", sa.Integer, nullable=False, server_default="0"),
        sa.Column("labels", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("updated_by", sa.Text, nullable=False, server_default=""),
        sa.PrimaryKeyConstraint("conversation_id", "annotator"),
        **without_rowid)
    op.create_table(
        "assignments",
        sa.Column("conversation_id", sa.Integer, sa.ForeignKey("conversations.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("annotator", sa.Text, nullable=False),
        sa.Column("assigned_at", sa.Float, nullable=False),
        sa.Column("assigned_by", sa.Text, nullable=False, server_default=""),
        sa.PrimaryKeyConstraint("conversation_id", "annotator"),
        **without_rowid)
    op.create_index("assignments_by_annotator", "assignments", ["annotator", "conversation_id"])
    if sqlite:
        op.execute("PRAGMA user_version = 2")


def downgrade() -> None:
    raise NotImplementedError("the store's schema is not downgraded")
