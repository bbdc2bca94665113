"""SQLite specifics. The migrations-match-models test runs on both databases in test_databases.py."""
import pytest
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from rlhf.labeling.db import MIGRATIONS, make_engine, upgrade_database


def test_the_folder_is_created_and_the_database_reaches_the_latest_revision(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'nested' / 'labeling.db'}")
    upgrade_database(engine)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    assert current == ScriptDirectory.from_config(config).get_current_head()
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
