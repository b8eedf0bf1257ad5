"""Schema migrations (Alembic), configured in code: the scripts live in ``pipeline/migrations``.

Production runs ``bindpipe migrate`` (:func:`upgrade`) before the workers; the embedded default and
the tests may still call :func:`pipeline.db.create_schema`, which builds the same schema from the
models. :func:`check` compares a database with the models (Alembic's ``compare_metadata``, plus the
two guards it cannot see: the PostgreSQL exclusion constraint and the SQLite trigger that keep a PF
and its VFs from being in use together).

A database built by ``create_schema`` has the tables but no Alembic revision; :func:`upgrade`
adopts it (stamps ``head``) when it matches the models exactly, and refuses otherwise.

A new revision, after changing the models (review it, and keep the non-declarative parts in mind)::

    from alembic import command
    command.revision(alembic_config("sqlite:///scratch.db"), "what changed", autogenerate=True, rev_id="0002")
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import structlog
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text

from pipeline.db import make_engine
from pipeline.models.tables import PG_PF_VF_EXCLUSION, SQLITE_PF_VF_TRIGGER, Base
from pipeline.progress import progress

log = structlog.get_logger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
PG_EXCLUSION = "ex_pci_devices_pf_vf"
SQLITE_TRIGGER = "tr_pci_devices_pf_vf"


class SchemaMismatch(RuntimeError):
    """The database schema is not the one the models describe; ``differences`` says how."""

    def __init__(self, message: str, differences: list[Any]):
        self.differences = differences
        super().__init__(message + "".join(f"\n  {d!r}" for d in differences))


def _scripts_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    config.set_main_option("file_template", "%%(rev)s_%%(slug)s")  # new revisions: 0002_<message>.py
    return config


def alembic_config(url: str | None = None, connection: Connection | None = None) -> Config:
    """An Alembic ``Config`` without an ini file: the packaged scripts and ``url`` (default: Settings),
    or an open ``connection`` to run in (the caller owns its transaction)."""
    if url is None and connection is None:
        from pipeline.settings import Settings

        url = Settings().database_url
    config = _scripts_config()
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
        config.attributes["url"] = url
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head() -> str | None:
    """The newest revision shipped with this code."""
    return ScriptDirectory.from_config(_scripts_config()).get_current_head()


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def current(url: str) -> str | None:
    """The database's revision (``None``: never migrated, or an empty database)."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return _current(connection)
    finally:
        engine.dispose()


def _normal(sql: str) -> str:
    """SQL text compared loosely: case, whitespace, parentheses, ``IF NOT EXISTS`` and the ``::text``
    casts PostgreSQL adds to a reflected ``WHERE`` ignored."""
    sql = re.sub(r"\bif not exists\b|::text\b", " ", sql.lower())
    return " ".join(re.sub(r"[()]", " ", sql).split())


def _partial_index_differences(connection: Connection) -> list[Any]:
    """Alembic compares an index's columns and uniqueness, not its ``WHERE``: compare that here."""
    dialect = connection.dialect.name
    inspector = inspect(connection)
    existing = set(inspector.get_table_names())
    differences: list[Any] = []
    for table in Base.metadata.sorted_tables:
        if table.name not in existing:
            continue  # compare_metadata reports it
        reflected = {ix["name"]: ix for ix in inspector.get_indexes(table.name)}
        for index in table.indexes:
            if dialect not in index.dialect_options:
                continue
            wanted = index.dialect_options[dialect].get("where")
            found = reflected.get(index.name, {}).get("dialect_options", {}).get(f"{dialect}_where")
            wanted, found = ("" if w is None else str(w) for w in (wanted, found))
            if index.name in reflected and _normal(wanted) != _normal(found):
                differences.append(("modify_index_where", table.name, index.name, found, wanted))
    return differences


def _pf_vf_guard_differences(connection: Connection) -> list[Any]:
    """The PF/VF guard made by ``_pf_vf_guard`` in tables.py, invisible to ``compare_metadata``."""
    if "pci_devices" not in inspect(connection).get_table_names():
        return []
    dialect = connection.dialect.name
    if dialect == "postgresql":
        found = connection.execute(
            text("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = :n AND contype = 'x' "
                 "AND conrelid = 'pci_devices'::regclass"), {"n": PG_EXCLUSION}).scalar()
        wanted = PG_PF_VF_EXCLUSION.split(PG_EXCLUSION, 1)[1]  # "EXCLUDE USING gist (...) WHERE (...)"
        kind, name = "exclusion_constraint", PG_EXCLUSION
    elif dialect == "sqlite":
        found = connection.execute(
            text("SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = :n AND tbl_name = 'pci_devices'"),
            {"n": SQLITE_TRIGGER}).scalar()
        wanted, kind, name = SQLITE_PF_VF_TRIGGER, "trigger", SQLITE_TRIGGER
    else:
        return []
    if found is None:
        return [(f"missing_{kind}", "pci_devices", name)]
    if _normal(found) != _normal(wanted):
        return [(f"modify_{kind}", "pci_devices", name, found, wanted.strip())]
    return []


def _differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return [*compare_metadata(context, Base.metadata), *_partial_index_differences(connection),
            *_pf_vf_guard_differences(connection)]


def schema_problem(connection: Connection) -> str | None:
    """What keeps this code from using the database's schema (None: nothing). A schema made by
    ``create_schema`` (no revision) is good when it matches the models, as :func:`upgrade` adopts it."""
    revision, newest = _current(connection), head()
    if revision == newest:
        return None
    if revision is None:
        if not set(Base.metadata.tables) & set(inspect(connection).get_table_names()):
            return "the database has no schema (empty or never migrated)"
        if _differences(connection):
            return "the database has tables but no Alembic revision, and they differ from the models"
        return None
    if revision not in {script.revision for script in ScriptDirectory.from_config(_scripts_config()).walk_revisions()}:
        return f"the database is at revision {revision}, which this release does not know (a newer one migrated it)"
    return f"the database is at revision {revision}, this release needs {newest}"


def check(url: str) -> None:
    """Raise :class:`SchemaMismatch` unless the database's schema is exactly the models'."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            differences = _differences(connection)
    finally:
        engine.dispose()
    if differences:
        raise SchemaMismatch("the database schema differs from the models:", differences)


def upgrade(url: str, revision: str = "head") -> str | None:
    """Migrate the database at ``url`` to ``revision`` in one transaction (on PostgreSQL the DDL too);
    the revision reached."""
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            config = alembic_config(url, connection)
            if _current(connection) is None and set(Base.metadata.tables) & set(inspect(connection).get_table_names()):
                differences = _differences(connection)
                if differences:
                    raise SchemaMismatch("the database has tables but no Alembic revision, and they differ "
                                         "from the models; stamp its revision by hand:", differences)
                log.info("adopting a schema made by create_schema", stamp="head")
                command.stamp(config, "head")
            steps = [script.revision for script in reversed(list(
                ScriptDirectory.from_config(config).iterate_revisions(revision, _current(connection) or "base")))]
            with progress("migrations applied", len(steps)) as shown:
                for done, step in enumerate(steps, 1):  # one at a time, to show how far it got
                    command.upgrade(config, step)
                    shown.update(done)
            reached = _current(connection)
    finally:
        engine.dispose()
    log.info("database migrated", revision=reached)
    return reached


def downgrade(url: str, revision: str) -> str | None:
    """Migrate the database at ``url`` down to ``revision`` (``"base"``: drop everything)."""
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            command.downgrade(alembic_config(url, connection), revision)
            return _current(connection)
    finally:
        engine.dispose()
