"""The store's tables as this code reads and writes them (the schema at the newest migration; the
migrations in workbench/store/migrations make it, and never import this module)."""
from __future__ import annotations

from sqlalchemy import Column, Float, ForeignKey, Integer, MetaData, Table, Text

from .engine import SafeText

metadata = MetaData()

datasets = Table(
    "datasets", metadata,
    Column("id", Integer, primary_key=True),
    Column("name", Text, nullable=False, unique=True),
    Column("created_at", Float, nullable=False))

conversations = Table(
    "conversations", metadata,
    Column("id", Integer, primary_key=True),
    Column("dataset_id", Integer, ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False),
    Column("position", Integer, nullable=False),
    Column("source", Text),
    Column("extra", Text, nullable=False),
    Column("search_text", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("labelled", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("updated_by", Text, nullable=False),
    Column("content_key", Text),
    Column("reviewed_by", Text),
    Column("reviewed_at", Float))

turns = Table(
    "turns", metadata,
    Column("conversation_id", Integer, primary_key=True),
    Column("turn", Integer, primary_key=True),
    Column("speaker", Text, nullable=False),
    Column("text", SafeText, nullable=False),
    Column("role", Integer, nullable=False))

spans = Table(
    "spans", metadata,
    Column("conversation_id", Integer, primary_key=True),
    Column("turn", Integer, primary_key=True),
    Column("start", Integer, primary_key=True),
    Column("end", Integer, nullable=False),
    Column("role", Integer, nullable=False))

images = Table(
    "images", metadata,
    Column("conversation_id", Integer, primary_key=True),
    Column("position", Integer, primary_key=True),
    Column("sha256", Text, nullable=False),
    Column("file", Text, nullable=False))

revisions = Table(
    "revisions", metadata,
    Column("id", Integer, primary_key=True),
    Column("conversation_id", Integer, nullable=False),
    Column("version", Integer, nullable=False),
    Column("kind", Text, nullable=False),
    # 0 = in effect, 1 = undone (can be redone), 2 = undone and superseded, 3 = in effect, sealed by a review
    Column("state", Integer, nullable=False, default=0),
    Column("action", Text, nullable=False),
    Column("author", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("before", Text),
    Column("after", Text),
    Column("annotator", Text))  # NULL: the main labels; a name: that annotator's copy

copies = Table(
    "copies", metadata,
    Column("conversation_id", Integer, primary_key=True),
    Column("annotator", Text, primary_key=True),
    Column("version", Integer, nullable=False),
    Column("done", Integer, nullable=False),
    Column("labels", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("updated_by", Text, nullable=False))

assignments = Table(
    "assignments", metadata,
    Column("conversation_id", Integer, primary_key=True),
    Column("annotator", Text, primary_key=True),
    Column("assigned_at", Float, nullable=False),
    Column("assigned_by", Text, nullable=False))
