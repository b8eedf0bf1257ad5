"""Dead letters as the database keeps them: recorded once, found again, listed, redriven, purged.

The body is stored as bytes, whatever they are; its SHA-256 finds an earlier copy of a message that
has no readable event id. What is a copy and what is a conflict is decided in ``find_earlier``.
"""

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from pipeline.db import among
from pipeline.models.refusals import BAD_SIGNATURE, CONFLICTING_EVENT_ID, DELIVERY_LIMIT, PoisonMessage
from pipeline.models.tables import DeadLetter, EventLog, utcnow

KEPT_BODY_BYTES = 1 << 20  # a larger body is kept cut to this size (it was refused as too large anyway)
BROKER_HEADERS = ("x-death", "x-first-death-", "x-last-death-", "x-delivery-count")  # set by RabbitMQ, not the sender


@dataclass(frozen=True)
class Arrival:
    """A refused message as it arrived: what ``bindpipe dlq redrive`` needs to send it again."""

    stage: str
    body: bytes
    routing_key: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    redelivered: bool = False  # the broker's flag: an earlier delivery may have been recorded already
    redrive_of: int | None = None  # the dead letter this message was redriven from

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


def sender_headers(headers: dict[str, Any] | None) -> dict[str, Any]:
    """The headers its sender gave a message (signatures included), as JSON values; the broker's own
    (``x-death``, delivery counts) are left out: a redriven message starts afresh."""
    return {_text(str(k)): _json_value(v) for k, v in (headers or {}).items()
            if not str(k).startswith(BROKER_HEADERS)}


def _json_value(value: Any) -> Any:
    if isinstance(value, str):
        return _text(value)
    if value is None or isinstance(value, (int, float, bool)):
        return value
    if isinstance(value, bytes):
        return _text(value.decode("utf-8", "replace"))
    if isinstance(value, dict):
        return {_text(str(k)): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return _text(str(value))


def find_earlier(session: Session, arrival: Arrival, poison: PoisonMessage) -> tuple[DeadLetter | None, PoisonMessage]:
    """An earlier record of this very message, and the refusal to record now.

    At intake (``validate``) a message is known by its event id: the same body under a recorded id
    is a copy (a publisher's retry), another body under an id that is taken — by an accepted event
    or by another refused message — is a *conflict*. A message without a readable event id is a
    message of its own each time, unless the broker redelivers it. Hand-offs between stages come
    from the workers themselves: one with the same body is a copy. A redriven message is never a
    copy: it is meant to be judged again."""
    if arrival.redrive_of is not None:
        return None, poison
    if arrival.stage == "validate" and poison.event_id is not None and poison.category != DELIVERY_LIMIT:
        if session.scalar(select(EventLog.seq).where(EventLog.event_id == poison.event_id)) is not None:
            return None, poison.conflicting(f"event id {poison.event_id} is taken by an accepted event")
        bodies = session.scalars(select(DeadLetter).where(DeadLetter.event_id == poison.event_id,
                                                          DeadLetter.stage == arrival.stage)).all()
        same = next((d for d in bodies if d.body_sha256 == arrival.sha256), None)
        if same is not None or not bodies or poison.category == CONFLICTING_EVENT_ID:
            return same, poison
        return None, poison.conflicting(f"event id {poison.event_id} is taken by another refused message")
    if arrival.stage != "validate" or arrival.redelivered or poison.category == DELIVERY_LIMIT:
        earlier = session.scalar(select(DeadLetter).where(DeadLetter.stage == arrival.stage,
                                                          DeadLetter.body_sha256 == arrival.sha256).limit(1))
        return earlier, poison
    return None, poison


def refused_event_ids(session: Session, event_ids: list[str]) -> set[str]:
    """Which of ``event_ids`` a refused message took (an event arriving under one is a conflict).
    A message the broker gave up on was not refused, one redriven is to be judged again, and one
    refused for its signature proved nothing of its sender: none of them takes its id."""
    if not event_ids:
        return set()
    return set(session.scalars(select(DeadLetter.event_id).where(
        among(session, DeadLetter.event_id, event_ids), DeadLetter.stage == "validate",
        DeadLetter.category.not_in((DELIVERY_LIMIT, BAD_SIGNATURE)), DeadLetter.redriven_at.is_(None))))


def add(session: Session, arrival: Arrival, poison: PoisonMessage) -> DeadLetter:
    body = arrival.body[:KEPT_BODY_BYTES]
    reason = poison.reason if len(body) == len(arrival.body) else (
        f"{poison.reason} (body of {len(arrival.body)} bytes kept cut to {KEPT_BODY_BYTES})")
    row = DeadLetter(stage=arrival.stage, category=poison.category, reason=_text(f"{poison.category}: {reason}"),
                     event_id=_text(poison.event_id, 64), port_id=_text(poison.port_id, 64), body=body,
                     body_sha256=arrival.sha256, routing_key=_text(arrival.routing_key, 255),
                     headers=sender_headers(arrival.headers) or None, redrive_of=arrival.redrive_of)
    session.add(row)
    session.flush()
    return row


def _text(value: str | None, size: int | None = None) -> str | None:
    """A text column's value: no NUL character (PostgreSQL refuses one), at most ``size`` characters."""
    return value.replace("\x00", "\\x00")[:size] if value is not None else None


def listed(session: Session, stage: str | None = None, pending_only: bool = False,
           limit: int | None = None) -> list[DeadLetter]:
    """Dead letters, newest first (of ``stage``; not yet redriven with ``pending_only``)."""
    query = select(DeadLetter).order_by(DeadLetter.id.desc()).limit(limit)
    if stage is not None:
        query = query.where(DeadLetter.stage == stage)
    if pending_only:
        query = query.where(DeadLetter.redriven_at.is_(None))
    return list(session.scalars(query))


def mark_redriven(session: Session, ids: list[int], at: datetime | None = None) -> None:
    session.execute(update(DeadLetter).where(DeadLetter.id.in_(ids)).values(redriven_at=at or utcnow()))


def purge(session: Session, stage: str | None = None, ids: list[int] | None = None) -> int:
    """Forget dead letters (of ``stage``, or these ``ids``); how many."""
    statement = delete(DeadLetter)
    if stage is not None:
        statement = statement.where(DeadLetter.stage == stage)
    if ids is not None:
        statement = statement.where(DeadLetter.id.in_(ids))
    return session.execute(statement).rowcount
