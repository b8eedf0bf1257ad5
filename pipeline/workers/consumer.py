"""The stage worker: decode → stage → persist → publish → ack, in micro-batches.

Deliveries are buffered until ``batch_size`` have arrived or the oldest has waited
``batch_wait_ms``; the batch is handled in one database transaction, its hand-offs are published
with publisher confirms, and only then are its deliveries acked. A message that cannot be decoded
is dead-lettered on its first delivery. If a batch fails, its messages are retried one by one, so
one bad message never takes its neighbours down with it.
"""

import signal
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from kombu import Connection, Consumer, Message, Producer
from kombu.mixins import ConsumerProducerMixin
from sqlalchemy import Engine, update

from pipeline.db import is_transient, run_transaction
from pipeline.models.tables import DeadLetter, ResultRow
from pipeline.settings import Settings
from pipeline.workers.handlers import HANDLERS, PoisonMessage, Publish, StageHandler
from pipeline.workers.topology import RESULTS, declare_topology, stage_queue

log = structlog.get_logger(__name__)


@dataclass
class StageBuffer:
    handler: StageHandler
    messages: list[Message] = field(default_factory=list)
    first_at: float = 0.0

    def add(self, message: Message) -> None:
        if not self.messages:
            self.first_at = time.monotonic()
        self.messages.append(message)


class Worker(ConsumerProducerMixin):
    """Consumes the queues of ``stages`` (one, or all four for ``bindpipe run``)."""

    def __init__(self, settings: Settings, engine: Engine, stages: list[str], connection: Connection | None = None):
        self.settings = settings
        self.engine = engine
        self.connection = connection or Connection(
            settings.broker_url, heartbeat=settings.heartbeat,
            transport_options={"confirm_publish": True, "polling_interval": 0.001})
        self.buffers = {stage: StageBuffer(HANDLERS[stage](settings)) for stage in stages}
        self.stopping = False
        self.handled = 0

    # --- kombu mixin hooks ---
    def get_consumers(self, consumer_cls: type[Consumer], channel: Any) -> list[Consumer]:
        declare_topology(self.connection, self.settings)
        return [consumer_cls(queues=[stage_queue(stage, self.settings)], on_message=buffer.add,
                             prefetch_count=self.settings.prefetch, no_ack=False)
                for stage, buffer in self.buffers.items()]

    def on_iteration(self) -> None:
        now = time.monotonic()
        wait = self.settings.batch_wait_ms / 1000
        for buffer in self.buffers.values():
            if buffer.messages and (self.stopping or len(buffer.messages) >= self.settings.batch_size
                                    or now - buffer.first_at >= wait):
                self.flush(buffer)
        if self.stopping:
            self.should_stop = True

    # --- running ---
    def run_forever(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        self.run(safety_interval=max(self.settings.batch_wait_ms / 1000, 0.001))

    def request_stop(self, *_: Any) -> None:
        """Finish the batches in hand, ack them, then leave (prefetched ones go back to the queue)."""
        self.stopping = True

    # --- one batch ---
    def flush(self, buffer: StageBuffer) -> None:
        messages, buffer.messages = buffer.messages, []
        handler = buffer.handler
        decoded: list[tuple[Message, Any]] = []
        for message in messages:
            try:
                decoded.append((message, handler.decode(message.body)))
            except PoisonMessage as poison:
                self.dead_letter(handler.stage, message, poison)
        if not decoded:
            return
        try:
            self.commit_and_publish(handler, decoded)
        except Exception as exc:  # noqa: BLE001 - isolate the culprit below
            if len(decoded) == 1:
                self.fail_one(handler, decoded[0][0], exc)
                return
            log.warning("batch failed, retrying one by one", stage=handler.stage, size=len(decoded),
                        error=str(exc)[:200])
            for pair in decoded:
                try:
                    self.commit_and_publish(handler, [pair])
                except Exception as single_exc:  # noqa: BLE001
                    self.fail_one(handler, pair[0], single_exc)

    def commit_and_publish(self, handler: StageHandler, decoded: list[tuple[Message, Any]]) -> None:
        outputs = run_transaction(self.engine, lambda session: handler.handle(session, [d for _, d in decoded]))
        self.publish(outputs)
        for message, _ in decoded:
            message.ack()
        self.handled += len(decoded)

    def publish(self, outputs: list[Publish]) -> None:
        producer: Producer = self.producer
        for out in outputs:
            producer.publish(out.body, exchange=out.exchange, routing_key=out.routing_key, serializer="json",
                             delivery_mode=2, retry=True, retry_policy={"max_retries": 5, "interval_max": 2})
        seqs = [out.body["seq"] for out in outputs if out.exchange == RESULTS.name]
        if seqs:
            run_transaction(self.engine, lambda s: s.execute(
                update(ResultRow).where(ResultRow.seq.in_(seqs)).values(published_at=datetime.now(UTC))))

    def fail_one(self, handler: StageHandler, message: Message, exc: Exception) -> None:
        if isinstance(exc, PoisonMessage):
            self.dead_letter(handler.stage, message, exc)
        elif is_transient(exc):
            log.warning("transient failure, message requeued", stage=handler.stage, error=str(exc)[:200])
            message.requeue()
        else:
            log.exception("handler failed", stage=handler.stage)
            self.dead_letter(handler.stage, message, PoisonMessage("other", f"{type(exc).__name__}: {exc}"))

    def dead_letter(self, stage: str, message: Message, poison: PoisonMessage) -> None:
        """Record why, then reject without requeue: RabbitMQ routes it to the stage's DLQ."""
        body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
        row = DeadLetter(stage=stage, reason=f"{poison.category}: {poison.reason}", event_id=poison.event_id,
                         port_id=poison.port_id, body=body.decode("utf-8", errors="replace")[:65536])
        run_transaction(self.engine, lambda session: session.add(row))
        log.warning("dead-lettered", stage=stage, reason=row.reason, event_id=poison.event_id)
        message.reject(requeue=False)
