"""The stage worker: decode → stage → persist → publish → ack, in micro-batches.

Deliveries are buffered until ``batch_size`` have arrived or the oldest has waited
``batch_wait_ms``; the batch is handled in one database transaction, its hand-offs are published
with one wait for the broker's confirms, and only then are its deliveries acked (together).

What a failure costs a message depends on whose failure it is:

* **The message's own** (it cannot be decoded, or handling it raises): it is refused once and for
  all: recorded in ``dead_letters`` with its category and reason, then acked. If a batch fails, its
  items are tried one by one, so one bad message never takes its neighbours down with it.
* **The infrastructure's** (the database away, the broker refusing or not confirming a publish):
  the batch is *held*: kept in hand, unacked, and tried again with a growing pause while the
  connection's heartbeats go on. Nothing is requeued, so a message's delivery budget (the quorum
  queue's ``x-delivery-limit``, which counts every return to the queue) is spent only on failures
  the message causes itself, or on a worker dying with it in hand.
* **A lost broker connection**: the kombu mixin reconnects; deliveries not acked come back.

A message the broker gives up on (its delivery limit reached) lands on the stage's DLQ; the worker
consumes that DLQ too and records each such message in ``dead_letters`` (category
``delivery_limit``), so that every dead letter is in one place, with its reason.
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

import structlog
from kombu import Connection, Consumer, Message
from kombu.mixins import ConsumerProducerMixin
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session

from pipeline.db import among, is_transient, run_transaction
from pipeline.models.binding import BindingResult
from pipeline.models.reasons import failure_reason_category, primary_decline
from pipeline.models.refusals import DELIVERY_LIMIT, OTHER, PoisonMessage
from pipeline.models.tables import ResultRow
from pipeline.observability import metrics
from pipeline.observability.logging import clear_event_context
from pipeline.settings import Settings
from pipeline.store import dead_letters as dead_letter_store
from pipeline.store.marks import add_marks
from pipeline.workers.gauges import refresh_gauges
from pipeline.workers.keepalive import KeepAlive
from pipeline.workers.handlers import HANDLERS, HandledBatch, StageHandler, poison_refusal, unpublished_refusals
from pipeline.workers.messages import HANDOFF_JOBS, REDRIVE_HEADER, Publish, handoff_messages, peek_identity
from pipeline.workers.publisher import BatchPublisher, PublishNotConfirmed, connect_with_retry
from pipeline.workers.topology import RESULTS, check_topology, dead_letter_queue, declare_topology, stage_queue

log = structlog.get_logger(__name__)
GAUGE_INTERVAL = 5.0  # seconds between refreshes of the database-derived gauges
DLQ_PREFETCH = 10


@dataclass
class StageBuffer:
    """A stage's deliveries decoded on arrival, waiting for their batch: ``(message, item)`` pairs
    (a hand-off message holds many jobs, so a batch is counted in items, not messages)."""

    handler: StageHandler
    items: list[tuple[Message, Any]] = field(default_factory=list)
    first_at: float = 0.0
    held_until: float = 0.0  # a batch held back by the infrastructure is tried again from then on
    backoff: float = 0.0

    def add(self, message: Message, items: list[Any]) -> None:
        if not self.items:
            self.first_at = time.monotonic()
        self.items += [(message, item) for item in items]


@dataclass
class Refused:
    """A message (or one job of a hand-off: ``item``) refused, waiting to be recorded and settled."""

    stage: str
    message: Message
    poison: PoisonMessage
    item: Any = None  # the job, when the refusal is one job's of a many-job hand-off
    mark: str | None = None  # its job id: an empty mark lets a redelivered hand-off skip it
    routing_key: str | None = None  # where it was first sent, when it comes from a DLQ


class Worker(ConsumerProducerMixin):
    """Consumes the queues of ``stages`` (one, or all four for ``bindpipe run``), and their DLQs."""

    def __init__(self, settings: Settings, engine: Engine, stages: list[str], connection: Connection | None = None):
        self.settings = settings
        self.engine = engine
        self.connection = connection or Connection(settings.broker_url, heartbeat=settings.heartbeat,
                                                   transport_options={"polling_interval": 0.001},
                                                   ssl=settings.broker_ssl_options())
        self.buffers = {stage: StageBuffer(HANDLERS[stage](settings)) for stage in stages}
        self.stopping = False
        self.flushing = False
        self.open: dict[int, int] = {}  # delivery tag -> its items not settled yet (acked once none is left)
        self.refused: list[Refused] = []
        self.refused_held_until = 0.0
        self.refused_backoff = 0.0
        self.handled = 0
        self.connections_made = 0  # to the broker, for consuming: more than one means a reconnection
        self.consuming: Connection = self.connection
        self._publisher: BatchPublisher | None = None
        self.keepalive = KeepAlive(self.broker_connections, settings.heartbeat)
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
            self.connections_made += 1
            if self.connections_made > 1:
                log.warning("reconnected to the broker; deliveries not acked came back", times=self.connections_made)
            self.consuming = conn  # the mixin consumes on a clone of ``self.connection``
            yield conn

    def get_consumers(self, consumer_cls: type[Consumer], channel: Any) -> list[Consumer]:
        for buffer in self.buffers.values():  # deliveries of a lost connection come back by themselves
            buffer.items, buffer.held_until, buffer.backoff = [], 0.0, 0.0
        self.open, self.refused = {}, []
        queues = [stage_queue(stage, self.settings, no_declare=True) for stage in self.buffers]
        dlqs = [dead_letter_queue(stage, self.settings, no_declare=True) for stage in self.buffers]
        if self.settings.declare_topology:
            declare_topology(self.connection, self.settings)
        else:
            check_topology(channel, queues + dlqs)
        consumers = [consumer_cls(queues=[queue], on_message=partial(self.receive, buffer), no_ack=False,
                                  prefetch_count=self.prefetch(stage))
                     for stage, queue, buffer in zip(self.buffers, queues, self.buffers.values(), strict=True)]
        if not self.settings.embedded:  # the in-memory transport has no delivery limit, so no DLQ arrivals
            consumers += [consumer_cls(queues=[dlq], on_message=partial(self.receive_dead, stage), no_ack=False,
                                       prefetch_count=DLQ_PREFETCH) for stage, dlq in zip(self.buffers, dlqs, strict=True)]
        return consumers

    def on_consume_ready(self, connection: Connection, channel: Any, consumers: list[Consumer], **kwargs: Any) -> None:
        metrics.worker_state(self.buffers, consuming=True)

    def prefetch(self, stage: str) -> int:
        """Deliveries in hand per stage: a hand-off holds up to ``HANDOFF_JOBS`` jobs, so fewer of
        those. (The in-memory transport applies one limit to the whole channel: keep the full one.)"""
        if stage == "validate" or self.settings.embedded:
            return self.settings.prefetch
        return max(2, self.settings.prefetch // HANDOFF_JOBS)

    def receive(self, buffer: StageBuffer, message: Message) -> None:
        """Decode a delivery as it arrives; a message refused here is recorded on the next loop turn."""
        handler = buffer.handler
        self.open[message.delivery_tag] = 1
        try:
            items = handler.decode(message.body, message.headers, message.content_type)
        except PoisonMessage as poison:
            self.refused.append(Refused(handler.stage, message, poison))
            return
        except Exception as exc:  # noqa: BLE001 - a decoder bug must not stop the worker
            log.exception("undecodable message", stage=handler.stage)
            self.refused.append(Refused(handler.stage, message, PoisonMessage(OTHER, f"{type(exc).__name__}: {exc}")))
            return
        self.open[message.delivery_tag] = len(items)
        buffer.add(message, items)

    def receive_dead(self, stage: str, message: Message) -> None:
        """A message the broker dead-lettered (its delivery limit reached): recorded, then acked."""
        self.open[message.delivery_tag] = 1
        deaths = (message.headers or {}).get("x-death") or [{}]
        death = deaths[0] if isinstance(deaths[0], dict) else {}
        why = str(death.get("reason") or "dead-lettered by the broker")
        keys = death.get("routing-keys") or []
        self.refused.append(Refused(stage, message, PoisonMessage(
            DELIVERY_LIMIT if why == "delivery_limit" else OTHER,
            f"the broker dead-lettered it ({why}, {death.get('count') or 'several'} time(s)): it failed every "
            "time or its workers died with it in hand; see the workers' logs, then `bindpipe dlq redrive`"),
            routing_key=str(keys[0]) if keys else None))

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
        """Nothing buffered, nothing refused waiting to be recorded, and no batch being handled."""
        return self.buffered() == 0 and not self.refused and not self.flushing

    def on_iteration(self) -> None:
        now = time.monotonic()
        if self.refused and (now >= self.refused_held_until or self.stopping):
            self.settle_refused()
        wait = self.settings.batch_wait_ms / 1000
        for stage, buffer in self.buffers.items():
            metrics.touch_loop(stage)
            if buffer.items and (now >= buffer.held_until or self.stopping) and (
                    self.stopping or len(buffer.items) >= self.settings.batch_size or now - buffer.first_at >= wait):
                self.flush(buffer)
        for task in self.periodic:
            task()
        if now - self._gauges_at >= GAUGE_INTERVAL:
            self._gauges_at = now
            try:
                with self.keepalive.waiting():
                    refresh_gauges(self.engine, list(self.buffers))
                metrics.worker_state(self.buffers, database=True)
            except Exception as exc:  # noqa: BLE001 - gauges wait for the database; the work goes on
                metrics.worker_state(self.buffers, database=False)
                log.warning("gauges not refreshed", error=str(exc)[:200])
        if self.stopping:
            left = sum(len(b.items) for b in self.buffers.values()) + len(self.refused)
            if left:
                log.warning("stopping with messages not handled (the database or broker is away); "
                            "they go back to their queues", count=left)
            self.should_stop = True

    def broker_connections(self) -> list[Any]:
        """The py-amqp connections this worker holds (consuming, and publishing if it has published)."""
        held = [self.consuming] + ([self._publisher.connection] if self._publisher is not None else [])
        return [c.connection for c in held if c.transport.driver_type == "amqp" and c.connected]

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
        try:
            self.run(safety_interval=max(self.settings.batch_wait_ms / 1000, 0.001))
        finally:
            self.keepalive.stop()
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
            self.keepalive.stop()
            self.stopped = not thread.is_alive()

    def request_stop(self, *_: Any) -> None:
        """Finish the batches in hand, ack them, then leave (prefetched ones go back to the queue)."""
        self.stopping = True

    @property
    def publisher(self) -> BatchPublisher:
        if self._publisher is None or self._publisher.connection is not self.producer_connection:
            self._publisher = BatchPublisher(self.producer_connection, confirm_timeout=self.settings.confirm_timeout)
        return self._publisher

    def drop_publisher(self) -> None:
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None

    # --- one batch ---
    def flush(self, buffer: StageBuffer) -> None:
        """Handle the buffered deliveries as one batch (see the module's docstring for failures)."""
        items, buffer.items = buffer.items, []
        self.flushing = True
        try:
            self.handle_batch(buffer, items)
        finally:
            self.flushing = False
            clear_event_context()  # the next lines are about no event in particular

    def handle_batch(self, buffer: StageBuffer, items: list[tuple[Message, Any]]) -> None:
        handler = buffer.handler
        try:
            refused = self.commit_and_publish(handler, [item for _, item in items])
        except self.connection.connection_errors:
            raise  # the mixin reconnects; unacked deliveries come back
        except Exception as exc:  # noqa: BLE001 - whose failure it is decides what follows
            if self.infrastructure_failure(exc):
                self.hold(buffer, items, exc)
            elif len(items) > 1:
                log.warning("batch failed, retrying one by one", stage=handler.stage, size=len(items),
                            error=str(exc)[:200])
                self.one_by_one(buffer, items)
            else:
                self.refuse(handler, *items[0], self.poison_of(handler, items[0][1], exc))
            return
        buffer.backoff = 0.0
        self.settle_handled(handler, items, refused)

    def one_by_one(self, buffer: StageBuffer, items: list[tuple[Message, Any]]) -> None:
        """Each item in its own transaction: an item that fails by itself is refused alone. If the
        infrastructure fails meanwhile, the items not handled yet are held, untried."""
        handler = buffer.handler
        done: list[tuple[Message, Any]] = []
        refused: list[tuple[Any, PoisonMessage]] = []
        for index, (message, item) in enumerate(items):
            try:
                refused += self.commit_and_publish(handler, [item])
            except self.connection.connection_errors:
                raise
            except Exception as exc:  # noqa: BLE001
                if self.infrastructure_failure(exc):
                    self.hold(buffer, items[index:], exc)
                    break
                self.refuse(handler, message, item, self.poison_of(handler, item, exc))
                continue
            done.append((message, item))
        self.settle_handled(handler, done, refused)

    def infrastructure_failure(self, exc: Exception) -> bool:
        """A failure no message caused: the database away (or a race a retry resolves), or the
        broker refusing or not confirming a publish (the publisher's channel is dropped)."""
        if isinstance(exc, (PublishNotConfirmed, *self.connection.channel_errors)):
            self.drop_publisher()
            return True
        return is_transient(exc)

    def hold(self, buffer: StageBuffer, items: list[tuple[Message, Any]], exc: Exception) -> None:
        """Keep ``items`` in hand, unacked, and try them again after a growing pause (heartbeats go on)."""
        buffer.items[:0] = items
        buffer.backoff = min(max(buffer.backoff * 2, self.settings.hold_backoff_min), self.settings.hold_backoff_max)
        buffer.held_until = time.monotonic() + buffer.backoff
        metrics.STAGE_MESSAGES.labels(stage=buffer.handler.stage, outcome="retried").inc(len(items))
        log.warning("infrastructure failure: holding the batch and trying again", stage=buffer.handler.stage,
                    size=len(items), retry_in_s=round(buffer.backoff, 2), error=str(exc)[:200])

    def poison_of(self, handler: StageHandler, item: Any, exc: Exception) -> PoisonMessage:
        """The refusal of an item that failed by itself."""
        if isinstance(exc, PoisonMessage):
            return exc
        log.exception("handler failed", stage=handler.stage)
        ids = handler.log_context(item)
        return PoisonMessage(OTHER, f"{type(exc).__name__}: {exc}", ids.get("event_id"), ids.get("port_id"))

    def refuse(self, handler: StageHandler, message: Message, item: Any, poison: PoisonMessage) -> None:
        """An item that failed by itself: at intake the whole message (an envelope) is refused; at a
        later stage only that job of its hand-off, whose neighbours were handled."""
        if handler.stage == "validate":
            self.refused.append(Refused(handler.stage, message, poison))
        else:
            self.refused.append(Refused(handler.stage, message, poison, item=item, mark=handler.key(item)))
        self.settle_refused()

    def settle_handled(self, handler: StageHandler, items: list[tuple[Message, Any]],
                       refused: list[tuple[Any, PoisonMessage]]) -> None:
        """``items`` went through a committed batch: each is settled, or refused if the handler
        refused it (its neighbours' effects are committed; it had none)."""
        if not refused:
            self.settle(items)
            return
        why = {id(item): poison for item, poison in refused}
        self.settle([(message, item) for message, item in items if id(item) not in why])
        for message, item in items:
            if id(item) in why:
                self.refuse(handler, message, item, why[id(item)])

    def settle(self, items: list[tuple[Message, Any]]) -> None:
        """These items are handled: ack each message none of whose items is left (together)."""
        complete = []
        for message, _ in items:
            tag = message.delivery_tag
            self.open[tag] = self.open.get(tag, 1) - 1
            if self.open[tag] <= 0:
                complete.append(message)
        if complete:
            self.ack_all(complete)

    def ack_all(self, messages: list[Message]) -> None:
        """Ack deliveries. On RabbitMQ one ``multiple`` ack covers them all when every delivery of
        the channel up to the highest tag that is not settled yet is among them, as it always is
        for a one-stage worker (a batch takes all it has in hand): one frame, not one per message.
        (The in-memory transport ignores ``multiple``: there, one by one.)"""
        tags = {m.delivery_tag for m in messages}
        top = max(messages, key=lambda m: m.delivery_tag)
        if (len(messages) > 1 and self.connection.transport.driver_type == "amqp"
                and all(tag in tags for tag in self.open if tag <= top.delivery_tag)):
            top.ack(multiple=True)
        else:
            for message in messages:
                message.ack()
        for tag in tags:
            self.open.pop(tag, None)

    def commit_and_publish(self, handler: StageHandler, items: list[Any]) -> list[tuple[Any, PoisonMessage]]:
        """Handle, commit and publish a batch; the items the handler refused (nothing of theirs written)."""
        started = time.perf_counter()
        with self.keepalive.waiting():
            batch = run_transaction(self.engine, lambda session: handler.handle(session, items),
                                    self.settings.transaction_retry_seconds)
        self.publish(batch.publishes)
        self.handled += len(items) - len(batch.refused)
        self.observe(handler, len(items) - len(batch.refused), time.perf_counter() - started, batch)
        return batch.refused

    def publish(self, outputs: list[Publish]) -> None:
        try:
            self.publisher.publish(handoff_messages(outputs))
        except Exception:
            self.drop_publisher()  # its channel may be unusable; the next batch opens a fresh one
            raise
        with self.keepalive.waiting():
            mark_published(self.engine, [out.body["seq"] for out in outputs if out.exchange == RESULTS.name],
                           self.settings.transaction_retry_seconds)

    def observe(self, handler: StageHandler, size: int, seconds: float, batch: HandledBatch) -> None:
        stage = handler.stage
        metrics.batch_done(stage)
        if size:
            metrics.BATCH_SIZE.labels(stage=stage).observe(size)
            metrics.observe_each(metrics.STAGE_DURATION.labels(stage=stage), seconds / size, size)
            metrics.STAGE_MESSAGES.labels(stage=stage, outcome="ok").inc(size - batch.duplicates)
        if batch.duplicates:
            metrics.STAGE_MESSAGES.labels(stage=stage, outcome="duplicate").inc(batch.duplicates)
        report_results([(out.result or BindingResult.model_validate(out.body), out.occurred_at)
                        for out in batch.publishes if out.exchange == RESULTS.name])

    # --- refusals ---
    def settle_refused(self) -> None:
        """Record each refused message (or job) and settle it. While the database is away they are
        held, as batches are; one that cannot be recorded at all goes to the broker's DLQ, never
        lost and never in a loop that stops the worker."""
        pending, self.refused = self.refused, []
        for index, refused in enumerate(pending):
            try:
                self.record_refusal(refused)
            except self.connection.connection_errors:
                self.refused = pending[index:] + self.refused
                raise
            except Exception as exc:  # noqa: BLE001 - a refusal must never stop the worker
                if self.infrastructure_failure(exc):
                    self.refused = pending[index:] + self.refused
                    self.refused_backoff = min(max(self.refused_backoff * 2, self.settings.hold_backoff_min),
                                               self.settings.hold_backoff_max)
                    self.refused_held_until = time.monotonic() + self.refused_backoff
                    log.warning("infrastructure failure: holding refused messages", count=len(self.refused),
                                retry_in_s=round(self.refused_backoff, 2), error=str(exc)[:200])
                    return
                log.exception("a refused message could not be recorded", stage=refused.stage,
                              category=refused.poison.category)
                self.give_up(refused, pending[index + 1:])
                return
        self.refused_backoff = 0.0

    def record_refusal(self, refused: Refused) -> None:
        """Record the refusal (once: a copy of a recorded one is recognised), publish the result
        that tells the host of a refused port event, then settle the message."""
        recorded, results = self.commit_refusal(refused)
        if results:
            self.publish(results)
        stage = refused.stage
        if recorded is None:
            log.info("copy of a dead-lettered message dropped", stage=stage, event_id=refused.poison.event_id)
            metrics.STAGE_MESSAGES.labels(stage=stage, outcome="duplicate").inc()
        else:
            dead_letter_id, poison = recorded
            log.warning("dead-lettered", stage=stage, dead_letter_id=dead_letter_id,
                        reason=f"{poison.category}: {poison.reason}"[:500], event_id=poison.event_id,
                        port_id=poison.port_id)
            metrics.DEAD_LETTERS.labels(stage=stage, reason=metrics.bounded(
                poison.category, metrics.DEAD_LETTER_REASONS)).inc()
            metrics.STAGE_MESSAGES.labels(stage=stage, outcome="dead_lettered").inc()
        self.settle([(refused.message, refused.item)])

    def commit_refusal(self, refused: Refused) -> tuple[tuple[int, PoisonMessage] | None, list[Publish]]:
        """The refusal's transaction: its dead letter (unless it is a copy of one recorded: None),
        the empty mark of a refused job, and the result of a refused port event to publish."""
        message, stage = refused.message, refused.stage
        body = message.body if isinstance(message.body, bytes) else str(message.body).encode("utf-8", "surrogatepass")
        redrive_of = (message.headers or {}).get(REDRIVE_HEADER)
        arrival = dead_letter_store.Arrival(
            stage=stage, body=body if refused.item is None else refused.item.model_dump_json().encode(),
            routing_key=refused.routing_key or (message.delivery_info or {}).get("routing_key"),
            headers=message.headers or {},
            redelivered=bool((message.delivery_info or {}).get("redelivered")),
            redrive_of=int(redrive_of) if isinstance(redrive_of, int | str) and str(redrive_of).isdigit() else None)


        def record(session: Session) -> tuple[Any, list[Publish]]:
            earlier, poison = dead_letter_store.find_earlier(session, arrival, refused.poison)
            if earlier is not None:
                return None, unpublished_refusals(session, poison)
            # a port the decoder named is told of its refusal; the ids of a body it did not trust (a
            # bad signature) or never read (from a DLQ) are only recorded, for `dlq list` and `explain`
            tell = stage == "validate" and poison.port_id is not None
            if stage == "validate" and poison.event_id is None and poison.port_id is None:
                poison = PoisonMessage(poison.category, poison.reason, *peek_identity(body)[:2])
            row = dead_letter_store.add(session, arrival, poison)
            if refused.mark is not None:
                add_marks(session, stage, {refused.mark: []})
            result = poison_refusal(session, poison) if tell else None
            return (row.id, poison), [result] if result is not None else []

        with self.keepalive.waiting():
            return run_transaction(self.engine, record, self.settings.transaction_retry_seconds)

    def give_up(self, refused: Refused, rest: list[Refused]) -> None:
        """The last resort for a refusal that cannot be recorded: the whole message goes to the
        broker's DLQ (which keeps it; from there it is tried again) once none of its other items is
        in hand. One that came from a DLQ stays in hand and is tried again after a pause."""
        self.refused += rest
        tag = refused.message.delivery_tag
        if refused.routing_key is not None or refused.poison.category == DELIVERY_LIMIT:
            self.refused.insert(0, refused)
            self.refused_backoff = self.settings.hold_backoff_max
            self.refused_held_until = time.monotonic() + self.refused_backoff
        elif self.open.get(tag, 1) > 1:
            self.open[tag] -= 1  # its other jobs are still being handled; the message is acked with them
        else:
            self.open.pop(tag, None)
            refused.message.reject(requeue=False)


def tune_gc(batch_size: int) -> None:
    """A batch keeps its objects (models, rows, dicts: ~100 a job) alive until it ends, and an
    automatic collection in its middle walks them all: at the young generation's threshold of
    50,000, decoding a hand-off cost 10 -> 17 µs a job (measured). What start-up built is moved out
    of the collector's sight, and the threshold is twice what a batch keeps (200,000 for batches of
    1,000; at 200,000 with batches of 2,000, collections fell inside batches, ~90 ms each, measured).
    A batch leaves almost no cyclic garbage (``run_transaction``), so collections stay rare."""
    gc.freeze()
    gc.set_threshold(max(50_000, 200 * batch_size), 20, 20)


def mark_published(engine: Engine, seqs: list[int], retry_seconds: float = 20.0) -> None:
    """The outbox side of a confirmed publish: these results need no relay."""
    if seqs:
        run_transaction(engine, lambda s: s.execute(
            update(ResultRow).where(among(s, ResultRow.seq, seqs)).values(published_at=datetime.now(UTC))),
            retry_seconds)


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
