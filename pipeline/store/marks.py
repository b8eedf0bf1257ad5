"""The event log and the per-stage idempotency marks."""

from typing import Any

from sqlalchemy import Table, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from pipeline.models.events import Envelope
from pipeline.models.tables import EventLog, StageMark


def insert_ignore(session: Session, table: Table, values: dict[str, Any], returning=None):  # noqa: ANN001
    """INSERT that silently does nothing on a key conflict; returns the RETURNING row or None."""
    dialect = sqlite if session.get_bind().dialect.name == "sqlite" else postgresql
    stmt = dialect.insert(table).values(**values).on_conflict_do_nothing()
    if returning is not None:
        return session.execute(stmt.returning(returning)).first()
    return session.execute(stmt).rowcount


def record_event(session: Session, envelope: Envelope) -> int | None:
    """Append to the event log; the new ``seq``, or None when this event_id was seen before."""
    row = insert_ignore(session, EventLog.__table__, {
        "event_id": str(envelope.event_id), "event_type": envelope.event_type,
        "occurred_at": envelope.occurred_at, "envelope": envelope.model_dump(mode="json"),
    }, returning=EventLog.seq)
    return row[0] if row else None


def stored_output(session: Session, job_id: str, stage: str) -> list[Any] | None:
    """What ``stage`` handed on when it handled ``job_id`` before, or None if it never did."""
    return session.scalar(select(StageMark.output).where(StageMark.job_id == job_id, StageMark.stage == stage))


def add_mark(session: Session, job_id: str, stage: str, output: list[Any]) -> None:
    """Record the handling in the transaction of its effects. A plain INSERT on purpose: if a
    concurrent redelivery got there first, the key conflict rolls this whole transaction back."""
    session.add(StageMark(job_id=job_id, stage=stage, output=output))
    session.flush()


def newest_event_seq(session: Session) -> int:
    return session.scalar(select(func.coalesce(func.max(EventLog.seq), 0)))


def events_between(session: Session, first: int, last: int | None, limit: int | None = None) -> list[EventLog]:
    query = select(EventLog).where(EventLog.seq >= first).order_by(EventLog.seq).limit(limit)
    if last is not None:
        query = query.where(EventLog.seq <= last)
    return list(session.scalars(query))
