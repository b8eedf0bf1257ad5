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
``after_dead_letter`` a refused message's dead letter committed, its delivery not yet acked

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
from collections.abc import Callable
from typing import Any

from tests.faults.checker import marker_of

POINTS = ("in_transaction", "after_commit", "after_publish", "before_ack", "mid_ack", "after_dead_letter")


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


def _wrap(owner: object, name: str, make: "Callable[[Callable[..., Any]], Callable[..., Any]]", hooks: Hooks) -> None:
    """Replace ``owner.name`` by ``make(original)``; a hook point the product no longer has is
    reported in the fault log (the checker then sees that point never fire) instead of failing."""
    original = getattr(owner, name, None)
    if original is None:
        hooks.log(f"missing-hook {getattr(owner, '__name__', owner)}.{name} {os.getpid()}")
        return
    setattr(owner, name, make(original))


def install(hooks: Hooks) -> None:
    """Hooks on stable seams: kombu's Consumer/Message, and the worker's ``publish`` (commit done,
    nothing published) and ``commit_refusal`` (a dead letter committed), the outbox's
    ``mark_published`` and the stage handlers' ``handle``. Every wrapper passes its arguments
    through untouched, whatever the signature."""
    from kombu.message import Message
    from kombu.messaging import Consumer

    from pipeline.workers import consumer, handlers

    def handle(original):  # noqa: ANN001, ANN202
        def wrapper(self, session, *args, **kwargs):  # noqa: ANN001, ANN202
            outputs = original(self, session, *args, **kwargs)
            session.flush()
            hooks.point("in_transaction")
            return outputs
        return wrapper

    def publish(original):  # noqa: ANN001, ANN202
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            hooks.point("after_commit")
            result = original(*args, **kwargs)
            hooks.point("before_ack")
            return result
        return wrapper

    def mark_published(original):  # noqa: ANN001, ANN202
        def wrapper(engine, seqs, *args, **kwargs):  # noqa: ANN001, ANN202
            if seqs:
                hooks.point("after_publish")
            return original(engine, seqs, *args, **kwargs)
        return wrapper

    def ack(original):  # noqa: ANN001, ANN202
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            hooks.point("mid_ack")
            return original(*args, **kwargs)
        return wrapper

    def commit_refusal(original):  # noqa: ANN001, ANN202
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            outcome = original(*args, **kwargs)
            hooks.point("after_dead_letter")
            return outcome
        return wrapper

    def receive(original):  # noqa: ANN001, ANN202
        def wrapper(self, message, *args, **kwargs):  # noqa: ANN001, ANN202
            count = (getattr(message, "headers", None) or {}).get("x-delivery-count") or 0
            if count:
                hooks.log(f"redelivery {hooks.stage} {os.getpid()} {count}")
            marker = marker_of(getattr(message, "body", b"") or b"")
            if marker is not None:
                hooks.log(f"delivery {marker} {hooks.stage} {os.getpid()} {count}")
            return original(self, message, *args, **kwargs)
        return wrapper

    _wrap(handlers.StageHandler, "handle", handle, hooks)
    _wrap(consumer.Worker, "publish", publish, hooks)
    _wrap(consumer, "mark_published", mark_published, hooks)
    _wrap(Message, "ack", ack, hooks)
    _wrap(consumer.Worker, "commit_refusal", commit_refusal, hooks)
    _wrap(Consumer, "_receive_callback", receive, hooks)  # every delivery, before the worker sees it


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
