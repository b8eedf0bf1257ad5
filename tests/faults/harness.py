"""The fault harness: the real pipeline (``bindpipe worker STAGE`` processes, several per stage, and
``bindpipe relay``) on the real RabbitMQ and PostgreSQL, a workload, a nemesis, then the checker.

Pieces (each usable alone):

* :class:`Services`      restart RabbitMQ (``rabbitmqctl stop_app``/``start_app``) or PostgreSQL
                         (``pg_ctlcluster … restart``) and wait until they serve again;
* :class:`Proxy`         (``proxy.py``) a TCP proxy between the workers and both services, which cuts
                         every connection on demand;
* :class:`Workers`       starts/stops/kills worker processes, restarts any that dies (as supervisord
                         does) and tells planned deaths from unexpected ones; workers run through
                         ``tests/faults/worker.py`` (crash points, delivery log);
* :class:`Ledger`        what was published, which host must get a result for it, what came back;
* :class:`Collector`     consumes every host's durable result queue (a compute host's view);
* :class:`Workload`      ports created, moved between hosts and deleted, with a deterministic seed;
                         an event for a port is only sent once the port's previous event has all its
                         results (as Nova waits for vif-plugged), so every event must give results;
* hostile messages, VF race rounds, duplicates, and :class:`Nemesis` running a fault timeline;
* :func:`run` ties them together and returns the checker's summary plus the harness's figures.

Faults are described by :class:`Plan`; ``test_faults.py`` runs a reduced plan, ``scripts/faults.py``
the large one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from kombu import Connection, Consumer, Producer
from kombu.mixins import ConsumerMixin
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from pipeline.client import BindingClient
from pipeline.db import create_schema, make_engine
from pipeline.models.binding import RequestContext
from pipeline.models.events import Envelope
from pipeline.models.tables import DeadLetter, EventLog, PciDeviceRow, PortRow, ResultRow
from pipeline.settings import Settings
from pipeline.stages.pci_accounting import invariant_violations
from pipeline.store.pci import tracker_for
from pipeline.workers.topology import STAGES, declare_topology, results_queue
from tests.bus import wait_until
from tests.faults import checker
from tests.faults.proxy import Proxy

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RABBITMQCTL = os.environ.get("BINDPIPE_FAULT_RABBITMQCTL", "rabbitmqctl")


def _pg_version() -> str:
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    return versions[-1] if versions else "15"


def log(message: str) -> None:
    print(f"[faults {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def retrying(what: str, action: Callable[[], Any], timeout: float = 120.0, interval: float = 0.5) -> Any:
    """``action()`` until it returns without raising (services restart under the harness too)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return action()
        except Exception as exc:  # noqa: BLE001 - any failure while a service is down
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: still failing after {timeout}s: {exc}") from exc
            time.sleep(interval)


# --- the plan ----------------------------------------------------------------------------------

@dataclass
class Plan:
    """What to run. Times in the ``schedule`` are seconds after the workload starts."""

    seed: int = 5
    events: int = 400  # workload events (creates, moves, deletes), duplicates and races not counted
    rate: float = 15.0  # workload events per second
    in_flight: int = 60  # ports with an event under way at most
    workers: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STAGES, 2))
    relay: bool = True
    ovs_hosts: int = 4
    sriov_hosts: int = 3
    pfs_per_host: int = 2
    vfs_per_pf: int = 8
    share_sriov: float = 0.25  # of the ports: direct (VF) ports on the SR-IOV hosts
    share_pf: float = 0.04  # direct-physical (PF) ports on the SR-IOV hosts
    duplicate_rate: float = 0.04  # events published twice in the same batch
    late_duplicate_rate: float = 0.03  # events published again 1-10 s later (the port may have moved on)
    overtake_rate: float = 0.0  # a port's next event published with this one, before its results came
    hostile: int = 0  # hostile messages, injected by ("hostile", n) schedule entries
    race_ports: int = 64
    race_vfs: int = 8
    kill_every: float = 0.0  # seconds between kill -9 of a random stage worker (0: none)
    kill_between: tuple[float, float] = (0.0, 1e9)
    quiet: list[tuple[float, float]] = field(default_factory=list)  # no random kill in these windows
    schedule: list[tuple[float, str, Any]] = field(default_factory=list)
    crash_plans: dict[str, list[str]] = field(default_factory=dict)  # stage -> crash specs, one per start
    crash_spec: str = ""  # for every start without a plan (e.g. "after_commit=0.002")
    restart_delay: float = 0.5  # before a dead worker is started again (supervisord: startretries…)
    drain_timeout: float = 120.0
    worker_env: dict[str, str] = field(default_factory=dict)  # extra BINDPIPE_* for the workers


# --- services ----------------------------------------------------------------------------------

class Services:
    """The shared RabbitMQ and PostgreSQL: restarts that wait until each serves again."""

    def __init__(self, broker_url: str, database_url: str):
        self.broker_url, self.database_url = broker_url, database_url

    def rabbitmq_up(self, queues: list[str]) -> bool:
        try:
            with Connection(self.broker_url, connect_timeout=2) as connection:
                channel = connection.channel()
                for name in queues:
                    channel.queue_declare(queue=name, passive=True)
                channel.close()
            return True
        except Exception:  # noqa: BLE001
            return False

    def restart_rabbitmq(self, down: float, queues: list[str]) -> dict[str, float]:
        started = time.monotonic()
        subprocess.run([RABBITMQCTL, "-q", "stop_app"], check=True, capture_output=True, timeout=180)
        stopped = time.monotonic()
        time.sleep(down)
        subprocess.run([RABBITMQCTL, "-q", "start_app"], check=True, capture_output=True, timeout=300)
        subprocess.run([RABBITMQCTL, "-q", "await_startup"], capture_output=True, timeout=300)
        wait_until(lambda: self.rabbitmq_up(queues), 120, "RabbitMQ serving the queues again", interval=0.25)
        return {"stop_s": stopped - started, "down_s": time.monotonic() - stopped}

    def postgres_up(self) -> bool:
        import psycopg

        try:
            conninfo = re.sub(r"^postgresql\+\w+://", "postgresql://", self.database_url)
            with psycopg.connect(conninfo, connect_timeout=2) as connection:
                connection.execute("SELECT 1")
            return True
        except Exception:  # noqa: BLE001
            return False

    def stop_postgres_for(self, seconds: float) -> dict[str, float]:
        """PostgreSQL down for ``seconds`` (stop, wait, start), then serving again."""
        version = _pg_version()
        started = time.monotonic()
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", "-m", "fast", version, "main", "stop"],
                       check=True, capture_output=True, timeout=180)
        time.sleep(seconds)
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"],
                       check=True, capture_output=True, timeout=180)
        wait_until(self.postgres_up, 120, "PostgreSQL serving again", interval=0.2)
        return {"down_s": time.monotonic() - started}

    def restart_postgres(self, mode: str = "fast") -> dict[str, float]:
        started = time.monotonic()
        command = os.environ.get("BINDPIPE_FAULT_PG_RESTART")
        argv = (command.split() if command else
                ["pg_ctlcluster", "--skip-systemctl-redirect", "-m", mode, _pg_version(), "main", "restart"])
        subprocess.run(argv, check=True, capture_output=True, timeout=180)
        wait_until(self.postgres_up, 120, "PostgreSQL serving again", interval=0.2)
        return {"down_s": time.monotonic() - started}


# --- worker processes --------------------------------------------------------------------------

@dataclass
class Managed:
    name: str
    stage: str  # a stage, or "relay"
    argv: list[str]
    process: subprocess.Popen | None = None
    crash_spec: str = ""
    planned: str | None = None  # why we expect it to exit ("kill", "sigterm", "stop")
    starts: int = 0


class Workers:
    """Worker processes with a reaper thread that restarts any that exits (after ``restart_delay``)."""

    def __init__(self, plan: Plan, env: dict[str, str], run_dir: Path, fault_log: Path):
        self.plan, self.env, self.run_dir, self.fault_log = plan, env, run_dir, fault_log
        self.lock = threading.RLock()
        self.crash_plans = {stage: list(specs) for stage, specs in plan.crash_plans.items()}
        self.procs: dict[str, Managed] = {}
        for stage in STAGES:
            for i in range(plan.workers.get(stage, 0)):
                self.procs[f"{stage}-{i}"] = Managed(f"{stage}-{i}", stage,
                                                     [sys.executable, "-m", "tests.faults.worker", stage])
        if plan.relay:
            self.procs["relay"] = Managed("relay", "relay",
                                          [str(BIN / "bindpipe"), "relay", "--interval", "1", "--grace", "3"])
        self.events: list[dict[str, Any]] = []  # every exit: name, pid, code, why, at
        self.dead_pids: dict[int, float] = {}  # pid -> when its exit was seen
        self.stopping = False
        self.reaper = threading.Thread(target=self._reap, name="reaper", daemon=True)

    def start_all(self) -> None:
        for name in self.procs:
            self.start(name)
        self.reaper.start()

    def start(self, name: str) -> None:
        with self.lock:
            managed = self.procs[name]
            plans = self.crash_plans.get(managed.stage, [])
            managed.crash_spec = plans.pop(0) if plans else self.plan.crash_spec
            env = {**self.env, "BINDPIPE_FAULT_CRASH": managed.crash_spec if managed.stage != "relay" else "",
                   "BINDPIPE_FAULT_SEED": f"{self.plan.seed}:{name}:{managed.starts}"}
            out = open(self.run_dir / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
            managed.process = subprocess.Popen(managed.argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                               start_new_session=True)
            out.close()
            managed.planned = None
            managed.starts += 1

    def names(self, stage: str | None = None) -> list[str]:
        return [n for n, m in self.procs.items() if (stage is None and m.stage != "relay") or m.stage == stage]

    def pid(self, name: str) -> int | None:
        process = self.procs[name].process
        return process.pid if process is not None and process.poll() is None else None

    def kill9(self, name: str) -> int | None:
        with self.lock:
            managed = self.procs[name]
            if managed.process is None or managed.process.poll() is not None or managed.planned:
                return None
            managed.planned = "kill"
            managed.process.send_signal(signal.SIGKILL)
            return managed.process.pid

    def sigterm(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        """SIGTERM one worker, wait for it (the reaper starts it again)."""
        with self.lock:
            managed = self.procs[name]
            process = managed.process
            if process is None or process.poll() is not None or managed.planned:
                return {"name": name, "skipped": True}
            managed.planned = "sigterm"
            process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            code = "timeout"
        return {"name": name, "pid": process.pid, "code": code, "seconds": round(time.monotonic() - started, 2)}

    def crash_points(self) -> dict[int, str]:
        """pid -> crash point, from the fault log."""
        found = {}
        if self.fault_log.exists():
            for line in self.fault_log.read_text().splitlines():
                words = line.split()
                if words and words[0] == "crash":
                    found[int(words[3])] = words[1]
        return found

    def _reap(self) -> None:
        while not self.stopping:
            try:
                self._reap_once()
            except Exception as exc:  # noqa: BLE001 - the reaper must outlive anything
                log(f"reaper: {exc!r}")

    def _reap_once(self) -> None:
        time.sleep(0.1)
        for name, managed in list(self.procs.items()):
            with self.lock:
                process = managed.process
                if self.stopping or process is None or process.poll() is None:
                    continue
                why = managed.planned
                if why is None:
                    point = self.crash_points().get(process.pid)
                    why = f"crash:{point}" if point else "unexpected"
                if "@" in managed.crash_spec and not why.startswith("crash:"):
                    self.crash_plans.setdefault(managed.stage, []).insert(0, managed.crash_spec)  # not fired
                self.dead_pids[process.pid] = time.time()
                event = {"name": name, "pid": process.pid, "code": process.returncode, "why": why, "at": time.time()}
                if why == "unexpected":
                    tail = (self.run_dir / f"{name}.log").read_text(errors="replace").splitlines()[-6:]
                    event["log_tail"] = [line[:300] for line in tail]
                    log(f"UNEXPECTED exit of {name} (pid {process.pid}, code {process.returncode})")
                self.events.append(event)
                managed.process = None
            time.sleep(self.plan.restart_delay if why != "unexpected" else max(self.plan.restart_delay, 1.0))
            if not self.stopping:
                self.start(name)

    def stop_all(self, timeout: float = 30.0) -> dict[str, Any]:
        """SIGTERM every process, wait; their exit codes (expected 0)."""
        with self.lock:
            self.stopping = True
            live = {n: m.process for n, m in self.procs.items() if m.process is not None}
            for managed in self.procs.values():
                managed.planned = "stop"
            for process in live.values():
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
        codes = {}
        for name, process in live.items():
            try:
                codes[name] = process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                codes[name] = "timeout"
        self.reaper.join(5)
        return codes

    def kill_all(self) -> None:
        self.stopping = True
        for managed in self.procs.values():
            if managed.process is not None and managed.process.poll() is None:
                managed.process.kill()
                managed.process.wait(10)


# --- the ledger --------------------------------------------------------------------------------

@dataclass
class EventRecord:
    event_id: str
    event_type: str
    port_id: str
    hosts: frozenset[str]
    group: str
    sent_at: float
    confirmed: bool = False
    copies: int = 0
    received_at: dict[str, float] = field(default_factory=dict)
    overtaken: bool = False
    optional_hosts: frozenset[str] = frozenset()
    outcome: tuple[str | None, tuple[str, ...]] | None = None  # (target host, vif_types of a binding there)


class Ledger:
    """Events published, the results each still waits for, and every result received."""

    def __init__(self):
        self.lock = threading.Condition()
        self.events: dict[str, EventRecord] = {}
        self.waiting: dict[str, tuple[str, set[str]]] = {}  # port -> (event id, hosts still without a result)
        self.final_hosts: dict[str, str | None] = {}
        self.received: list[checker.ReceivedResult] = []
        self.last_result_at = 0.0

    def expect(self, envelope: Envelope, port_id: str, hosts: set[str], final_host: str | None, group: str,
               optional: set[str] = frozenset(), outcome: tuple[str | None, tuple[str, ...]] | None = None) -> None:
        """The port's next event: its results are waited for on ``hosts`` (``optional``: accepted, not
        required). An event of the port still waited for is then *overtaken*: it may give nothing."""
        with self.lock:
            event_id = str(envelope.event_id)
            before = self.waiting.get(port_id)
            if before is not None and before[1]:
                self.events[before[0]].overtaken = True
            self.events[event_id] = EventRecord(event_id, envelope.event_type, port_id, frozenset(hosts), group,
                                                time.monotonic(), optional_hosts=frozenset(optional) - set(hosts),
                                                outcome=outcome)
            self.waiting[port_id] = (event_id, set(hosts))
            self.final_hosts[port_id] = final_host
            if not hosts:
                del self.waiting[port_id]

    def sent(self, envelopes: list[Envelope]) -> None:
        with self.lock:
            for envelope in envelopes:
                record = self.events.get(str(envelope.event_id))
                if record is not None:
                    record.confirmed = True
                    record.copies += 1

    def on_result(self, queue_host: str, body: dict[str, Any], redelivered: bool) -> None:
        with self.lock:
            now = time.monotonic()
            self.last_result_at = now
            self.received.append(checker.ReceivedResult(queue_host, body, redelivered))
            event_id, port_id = str(body.get("event_id")), body.get("port_id")
            record = self.events.get(event_id)
            if record is not None:
                record.received_at.setdefault(queue_host, now)
            waiting = self.waiting.get(port_id)
            if waiting is not None and waiting[0] == event_id:
                waiting[1].discard(queue_host)
                if not waiting[1]:
                    del self.waiting[port_id]
                    self.lock.notify_all()

    def idle(self, port_id: str) -> bool:
        return port_id not in self.waiting

    def outstanding(self) -> int:
        with self.lock:
            return len(self.waiting)

    def wait_idle(self, ports: list[str] | None, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.lock:
            while any(p in self.waiting for p in (ports if ports is not None else list(self.waiting))):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.lock.wait(min(remaining, 1.0))
        return True

    def published(self) -> dict[str, checker.PublishedEvent]:
        with self.lock:
            return {e.event_id: checker.PublishedEvent(
                e.event_id, e.event_type, e.port_id, e.hosts, e.group, e.confirmed, e.copies, e.overtaken,
                e.optional_hosts, e.outcome is not None, *(e.outcome or (None, ())))
                for e in self.events.values()}

    def latencies(self) -> list[float]:
        with self.lock:
            return sorted(t - e.sent_at for e in self.events.values() for t in e.received_at.values())


class Collector(ConsumerMixin):
    """Every host's durable result queue, acked once recorded (a compute host's consumer)."""

    def __init__(self, broker_url: str, hosts: list[str], settings: Settings, ledger: Ledger):
        self.connection = Connection(broker_url, heartbeat=10)
        self.hosts, self.settings, self.ledger = hosts, settings, ledger
        self.thread = threading.Thread(target=self.run, name="collector", daemon=True)

    def get_consumers(self, consumer_cls: type[Consumer], channel: Any) -> list[Consumer]:
        return [consumer_cls(queues=[results_queue(host, self.settings)], accept=["json"], prefetch_count=200,
                             callbacks=[self._callback(host)]) for host in self.hosts]

    def _callback(self, host: str) -> Callable[[Any, Any], None]:
        def on_message(body: Any, message: Any) -> None:
            self.ledger.on_result(host, body, bool(message.delivery_info.get("redelivered")))
            message.ack()
        return on_message

    def on_connection_error(self, exc: Exception, interval: float) -> None:
        pass  # the broker restarts on purpose; the mixin retries

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.should_stop = True
        self.thread.join(15)


class Publisher:
    """Publishes with confirms, reconnecting and re-publishing the batch until confirmed."""

    def __init__(self, settings: Settings, ledger: Ledger):
        self.settings, self.ledger = settings, ledger
        self.client: BindingClient | None = None
        self.raw: Connection | None = None
        self.lock = threading.Lock()
        self.retries = 0

    def _client(self) -> BindingClient:
        if self.client is None:
            self.client = BindingClient(settings=self.settings).__enter__()
        return self.client

    def _drop(self) -> None:
        for closer in (lambda: self.client and self.client.close(), lambda: self.raw and self.raw.release()):
            try:
                closer()
            except Exception:  # noqa: BLE001
                pass
        self.client = self.raw = None

    def publish(self, envelopes: list[Envelope], timeout: float = 180.0) -> None:
        if not envelopes:
            return
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                try:
                    self._client().publish_envelopes(envelopes)
                    break
                except Exception:  # noqa: BLE001 - broker restarting: publish the batch again
                    self.retries += 1
                    self._drop()
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
        self.ledger.sent(envelopes)

    def publish_raw(self, body: bytes, exchange: str, routing_key: str, content_type: str,
                    content_encoding: str, headers: dict[str, Any] | None = None) -> int:
        """Publish until confirmed; how many publishes that took (each may have reached the broker)."""
        attempts = 0
        with self.lock:
            while True:
                attempts += 1
                try:
                    if self.raw is None:
                        self.raw = Connection(self.settings.broker_url, transport_options={"confirm_publish": True})
                        self.raw.connect()
                    Producer(self.raw.default_channel).publish(
                        body, exchange=exchange, routing_key=routing_key, content_type=content_type,
                        content_encoding=content_encoding, delivery_mode=2, headers=headers)
                    return attempts
                except Exception:  # noqa: BLE001
                    self.retries += 1
                    self._drop()
                    time.sleep(0.5)

    def close(self) -> None:
        with self.lock:
            self._drop()


# --- the topology and the workload -------------------------------------------------------------

OVS_AGENT = {"agent_type": "Open vSwitch agent", "binary": "neutron-openvswitch-agent", "alive": True,
             "configurations": {"bridge_mappings": {"physnet1": "br-physnet1"}, "tunnel_types": ["vxlan"],
                                "integration_bridge": "br-int", "datapath_type": "system"}}
SRIOV_AGENT = {"agent_type": "NIC Switch agent", "binary": "neutron-sriov-nic-agent", "alive": True,
               "configurations": {"device_mappings": {"physnet1": ["ens1f0"]}}}
NETWORKS = [{"id": "net-vxlan", "segments": [{"id": "seg-vxlan", "network_type": "vxlan",
                                              "physical_network": None, "segmentation_id": 5001}]},
            {"id": "net-vlan", "segments": [{"id": "seg-vlan", "network_type": "vlan",
                                             "physical_network": "physnet1", "segmentation_id": 101}]}]
RACE_HOST = "race-0"


def inventory(host: str, pfs: int, vfs: int) -> dict[str, Any]:
    devices = []
    for p in range(pfs):
        pf = f"0000:{0x81 + p:02x}:00.0"
        devices.append({"address": pf, "vendor_id": "8086", "product_id": "1572", "dev_type": "type-PF",
                        "numa_node": 0, "physical_network": "physnet1"})
        devices += [{"address": f"0000:{0x81 + p:02x}:10.{v}", "vendor_id": "8086", "product_id": "154c",
                     "dev_type": "type-VF", "parent_addr": pf, "numa_node": 0, "physical_network": "physnet1"}
                    for v in range(vfs)]
    return {"host": host, "devices": devices}


@dataclass
class Topology:
    ovs: list[str]
    sriov: list[str]
    race: str

    @property
    def hosts(self) -> list[str]:
        return self.ovs + self.sriov + [self.race]

    def events(self, make: Callable[[str, dict[str, Any]], Envelope], plan: Plan) -> list[Envelope]:
        events = [make("network.upsert", n) for n in NETWORKS]
        events += [make("agent.report", {**OVS_AGENT, "host": h, "id": f"ovs-agent-{h}"}) for h in self.ovs]
        for host in self.sriov:
            events.append(make("agent.report", {**SRIOV_AGENT, "host": host, "id": f"nic-agent-{host}"}))
            events.append(make("pci.inventory", inventory(host, plan.pfs_per_host, plan.vfs_per_pf)))
        events.append(make("agent.report", {**SRIOV_AGENT, "host": self.race, "id": "nic-agent-race"}))
        events.append(make("pci.inventory", inventory(self.race, 1, plan.race_vfs)))
        return events


@dataclass
class PortPlan:
    port_id: str
    kind: str  # ovs | vf | pf
    hosts: list[str]  # the create's host, then one per move
    delete: bool
    step: int = 0  # ops done
    raced: bool = False  # one of its events went out before the previous one's results came

    @property
    def ops(self) -> int:
        return len(self.hosts) + int(self.delete)


def port_plans(plan: Plan, topo: Topology, rng: random.Random) -> list[PortPlan]:
    plans, events, n = [], 0, 0
    while events < plan.events:
        roll = rng.random()
        kind = "pf" if roll < plan.share_pf else "vf" if roll < plan.share_pf + plan.share_sriov else "ovs"
        pool = topo.ovs if kind == "ovs" else topo.sriov
        hosts = [rng.choice(pool)]
        for _ in range(rng.choice((0, 0, 1, 1, 2, 3))):
            hosts.append(rng.choice([h for h in pool if h != hosts[-1]]))
        port = PortPlan(f"p{plan.seed}-{n:05d}", kind, hosts, delete=rng.random() < 0.7)
        plans.append(port)
        events += port.ops
        n += 1
    return plans


KIND_VIF_TYPES = {"ovs": ("ovs",), "vf": ("hw_veb",), "pf": ("hostdev_physical",)}


def port_body(port_id: str, kind: str, host: str, n: int) -> dict[str, Any]:
    network, vnic = {"ovs": ("net-vxlan", "normal"), "vf": ("net-vlan", "direct"),
                     "pf": ("net-vlan", "direct-physical")}[kind]
    return {"id": port_id, "network_id": network, "host": host, "vnic_type": vnic, "profile": {},
            "device_owner": "compute:nova",
            "fixed_ips": [{"subnet_id": "sub-1", "ip_address": f"10.{n // 62500 % 250}.{n // 250 % 250}.{n % 250 + 2}"}]}


class EnvelopeFactory:
    """Envelopes with event ids from the seeded generator (a run's ids are reproducible)."""

    def __init__(self, client_context: Any, rng: random.Random):
        self.context, self.rng = client_context, rng

    def __call__(self, event_type: str, payload: dict[str, Any]) -> Envelope:
        return Envelope(event_id=uuid.UUID(int=self.rng.getrandbits(128), version=4), event_type=event_type,
                        occurred_at=datetime.now(UTC), context=self.context, payload=payload)


class Workload:
    """Port lifecycles at ``plan.rate`` events/s, at most ``plan.in_flight`` ports under way."""

    def __init__(self, plan: Plan, topo: Topology, ledger: Ledger, publisher: Publisher, make: EnvelopeFactory):
        self.plan, self.topo, self.ledger, self.publisher, self.make = plan, topo, ledger, publisher, make
        self.rng = random.Random(f"{plan.seed}:workload")
        self.plans = port_plans(plan, topo, random.Random(f"{plan.seed}:ports"))
        self.duplicates = 0
        self.late_duplicates: list[tuple[float, Envelope]] = []
        self.late_sent = 0
        self.sent = 0
        self.overtaken = 0
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="workload", daemon=True)

    def next_event(self, port: PortPlan) -> tuple[Envelope, set[str], str | None]:
        n = int(port.port_id.rsplit("-", 1)[1])
        if port.step == 0:
            host = port.hosts[0]
            return self.make("port.create", port_body(port.port_id, port.kind, host, n)), {host}, host
        if port.step < len(port.hosts):
            old, new = port.hosts[port.step - 1], port.hosts[port.step]
            return self.make("port.update", port_body(port.port_id, port.kind, new, n)), {old, new}, new
        host = port.hosts[-1]
        return self.make("port.delete", {"id": port.port_id}), {host}, None

    def send(self, port: PortPlan, batch: list[Envelope]) -> Envelope:
        """The port's next event into ``batch``, with what it must give. Once one of a port's events
        went out before the previous one's results came, competing workers may take its events in
        any order, and the newer one wins: an event may then find its port already where it says
        (nothing to tell) or be overtaken (nothing to do). Its results are no longer required, only
        judged when they come (on any host of its plan), and the port's last word on every host is
        checked at the end (``checker.stale_bindings``)."""
        envelope, hosts, final = self.next_event(port)
        if port.raced:
            optional, hosts = set(port.hosts[:port.step + 1]), set()
        else:
            optional = set()
        self.ledger.expect(envelope, port.port_id, hosts, final, "workload", optional,
                           (final, KIND_VIF_TYPES[port.kind]))
        port.step += 1
        batch.append(envelope)
        self.sent += 1
        return envelope

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - reported by run()
            self.error = exc
            log(f"workload failed: {exc!r}")
        finally:
            self.done.set()

    def _loop(self) -> None:
        pending = list(reversed(self.plans))
        active: list[PortPlan] = []
        interval = 1.0 / self.plan.rate
        next_at = time.monotonic()
        batch: list[Envelope] = []
        batch_started = time.monotonic()
        progress_at = time.monotonic()
        while pending or batch or any(p.step < p.ops for p in active):
            now = time.monotonic()
            if now - progress_at > self.plan.drain_timeout:
                log(f"workload stalled for {self.plan.drain_timeout:.0f}s: ports waiting for results that do not "
                    f"come; {sum(p.ops - p.step for p in active + pending)} events not sent")
                break
            if batch and (now - batch_started > 0.05 or len(batch) >= 25 or (not pending and not active)):
                self.publisher.publish(batch)
                batch = []
            due = [e for t, e in self.late_duplicates if t <= now]
            if due:
                self.late_duplicates = [(t, e) for t, e in self.late_duplicates if t > now]
                self.publisher.publish(due)
                self.late_sent += len(due)
            if now < next_at:
                time.sleep(min(next_at - now, 0.02))
                continue
            next_at = max(next_at, now - 1.0)  # after a stall, no burst of more than a second's events
            active = [p for p in active if p.step < p.ops or not self.ledger.idle(p.port_id)]
            idle = [p for p in active if p.step < p.ops and self.ledger.idle(p.port_id)]
            if pending and len(active) < self.plan.in_flight and (not idle or self.rng.random() < 0.5):
                port = pending.pop()
                active.append(port)
            elif idle:
                port = self.rng.choice(idle)
            else:
                time.sleep(0.01)
                continue
            if not batch:
                batch_started = time.monotonic()
            envelope = self.send(port, batch)
            if port.step < port.ops and self.rng.random() < self.plan.overtake_rate:
                port.raced = True  # its next event goes out with this one: each overtakes the other's results
                self.send(port, batch)
                self.overtaken += 1
            progress_at = time.monotonic()
            roll = self.rng.random()
            if roll < self.plan.duplicate_rate:
                batch.append(envelope)
                self.duplicates += 1
            elif roll < self.plan.duplicate_rate + self.plan.late_duplicate_rate:
                self.late_duplicates.append((time.monotonic() + self.rng.uniform(1, 10), envelope))
            next_at += interval
        for _, envelope in self.late_duplicates:  # whatever is left goes now
            self.publisher.publish([envelope])
            self.late_sent += 1
        self.late_duplicates = []

    def start(self) -> None:
        self.thread.start()


# --- hostile messages --------------------------------------------------------------------------

HOSTILE_KINDS = ("bad_json", "not_utf8", "not_utf8_declared", "too_large", "deep_nesting", "missing_event_id",
                 "unknown_type", "wrong_schema_payload", "wrong_schema_types", "not_an_object", "extra_field",
                 "bad_event_id", "unknown_port", "bad_job", "nul_body", "binary_body", "text_plain", "escaped_nul",
                 "conflicting_id", "conflicting_body")


NAMES_A_PORT = {"missing_event_id", "unknown_type", "wrong_schema_payload", "wrong_schema_types", "extra_field",
                "bad_event_id", "unknown_port", "escaped_nul"}


def hostile_messages(count: int, seed: int, max_body: int = 64 * 1024,
                     taken: list[str] = ()) -> list[tuple[checker.HostileMessage, dict]]:
    """``count`` hostile messages (kinds in turn), each with a unique marker in its first bytes;
    ``taken``: ids of events accepted before (a conflicting message reuses one)."""
    rng = random.Random(f"{seed}:hostile")
    out = []
    for i in range(count):
        kind = HOSTILE_KINDS[i % len(HOSTILE_KINDS)]
        marker = f"HOSTILE-{i:05d}-{rng.getrandbits(32):08x}"
        event_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        now = datetime.now(UTC).isoformat()
        envelope = {"event_id": event_id, "event_type": "port.create", "occurred_at": now,
                    "context": {"user_id": "nova", "project_id": "service", "roles": ["service"]},
                    "payload": {"id": marker, "network_id": "net-vxlan", "host": "ovs-0", "vnic_type": "normal"}}
        exchange, routing_key, stage, encoding = "binding.events", "port.create", "validate", "binary"
        content_type = "application/json"
        if kind == "nul_body":
            body, category = b"\x00" + marker.encode() + b"\x00 {}", "bad_json"
        elif kind == "binary_body":
            body, category = bytes(range(128, 256)) + marker.encode() + bytes(range(128)), "not_utf8"
        elif kind == "text_plain":
            body, category, content_type = json.dumps(envelope).encode(), "bad_content_type", "text/plain"
        elif kind == "escaped_nul":
            payload = {**envelope["payload"], "profile": {"k\u0000": 1}}
            body, category = json.dumps({**envelope, "payload": payload}).encode(), "bad_schema"
        elif kind == "conflicting_id":  # malformed, under an accepted event's id
            payload = {k: v for k, v in envelope["payload"].items() if k != "network_id"}
            body = json.dumps({**envelope, "event_id": rng.choice(taken), "payload": payload}).encode()
            category = "conflicting_event_id"
        elif kind == "conflicting_body":  # well formed, under an accepted event's id
            body, category = json.dumps({**envelope, "event_id": rng.choice(taken)}).encode(), "conflicting_event_id"
        elif kind == "bad_json":
            body, category = f'{{"event_id": "{marker}", "payload": {{"id": '.encode(), "bad_json"
        elif kind == "not_utf8":
            body, category = b"\xff\xfe" + marker.encode() + b"\xc3\x28\xa0\xa1 not utf-8", "not_utf8"
        elif kind == "not_utf8_declared":
            body, category, encoding = b"\x80" + marker.encode() + b"\xed\xa0\x80", "not_utf8", "utf-8"
        elif kind == "too_large":
            body = json.dumps({**envelope, "payload": {**envelope["payload"],
                                                      "description": "x" * (max_body + 4096)}}).encode()
            body, category = body, "too_large"
        elif kind == "deep_nesting":
            depth = 20000
            body = (json.dumps(envelope)[:-2] + ', "profile": ' + "[" * depth + "]" * depth + "}}").encode()
            category = "bad_json"
        elif kind == "missing_event_id":
            body, category = json.dumps({k: v for k, v in envelope.items() if k != "event_id"}).encode(), \
                "missing_event_id"
        elif kind == "unknown_type":
            body, category = json.dumps({**envelope, "event_type": "port.explode"}).encode(), "unknown_event_type"
        elif kind == "wrong_schema_payload":
            payload = {k: v for k, v in envelope["payload"].items() if k != "network_id"}
            body, category = json.dumps({**envelope, "payload": payload}).encode(), "bad_schema"
        elif kind == "wrong_schema_types":
            body, category = json.dumps({**envelope, "occurred_at": ["yesterday"]}).encode(), "bad_schema"
        elif kind == "not_an_object":
            body, category = json.dumps([marker, envelope]).encode(), "bad_schema"
        elif kind == "extra_field":
            body, category = json.dumps({**envelope, "evil": marker}).encode(), "bad_schema"
        elif kind == "bad_event_id":
            body, category = json.dumps({**envelope, "event_id": marker}).encode(), "bad_schema"
        elif kind == "unknown_port":
            body = json.dumps({**envelope, "event_type": "binding.request",
                               "payload": {"port_id": marker, "host": "ovs-0"}}).encode()
            category, routing_key = "bad_schema", "binding.request"
        else:  # bad_job: straight onto a later stage's queue
            stage = ("select", "allocate", "compose")[i // len(HOSTILE_KINDS) % 3]
            exchange, routing_key = "binding.stages", stage
            body, category = json.dumps({"job_id": marker, "port_id": 42}).encode(), "bad_schema"
        # README, "Hostile input": a refused event that names a port (a port.* or binding.* payload
        # with an id) gives that port's host (the one the event names) a binding_failed result.
        refusal_host = "ovs-0" if kind in NAMES_A_PORT else None
        if kind == "unknown_port":  # well formed: refused as a binding request, not dead-lettered
            out.append((checker.HostileMessage(marker, kind, stage, "", refusal_host, dead_lettered=False,
                                               refusal_error="InvalidInput: port_id: port"),
                        {"body": body, "exchange": exchange, "routing_key": routing_key,
                         "content_type": "application/json", "content_encoding": encoding}))
            continue
        out.append((checker.HostileMessage(marker, kind, stage, category, refusal_host),
                    {"body": body, "exchange": exchange, "routing_key": routing_key,
                     "content_type": content_type, "content_encoding": encoding}))
    return out


# --- the nemesis -------------------------------------------------------------------------------

class Nemesis:
    """Runs the plan's schedule and the random kills; every fault is logged with its times."""

    def __init__(self, plan: Plan, run: Run):
        self.plan, self.run = plan, run
        self.rng = random.Random(f"{plan.seed}:nemesis")
        self.faults: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.threads: list[threading.Thread] = []
        self.stop = threading.Event()
        self.t0 = 0.0

    def record(self, kind: str, start: float, **detail: Any) -> dict[str, Any]:
        fault = {"kind": kind, "t": round(start - self.t0, 2), "start": start, "end": time.time(), **detail}
        self.faults.append(fault)
        log(f"fault {kind} at t={fault['t']}s: {({k: v for k, v in detail.items() if k != 'log_tail'})}")
        return fault

    def start(self) -> None:
        self.t0 = time.time()
        for at, action, arg in sorted(self.plan.schedule, key=lambda s: s[0]):
            thread = threading.Thread(target=self._at, args=(at, action, arg), name=f"nemesis-{action}", daemon=True)
            thread.start()
            self.threads.append(thread)
        if self.plan.kill_every:
            thread = threading.Thread(target=self._kill_loop, name="nemesis-kills", daemon=True)
            thread.start()
            self.threads.append(thread)

    def _sleep_until(self, at: float) -> bool:
        while (left := self.t0 + at - time.time()) > 0:
            if self.stop.wait(min(left, 0.5)):
                return False
        return True

    def _at(self, at: float, action: str, arg: Any) -> None:
        if not self._sleep_until(at):
            return
        try:
            getattr(self, f"do_{action}")(arg)
        except Exception as exc:  # noqa: BLE001 - reported in the summary
            self.errors.append(f"{action} at {at}: {type(exc).__name__}: {exc}")
            log(f"fault {action} failed: {exc!r}")

    def quiet(self) -> bool:
        t = time.time() - self.t0
        return any(a <= t <= b for a, b in self.plan.quiet)

    def _kill_loop(self) -> None:
        first, last = self.plan.kill_between
        if not self._sleep_until(first):
            return
        while not self.stop.is_set() and time.time() - self.t0 < last:
            if not self.quiet():
                self.do_kill(None)
            self.stop.wait(self.plan.kill_every * self.rng.uniform(0.6, 1.4))

    # --- actions ---
    def do_kill(self, stage: str | None) -> None:
        names = self.run.workers.names(stage)
        if stage is None and self.plan.relay and self.rng.random() < 0.1:
            names = ["relay"]
        name = self.rng.choice(names)
        start = time.time()
        pid = self.run.workers.kill9(name)
        if pid is not None:
            self.record("kill9", start, worker=name, pid=pid)

    def do_sigterm(self, stage: str | None) -> None:
        name = self.rng.choice(self.run.workers.names(stage))
        start = time.time()
        self.record("sigterm", start, **self.run.workers.sigterm(name))

    def do_cut(self, route: str) -> None:
        start = time.time()
        self.record("cut", start, route=route, connections=self.run.proxy.cut(route))

    def do_broker_restart(self, down: float) -> None:
        start = time.time()
        timings = self.run.services.restart_rabbitmq(down, self.run.queue_names())
        back = time.monotonic()
        consumers_back = self.run.wait_consumers(timeout=120)
        self.record("broker_restart", start, **{k: round(v, 2) for k, v in timings.items()},
                    consumers_back_s=round(time.monotonic() - back, 2) if consumers_back else None)

    def do_pg_restart(self, mode: str) -> None:
        start = time.time()
        timings = self.run.services.restart_postgres(mode)
        self.record("pg_restart", start, mode=mode, **{k: round(v, 2) for k, v in timings.items()})

    def do_pg_outage(self, seconds: float) -> None:
        start = time.time()
        timings = self.run.services.stop_postgres_for(seconds)
        self.record("pg_outage", start, **{k: round(v, 2) for k, v in timings.items()})

    def do_pg_blackhole(self, seconds: float) -> None:
        """The database answers nothing for ``seconds`` (the proxy holds every byte): longer than any
        retry, so the workers hold their batches and keep their broker connections alive."""
        start = time.time()
        self.run.proxy.hold("pg", seconds)
        time.sleep(seconds)
        self.record("pg_blackhole", start, seconds=seconds)

    def do_pg_refused(self, seconds: float) -> None:
        """The database refuses every connection for ``seconds``, the open ones cut at once."""
        start = time.time()
        self.run.proxy.refuse("pg", seconds)
        cut = self.run.proxy.cut("pg")
        time.sleep(seconds)
        self.record("pg_refused", start, seconds=seconds, connections=cut)

    def do_hostile(self, count: int) -> None:
        start = time.time()
        sent = self.run.inject_hostile(count)
        self.record("hostile", start, messages=sent)

    def do_race(self, name: str) -> None:
        start = time.time()
        race = self.run.race_round(name)
        self.record("race", start, round=name, ports=len(race.create_ids))

    def do_race_with_kill(self, name: str) -> None:
        """A race round with allocate workers SIGKILLed while its creates are in flight."""
        def killer() -> None:
            time.sleep(0.3)
            for victim in self.run.workers.names("allocate"):
                pid = self.run.workers.kill9(victim)
                if pid is not None:
                    self.record("kill9", time.time(), worker=victim, pid=pid, during=name)
                time.sleep(0.4)
        threading.Thread(target=killer, daemon=True).start()
        self.do_race(name)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            if thread.name != "nemesis-kills":
                thread.join(max(deadline - time.monotonic(), 0.1))
        self.stop.set()
        for thread in self.threads:
            thread.join(max(deadline - time.monotonic(), 0.1))


# --- a run -------------------------------------------------------------------------------------

def _with_host_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    return urlunsplit(parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host))


class Run:
    """One run of a plan against ``broker_url`` (a vhost of its own) and ``database_url`` (a fresh DB)."""

    def __init__(self, plan: Plan, broker_url: str, database_url: str, run_dir: Path | None = None):
        self.plan = plan
        self.run_dir = run_dir or Path(tempfile.mkdtemp(prefix="bindpipe-faults-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.fault_log = self.run_dir / "faults.log"
        self.broker_url, self.database_url = broker_url, database_url
        self.settings = Settings(broker_url=broker_url, database_url=database_url)
        self.services = Services(broker_url, database_url)
        self.engine: Engine = make_engine(database_url)
        self.topo = Topology([f"ovs-{i}" for i in range(plan.ovs_hosts)],
                             [f"sriov-{i}" for i in range(plan.sriov_hosts)], RACE_HOST)
        self.ledger = Ledger()
        self.publisher = Publisher(self.settings, self.ledger)
        self.make = EnvelopeFactory(RequestContext.service(), random.Random(f"{plan.seed}:ids"))
        self.hostile: list[tuple[checker.HostileMessage, dict]] = []  # made once the topology is in (``setup``)
        self.hostile_sent = 0
        self.races: list[checker.RaceRound] = []
        self.race_lock = threading.Lock()
        self.proxy: Proxy | None = None
        self.workers: Workers | None = None
        self.collector: Collector | None = None
        self.figures: dict[str, Any] = {}

    # --- helpers used by the nemesis ---
    def queue_names(self) -> list[str]:
        return [f"binding.{s}" for s in STAGES] + [results_queue(h, self.settings).name for h in self.topo.hosts]

    def queue_state(self) -> dict[str, tuple[int, int]]:
        with Connection(self.broker_url, connect_timeout=3) as connection:
            channel = connection.channel()
            state = {}
            for stage in STAGES:
                _, messages, consumers = channel.queue_declare(queue=f"binding.{stage}", passive=True)
                state[stage] = (messages, consumers)
            channel.close()
        return state

    def wait_consumers(self, timeout: float) -> bool:
        def ready() -> bool:
            try:
                state = self.queue_state()
            except Exception:  # noqa: BLE001
                return False
            return all(state[s][1] >= self.plan.workers.get(s, 0) for s in STAGES)
        try:
            wait_until(ready, timeout, "a consumer per worker on every stage queue", interval=0.25)
            return True
        except AssertionError:
            return False

    def db(self, work: Callable[[Session], Any]) -> Any:
        def attempt() -> Any:
            with Session(self.engine) as session:
                return work(session)
        return retrying("database query", attempt)

    def inject_hostile(self, count: int) -> int:
        first = self.hostile_sent
        chunk = self.hostile[first:first + count]
        self.hostile_sent += len(chunk)
        for number, (expected, message) in enumerate(chunk, start=first):
            copies = self.publisher.publish_raw(**message)
            if copies > 1:
                self.hostile[number] = (replace(expected, copies=copies), message)
        return len(chunk)

    def race_round(self, name: str) -> checker.RaceRound:
        """64 ports racing for the race host's 8 VFs, then deleted: one round at a time (rounds
        scheduled close together, as at high rates, wait for the one under way)."""
        with self.race_lock:
            return self._race_round(name)

    def _race_round(self, name: str) -> checker.RaceRound:
        ports = [f"{name}-{i:02d}" for i in range(self.plan.race_ports)]
        creates = []
        for i, port_id in enumerate(ports):
            envelope = self.make("port.create", port_body(port_id, "vf", RACE_HOST, 60000 + i))
            self.ledger.expect(envelope, port_id, {RACE_HOST}, RACE_HOST, name)
            creates.append(envelope)
        self.publisher.publish(creates)
        race = checker.RaceRound(name, RACE_HOST, [str(e.event_id) for e in creates], [], self.plan.race_vfs)
        self.races.append(race)
        if not self.ledger.wait_idle(ports, 150):
            log(f"race {name}: creates still without results after 150 s")
        deletes = []
        for port_id in ports:
            envelope = self.make("port.delete", {"id": port_id})
            self.ledger.expect(envelope, port_id, {RACE_HOST}, None, name)
            deletes.append(envelope)
        self.publisher.publish(deletes)
        race.delete_ids = [str(e.event_id) for e in deletes]
        if not self.ledger.wait_idle(ports, 150):
            log(f"race {name}: deletes still without results after 150 s")
        race.owned_after_delete = self.db(lambda s: s.scalar(
            select(func.count()).select_from(PciDeviceRow).where(PciDeviceRow.host == RACE_HOST,
                                                                 PciDeviceRow.owner_port_id.is_not(None))))
        return race

    # --- the run ---
    def setup(self) -> None:
        create_schema(self.engine)
        with Connection(self.broker_url) as connection:
            declare_topology(connection, self.settings)
            for host in self.topo.hosts:  # a compute host's queue exists before its first result
                results_queue(host, self.settings)(connection.default_channel).declare()
        self.proxy = Proxy({"amqp": f"{urlsplit(self.broker_url).hostname}:{urlsplit(self.broker_url).port or 5672}",
                            "pg": f"{urlsplit(self.database_url).hostname}:{urlsplit(self.database_url).port or 5432}"},
                           str(self.run_dir / "proxy.log"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("BINDPIPE_")
               and k.lower() != "prometheus_multiproc_dir"}
        env.update({"BINDPIPE_BROKER_URL": _with_host_port(self.broker_url, self.proxy.port("amqp")),
                    "BINDPIPE_DATABASE_URL": _with_host_port(self.database_url, self.proxy.port("pg")),
                    "BINDPIPE_LOG_FORMAT": "json", "BINDPIPE_DECLARE_TOPOLOGY": "false",
                    "BINDPIPE_AGENT_DOWN_TIME": "86400", "BINDPIPE_FAULT_LOG": str(self.fault_log),
                    "PYTHONPATH": str(ROOT), "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
                    **self.plan.worker_env})
        self.workers = Workers(self.plan, env, self.run_dir, self.fault_log)
        self.workers.start_all()
        self.collector = Collector(self.broker_url, self.topo.hosts, self.settings, self.ledger)
        self.collector.start()
        if not self.wait_consumers(90):
            raise RuntimeError(f"the workers did not all start consuming: {self.queue_state()}")
        topology = self.topo.events(self.make, self.plan)
        self.publisher.publish(topology)
        wait_until(lambda: self.db(lambda s: s.scalar(select(func.count()).select_from(EventLog))) >= len(topology),
                 60, "the topology events logged", interval=0.2)
        self.hostile = hostile_messages(self.plan.hostile, self.plan.seed, self.settings.max_body_bytes,
                                        taken=[str(e.event_id) for e in topology])

    def drain(self) -> dict[str, Any]:
        started = time.monotonic()
        all_idle = self.ledger.wait_idle(None, self.plan.drain_timeout)

        def settled() -> bool:
            try:
                queues = self.queue_state()
            except Exception:  # noqa: BLE001
                return False
            unpublished = self.db(lambda s: s.scalar(select(func.count()).select_from(ResultRow)
                                                     .where(ResultRow.published_at.is_(None))))
            return all(m == 0 for m, _ in queues.values()) and unpublished == 0 \
                and time.monotonic() - self.ledger.last_result_at > 2.0

        try:
            wait_until(settled, 60 if all_idle else 10, "stage queues empty and the outbox published", interval=0.5)
            settled_ok = True
        except AssertionError:
            settled_ok = False
        return {"drain_s": round(time.monotonic() - started, 1), "all_results_in": all_idle, "settled": settled_ok,
                "ports_still_waiting": self.ledger.outstanding()}

    def snapshot(self) -> checker.DbState:
        def read(session: Session) -> checker.DbState:
            state = checker.DbState()
            state.results = [checker.ResultRowData(r.seq, r.event_id, r.port_id, r.host, r.published(), r.published_at is not None)
                             for r in session.scalars(select(ResultRow))]
            state.devices = [checker.DeviceData(d.host, d.address, d.dev_type, d.parent_addr, d.status, d.owner_port_id)
                             for d in session.scalars(select(PciDeviceRow))]
            for host in self.topo.sriov + [self.topo.race]:
                tracker, _ = tracker_for(session, host)
                if tracker is not None:
                    state.violations[host] = invariant_violations(tracker)
            state.ports = dict(session.execute(select(PortRow.id, PortRow.host)).all())
            state.dead_letters = [checker.DeadLetterData(d.id, d.stage, d.reason, d.event_id, d.body, d.category)
                                  for d in session.scalars(select(DeadLetter))]
            return state
        return self.db(read)

    def read_dlqs(self) -> list[checker.DlqMessage]:
        messages = []
        with Connection(self.broker_url) as connection:
            channel = connection.channel()
            for stage in STAGES:
                queue = f"binding.{stage}.dlq"
                while (message := channel.basic_get(queue, no_ack=True)) is not None:
                    body = message.body if isinstance(message.body, bytes) else str(message.body).encode(
                        "utf-8", "surrogateescape")
                    messages.append(checker.DlqMessage(queue, body, dict(message.headers or {})))
            channel.close()
        return messages

    def fault_log_entries(self) -> tuple[list[checker.Delivery], Counter, int, int]:
        deliveries, crashes, redeliveries, max_count = [], Counter(), 0, 0
        self.missing_hooks = set()
        if self.fault_log.exists():
            for line in self.fault_log.read_text().splitlines():
                words = line.split()
                if not words:
                    continue
                if words[0] == "delivery":
                    deliveries.append(checker.Delivery(words[1], words[2], int(words[3]), int(words[4]),
                                                       float(words[5])))
                elif words[0] == "crash":
                    crashes[f"{words[1]} ({words[2]})"] += 1
                elif words[0] == "redelivery":
                    redeliveries += 1
                    max_count = max(max_count, int(words[3]))
                elif words[0] == "missing-hook":
                    self.missing_hooks.add(words[1])
        return deliveries, crashes, redeliveries, max_count

    def execute(self) -> dict[str, Any]:
        started = time.monotonic()
        self.setup()
        log(f"set up in {time.monotonic() - started:.1f}s; run dir {self.run_dir}")
        workload = Workload(self.plan, self.topo, self.ledger, self.publisher, self.make)
        nemesis = Nemesis(self.plan, self)
        load_started = time.monotonic()
        nemesis.start()
        workload.start()
        workload.done.wait()
        nemesis.join(timeout=400)
        load_s = time.monotonic() - load_started
        log(f"workload sent {workload.sent} events in {load_s:.1f}s; draining")
        if workload.error is not None:
            raise RuntimeError("the workload failed") from workload.error
        drain = self.drain()
        stop_codes = self.workers.stop_all()
        self.collector.stop()
        deliveries, crashes, redeliveries, max_delivery_count = self.fault_log_entries()
        windows = [(f["start"], f["end"]) for f in nemesis.faults if f["kind"] in ("cut", "broker_restart")]
        summary = checker.check(self.ledger.published(), list(self.ledger.received), self.snapshot(),
                                dict(self.ledger.final_hosts), hostile=[h for h, _ in self.hostile[:self.hostile_sent]],
                                deliveries=deliveries, dlq=self.read_dlqs(), races=self.races,
                                fault_windows=windows, dead_pids=self.workers.dead_pids)
        latencies = self.ledger.latencies()
        faults = Counter(f["kind"] for f in nemesis.faults)
        exits = Counter(e["why"] for e in self.workers.events)
        self.figures = {
            "duration_s": round(time.monotonic() - started, 1), "load_s": round(load_s, 1), **drain,
            "workload_events": workload.sent, "race_events": sum(len(r.create_ids) + len(r.delete_ids) for r in self.races),
            "hostile_sent": self.hostile_sent,
            "events_per_s": round(workload.sent / load_s, 1) if load_s else None,
            "duplicates_same_batch": workload.duplicates, "duplicates_late": workload.late_sent,
            "publish_retries": self.publisher.retries,
            "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
            "latency_p99_s": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 3)
            if latencies else None,
            "latency_max_s": round(latencies[-1], 3) if latencies else None,
            "faults": dict(sorted(faults.items())),
            "worker_exits": dict(sorted(exits.items())),
            "crash_points_fired": dict(sorted(crashes.items())),
            "missing_hooks": sorted(self.missing_hooks),  # product seams tests/faults/worker.py no longer finds
            "unexpected_exits": [e for e in self.workers.events if e["why"] == "unexpected"],
            "redeliveries_seen": redeliveries, "max_x_delivery_count": max_delivery_count,
            "sigterm": [{k: f.get(k) for k in ("t", "name", "code", "seconds")}
                        for f in nemesis.faults if f["kind"] == "sigterm"],
            "broker_restarts": [{k: f[k] for k in ("t", "stop_s", "down_s", "consumers_back_s")}
                                for f in nemesis.faults if f["kind"] == "broker_restart"],
            "pg_restarts": [{k: f.get(k) for k in ("t", "mode", "down_s")} for f in nemesis.faults
                            if f["kind"] in ("pg_restart", "pg_outage")],
            "pg_unreachable": [{k: f.get(k) for k in ("t", "kind", "seconds")} for f in nemesis.faults
                               if f["kind"] in ("pg_blackhole", "pg_refused")],
            "overtaking_events": workload.overtaken,
            "cuts": [{k: f[k] for k in ("t", "route", "connections")} for f in nemesis.faults if f["kind"] == "cut"],
            "nemesis_errors": nemesis.errors,
            "stop_exit_codes": stop_codes,
            "run_dir": str(self.run_dir),
        }
        return summary

    def close(self) -> None:
        if self.collector is not None and self.collector.thread.is_alive():
            self.collector.stop()
        if self.workers is not None:
            self.workers.kill_all()
        if self.proxy is not None:
            self.proxy.close()
        self.publisher.close()
        self.engine.dispose()


def run(plan: Plan, broker_url: str, database_url: str, run_dir: Path | None = None,
        keep_run_dir: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``plan``; (the checker's summary, the harness's figures)."""
    the_run = Run(plan, broker_url, database_url, run_dir)
    try:
        summary = the_run.execute()
    finally:
        the_run.close()
        if not keep_run_dir:
            shutil.rmtree(the_run.run_dir, ignore_errors=True)
    return summary, the_run.figures


def print_report(summary: dict[str, Any], figures: dict[str, Any], out: Any = sys.stdout) -> None:
    extra = {k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in figures.items()}
    print(checker.format_summary(summary, extra), file=out)


__all__ = ["Plan", "Run", "Services", "Workers", "Ledger", "Collector", "Workload", "Nemesis", "run",
           "print_report", "hostile_messages"]


# --- the two plans -----------------------------------------------------------------------------

def reduced_plan(seed: int = 5) -> Plan:
    """The CI run: 600 workload events at 12/s (one port in ten has its next event sent before the
    previous one's results came) plus two VF race rounds and 80 hostile messages, every fault at
    least once, one after the other (a broker restart takes ~20 s here: stop_app ~5 s, start_app
    and the quorum queues back ~12 s), ending with the database unreachable for twice the workers'
    transaction retry budget. The first hostile batch goes in while no fault is injected."""
    return Plan(
        seed=seed, events=600, rate=12.0, in_flight=40, hostile=80, overtake_rate=0.1,
        kill_every=5.0, kill_between=(2.0, 62.0), quiet=[(2.5, 9.0)],
        schedule=[(4.0, "hostile", 42), (9.5, "cut", "amqp"), (11.0, "race_with_kill", "race-1"),
                  (17.0, "cut", "pg"), (20.0, "broker_restart", 2.0), (44.0, "pg_restart", "fast"),
                  (50.0, "hostile", 38), (52.0, "cut", "all"), (55.0, "sigterm", None), (58.0, "race", "race-2"),
                  (64.0, "pg_blackhole", 11.0)],
        crash_plans={"validate": ["before_ack@40", "after_dead_letter@15"], "select": ["after_commit@40"],
                     "allocate": ["in_transaction@30", "mid_ack@120"],
                     "compose": ["after_commit@30", "after_publish@60"]},
        drain_timeout=90.0)


def large_plan(seed: int = 7, events: int = 5200, rate: float = 30.0) -> Plan:
    """The long run (``scripts/faults.py``): ≥ 5,000 workload events under every fault, repeatedly,
    the database twice unreachable for longer than every retry (30 s: blackholed, then refused)."""
    load = events / rate
    schedule: list[tuple[float, str, Any]] = []
    for i in range(10):  # 500 hostile messages in ten bursts
        schedule.append((5.0 + i * load / 10, "hostile", 50))
    for i in range(8):  # eight VF race rounds, every other one with its allocators killed mid-round
        schedule.append((8.0 + i * load / 8, "race_with_kill" if i % 2 else "race", f"race-{i + 1}"))
    schedule += [(0.22 * load, "broker_restart", 5.0), (0.62 * load, "broker_restart", 2.0),
                 (0.40 * load, "pg_restart", "fast"), (0.80 * load, "pg_restart", "immediate"),
                 (0.33 * load, "pg_blackhole", 30.0), (0.86 * load, "pg_refused", 30.0)]
    schedule += [(t * load, "cut", route) for t, route in ((0.12, "amqp"), (0.30, "pg"), (0.50, "all"),
                                                          (0.70, "amqp"), (0.88, "all"), (0.95, "pg"))]
    schedule += [(t * load, "sigterm", stage) for t, stage in ((0.15, "allocate"), (0.45, "compose"),
                                                              (0.75, "validate"), (0.90, "select"))]
    return Plan(
        seed=seed, events=events, rate=rate, in_flight=max(80, int(rate * 10)), hostile=500, overtake_rate=0.1,
        kill_every=4.0, kill_between=(3.0, load),
        schedule=schedule,
        crash_plans={"validate": ["before_ack@200", "mid_ack@900"], "select": ["after_commit@200"],
                     "allocate": ["in_transaction@100", "after_commit@150", "mid_ack@500"],
                     "compose": ["after_commit@100", "after_publish@150", "before_ack@250", "in_transaction@300"]},
        crash_spec="in_transaction=0.0005,after_commit=0.0005,after_publish=0.0005,before_ack=0.0005",
        drain_timeout=240.0)


def fast_plan(seed: int = 31, events: int = 20000, rate: float = 400.0) -> Plan:
    """The large plan at 400 events/s: 20,000 workload events in under a minute of load."""
    return large_plan(seed, events, rate)


def duplicates_plan(seed: int = 5) -> Plan:
    """No fault but duplicates (F6): 15 % of the events twice in one batch, 5 % again later. Shows
    a copy handled concurrently by a second worker being dead-lettered (docs/faults.md, bug 1)."""
    return Plan(seed=seed, events=400, rate=25.0, duplicate_rate=0.15, late_duplicate_rate=0.05, drain_timeout=60.0)


def reject_crash_plan(seed: int = 5) -> Plan:
    """Hostile messages while validate workers die between a dead letter's commit and its ack
    (crash point ``after_dead_letter``): the redelivery must not record it twice (bug 4)."""
    return Plan(seed=seed, events=60, rate=20.0, hostile=56, schedule=[(1.0, "hostile", 56)],
                crash_plans={"validate": ["after_dead_letter@3", "after_dead_letter@3", "after_dead_letter@5"]},
                drain_timeout=60.0)


def pg_outage_plan(seed: int = 5) -> Plan:
    """PostgreSQL down for 8 s while the workers are idle (well within the 20 s a transaction is
    retried): none may exit (bug 3)."""
    return Plan(seed=seed, events=60, rate=20.0, schedule=[(6.0, "pg_outage", 8.0)], drain_timeout=60.0)


PLANS = {"large": large_plan, "fast": fast_plan, "reduced": reduced_plan, "duplicates": duplicates_plan,
         "reject-crash": reject_crash_plan, "pg-outage": pg_outage_plan}

