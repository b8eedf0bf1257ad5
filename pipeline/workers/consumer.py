"""The stage worker: decode → stage → persist → publish → ack, in micro-batches.

Deliveries are buffered until ``batch_size`` have arrived or the oldest has waited
``batch_wait_ms``; the batch is handled in one database transaction, its hand-offs are published
with one wait for the broker's confirms, and only then are its deliveries acked (together). A
message that cannot be decoded is dead-lettered on its first delivery. If a batch fails, its
messages are retried one by one, so one bad message never takes its neighbours down with it.
"""

import collections
import gc
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

import orjson
import structlog
from kombu import Connection, Consumer, Message
from kombu.mixins import ConsumerProducerMixin
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from pipeline.db import among, is_transient, run_transaction
from pipeline.models.binding import BindingResult
from pipeline.models.reasons import failure_reason_category, primary_decline
from pipeline.models.tables import DeadLetter, ResultRow
from pipeline.observability import metrics
from pipeline.observability.logging import clear_event_context
from pipeline.settings import Settings
from pipeline.store.marks import add_marks
from pipeline.workers.gauges import refresh_gauges
from pipeline.workers.handlers import HANDLERS, StageHandler, refusal, unpublished_refusals
from pipeline.workers.messages import HANDOFF_JOBS, PoisonMessage, Publish, handoff_messages
from pipeline.workers.publisher import BatchPublisher, connect_with_retry
from pipeline.workers.topology import DEAD_LETTERS, RESULTS, check_topology, declare_topology, stage_queue

log = structlog.get_logger(__name__)
GAUGE_INTERVAL = 5.0  # seconds between refreshes of the database-derived gauges


@dataclass
class StageBuffer:
    """A stage's deliveries decoded on arrival, waiting for their batch: ``(message, item)`` pairs
    (a hand-off message holds many jobs, so a batch is counted in items, not messages)."""

    handler: StageHandler
    items: list[tuple[Message, Any]] = field(default_factory=list)
    first_at: float = 0.0

    def add(self, message: Message, items: list[Any]) -> None:
        if not self.items:
            self.first_at = time.monotonic()
        self.items += [(message, item) for item in items]


class Worker(ConsumerProducerMixin):
    """Consumes the queues of ``stages`` (one, or all four for ``bindpipe run``)."""

    def __init__(self, settings: Settings, engine: Engine, stages: list[str], connection: Connection | None = None):
        self.settings = settings
        self.engine = engine
        self.connection = connection or Connection(settings.broker_url, heartbeat=settings.heartbeat,
                                                   transport_options={"polling_interval": 0.001},
                                                   ssl=settings.broker_ssl_options())
        self.buffers = {stage: StageBuffer(HANDLERS[stage](settings)) for stage in stages}
        self.stopping = False
        self.flushing = False
        self.unsettled: set[int] = set()  # delivery tags of this channel not acked or rejected yet
        self.handled = 0
        self._publisher: BatchPublisher | None = None
        self._gauges_at = 0.0
        self.periodic: list[Callable[[], None]] = []  # run on every loop turn (the relay in `bindpipe run`)

    # --- kombu mixin hooks ---
    @contextmanager
    def establish_connection(self):  # noqa: ANN201 - the mixin's context manager
        metrics.worker_state(self.buffers, broker=False, consuming=False)
        with self.create_connection() as conn:
            try:
                connect_with_retry(conn, stop_requested=lambda: self.stopping)
            except Exception:
                if self.stopping:  # told to stop while the broker is away: nothing is in hand, leave
                    self.should_stop = True
                raise
            metrics.worker_state(self.buffers, broker=True)
            yield conn

    def get_consumers(self, consumer_cls: type[Consumer], channel: Any) -> list[Consumer]:
        for buffer in self.buffers.values():
            buffer.items = []  # deliveries of a lost connection come back by themselves
        self.unsettled = set()
        queues = [stage_queue(stage, self.settings, no_declare=True) for stage in self.buffers]
        if self.settings.declare_topology:
            declare_topology(self.connection, self.settings)
        else:
            check_topology(channel, queues)
        return [consumer_cls(queues=[queue], on_message=partial(self.receive, buffer), no_ack=False,
                             prefetch_count=self.prefetch(stage))
                for stage, queue, buffer in zip(self.buffers, queues, self.buffers.values(), strict=True)]

    def on_consume_ready(self, connection: Connection, channel: Any, consumers: list[Consumer], **kwargs: Any) -> None:
        metrics.worker_state(self.buffers, consuming=True)

    def prefetch(self, stage: str) -> int:
        """Deliveries in hand per stage: a hand-off holds up to ``HANDOFF_JOBS`` jobs, so fewer of
        those. (The in-memory transport applies one limit to the whole channel: keep the full one.)"""
        if stage == "validate" or self.settings.embedded:
            return self.settings.prefetch
        return max(2, self.settings.prefetch // HANDOFF_JOBS)

    def receive(self, buffer: StageBuffer, message: Message) -> None:
        """Decode a delivery as it arrives; poison is dead-lettered at once, on its first delivery."""
        handler = buffer.handler
        self.unsettled.add(message.delivery_tag)
        try:
            buffer.add(message, handler.decode(message.body, message.headers))
        except PoisonMessage as poison:
            self.dead_letter(handler.stage, message, poison)
        except Exception as exc:  # noqa: BLE001 - a decoder bug must not stop the worker
            log.exception("undecodable message", stage=handler.stage)
            self.dead_letter(handler.stage, message, PoisonMessage("other", f"{type(exc).__name__}: {exc}"))

    def consume(self, limit: int | None = None, timeout: float | None = None, safety_interval: float = 1,
                **kwargs: Any) -> Any:
        """The mixin's loop, but greedy: after the first delivery, every delivery already waiting
        (up to a batch) is taken before the batches are looked at, so batches fill up under load."""
        with self.consumer_context(**kwargs) as (conn, _channel, _consumers):
            while not self.should_stop:
                self.on_iteration()
                try:
                    conn.drain_events(timeout=safety_interval)
                    while self.buffered() < self.settings.batch_size:
                        conn.drain_events(timeout=0)
                except socket.timeout:
                    conn.heartbeat_check()
                yield

    def buffered(self) -> int:
        return max(len(b.items) for b in self.buffers.values())

    @property
    def idle(self) -> bool:
        """Nothing buffered and no batch being handled."""
        return self.buffered() == 0 and not self.flushing

    def on_iteration(self) -> None:
        now = time.monotonic()
        wait = self.settings.batch_wait_ms / 1000
        for stage, buffer in self.buffers.items():
            metrics.touch_loop(stage)
            if buffer.items and (self.stopping or len(buffer.items) >= self.settings.batch_size
                                 or now - buffer.first_at >= wait):
                self.flush(buffer)
        for task in self.periodic:
            task()
        if now - self._gauges_at >= GAUGE_INTERVAL:
            self._gauges_at = now
            try:
                refresh_gauges(self.engine, list(self.buffers))
                metrics.worker_state(self.buffers, database=True)
            except Exception as exc:  # noqa: BLE001 - gauges wait for the database; the work goes on
                metrics.worker_state(self.buffers, database=False)
                log.warning("gauges not refreshed", error=str(exc)[:200])
        if self.stopping:
            self.should_stop = True

    def on_consume_end(self, connection: Connection, channel: Any) -> None:
        metrics.worker_state(self.buffers, consuming=False)
        self.drop_publisher()
        super().on_consume_end(connection, channel)

    # --- running ---
    def run_forever(self) -> None:
        tune_gc(self.settings.batch_size)
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        log.info("worker started", stages=list(self.buffers), broker=self.connection.as_uri())
        self.run(safety_interval=max(self.settings.batch_wait_ms / 1000, 0.001))
        log.info("worker stopped", handled=self.handled)

    @contextmanager
    def running_in_thread(self, safety_interval: float = 0.002) -> Iterator["Worker"]:
        """The worker consuming in a thread of this process (the embedded pipeline, tests); on
        exit it finishes the batches in hand and stops (``stopped`` says whether it did in 20 s)."""
        thread = threading.Thread(target=lambda: self.run(safety_interval=safety_interval), daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.request_stop()
            thread.join(20)
            self.stopped = not thread.is_alive()

    def request_stop(self, *_: Any) -> None:
        """Finish the batches in hand, ack them, then leave (prefetched ones go back to the queue)."""
        self.stopping = True

    @property
    def publisher(self) -> BatchPublisher:
        if self._publisher is None or self._publisher.connection is not self.producer_connection:
            self._publisher = BatchPublisher(self.producer_connection)
        return self._publisher

    def drop_publisher(self) -> None:
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None

    # --- one batch ---
    def flush(self, buffer: StageBuffer) -> None:
        """Handle the buffered deliveries as one batch; if that fails, each item alone. A message is
        acked once all its items are handled, requeued if one met a transient error, and rejected
        (to its DLQ) if it was poison; a poison item of a many-job hand-off is dead-lettered alone."""
        items, buffer.items = buffer.items, []
        handler = buffer.handler
        self.flushing = True
        try:
            self.handle_batch(handler, items)
        finally:
            self.flushing = False
            clear_event_context()  # the next lines are about no event in particular

    def handle_batch(self, handler: StageHandler, items: list[tuple[Message, Any]]) -> None:
        if not items:
            return
        try:
            self.commit_and_publish(handler, [item for _, item in items])
        except self.connection.connection_errors:
            raise  # the mixin reconnects; unacked deliveries come back
        except Exception as exc:  # noqa: BLE001 - isolate the culprit below
            if len(items) > 1:
                log.warning("batch failed, retrying one by one", stage=handler.stage, size=len(items),
                            error=str(exc)[:200])
                self.one_by_one(handler, items)
            else:
                message, item = items[0]
                poison = self.failure(handler, item, exc)
                if poison is None:
                    self.settle(message, message.requeue)
                else:
                    self.dead_letter(handler.stage, message, poison)
            return
        self.ack_all(list(dict.fromkeys(m for m, _ in items)))

    def settle(self, message: Message, how: Callable[[], None]) -> None:
        how()
        self.unsettled.discard(message.delivery_tag)

    def ack_all(self, messages: list[Message]) -> None:
        """Ack a batch's deliveries. On RabbitMQ one ``multiple`` ack covers them all when every
        unsettled delivery of the channel up to the highest tag is among them, as it always is for
        a one-stage worker (a batch takes all it has in hand): one frame, not one per message.
        (The in-memory transport ignores ``multiple``: there, one by one.)"""
        tags = {m.delivery_tag for m in messages}
        top = max(messages, key=lambda m: m.delivery_tag)
        if (len(messages) > 1 and self.connection.transport.driver_type == "amqp"
                and all(tag in tags for tag in self.unsettled if tag <= top.delivery_tag)):
            top.ack(multiple=True)
        else:
            for message in messages:
                message.ack()
        self.unsettled -= tags

    def one_by_one(self, handler: StageHandler, items: list[tuple[Message, Any]]) -> None:
        """Each item in its own transaction. After a transient failure (the database away, each
        attempt retried for up to 20 s) the items not tried yet go back with their messages
        untried: trying each of a batch of 1000 in turn could take hours without a heartbeat."""
        verdicts: dict[Message, list[tuple[str, Any, PoisonMessage | None]]] = {}
        transient = False
        for message, item in items:
            if transient:
                verdicts.setdefault(message, []).append(("requeue", item, None))
                continue
            try:
                self.commit_and_publish(handler, [item])
                verdicts.setdefault(message, []).append(("ok", item, None))
            except self.connection.connection_errors:
                raise
            except Exception as exc:  # noqa: BLE001
                poison = self.failure(handler, item, exc)
                transient = poison is None
                verdicts.setdefault(message, []).append(("requeue" if poison is None else "poison", item, poison))
        for message, outcomes in verdicts.items():
            if any(kind == "requeue" for kind, _, _ in outcomes):
                self.settle(message, message.requeue)  # the items already handled are recognised by their marks
                continue
            poisoned = [(item, poison) for kind, item, poison in outcomes if kind == "poison"]
            if len(outcomes) == 1 and poisoned:
                self.dead_letter(handler.stage, message, poisoned[0][1])
                continue
            for item, poison in poisoned:
                self.dead_letter_item(handler, item, poison)
            self.settle(message, message.ack)

    def failure(self, handler: StageHandler, item: Any, exc: Exception) -> PoisonMessage | None:
        """What a failed item is: None when a retry may cure it (transient), else the poison."""
        if isinstance(exc, PoisonMessage):
            return exc
        if is_transient(exc):
            log.warning("transient failure, will be retried", stage=handler.stage, error=str(exc)[:200])
            metrics.STAGE_MESSAGES.labels(stage=handler.stage, outcome="retried").inc()
            return None
        log.exception("handler failed", stage=handler.stage)
        ids = handler.log_context(item)
        return PoisonMessage("other", f"{type(exc).__name__}: {exc}", ids.get("event_id"), ids.get("port_id"))

    def commit_and_publish(self, handler: StageHandler, items: list[Any]) -> None:
        started = time.perf_counter()
        outputs = run_transaction(self.engine, lambda session: handler.handle(session, items))
        self.publish(outputs)
        self.handled += len(items)
        self.observe(handler, len(items), time.perf_counter() - started, outputs)

    def publish(self, outputs: list[Publish]) -> None:
        try:
            self.publisher.publish(handoff_messages(outputs))
        except Exception:
            self.drop_publisher()  # its channel may be unusable; the next batch opens a fresh one
            raise
        mark_published(self.engine, [out.body["seq"] for out in outputs if out.exchange == RESULTS.name])

    def observe(self, handler: StageHandler, size: int, seconds: float, outputs: list[Publish]) -> None:
        stage = handler.stage
        metrics.batch_done(stage)
        metrics.BATCH_SIZE.labels(stage=stage).observe(size)
        metrics.observe_each(metrics.STAGE_DURATION.labels(stage=stage), seconds / size, size)
        metrics.STAGE_MESSAGES.labels(stage=stage, outcome="ok").inc(size - handler.duplicates)
        if handler.duplicates:
            metrics.STAGE_MESSAGES.labels(stage=stage, outcome="duplicate").inc(handler.duplicates)
        report_results([(out.result or BindingResult.model_validate(out.body), out.occurred_at)
                        for out in outputs if out.exchange == RESULTS.name])

    def dead_letter(self, stage: str, message: Message, poison: PoisonMessage) -> None:
        """Record why, then reject without requeue: RabbitMQ routes it to the stage's DLQ. A message
        redelivered because a crash came between the record and the reject is recorded once. A new
        copy of a refused event recorded before (the same event id and body, e.g. its publisher
        retried) is acked instead: refused once, as a duplicate of a good event is handled once."""
        body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
        redelivered = bool((message.delivery_info or {}).get("redelivered"))
        new = self.record_dead_letter(stage, body.decode("utf-8", errors="replace"), poison, redelivered=redelivered)
        if new or redelivered:
            self.settle(message, partial(message.reject, requeue=False))
            return
        log.info("copy of a dead-lettered event dropped", stage=stage, event_id=poison.event_id)
        metrics.STAGE_MESSAGES.labels(stage=stage, outcome="duplicate").inc()
        self.settle(message, message.ack)

    def dead_letter_item(self, handler: StageHandler, item: Any, poison: PoisonMessage) -> None:
        """One poison job of a many-job hand-off: recorded (with an empty mark, so a redelivered
        hand-off skips it), and sent to the stage's DLQ on its own; its neighbours were handled."""
        body = item.model_dump(mode="json")
        self.publisher.publish([(DEAD_LETTERS.name, handler.stage, body)])
        self.record_dead_letter(handler.stage, orjson.dumps(body).decode(), poison, mark=handler.key(item))

    def record_dead_letter(self, stage: str, body: str, poison: PoisonMessage, redelivered: bool = False,
                           mark: str | None = None) -> bool:
        """The dead letter, and for a refused event naming a port a ``binding_failed`` result;
        False when it was recorded before (then only its unpublished refusals are sent again). One
        with an event id is looked for by it (indexed) every time, one without only if redelivered."""
        row = DeadLetter(stage=stage, reason=f"{poison.category}: {poison.reason}", event_id=poison.event_id,
                         port_id=poison.port_id, body=body[:65536])
        before = select(DeadLetter.id).where(DeadLetter.stage == stage, DeadLetter.body == row.body).limit(1)
        if poison.event_id is not None:
            before = before.where(DeadLetter.event_id == poison.event_id)

        def record(session: Session) -> tuple[bool, list[Publish]]:
            if (redelivered or poison.event_id is not None) and session.scalar(before) is not None:
                return False, unpublished_refusals(session, poison)
            session.add(row)
            if mark is not None:
                add_marks(session, stage, {mark: []})
            result = refusal(session, poison) if stage == "validate" else None
            return True, [result] if result is not None else []

        new, results = run_transaction(self.engine, record)
        if results:
            self.publish(results)
        if new:
            log.warning("dead-lettered", stage=stage, reason=row.reason, event_id=poison.event_id,
                        port_id=poison.port_id)
            metrics.DEAD_LETTERS.labels(stage=stage, reason=metrics.bounded(poison.category,
                                                                            metrics.DEAD_LETTER_REASONS)).inc()
            metrics.STAGE_MESSAGES.labels(stage=stage, outcome="dead_lettered").inc()
        return new


def tune_gc(batch_size: int) -> None:
    """A batch keeps its objects (models, rows, dicts: ~100 a job) alive until it ends, and an
    automatic collection in its middle walks them all: at the young generation's threshold of
    50,000, decoding a hand-off cost 10 -> 17 µs a job (measured). What start-up built is moved out
    of the collector's sight, and the threshold is twice what a batch keeps (200,000 for batches of
    1,000; at 200,000 with batches of 2,000, collections fell inside batches, ~90 ms each, measured).
    A batch leaves almost no cyclic garbage (``run_transaction``), so collections stay rare."""
    gc.freeze()
    gc.set_threshold(max(50_000, 200 * batch_size), 20, 20)


def mark_published(engine: Engine, seqs: list[int]) -> None:
    """The outbox side of a confirmed publish: these results need no relay."""
    if seqs:
        run_transaction(engine, lambda s: s.execute(
            update(ResultRow).where(among(s, ResultRow.seq, seqs)).values(published_at=datetime.now(UTC))))


def reason_category(result: BindingResult) -> str:
    decline = primary_decline(result.explanation)
    return failure_reason_category(result.error or (decline.reason if decline else ""))


def report_results(results: list[tuple[BindingResult, datetime | None]]) -> None:
    """One INFO line per published binding result (with the time its event occurred, if known),
    and the outcome metrics: counters once per label set of the batch."""
    now = datetime.now(UTC)
    bindings: collections.Counter[tuple[str, str]] = collections.Counter()
    failures: collections.Counter[str] = collections.Counter()
    for result, occurred_at in results:
        outcome = result.outcome
        reason = result.reason if outcome != "bound" else ""
        log.info("binding outcome", port_id=result.port_id, host=result.host, event_id=result.event_id,
                 outcome=outcome, vif_type=result.vif_type, reason=reason or None, seq=result.seq)
        bindings[(result.vif_type or "none", outcome)] += 1
        if outcome in ("failed", "error"):
            failures[reason_category(result)] += 1
        if occurred_at is not None:
            metrics.END_TO_END_LATENCY.observe(max((now - occurred_at).total_seconds(), 0.0))
    for (vif_type, outcome), count in bindings.items():
        metrics.BINDINGS.labels(vif_type=vif_type, outcome=outcome).inc(count)
    for category, count in failures.items():
        metrics.BINDING_FAILURES.labels(reason=category).inc(count)
