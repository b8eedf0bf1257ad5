"""Every Prometheus metric of the pipeline, defined once, at import.

Worker processes run side by side under supervisord/systemd, so metrics use prometheus_client's
**multiprocess mode**: each process writes its values to mmap files in one directory
(``PROMETHEUS_MULTIPROC_DIR``) and one exporter process (``bindpipe metrics-server``) serves
their aggregate. The directory is taken, in order, from ``PROMETHEUS_MULTIPROC_DIR``, from
``BINDPIPE_METRICS_DIR`` (both read at import) or from :func:`configure_metrics_dir` (called before
the first metric is used). With none of them the metrics live in this process's default registry,
as in tests and the single-process embedded mode.

The launcher wipes the directory before the first worker starts (``deploy/bin/bindpipe-prestart``);
the live gauges of processes that have exited are reaped on every export
(:func:`reap_dead_processes`), so the ``livemax`` gauges only show processes that are alive, while
their counters and histograms keep adding to the totals.

Labels are bounded: stages, outcomes, reason *categories*, vif types, hosts and physnets; never
port ids or free text (use :func:`failure_reason_category` for decline/error texts). The
``liveall`` gauges (a worker's readiness facts, a process's RSS, CPU time and open fds) carry one
series per *live* process, labelled ``pid`` by the multiprocess export: as many as the machine
runs processes, and reaped with them.
"""

from __future__ import annotations

import os
import platform
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from importlib.metadata import version
from typing import Any
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
    ProcessCollector,
    multiprocess,
    values,
)

from pipeline.models.reasons import FAILURE_REASONS, failure_reason_category
from pipeline.models.refusals import DEAD_LETTER_CATEGORIES

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
METRICS_DIR_ENV = "BINDPIPE_METRICS_DIR"

STAGES = ("validate", "select", "allocate", "compose")
STAGE_OUTCOMES = ("ok", "duplicate", "rejected", "dead_lettered", "retried")
BINDING_OUTCOMES = ("bound", "failed", "unbound", "error")
DEAD_LETTER_REASONS = DEAD_LETTER_CATEGORIES
PCI_STATES = ("available", "claimed", "allocated", "unavailable", "unclaimable")


def _is_multiprocess() -> bool:
    return bool(getattr(values.ValueClass, "_multiprocess", False))


def _use_directory(path: str) -> str:
    """Point prometheus_client at ``path``: new metric values are mmap files there from now on."""
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    if os.environ.get(MULTIPROC_ENV) != path or not _is_multiprocess():
        os.environ[MULTIPROC_ENV] = path
        # prometheus_client picks its value class once, when it is first imported; it may have been
        # imported before the directory was known, so pick again (a fresh class opens fresh files).
        values.ValueClass = values.MultiProcessValue()
    return path


# The directory must be chosen before the first metric below is constructed.
if os.environ.get(MULTIPROC_ENV) or os.environ.get(METRICS_DIR_ENV):
    _use_directory(os.environ.get(MULTIPROC_ENV) or os.environ[METRICS_DIR_ENV])

STAGE_MESSAGES = Counter(
    "bindpipe_stage_messages_total", "Messages handled by a stage, by outcome (ok|duplicate|rejected|dead_lettered|retried).",
    ["stage", "outcome"])
STAGE_DURATION = Histogram(
    "bindpipe_stage_duration_seconds", "Time a stage spends handling one message.", ["stage"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
BATCH_SIZE = Histogram(
    "bindpipe_batch_size", "Events or jobs handled in one stage transaction.", ["stage"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000))
END_TO_END_LATENCY = Histogram(
    "bindpipe_end_to_end_latency_seconds", "From an event's occurred_at to its result being published.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0))
BINDINGS = Counter(
    "bindpipe_bindings_total", "Binding results, by vif_type and outcome (bound|failed|unbound|error).",
    ["vif_type", "outcome"])
BINDING_FAILURES = Counter(
    "bindpipe_binding_failures_total", "Failed bindings by reason category (see failure_reason_category).",
    ["reason"])
DEAD_LETTERS = Counter(
    "bindpipe_dead_letters_total", "Messages dead-lettered by a stage, by bounded reason.", ["stage", "reason"])
PCI_DEVICES = Gauge(
    "bindpipe_pci_devices", "PCI devices by host, physnet, vendor:product and state.",
    ["host", "physical_network", "vendor_product", "state"], multiprocess_mode="livemax")
DEAD_LETTERS_WAITING = Gauge(
    "bindpipe_dead_letters_waiting", "Dead letters in the database not redriven yet (bindpipe dlq), by stage.",
    ["stage"], multiprocess_mode="livemax")
EVENT_LOG_LAG = Gauge(
    "bindpipe_event_log_lag", "Port events logged after the newest one the stage has turned into a result.",
    ["stage"], multiprocess_mode="livemax")
WORKER_LAST_LOOP = Gauge(
    "bindpipe_worker_last_loop_timestamp_seconds", "Unix time at which a stage worker's consume loop last turned.",
    ["stage"], multiprocess_mode="livemax")


def _per_process(name: str, documentation: str, label: str) -> Gauge:
    """A gauge with one series per live process: ``liveall``, which the export labels with its pid."""
    return Gauge(name, documentation, [label], multiprocess_mode="liveall")


# A worker process's readiness facts (pipeline/observability/health.py reads them for /healthz and
# the watchdog).
WORKER_BROKER = _per_process(
    "bindpipe_worker_broker_connected", "1 while a worker process is connected to the broker.", "stage")
WORKER_DATABASE = _per_process(
    "bindpipe_worker_database_reachable", "1 when a worker process's last look at the database succeeded.", "stage")
WORKER_CONSUMING = _per_process(
    "bindpipe_worker_consuming", "1 while a worker process's consumers are registered with the broker.", "stage")
WORKER_LOOP = _per_process(
    "bindpipe_worker_process_loop_timestamp_seconds", "Unix time at which a worker process's consume loop last turned.",
    "stage")
WORKER_LAST_BATCH = _per_process(
    "bindpipe_worker_last_batch_timestamp_seconds", "Unix time at which a worker process last handled a batch.", "stage")
# prometheus_client's ProcessCollector reads only its own process: in multiprocess mode each process
# writes its readings here, labelled with its role.
PROCESS_RESIDENT_MEMORY = _per_process(
    "bindpipe_process_resident_memory_bytes", "Resident memory of a live process.", "process")
PROCESS_CPU = _per_process("bindpipe_process_cpu_seconds", "User and system CPU time a live process has used.", "process")
PROCESS_OPEN_FDS = _per_process("bindpipe_process_open_fds", "Open file descriptors of a live process.", "process")
BUILD_INFO = Gauge(
    "bindpipe_build_info", "1, labelled with the version of the code the machine's live processes run.",
    ["version", "python", "kombu"], multiprocess_mode="livemax")

_ALL = (STAGE_MESSAGES, STAGE_DURATION, BATCH_SIZE, END_TO_END_LATENCY, BINDINGS, BINDING_FAILURES, DEAD_LETTERS,
        DEAD_LETTERS_WAITING, PCI_DEVICES, EVENT_LOG_LAG, WORKER_LAST_LOOP, WORKER_BROKER, WORKER_DATABASE, WORKER_CONSUMING, WORKER_LOOP,
        WORKER_LAST_BATCH, PROCESS_RESIDENT_MEMORY, PROCESS_CPU, PROCESS_OPEN_FDS, BUILD_INFO)
_UNLABELLED = (END_TO_END_LATENCY,)

#: Every metric family name as exposed (counters with their ``_total``), for docs, dashboards and tests.
METRIC_FAMILIES = (
    "bindpipe_stage_messages_total",
    "bindpipe_stage_duration_seconds",
    "bindpipe_batch_size",
    "bindpipe_end_to_end_latency_seconds",
    "bindpipe_bindings_total",
    "bindpipe_binding_failures_total",
    "bindpipe_dead_letters_total",
    "bindpipe_dead_letters_waiting",
    "bindpipe_pci_devices",
    "bindpipe_event_log_lag",
    "bindpipe_worker_last_loop_timestamp_seconds",
    "bindpipe_worker_broker_connected",
    "bindpipe_worker_database_reachable",
    "bindpipe_worker_consuming",
    "bindpipe_worker_process_loop_timestamp_seconds",
    "bindpipe_worker_last_batch_timestamp_seconds",
    "bindpipe_process_resident_memory_bytes",
    "bindpipe_process_cpu_seconds",
    "bindpipe_process_open_fds",
    "bindpipe_build_info",
)


def metrics_dir() -> str | None:
    """The multiprocess directory in use, or None in single-process mode."""
    return os.environ.get(MULTIPROC_ENV) if _is_multiprocess() else None


def _in_use() -> bool:
    if any(metric._metrics for metric in _ALL if metric not in _UNLABELLED):
        return True
    return any(bucket.get() for metric in _UNLABELLED for bucket in metric._buckets)


def configure_metrics_dir(path: str | None) -> str | None:
    """Use multiprocess mode with ``path`` (created if missing); call before the first metric is used.

    ``None`` changes nothing. Returns the directory in use (None in single-process mode). Raises
    ``RuntimeError`` when a metric already holds values in another place: they would be lost.
    """
    if not path:
        return metrics_dir()
    if metrics_dir() == os.path.abspath(path):
        return _use_directory(path)
    if _in_use():
        raise RuntimeError(f"metrics were used before configure_metrics_dir({path!r}); call it at process start")
    path = _use_directory(path)
    for metric in _UNLABELLED:
        metric._metric_init()  # re-create its values with the multiprocess value class
    return path


def mark_dead(pid: int) -> None:
    """Drop the live gauges of an exited process (no-op in single-process mode)."""
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        multiprocess.mark_process_dead(pid, path)


_LIVE_GAUGE_FILE = re.compile(r"^gauge_live[a-z]+_(\d+)\.db$")


_REAP_LOCK = threading.Lock()


def writes_to(pid: int, path: str) -> bool:
    """Is ``pid`` a live process with a file of ``path`` mapped (as every metrics writer has)?

    Looking at /proc/PID/maps, not just at the pid, keeps a recycled pid from passing for the dead
    writer. Where /proc is missing or unreadable, a live pid counts as a writer.
    """
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as maps:
            return os.path.realpath(path) + os.sep in maps.read()
    except (FileNotFoundError, ProcessLookupError):
        if os.path.isdir("/proc"):
            return False
    except OSError:  # not ours to read: decide by the pid alone
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_dead_processes(path: str | None = None) -> list[int]:
    """``mark_dead`` every process that left live-gauge files in ``path`` and no longer runs.

    Counters and histograms of dead processes stay (they keep adding to the totals, as they must);
    only their ``livemax`` gauges go. Returns the pids reaped.
    """
    path = path or metrics_dir()
    if not path:
        return []
    with _REAP_LOCK:  # concurrent scrapes would race on the same files
        pids = {int(m.group(1)) for m in map(_LIVE_GAUGE_FILE.match, os.listdir(path)) if m}
        dead = sorted(pid for pid in pids if pid != os.getpid() and not writes_to(pid, path))
        for pid in dead:
            try:
                multiprocess.mark_process_dead(pid, path)
            except FileNotFoundError:  # removed meanwhile by another exporter or mark_dead()
                pass
    return dead


class _ReapingCollector:
    """The multiprocess aggregate, after reaping the live gauges of processes that have exited."""

    def __init__(self, path: str):
        self._path = path
        self._inner = multiprocess.MultiProcessCollector(None, path=path)

    def collect(self):
        reap_dead_processes(self._path)
        return self._inner.collect()


def registry_for_export() -> CollectorRegistry:
    """What ``/metrics`` serves: the aggregate of every process's files, or this process's registry."""
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        return REGISTRY
    registry = CollectorRegistry()
    registry.register(_ReapingCollector(path))
    return registry


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # one line per scrape is noise
        pass


def make_metrics_server(port: int, addr: str = "0.0.0.0", routes: dict[str, Callable[..., Any]] | None = None
                        ) -> WSGIServer:
    """An HTTP server (not yet serving): the WSGI apps of ``routes`` by path (``/healthz``), and
    :func:`registry_for_export` on every other path."""
    server_class = _Server
    if ":" in addr:  # an IPv6 address
        server_class = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
    exported = make_wsgi_app(registry_for_export())
    routes = routes or {}

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        return routes.get(environ.get("PATH_INFO", ""), exported)(environ, start_response)

    return make_server(addr, port, app, server_class=server_class, handler_class=_QuietHandler)


def serve(port: int, addr: str = "0.0.0.0", routes: dict[str, Callable[..., Any]] | None = None) -> None:
    """Serve the metrics until SIGTERM (or SIGINT), then return; blocking (``bindpipe metrics-server``)."""
    server = make_metrics_server(port, addr, routes)
    if threading.current_thread() is threading.main_thread():
        def stop(signum: int, frame: object) -> None:
            # shutdown() waits for serve_forever() to return, so it must run on another thread.
            threading.Thread(target=server.shutdown, daemon=True).start()

        signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def bounded(value: str | None, allowed: Iterable[str], default: str = "other") -> str:
    """``value`` if it is one of ``allowed``, else ``default`` (keeps label sets bounded)."""
    return value if value in tuple(allowed) else default


_INITIALISED_STAGES: set[str] = set()


def init_stage_series(stage: str) -> None:
    """Create ``stage``'s bounded counter and histogram series at 0 (once per process).

    A labelled series appears only when first used, so without this a healthy machine exports no
    ``bindpipe_dead_letters_total`` at all, and the first dead letter of a (stage, reason) appears
    already at 1: ``increase()``/``rate()`` see no rise from a missing sample, so
    ``BindpipeDeadLettersGrowing`` would not fire for it. Label sets are bounded, so this is cheap.
    """
    if stage in _INITIALISED_STAGES:
        return
    _INITIALISED_STAGES.add(stage)
    for outcome in STAGE_OUTCOMES:
        STAGE_MESSAGES.labels(stage=stage, outcome=outcome)
    for reason in DEAD_LETTER_REASONS:
        DEAD_LETTERS.labels(stage=stage, reason=reason)
    STAGE_DURATION.labels(stage=stage)
    BATCH_SIZE.labels(stage=stage)
    if stage == "compose":  # the stage that reports binding results
        for reason in FAILURE_REASONS:
            BINDING_FAILURES.labels(reason=reason)


def observe_each(histogram: Histogram, amount: float, count: int) -> None:
    """``count`` observations of the same ``amount`` (a batch's share per message) in two writes,
    as ``Histogram.observe`` makes them (its sum, then the first bucket that holds ``amount``):
    one ``observe`` per message cost ~3 µs each in multiprocess mode."""
    histogram._sum.inc(amount * count)
    for bucket, bound in zip(histogram._buckets, histogram._upper_bounds, strict=True):
        if amount <= bound:
            bucket.inc(count)
            break


def touch_loop(stage: str) -> None:
    """Record that ``stage``'s consume loop is turning (for the worker-stalled alert and this
    process's readiness); the first time in this process, also create the stage's series at 0
    (:func:`init_stage_series`)."""
    init_stage_series(stage)
    now = time.time()
    WORKER_LAST_LOOP.labels(stage=stage).set(now)
    WORKER_LOOP.labels(stage=stage).set(now)


def worker_state(stages: Iterable[str], broker: bool | None = None, database: bool | None = None,
                 consuming: bool | None = None) -> None:
    """Record this worker process's readiness facts for ``stages`` (None: unchanged)."""
    for stage in stages:
        for gauge, fact in ((WORKER_BROKER, broker), (WORKER_DATABASE, database), (WORKER_CONSUMING, consuming)):
            if fact is not None:
                gauge.labels(stage=stage).set(1 if fact else 0)


def batch_done(stage: str) -> None:
    WORKER_LAST_BATCH.labels(stage=stage).set(time.time())


_PROCESS_READINGS = {"process_resident_memory_bytes": PROCESS_RESIDENT_MEMORY, "process_cpu_seconds": PROCESS_CPU,
                     "process_open_fds": PROCESS_OPEN_FDS}
PROCESS_SAMPLE_SECONDS = 5.0


def sample_process(process: str, reader: ProcessCollector | None = None) -> None:
    """This process's RSS, CPU time and open fds, as ``ProcessCollector`` reads them (/proc), into
    the gauges labelled ``process``; nothing where /proc is missing."""
    for family in (reader or ProcessCollector(registry=None)).collect():
        gauge = _PROCESS_READINGS.get(family.name)
        if gauge is not None and family.samples:
            gauge.labels(process=process).set(family.samples[0].value)


def build_labels() -> dict[str, str]:
    from pipeline import __version__

    return {"version": __version__, "python": platform.python_version(), "kombu": version("kombu")}


def start_process_metrics(process: str) -> threading.Thread:
    """``bindpipe_build_info`` for this process, and :func:`sample_process` every few seconds in a
    daemon thread, for the life of a long-running process (worker, relay, metrics server)."""
    BUILD_INFO.labels(**build_labels()).set(1)
    reader = ProcessCollector(registry=None)

    def sample_forever() -> None:
        while True:
            sample_process(process, reader)
            time.sleep(PROCESS_SAMPLE_SECONDS)

    thread = threading.Thread(target=sample_forever, name="bindpipe-process-metrics", daemon=True)
    thread.start()
    return thread


__all__ = [
    "BATCH_SIZE", "BINDINGS", "BINDING_FAILURES", "BINDING_OUTCOMES", "DEAD_LETTERS", "DEAD_LETTER_REASONS",
    "END_TO_END_LATENCY", "EVENT_LOG_LAG", "FAILURE_REASONS", "METRIC_FAMILIES", "PCI_DEVICES", "PCI_STATES",
    "STAGES", "STAGE_DURATION", "STAGE_MESSAGES", "STAGE_OUTCOMES", "WORKER_LAST_LOOP", "batch_done", "bounded",
    "build_labels", "configure_metrics_dir", "failure_reason_category", "init_stage_series", "make_metrics_server",
    "mark_dead", "metrics_dir", "observe_each", "reap_dead_processes", "registry_for_export", "sample_process",
    "serve", "start_process_metrics", "touch_loop", "worker_state", "writes_to",
]
