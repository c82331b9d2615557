"""Alembic's entry point for the store: migrations run on the connection workbench.store.migrate gives
(inside its transaction, under its lock); there is no offline mode and no alembic.ini."""
from alembic import context

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("the store's migrations run through workbench.store.migrate (opening a Store), "
                       "not the alembic command")
context.configure(connection=connection, target_metadata=None)
with context.begin_transaction():
    context.run_migrations()
