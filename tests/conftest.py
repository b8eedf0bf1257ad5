"""Fixtures for tests on the real services: every test gets its own database and vhost."""

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from pipeline.db import create_schema, make_engine
from tests.services import fresh_database, fresh_vhost


def _tag() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database of this test's own."""
    url, drop = fresh_database(_tag())
    yield url
    drop()


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[Engine]:
    """An engine on a fresh PostgreSQL database with the schema created."""
    engine = make_engine(pg_url)
    create_schema(engine)
    yield engine
    engine.dispose()


@pytest.fixture(params=[pytest.param("postgresql", marks=pytest.mark.services), "sqlite"])
def any_engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An engine with the schema created, once on a fresh PostgreSQL database, once on a SQLite file."""
    if request.param == "postgresql":
        yield request.getfixturevalue("pg_engine")
        return
    engine = make_engine(f"sqlite:///{tmp_path / 'any.sqlite'}")
    create_schema(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def amqp_url() -> Iterator[str]:
    """A fresh RabbitMQ vhost of this test's own (``amqp://…/bindpipe-<tag>``)."""
    url, delete = fresh_vhost(_tag())
    yield url
    delete()
