"""The annotation store's schema history, as Alembic migrations (run by workbench.store.migrate when a
Store opens a database whose schema is behind; nothing to run by hand)."""
