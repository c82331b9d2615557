"""The annotation store: datasets of conversations with per-turn roles and character-span labels,
in SQLite or PostgreSQL (one transaction per edit, optimistic versions, revision history for
undo/redo, annotators' own copies, assignments and review), and their import/export (ShareGPT,
LLaMA-Factory, per-token semantic ids).

    store = Store("workspace/workbench.db")           # or Store("postgresql://ann@dbhost/hsa")
    report = import_file(store, "data.jsonl", dataset="shapes")
    conv = store.conversation(report.conversation_ids[0])
    conv = store.set_span(conv.id, turn=1, start=0, end=5, role="noise", expected_version=conv.version)
"""
from pathlib import Path

from .db import (AnnotatorCopy, ConversationSummary, DatasetInfo, NotFoundError, Revision, StaleVersionError, Store,
                 StoreBusyError, StoredConversation, StoreError)
from .io import (FORMATS, ExportReport, FileError, ImportReport, RecordError, conversation_record,
                 export_dataset, import_file, import_records, import_upload, load_records, load_tokenizer,
                 prepare_record, read_records)

# The app's database: `python app.py` keeps it in its workspace (default ROOT/workspace).
DEFAULT_DB = Path(__file__).resolve().parents[2] / "workspace" / "workbench.db"

__all__ = ["AnnotatorCopy", "Store", "StoreError", "StoreBusyError", "NotFoundError", "StaleVersionError", "StoredConversation", "Revision",
           "ConversationSummary", "DatasetInfo", "FORMATS", "ExportReport", "FileError", "ImportReport",
           "RecordError", "conversation_record", "export_dataset", "import_file", "import_records",
           "import_upload", "load_records", "load_tokenizer", "prepare_record", "read_records", "DEFAULT_DB"]
