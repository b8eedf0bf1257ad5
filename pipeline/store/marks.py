"""The event log and the per-stage idempotency marks."""

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.db import among, insert_rows
from pipeline.models.events import Envelope
from pipeline.models.tables import EventLog, StageMark, utcnow


def record_events(session: Session, envelopes: list[Envelope]) -> None:
    """Append to the event log (one statement, ``insert_rows``), each envelope as it arrived. An
    event_id logged before is skipped here; its handling is refused by the validate mark, which
    shares its commit: a copy handled concurrently by another worker conflicts on the mark's key
    and is retried as a duplicate."""
    if not envelopes:
        return
    now = utcnow()
    insert_rows(session, EventLog.__table__, [
        {"event_id": e.key, "event_type": e.event_type, "occurred_at": e.occurred_at, "received_at": now,
         "envelope": e.as_received()} for e in envelopes], on_conflict="nothing")


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
        insert_rows(session, StageMark.__table__, [
            {"job_id": job_id, "stage": stage, "output": output, "done_at": now} for job_id, output in outputs.items()])


def events_between(session: Session, first: int, last: int | None, limit: int | None = None) -> list[EventLog]:
    query = select(EventLog).where(EventLog.seq >= first).order_by(EventLog.seq).limit(limit)
    if last is not None:
        query = query.where(EventLog.seq <= last)
    return list(session.scalars(query))
