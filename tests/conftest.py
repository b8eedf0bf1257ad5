"""Fixtures for tests on the real services: every test gets its own database and vhost."""

import uuid
from collections.abc import Iterator

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


@pytest.fixture
def amqp_url() -> Iterator[str]:
    """A fresh RabbitMQ vhost of this test's own (``amqp://…/bindpipe-<tag>``)."""
    url, delete = fresh_vhost(_tag())
    yield url
    delete()
