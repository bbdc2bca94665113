"""The schema comes from the Alembic migrations, and they match the models."""
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from rlhf.labeling.db import Base, make_engine, upgrade_database


def test_migrations_build_the_models_schema_and_rerun_as_a_no_op(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'nested' / 'labeling.db'}")  # the folder is created
    upgrade_database(engine)
    upgrade_database(engine)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
        assert context.get_current_revision() == "0001"
    assert "votes" in inspect(engine).get_table_names()


def test_sqlite_runs_in_wal_mode_with_full_sync(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'labeling.db'}")
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_in_memory_sqlite_is_refused():
    with pytest.raises(ValueError, match="needs a file"):
        make_engine("sqlite://")
