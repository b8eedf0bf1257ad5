"""The real services tests may need, each behind one call that returns its URL.

A test (or fixture) that needs RabbitMQ or PostgreSQL calls :func:`require_rabbitmq` /
:func:`require_postgres` first. When the service cannot be reached the test is **skipped** with the
reason — except in CI (``CI=true``), where it **fails**: CI must never go green by skipping.

URLs come from ``BINDPIPE_TEST_BROKER_URL`` and ``BINDPIPE_TEST_DATABASE_URL``, defaulting to the
local services (RabbitMQ guest/guest on 127.0.0.1:5672, PostgreSQL user postgres, database test).
"""

from __future__ import annotations

import functools
import os
import re
import time
from collections.abc import Callable

import pytest

BROKER_URL_ENV = "BINDPIPE_TEST_BROKER_URL"
DATABASE_URL_ENV = "BINDPIPE_TEST_DATABASE_URL"
DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
CI_PATIENCE_S = 30
_waited_for: set[str] = set()


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str) -> None:
    """Fail in CI, skip elsewhere; never returns."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: the real services are required)", pytrace=False)
    pytest.skip(reason)


def _safe(url: str) -> str:
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


@functools.lru_cache(maxsize=None)
def _rabbitmq_problem(url: str) -> str | None:
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=3) as connection:
            connection.connect()
    except Exception as exc:  # any failure to connect is the reason to report
        return f"RabbitMQ at {_safe(url)} is unreachable: {type(exc).__name__}: {exc}"
    return None


@functools.lru_cache(maxsize=None)
def _postgres_problem(url: str) -> str | None:
    import psycopg

    try:
        with psycopg.connect(_conninfo(url), connect_timeout=3) as connection:
            connection.execute("SELECT 1")
    except Exception as exc:
        return f"PostgreSQL at {_safe(url)} is unreachable: {type(exc).__name__}: {exc}"
    return None


def _require(env: str, default: str, problem_of) -> str:  # noqa: ANN001
    url = os.environ.get(env, default)
    problem = problem_of(url)
    if problem and in_ci() and url not in _waited_for:
        # In CI one failed probe would fail every test after it: look again for a while, once.
        _waited_for.add(url)
        for _ in range(CI_PATIENCE_S):
            time.sleep(1)
            problem_of.cache_clear()
            if not (problem := problem_of(url)):
                break
    if problem:
        unavailable(problem)
    return url


def require_rabbitmq() -> str:
    """The broker URL (kombu/amqp form) after checking a login works; else skip or fail."""
    return _require(BROKER_URL_ENV, DEFAULT_BROKER_URL, _rabbitmq_problem)


def require_postgres() -> str:
    """The database URL (SQLAlchemy ``postgresql+psycopg`` form) after checking a query works; else skip or fail."""
    return _require(DATABASE_URL_ENV, DEFAULT_DATABASE_URL, _postgres_problem)


def _conninfo(url: str) -> str:
    return re.sub(r"^postgresql\+\w+://", "postgresql://", url)


def fresh_database(tag: str) -> tuple[str, Callable[[], None]]:
    """Create database ``bindpipe_<tag>`` beside the configured one: its URL and a drop function."""
    import psycopg

    base = require_postgres()
    name = f"bindpipe_{tag}"
    with psycopg.connect(_conninfo(base), autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(_conninfo(base), autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return _replace_db(base, name), drop


def _replace_db(url: str, name: str) -> str:
    """``url`` with its path (database or vhost) replaced by ``name``."""
    from urllib.parse import quote, urlsplit, urlunsplit

    return urlunsplit(urlsplit(url)._replace(path="/" + quote(name, safe="")))


def fresh_vhost(tag: str) -> tuple[str, Callable[[], None]]:
    """Create vhost ``bindpipe-<tag>`` (guest gets all rights): its broker URL and a delete function.

    Uses ``rabbitmqctl`` (root or the rabbitmq user), as the broker's AMQP side cannot make vhosts.
    """
    import shutil
    import subprocess

    base = require_rabbitmq()
    if shutil.which("rabbitmqctl") is None:
        unavailable("rabbitmqctl is not installed; it is needed to create a test vhost")
    vhost = f"bindpipe-{tag}"

    def ctl(*args: str) -> None:
        done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            unavailable(f"rabbitmqctl {args[0]} failed: {done.stderr.strip()[:300]}")

    ctl("add_vhost", vhost)
    user = re.match(r"amqp://([^:@/]*)", base)
    ctl("set_permissions", "-p", vhost, user.group(1) if user else "guest", ".*", ".*", ".*")

    def delete() -> None:
        subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], capture_output=True, timeout=120)

    return _replace_db(base, vhost), delete
