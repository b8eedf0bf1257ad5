"""Database engine and the one way to run a transaction: whole, and retried as a whole.

Retries wrap the *entire* transaction (never a statement inside one), on errors that a fresh
attempt can cure: a lost connection (server restart), a serialization failure or a deadlock.
They are bounded so a stalled batch never outlives the broker heartbeat.
"""

import functools
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import orjson
import structlog
from sqlalchemy import (
    JSON,
    ColumnElement,
    Engine,
    Table,
    Text,
    TextClause,
    any_,
    bindparam,
    cast,
    create_engine,
    event,
    func,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

from pipeline.models.tables import Base

log = structlog.get_logger(__name__)
T = TypeVar("T")
RETRYABLE_SQLSTATES = {"40001", "40P01"}  # serialization_failure, deadlock_detected
# Keys two transactions may both insert when each handles a message the other could not see yet:
# copies of one message (a stage mark), or a port's creation and its next event in two batches of
# two workers (the port). The retry finds the winner's row, locked, and goes on from it.
RACED_KEYS = {"pk_stage_marks": "stage_marks.job_id, stage_marks.stage", "pk_ports": "ports.id"}


def _json_text(value: object) -> str:
    return orjson.dumps(value).decode()


def make_engine(url: str) -> Engine:
    """JSON columns are (de)serialized with orjson: the stages store a lot of JSON (marks, results)."""
    json_options = {"json_serializer": _json_text, "json_deserializer": orjson.loads}
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **json_options)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")  # WAL: safe against a crash of the process
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    # a server that does not answer is found out in seconds, not after the kernel's TCP timeouts
    # (minutes): connecting gives up after 5 s, and a connection whose packets go unanswered for
    # ~20 s is dropped (keepalives, and the time unacknowledged data may wait)
    connect_args = {"connect_timeout": 5, "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 3,
                    "keepalives_count": 3, "tcp_user_timeout": 20_000}
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5, connect_args=connect_args,
                         **json_options)


def create_schema(engine: Engine) -> None:
    """Create every table (the embedded default and tests; production runs ``bindpipe migrate``)."""
    Base.metadata.create_all(engine)


def is_transient(exc: BaseException) -> bool:
    """Errors a fresh attempt of the whole transaction can cure: a lost connection, a serialization
    failure or deadlock, and a conflict on one of the ``RACED_KEYS``."""
    if isinstance(exc, OperationalError):
        return True
    if isinstance(exc, IntegrityError):
        return any(_violates(exc, name, columns) for name, columns in RACED_KEYS.items())
    if isinstance(exc, DBAPIError):
        return getattr(exc.orig, "sqlstate", None) in RETRYABLE_SQLSTATES
    return False


def _violates(exc: IntegrityError, constraint: str, columns: str) -> bool:
    diag = getattr(exc.orig, "diag", None)
    if diag is not None:  # PostgreSQL names the constraint
        return getattr(diag, "constraint_name", None) == constraint
    return f"UNIQUE constraint failed: {columns}" in str(exc.orig)  # SQLite names the columns


def among(session: Session, column: Any, values: Iterable[Any]) -> ColumnElement[bool]:
    """``column IN values``; on PostgreSQL ``column = ANY(ARRAY(…))`` of one JSON text parameter,
    whatever the number of values. An IN list is a new statement of n placeholders each time, which
    psycopg parses anew (it caches only short statements) and the server plans anew; an array
    parameter is one statement, but psycopg quotes each element in Python (measured: 1.25 against
    0.58 ms for a 200-id lookup that finds nothing, the common case of the marks lookup)."""
    values = list(values)
    if session.get_bind().dialect.name != "postgresql":
        return column.in_(values)
    elements = func.json_array_elements_text(cast(bindparam(None, orjson.dumps(values).decode(), type_=Text), JSON))
    return column == any_(func.array(select(cast(elements.table_valued("value").c.value, column.type))
                                     .scalar_subquery()))


def insert_rows(session: Session, table: Table, rows: list[dict[str, Any]], on_conflict: str | None = None) -> None:
    """INSERT ``rows`` (dicts of the same columns) into ``table`` as one statement. ``on_conflict``:
    None (a key conflict raises), ``"nothing"`` (the row is skipped) or ``"update"`` (the given
    columns replace the stored row's).

    On PostgreSQL the rows travel as one JSON text that ``json_populate_recordset`` turns back into
    rows of the table's type: psycopg's executemany dumps every parameter of every row in Python
    (measured: 16 µs of client CPU a row, with SQLAlchemy's per-row work on top), orjson encodes
    the whole batch in C (2 µs a row), and the server's work is the same. SQLite: an executemany."""
    if on_conflict not in (None, "nothing", "update"):
        raise ValueError(f"on_conflict must be None, 'nothing' or 'update', not {on_conflict!r}")
    if not rows:
        return
    columns = tuple(rows[0])
    if session.get_bind().dialect.name == "postgresql":
        session.execute(_json_insert(table, columns, on_conflict), {"rows": orjson.dumps(rows).decode()})
        return
    statement = sqlite.insert(table)
    if on_conflict == "nothing":
        statement = statement.on_conflict_do_nothing()
    elif on_conflict == "update":
        keys = [c.name for c in table.primary_key]
        statement = statement.on_conflict_do_update(
            index_elements=keys, set_={c: statement.excluded[c] for c in columns if c not in keys})
    session.execute(statement, rows)


@functools.cache
def _json_insert(table: Table, columns: tuple[str, ...], on_conflict: str | None) -> TextClause:
    quote = postgresql.dialect().identifier_preparer.quote
    names = ", ".join(quote(c) for c in columns)
    sql = (f"INSERT INTO {quote(table.name)} ({names}) SELECT {names} "
           f"FROM json_populate_recordset(NULL::{quote(table.name)}, CAST(:rows AS json))")
    keys = [c.name for c in table.primary_key]
    if on_conflict == "nothing":
        sql += " ON CONFLICT DO NOTHING"
    elif on_conflict == "update":
        sql += (f" ON CONFLICT ({', '.join(quote(k) for k in keys)}) DO UPDATE SET "
                + ", ".join(f"{quote(c)} = EXCLUDED.{quote(c)}" for c in columns if c not in keys))
    return text(sql)


def run_transaction(engine: Engine, work: Callable[[Session], T], max_seconds: float = 20.0) -> T:
    """Run ``work(session)`` in one transaction, retrying the whole of it on transient errors.

    Tenacity's iterator form, not its decorator: a decorated function made per call is a reference
    cycle (the wrapper and its ``Retrying``) that held ``work`` and with it the whole batch, which
    then waited for the garbage collector instead of being freed as the call returned."""
    for attempt in Retrying(retry=retry_if_exception(is_transient), stop=stop_after_delay(max_seconds),
                            wait=wait_exponential_jitter(multiplier=0.05, max=2.0), reraise=True,
                            before_sleep=_log_retry):
        with attempt, Session(engine, expire_on_commit=False) as session, session.begin():
            outcome = work(session)
    return outcome


def _log_retry(state: RetryCallState) -> None:
    log.warning("transaction retry", attempt=state.attempt_number, error=str(state.outcome.exception())[:200])
