"""The event log and the per-stage idempotency marks."""

from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from pipeline.db import among
from pipeline.models.events import Envelope
from pipeline.models.tables import EventLog, StageMark, utcnow


def record_events(session: Session, envelopes: list[Envelope]) -> set[str]:
    """Append to the event log in one statement; the event_ids that were new (the rest were seen before)."""
    if not envelopes:
        return set()
    dialect = sqlite if session.get_bind().dialect.name == "sqlite" else postgresql
    stmt = dialect.insert(EventLog).on_conflict_do_nothing().returning(EventLog.event_id)
    now = utcnow()
    rows = [{"event_id": str(e.event_id), "event_type": e.event_type, "occurred_at": e.occurred_at,
             "received_at": now, "envelope": e.model_dump(mode="json")} for e in envelopes]
    return set(session.scalars(stmt, rows))  # executemany: one cached statement, batched VALUES


def stored_outputs(session: Session, job_ids: list[str], stage: str) -> dict[str, list[Any]]:
    """What ``stage`` handed on for each of ``job_ids`` it handled before (one query)."""
    if not job_ids:
        return {}
    rows = session.execute(select(StageMark.job_id, StageMark.output)
                           .where(StageMark.stage == stage, among(session, StageMark.job_id, job_ids)))
    return {job_id: output for job_id, output in rows}


def add_marks(session: Session, stage: str, outputs: dict[str, list[Any]]) -> None:
    """Record the handling in the transaction of its effects (one statement). A plain INSERT on
    purpose: if a concurrent redelivery got there first, the key conflict rolls this whole
    transaction back."""
    if outputs:
        now = utcnow()
        session.execute(insert(StageMark), [{"job_id": job_id, "stage": stage, "output": output, "done_at": now}
                                            for job_id, output in outputs.items()])


def events_between(session: Session, first: int, last: int | None, limit: int | None = None) -> list[EventLog]:
    query = select(EventLog).where(EventLog.seq >= first).order_by(EventLog.seq).limit(limit)
    if last is not None:
        query = query.where(EventLog.seq <= last)
    return list(session.scalars(query))
