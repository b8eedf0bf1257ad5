"""``bindpipe worker STAGE`` with test-side instrumentation, for the fault harness::

    python -m tests.faults.worker STAGE

It installs hooks on the product's classes (monkeypatching in this process only; the product code
is unchanged), then runs the real CLI entry point ``pipeline.cli.app`` as ``bindpipe worker STAGE``.

**Crash points** (``BINDPIPE_FAULT_CRASH``): the process SIGKILLs itself at a chosen boundary of a
batch, which random ``kill -9`` only hits by luck. A comma-separated list of ``POINT@N`` (crash the
N-th time the point is reached in this process) or ``POINT=P`` (crash with probability P each time):

``in_transaction``  the handler's effects are written (rows locked), not committed
``after_commit``    the batch is committed, nothing published (results in the outbox, unpublished)
``after_publish``   hand-offs/results published and confirmed, the outbox not marked published
``before_ack``      committed, published and marked, no delivery acked
``mid_ack``         about to ack one delivery of the batch (earlier ones are acked)
``before_reject``   a dead-letter row committed, the poison delivery not yet rejected

Before dying it appends ``crash POINT STAGE PID TIME`` to ``BINDPIPE_FAULT_LOG``.

**Delivery log** (``BINDPIPE_FAULT_LOG``): every delivery whose body carries a hostile marker is
logged as ``delivery MARKER STAGE PID X-DELIVERY-COUNT TIME``, and every redelivery (a quorum
queue's ``x-delivery-count`` > 0) as ``redelivery STAGE PID COUNT TIME``, so the checker can tell a
poison message delivered once from one retried by the pipeline.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time

from tests.faults.checker import marker_of

POINTS = ("in_transaction", "after_commit", "after_publish", "before_ack", "mid_ack", "before_reject")


class Hooks:
    def __init__(self, stage: str, spec: str, log_path: str | None, seed: str):
        self.stage, self.log_path = stage, log_path
        self.at: dict[str, int] = {}
        self.rate: dict[str, float] = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            if "@" in item:
                point, n = item.split("@")
                self.at[point] = int(n)
            else:
                point, p = item.split("=")
                self.rate[point] = float(p)
            if point not in POINTS:
                raise SystemExit(f"unknown crash point {point!r}; one of {POINTS}")
        self.hits: dict[str, int] = dict.fromkeys(POINTS, 0)
        self.random = random.Random(f"{seed}:{os.getpid()}")
        self.log_file = open(log_path, "a", buffering=1) if log_path else None  # noqa: SIM115

    def log(self, line: str) -> None:
        if self.log_file is not None:
            self.log_file.write(f"{line} {time.time():.6f}\n")

    def point(self, name: str) -> None:
        self.hits[name] += 1
        if self.hits[name] == self.at.get(name) or (name in self.rate and self.random.random() < self.rate[name]):
            self.log(f"crash {name} {self.stage} {os.getpid()}")
            os.kill(os.getpid(), signal.SIGKILL)


def install(hooks: Hooks) -> None:
    from kombu.message import Message

    from pipeline.workers import consumer, handlers

    original_handle = handlers.StageHandler.handle

    def handle(self, session, items):  # noqa: ANN001, ANN202
        outputs = original_handle(self, session, items)
        session.flush()
        hooks.point("in_transaction")
        return outputs

    handlers.StageHandler.handle = handle

    original_publish = consumer.Worker.publish

    def publish(self, outputs):  # noqa: ANN001, ANN202
        hooks.point("after_commit")
        original_publish(self, outputs)
        hooks.point("before_ack")

    consumer.Worker.publish = publish

    original_mark = consumer.mark_published

    def mark_published(engine, seqs):  # noqa: ANN001, ANN202
        if seqs:
            hooks.point("after_publish")
        return original_mark(engine, seqs)

    consumer.mark_published = mark_published

    original_ack, original_reject = Message.ack, Message.reject

    def ack(self, multiple=False):  # noqa: ANN001, ANN202
        hooks.point("mid_ack")
        return original_ack(self, multiple)

    def reject(self, requeue=False):  # noqa: ANN001, ANN202
        if not requeue:
            hooks.point("before_reject")
        return original_reject(self, requeue)

    Message.ack, Message.reject = ack, reject

    original_add = consumer.StageBuffer.add

    def add(self, message):  # noqa: ANN001, ANN202
        count = (message.headers or {}).get("x-delivery-count") or 0
        if count:
            hooks.log(f"redelivery {hooks.stage} {os.getpid()} {count}")
        marker = marker_of(message.body)
        if marker is not None:
            hooks.log(f"delivery {marker} {hooks.stage} {os.getpid()} {count}")
        return original_add(self, message)

    consumer.StageBuffer.add = add


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m tests.faults.worker STAGE")
    stage = sys.argv[1]
    hooks = Hooks(stage, os.environ.get("BINDPIPE_FAULT_CRASH", ""), os.environ.get("BINDPIPE_FAULT_LOG"),
                  os.environ.get("BINDPIPE_FAULT_SEED", "0"))
    install(hooks)
    from pipeline.cli import app

    sys.argv = ["bindpipe", "worker", stage]
    app()


if __name__ == "__main__":
    main()
