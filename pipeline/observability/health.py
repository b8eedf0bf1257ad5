"""Is each worker process of this machine ready? Read from the facts the workers publish as metrics.

Every worker process writes its readiness facts as ``liveall`` gauges in the machine's Prometheus
multiprocess directory (:func:`pipeline.observability.metrics.worker_state`): connected to the
broker, database reachable at its last look, consumers registered, the time its consume loop last
turned and the time of its last batch. One reading of that directory serves every process, however
many supervisord or systemd runs:

* ``bindpipe metrics-server`` answers ``GET /healthz`` (200 when every live worker process is ready,
  503 otherwise, the report as JSON; ``?stage=select`` for one stage);
* ``bindpipe health`` prints the same report and exits 0 or 1;
* ``bindpipe watchdog`` ends a *stalled* worker, one consuming whose loop has not turned for
  ``stall_seconds``: SIGABRT, so that its log shows where each thread was (the workers enable
  ``faulthandler``), then SIGKILL if it lingers; supervisord or systemd starts it again. A worker
  waiting for its broker is not stalled, only not ready: starting it again would not help.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import parse_qs

import structlog
from prometheus_client import CollectorRegistry, Metric

from pipeline.observability import metrics

log = structlog.get_logger(__name__)

_FACTS = {"bindpipe_worker_broker_connected": "broker", "bindpipe_worker_database_reachable": "database",
          "bindpipe_worker_consuming": "consuming", "bindpipe_worker_process_loop_timestamp_seconds": "loop_at",
          "bindpipe_worker_last_batch_timestamp_seconds": "batch_at"}


@dataclass
class WorkerHealth:
    """One live worker process of one stage, as its facts say."""

    pid: int
    stage: str
    broker: bool = False
    database: bool = False
    consuming: bool = False
    loop_age: float | None = None
    batch_age: float | None = None
    stalled: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return not self.problems


def assess(facts: dict[str, float], pid: int, stage: str, now: float, stall_seconds: float) -> WorkerHealth:
    """A process's health from its facts (``broker``, ``database``, ``consuming``, ``loop_at``, ``batch_at``)."""
    health = WorkerHealth(pid=pid, stage=stage, broker=facts.get("broker") == 1, database=facts.get("database") == 1,
                          consuming=facts.get("consuming") == 1)
    if "loop_at" in facts:
        health.loop_age = round(max(now - facts["loop_at"], 0.0), 3)
    if "batch_at" in facts:
        health.batch_age = round(max(now - facts["batch_at"], 0.0), 3)
    if not health.broker:
        health.problems.append("not connected to the broker")
    if not health.database:
        health.problems.append("database unreachable at its last look")
    if not health.consuming:
        health.problems.append("not consuming")
    if health.consuming and (health.loop_age is None or health.loop_age > stall_seconds):
        health.stalled = health.loop_age is not None
        health.problems.append(f"consume loop stalled for {health.loop_age:.0f} s" if health.stalled
                               else "consume loop never turned")
    return health


def workers(families: Iterable[Metric], now: float, stall_seconds: float) -> list[WorkerHealth]:
    """Every worker process the metric families describe, by pid and stage (a process without a
    ``pid`` label is this one: single-process mode)."""
    facts: dict[tuple[int, str], dict[str, float]] = {}
    for family in families:
        for sample in family.samples:
            name = _FACTS.get(sample.name)
            if name is None:
                continue
            key = (int(sample.labels.get("pid", os.getpid())), sample.labels["stage"])
            facts.setdefault(key, {})[name] = sample.value
    return [assess(f, pid, stage, now, stall_seconds) for (pid, stage), f in sorted(facts.items())]


def machine_workers(stall_seconds: float, registry: CollectorRegistry | None = None) -> list[WorkerHealth]:
    """The live worker processes of this machine (its multiprocess directory), dead ones reaped."""
    return workers((registry or metrics.registry_for_export()).collect(), time.time(), stall_seconds)


def report(processes: list[WorkerHealth], stage: str | None = None) -> dict[str, Any]:
    """``{"ready", "stages": {stage: ready}, "processes": [...]}``: ready when there is at least one
    worker process (of ``stage``) and every one of them is ready."""
    chosen = [p for p in processes if stage is None or p.stage == stage]
    stages: dict[str, bool] = {}
    for process in chosen:
        stages[process.stage] = stages.get(process.stage, True) and process.ready
    return {"ready": bool(chosen) and all(p.ready for p in chosen), "stages": stages,
            "processes": [{**asdict(p), "ready": p.ready} for p in chosen]}


def render(summary: dict[str, Any]) -> str:
    if not summary["processes"]:
        return "no worker process reports on this machine (none running, or another BINDPIPE_METRICS_DIR)\n"
    lines = []
    for p in summary["processes"]:
        batch = f"{p['batch_age']:.0f} s ago" if p["batch_age"] is not None else "none yet"
        state = "ready" if p["ready"] else "NOT READY: " + "; ".join(p["problems"])
        lines.append(f"{p['stage']:<9} pid {p['pid']:<8} {state} (last batch {batch})")
    return "\n".join(lines) + "\n"


def healthz_app(stall_seconds: float, registry: CollectorRegistry | None = None) -> Callable[..., Any]:
    """The WSGI answer of ``GET /healthz[?stage=S]``."""
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        stage = (parse_qs(environ.get("QUERY_STRING", "")).get("stage") or [None])[0]
        summary = report(machine_workers(stall_seconds, registry), stage)
        body = json.dumps(summary, sort_keys=True).encode()
        start_response("200 OK" if summary["ready"] else "503 Service Unavailable",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
    return app


class Watchdog:
    """Ends stalled worker processes of this machine (see the module's docstring)."""

    def __init__(self, stall_seconds: float, grace_seconds: float = 10.0,
                 kill: Callable[[int, int], None] = os.kill, is_worker: Callable[[int], bool] | None = None):
        self.stall_seconds, self.grace_seconds, self.kill = stall_seconds, grace_seconds, kill
        # still the process that wrote the facts, not another that took its pid since
        self.is_worker = is_worker or (lambda pid: metrics.writes_to(pid, metrics.metrics_dir() or ""))
        self.aborted: dict[int, float] = {}  # pid -> when it was sent SIGABRT

    def check(self, processes: list[WorkerHealth], now: float) -> list[int]:
        """One pass: SIGABRT to each newly stalled process, SIGKILL to one that outlived its grace;
        the pids signalled."""
        signalled = []
        for pid, at in list(self.aborted.items()):
            if not self.is_worker(pid):
                del self.aborted[pid]
            elif now - at >= self.grace_seconds:
                log.error("stalled worker ignored SIGABRT, killing it", pid=pid)
                self.kill(pid, signal.SIGKILL)
                del self.aborted[pid]
                signalled.append(pid)
        for process in processes:
            if process.stalled and process.pid not in self.aborted and process.pid not in signalled \
                    and process.pid != os.getpid() and self.is_worker(process.pid):
                log.error("worker stalled, aborting it (its supervisor starts another)", pid=process.pid,
                          stage=process.stage, loop_age=process.loop_age, stall_seconds=self.stall_seconds)
                self.kill(process.pid, signal.SIGABRT)
                self.aborted[process.pid] = now
                signalled.append(process.pid)
        return signalled

    def run(self, interval: float, stopping: Callable[[], bool]) -> None:
        while not stopping():
            self.check(machine_workers(self.stall_seconds), time.monotonic())
            deadline = time.monotonic() + interval
            while time.monotonic() < deadline and not stopping():
                time.sleep(min(0.2, interval))
