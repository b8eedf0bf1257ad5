"""Publishing again from the database: the outbox relay and the two replays.

* ``relay_once``: results committed but never confirmed as published (a worker died between its
  commit and its publish) are published now. A result may so reach a host twice, always with the
  same body and ``seq``: compute hosts drop a ``seq`` they have seen.
* ``replay_results``: a host's current bindings, e.g. for a compute host that lost its state.
* ``replay_events``: stored envelopes back onto ``binding.events``. Every stage recognises the
  event by its mark, so a finished event changes nothing and publishes nothing new, and an event
  that stopped part-way (a dead-lettered hand-off) is carried through the remaining stages.
* ``redrive``: dead letters back where they first went (``bindpipe dlq redrive``), to be judged again.
"""

import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import structlog
from sqlalchemy import Engine, Select, func, select
from sqlalchemy.orm import Session

from pipeline.models.tables import DeadLetter, EventLog, ResultRow
from pipeline.progress import progress
from pipeline.store import dead_letters as dead_letter_store
from pipeline.store.marks import events_between
from pipeline.workers.consumer import mark_published
from pipeline.workers.messages import REDRIVE_HEADER, peek_event_type
from pipeline.workers.publisher import BatchPublisher
from pipeline.workers.topology import EVENTS, RESULTS, STAGE_EXCHANGE, host_routing_key

log = structlog.get_logger(__name__)
REPLAY_HEADER = {"x-bindpipe-replay": True}


def relay_once(engine: Engine, publisher: BatchPublisher, grace_seconds: float = 5.0, limit: int = 500) -> int:
    """Publish up to ``limit`` results left unpublished for longer than ``grace_seconds``."""
    with Session(engine) as session:
        rows = session.scalars(relay_query(datetime.now(UTC) - timedelta(seconds=grace_seconds), limit)).all()
    publisher.publish((RESULTS.name, host_routing_key(r.host), r.published()) for r in rows)
    mark_published(engine, [r.seq for r in rows])
    if rows:
        log.warning("relayed unpublished results", count=len(rows))
    return len(rows)


def relay_query(cutoff: datetime, limit: int = 500) -> Select:
    """Results left unpublished since before ``cutoff``, oldest first (read through the partial
    index ``ix_results_unpublished``, not the whole history)."""
    return (select(ResultRow).where(ResultRow.published_at.is_(None), ResultRow.created_at < cutoff)
            .order_by(ResultRow.seq).limit(limit))


def replay_results(engine: Engine, publisher: BatchPublisher, host: str, since: int = 0) -> int:
    """Re-publish, for every port with a result for ``host`` after ``since``, its latest one."""
    with Session(engine) as session:
        latest = (select(func.max(ResultRow.seq)).where(ResultRow.host == host, ResultRow.seq > since)
                  .group_by(ResultRow.port_id))
        rows = session.scalars(select(ResultRow).where(ResultRow.seq.in_(latest)).order_by(ResultRow.seq)).all()
    return publisher.publish(((RESULTS.name, host_routing_key(host), r.published()) for r in rows),
                             headers=REPLAY_HEADER)


def replay_events(engine: Engine, publisher: BatchPublisher, first: int, last: int | None = None,
                  chunk: int = 500) -> int:
    """Publish the logged envelopes with ``first <= seq <= last`` again, in log order."""
    count = 0
    with Session(engine) as session:
        total = session.scalar(select(func.count()).select_from(EventLog).where(
            EventLog.seq >= first, EventLog.seq <= (last if last is not None else EventLog.seq)))
    with progress("events replayed", total) as shown:
        while last is None or first <= last:
            with Session(engine) as session:
                rows = events_between(session, first, last, limit=chunk)
            if not rows:
                break
            count += publisher.publish(((EVENTS.name, r.event_type, r.envelope) for r in rows), headers=REPLAY_HEADER)
            shown.update(count)
            first = rows[-1].seq + 1
    return count


def redrive(engine: Engine, publisher: BatchPublisher, ids: list[int] | None = None,
            stage: str | None = None) -> list[int]:
    """Publish the dead letters not redriven yet (these ``ids``, or of ``stage``, or all) again, each
    where it first went with its own headers and ``x-bindpipe-redrive-of``, and mark them redriven;
    the ids sent. An envelope goes to ``binding.events`` under its event type, a hand-off to its stage."""
    with Session(engine) as session:
        query = select(DeadLetter).where(DeadLetter.redriven_at.is_(None)).order_by(DeadLetter.id)
        if ids is not None:
            query = query.where(DeadLetter.id.in_(ids))
        if stage is not None:
            query = query.where(DeadLetter.stage == stage)
        rows = list(session.scalars(query))
    sent = []
    for row in rows:
        if row.stage == "validate":
            target = (EVENTS.name, row.routing_key or peek_event_type(row.body) or "unknown")
        else:
            target = (STAGE_EXCHANGE.name, row.stage)
        publisher.publish([(*target, row.body)], headers={**(row.headers or {}), REDRIVE_HEADER: row.id})
        sent.append(row.id)
        with Session(engine) as session, session.begin():
            dead_letter_store.mark_redriven(session, [row.id])
    return sent


class Relay:
    """``relay_once`` at most every ``every`` seconds, as a periodic task of a worker's loop."""

    def __init__(self, engine: Engine, publisher: Callable[[], BatchPublisher], every: float, grace: float = 5.0):
        self.engine, self.publisher, self.every, self.grace = engine, publisher, every, grace
        self.last = time.monotonic()

    def __call__(self) -> int:
        if time.monotonic() - self.last < self.every:
            return 0
        self.last = time.monotonic()
        return relay_once(self.engine, self.publisher(), self.grace)


def run_relay(engine: Engine, connect: Callable[[], BatchPublisher], interval: float, grace: float,
              once: bool) -> int:
    """``bindpipe relay``: pass after pass until SIGTERM (or one pass). A pass that fails (the
    database or the broker away) is logged and tried again with a fresh broker connection."""
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    publisher: BatchPublisher | None = None
    while True:
        try:
            publisher = publisher or connect()
            relay_once(engine, publisher, grace)
        except Exception as exc:  # noqa: BLE001 - keep relaying once the services are back
            log.warning("relay pass failed, retrying", error=str(exc)[:200])
            if publisher is not None:
                publisher.close()
                publisher.connection.release()
            publisher = None
        if once or stopping:
            return 0
        deadline = time.monotonic() + interval
        while time.monotonic() < deadline and not stopping:
            time.sleep(min(0.2, interval))
