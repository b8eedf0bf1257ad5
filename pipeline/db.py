"""Database engine and the one way to run a transaction: whole, and retried as a whole.

Retries wrap the *entire* transaction (never a statement inside one), on errors that a fresh
attempt can cure: a lost connection (server restart), a serialization failure or a deadlock.
They are bounded so a stalled batch never outlives the broker heartbeat.
"""

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import orjson
import structlog
from sqlalchemy import ColumnElement, Engine, any_, bindparam, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session
from tenacity import retry, retry_if_exception, stop_after_delay, wait_exponential_jitter

from pipeline.models.tables import Base

log = structlog.get_logger(__name__)
T = TypeVar("T")
RETRYABLE_SQLSTATES = {"40001", "40P01"}  # serialization_failure, deadlock_detected
MARK_KEY = "pk_stage_marks"


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
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5, **json_options)


def create_schema(engine: Engine) -> None:
    """Create every table (the embedded default and tests; production runs ``bindpipe migrate``)."""
    Base.metadata.create_all(engine)


def is_transient(exc: BaseException) -> bool:
    """Errors a fresh attempt of the whole transaction can cure. A stage mark's key conflict is one:
    two workers handled copies of one message at once; the retry finds the winner's mark."""
    if isinstance(exc, OperationalError):
        return True
    if isinstance(exc, IntegrityError):
        return _violates(exc, MARK_KEY)
    if isinstance(exc, DBAPIError):
        return getattr(exc.orig, "sqlstate", None) in RETRYABLE_SQLSTATES
    return False


def _violates(exc: IntegrityError, constraint: str) -> bool:
    diag = getattr(exc.orig, "diag", None)
    if diag is not None:  # PostgreSQL names the constraint
        return getattr(diag, "constraint_name", None) == constraint
    return "UNIQUE constraint failed: stage_marks.job_id, stage_marks.stage" in str(exc.orig)  # SQLite


def among(session: Session, column: Any, values: Iterable[Any]) -> ColumnElement[bool]:
    """``column IN values``; on PostgreSQL ``column = ANY(array)``, one parameter whatever the
    number of values. An IN list is a new statement of n placeholders each time, which psycopg
    parses anew (it caches only short statements) and the server plans anew: measured, a few
    milliseconds per batch query; the array form is one statement, converted once and prepared."""
    values = list(values)
    if session.get_bind().dialect.name != "postgresql":
        return column.in_(values)
    return column == any_(bindparam(None, values, type_=ARRAY(column.type)))


def insert_on_conflict(session: Session, table: Any) -> Any:
    """The dialect's INSERT for ``table``, with ``on_conflict_do_nothing`` and ``on_conflict_do_update``
    (PostgreSQL and SQLite both have ``ON CONFLICT``; SQLAlchemy offers it per dialect)."""
    return (postgresql if session.get_bind().dialect.name == "postgresql" else sqlite).insert(table)


def run_transaction(engine: Engine, work: Callable[[Session], T], max_seconds: float = 20.0) -> T:
    """Run ``work(session)`` in one transaction, retrying the whole of it on transient errors."""

    @retry(retry=retry_if_exception(is_transient), stop=stop_after_delay(max_seconds),
           wait=wait_exponential_jitter(multiplier=0.05, max=2.0), reraise=True,
           before_sleep=lambda state: log.warning("transaction retry", attempt=state.attempt_number,
                                                  error=str(state.outcome.exception())[:200]))
    def attempt() -> T:
        with Session(engine, expire_on_commit=False) as session, session.begin():
            return work(session)

    return attempt()
