"""Alembic environment. `rlhf.labeling.db.upgrade_database` runs it with a live connection; no alembic.ini."""
from alembic import context

from rlhf.labeling.db import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True, compare_type=True)
with context.begin_transaction():
    context.run_migrations()
