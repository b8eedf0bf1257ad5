"""Alembic environment, driven by ``pipeline.migrate`` (no alembic.ini).

The database comes from ``config.attributes``: an open ``connection`` (used as is, inside the
caller's transaction handling) or a ``url`` (an engine is made with ``pipeline.db.make_engine``, so
SQLite gets the same pragmas as at run time). ``sqlalchemy.url`` in the main options is the
fallback, e.g. for the ``alembic`` command line with ``-x``-less ini files.
"""

from alembic import context
from sqlalchemy.engine import Connection

from pipeline.db import make_engine
from pipeline.models.tables import Base

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: pass one to pipeline.migrate (or set sqlalchemy.url)")
    return url


def _configure(**kw) -> None:  # noqa: ANN003
    context.configure(target_metadata=target_metadata, compare_type=True,
                      render_as_batch=True,  # SQLite cannot ALTER most things: batch mode copies the table
                      **kw)


def run_offline() -> None:
    """``--sql`` mode: print the DDL instead of running it."""
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def _run(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
