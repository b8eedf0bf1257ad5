"""The whole pipeline under real supervisord with ``deploy/supervisord.conf`` (issue #4).

supervisord starts every program of the conf (the real ``bindpipe`` of this virtualenv) against a
fresh RabbitMQ vhost (topology declared beforehand; workers only check it passively) and a fresh,
migrated PostgreSQL database. The test sees every program RUNNING, binds ports through the
stages, SIGKILLs the allocator while a second wave is in flight and sees supervisord restart it
with no message lost and no PCI device handed out twice, then scrapes the metrics server's
``/metrics`` and checks every documented family against the database.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Producer
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

from pipeline.client import BindingClient
from pipeline.db import make_engine
from pipeline.demo import load_topology
from pipeline.models.binding import BindingResult
from pipeline.models.events import Envelope
from pipeline.models.tables import DeadLetter, EventLog, PciDeviceRow, ResultRow, StageMark
from pipeline.observability.metrics import DEAD_LETTER_REASONS, METRIC_FAMILIES, PCI_STATES
from pipeline.settings import Settings
from pipeline.workers.topology import STAGES
from prometheus_client.parser import text_string_to_metric_families
from tests.bus import wait_until
from tests.services import unavailable

pytestmark = [pytest.mark.services, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "deploy" / "supervisord.conf"
GROUP = "bindpipe"
NUMPROCS = {"bindpipe-metrics": 1, "bindpipe-validate": 2, "bindpipe-select": 2, "bindpipe-allocate": 1,
            "bindpipe-compose": 2, "bindpipe-relay": 1, "bindpipe-watchdog": 1}
WORKER_PROCESSES = sum(n for program, n in NUMPROCS.items() if program.split("-")[1] in STAGES)
PROCESSES = [f"{GROUP}:{program}_{n:02d}" for program, count in NUMPROCS.items() for n in range(count)]
PRESTART = f"{GROUP}:bindpipe-prestart"
VICTIM = f"{GROUP}:bindpipe-allocate_00"  # the only allocator: its queue waits for the restart
VICTIM_STAGE = "allocate"
CONSUMERS = {stage: NUMPROCS[f"bindpipe-{stage}"] for stage in STAGES}


def venv_bin() -> Path:
    """The directory holding this interpreter's ``bindpipe`` and ``supervisord``."""
    for candidate in (Path(sys.executable).parent, ROOT / ".venv" / "bin"):
        if (candidate / "supervisord").exists() and (candidate / "bindpipe").exists():
            return candidate
    unavailable("supervisord and bindpipe are not installed beside this Python (pip install -e '.[test]')")
    raise AssertionError("unreachable")


# --- supervisord -------------------------------------------------------------------------------

class Supervisor:
    """One supervisord (foreground, own session) on ``deploy/supervisord.conf`` and its supervisorctl."""

    def __init__(self, bin_dir: Path, env: dict[str, str], run_dir: Path):
        self.bin_dir, self.env, self.run_dir = bin_dir, env, run_dir
        self.daemon: subprocess.Popen[bytes] | None = None
        self.pids: set[int] = set()  # every child pid seen, for the stray-process check

    def start(self) -> None:
        with open(self.run_dir / "supervisord.out", "wb") as out:
            self.daemon = subprocess.Popen([str(self.bin_dir / "supervisord"), "-n", "-c", str(CONF)], env=self.env,
                                           stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def ctl(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.bin_dir / "supervisorctl"), "-c", str(CONF), *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def status(self) -> dict[str, tuple[str, int | None]]:
        """name -> (state, pid); empty while supervisord is not answering."""
        states = {}
        for line in self.ctl("status").stdout.splitlines():
            match = re.match(r"^(\S+)\s+([A-Z]+)(?:\s+pid (\d+),)?", line)
            if match:
                pid = int(match.group(3)) if match.group(3) else None
                states[match.group(1)] = (match.group(2), pid)
                if pid:
                    self.pids.add(pid)
        return states

    def all_running(self) -> dict[str, tuple[str, int | None]] | None:
        assert self.daemon is not None and self.daemon.poll() is None, f"supervisord exited\n{self.logs()}"
        states = self.status()
        if all(states.get(name, ("", None))[0] == "RUNNING" for name in PROCESSES):
            return states
        return None

    def pid(self, name: str) -> int:
        done = self.ctl("pid", name)
        assert done.stdout.strip().isdigit(), (done.stdout, done.stderr)
        pid = int(done.stdout.strip())
        self.pids.add(pid)
        return pid

    def logs(self, lines: int = 15) -> str:
        parts = []
        for path in sorted(self.run_dir.glob("*.log")) + [self.run_dir / "supervisord.out"]:
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def stop(self) -> None:
        """``supervisorctl shutdown``, then make sure supervisord and every child it ran are gone."""
        if self.daemon is None:
            return
        try:
            if self.daemon.poll() is None:
                self.status()  # remember the current pids
                self.ctl("shutdown")
                try:
                    self.daemon.wait(timeout=45)
                except subprocess.TimeoutExpired:
                    os.killpg(self.daemon.pid, signal.SIGKILL)
                    self.daemon.wait(timeout=10)
        finally:
            strays = wait_for_exit(self.pids, timeout=10)
            for pid in strays:
                try:
                    os.killpg(pid, signal.SIGKILL)  # supervisord makes each child a group leader
                except ProcessLookupError:
                    pass
        assert not strays, f"processes left running after shutdown: {sorted(strays)}"


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for_exit(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while (left := {pid for pid in pids if alive(pid)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


# --- the environment ---------------------------------------------------------------------------

def child_environment(bin_dir: Path, run_dir: Path, metrics_dir: Path, amqp_url: str, pg_url: str,
                      metrics_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("BINDPIPE_") and k.lower() != "prometheus_multiproc_dir"}
    env.update({
        "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        "BINDPIPE_RUN_DIR": str(run_dir),
        "BINDPIPE_METRICS_DIR": str(metrics_dir),
        "BINDPIPE_METRICS_PORT": str(metrics_port),  # the conf leaves the port to the setting
        "BINDPIPE_METRICS_ADDR": "127.0.0.1",
        "BINDPIPE_BROKER_URL": amqp_url,
        "BINDPIPE_DATABASE_URL": pg_url,
        "BINDPIPE_DECLARE_TOPOLOGY": "false",  # passive checks only, as with the least-privilege user
        "BINDPIPE_LOG_FORMAT": "json",
        "BINDPIPE_AGENT_DOWN_TIME": "600",  # agents report once, at the start of the test
    })
    return env


@pytest.fixture
def run_dir() -> Iterator[Path]:
    # Not under tmp_path: a unix socket path must stay short (108 bytes).
    path = Path(tempfile.mkdtemp(prefix="bindpipe-sv-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def healthz(port: int, stage: str | None = None) -> tuple[int, dict[str, Any]]:
    """(HTTP status, report) of the metrics server's readiness check."""
    url = f"http://127.0.0.1:{port}/healthz" + (f"?stage={stage}" if stage else "")
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    except urllib.error.URLError as error:  # the server is not listening yet
        return 0, {"error": str(error)}


# --- the events --------------------------------------------------------------------------------

# (count, network, vnic_type, hosts): the demo topology's hosts (pipeline/data/demo_topology.json).
# sriov-1 and sriov-2 have 8 VFs each (and their PF); sriov-3's NIC agent is down; ovs-5 has no agent.
WAVE_1 = [(120, "net-vxlan", "normal", ["ovs-1", "ovs-2", "ovs-3", "ovs-4"]),
          (30, "net-geneve", "normal", ["ovn-1", "ovn-2"]),
          (20, "net-vlan", "normal", ["ovs-1", "sriov-1"]),
          (6, "net-vlan", "direct", ["sriov-1", "sriov-2"]),
          (4, "net-vlan", "direct", ["sriov-3"]),
          (20, "net-vxlan", "normal", ["ovs-5"])]
WAVE_2 = [(200, "net-vxlan", "normal", ["ovs-1", "ovs-2", "ovs-3", "ovs-4"]),
          (60, "net-geneve", "normal", ["ovn-1", "ovn-2"]),
          (20, "net-vlan", "direct", ["sriov-1", "sriov-2"]),  # 5 more VFs each, then pci_exhausted
          (20, "net-vlan", "normal", ["sriov-2"])]
HOSTS = sorted({host for wave in (WAVE_1, WAVE_2) for *_, hosts in wave for host in hosts})


def port_events(client: BindingClient, wave: str, mix: list[tuple[int, str, str, list[str]]]) -> list[Envelope]:
    events, number = [], 0
    for count, network, vnic_type, hosts in mix:
        for i in range(count):
            number += 1
            port = {"id": f"{wave}-port-{number:04d}", "network_id": network, "host": hosts[i % len(hosts)],
                    "vnic_type": vnic_type,
                    "fixed_ips": [{"subnet_id": "demo-subnet", "ip_address": f"10.{number // 250}.{number % 250}.10"}]}
            events.append(client.envelope("port.create", port))
    return events


def topology_events(client: BindingClient) -> list[Envelope]:
    topology = load_topology()
    return ([client.envelope("network.upsert", n) for n in topology["networks"]]
            + [client.envelope("agent.report", a) for a in topology["agents"]]
            + [client.envelope("pci.inventory", inv) for inv in topology["pci_inventories"]])


# --- the database ------------------------------------------------------------------------------

def count(engine: Engine, statement: Any) -> int:
    with Session(engine) as session:
        return session.scalar(statement) or 0


def published(engine: Engine) -> int:
    return count(engine, select(func.count()).select_from(ResultRow).where(ResultRow.published_at.is_not(None)))


def results_by_port(engine: Engine, ports: set[str]) -> dict[str, list[ResultRow]]:
    rows: dict[str, list[ResultRow]] = defaultdict(list)
    with Session(engine) as session:
        for row in session.scalars(select(ResultRow).order_by(ResultRow.seq)):
            if row.port_id in ports:
                session.expunge(row)
                rows[row.port_id].append(row)
    return rows


def stage_marks(engine: Engine) -> dict[str, int]:
    with Session(engine) as session:
        return dict(session.execute(select(StageMark.stage, func.count()).group_by(StageMark.stage)).all())


def pci_counts(engine: Engine) -> dict[tuple[str, str], int]:
    """(host, state) -> devices, every state listed (the gauge's labels, vendor:product summed)."""
    counts = {(host, state): 0 for host in ("sriov-1", "sriov-2", "sriov-3") for state in PCI_STATES}
    with Session(engine) as session:
        for host, state, n in session.execute(select(PciDeviceRow.host, PciDeviceRow.status, func.count())
                                              .group_by(PciDeviceRow.host, PciDeviceRow.status)):
            counts[(host, state)] += n
    return counts


def queue_state(amqp_url: str) -> dict[str, tuple[int, int]]:
    """binding.<stage> and its DLQ -> (messages, consumers), by passive declares."""
    states = {}
    with Connection(amqp_url) as connection:
        channel = connection.channel()
        for stage in STAGES:
            for name in (f"binding.{stage}", f"binding.{stage}.dlq"):
                _, messages, consumers = channel.queue_declare(queue=name, passive=True)
                states[name] = (messages, consumers)
        channel.close()
    return states


# --- /metrics ----------------------------------------------------------------------------------

def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """sample name -> [(labels, value)] from the metrics server."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name].append((dict(sample.labels), sample.value))
    return samples


def family_present(samples: dict[str, Any], family: str) -> bool:
    return any(samples.get(family + suffix) for suffix in ("", "_total", "_bucket", "_count", "_sum"))


def total(samples: dict[str, Any], name: str, **labels: str) -> float:
    return sum(value for sample_labels, value in samples.get(name, [])
               if all(sample_labels.get(k) == v for k, v in labels.items()))


def metric_problems(samples: dict[str, Any], engine: Engine, expected_bindings: Counter[tuple[str, str]],
                    failures: int) -> list[str]:
    """What the scrape gets wrong against the database (empty when all is well)."""
    problems = [f"family {f} missing" for f in METRIC_FAMILIES if not family_present(samples, f)]
    problems += [f"{name}{labels} = {value} < 0" for name, rows in samples.items() for labels, value in rows
                 if value < 0]
    marks = stage_marks(engine)
    for stage in STAGES:
        ok = total(samples, "bindpipe_stage_messages_total", stage=stage, outcome="ok")
        duplicates = total(samples, "bindpipe_stage_messages_total", stage=stage, outcome="duplicate")
        handled = marks.get(stage, 0)
        # The killed process may have committed a batch it never counted: its redelivery counts as
        # a duplicate in the new process.
        counted = ok + duplicates if stage == VICTIM_STAGE else ok
        if counted < handled:
            problems.append(f"stage {stage}: ok={ok} duplicate={duplicates} < {handled} items handled (stage marks)")
        durations = total(samples, "bindpipe_stage_duration_seconds_count", stage=stage)
        if durations < handled:
            problems.append(f"stage {stage}: {durations} durations observed < {handled} handled")
        if total(samples, "bindpipe_batch_size_count", stage=stage) < 1:
            problems.append(f"stage {stage}: no batch observed")
        loops = [value for labels, value in samples.get("bindpipe_worker_last_loop_timestamp_seconds", [])
                 if labels.get("stage") == stage]
        if not loops or time.time() - max(loops) > 30:
            problems.append(f"stage {stage}: last loop {loops} not within 30 s")
    bindings = Counter({(labels["vif_type"], labels["outcome"]): value
                        for labels, value in samples.get("bindpipe_bindings_total", []) if value})
    if bindings != expected_bindings:
        problems.append(f"bindings_total {dict(bindings)} != results {dict(expected_bindings)}")
    if total(samples, "bindpipe_binding_failures_total") != failures:
        problems.append(f"binding_failures_total {total(samples, 'bindpipe_binding_failures_total')} != {failures}")
    if total(samples, "bindpipe_end_to_end_latency_seconds_count") != sum(expected_bindings.values()):
        problems.append(f"end_to_end_latency count {total(samples, 'bindpipe_end_to_end_latency_seconds_count')} "
                        f"!= {sum(expected_bindings.values())} results")
    with Session(engine) as session:
        dead = Counter((d.stage, d.reason.split(":")[0]) for d in session.scalars(select(DeadLetter)))
    dead_letters = Counter({(labels["stage"], labels["reason"]): value
                            for labels, value in samples.get("bindpipe_dead_letters_total", []) if value})
    if dead_letters != dead:
        problems.append(f"dead_letters_total {dict(dead_letters)} != dead_letters rows {dict(dead)}")
    for stage in STAGES:
        dead_lettered = total(samples, "bindpipe_stage_messages_total", stage=stage, outcome="dead_lettered")
        if dead_lettered != sum(n for (s, _), n in dead.items() if s == stage):
            problems.append(f"stage {stage}: {dead_lettered} dead_lettered != {dict(dead)}")
    gauge = Counter()
    for labels, value in samples.get("bindpipe_pci_devices", []):
        gauge[(labels["host"], labels["state"])] += value
    if gauge != Counter(pci_counts(engine)):
        problems.append(f"pci_devices gauge {dict(gauge)} != database {pci_counts(engine)}")
    if not samples.get("bindpipe_event_log_lag"):
        problems.append("no event_log_lag sample")
    return problems


# --- the test ----------------------------------------------------------------------------------

def migrate_and_declare(bin_dir: Path, env: dict[str, str]) -> None:
    """The database migrated and the topology declared, as deploy/README.md has an operator do first."""
    for command in (["migrate"], ["declare"]):
        done = subprocess.run([str(bin_dir / "bindpipe"), *command], env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, f"bindpipe {command[0]}: {done.stdout}\n{done.stderr}"


def test_pipeline_under_supervisord(pg_url: str, amqp_url: str, run_dir: Path) -> None:
    bin_dir = venv_bin()
    metrics_port = free_port()
    metrics_dir = run_dir / "metrics"
    env = child_environment(bin_dir, run_dir, metrics_dir, amqp_url, pg_url, metrics_port)
    migrate_and_declare(bin_dir, env)

    engine = make_engine(pg_url)
    supervisor = Supervisor(bin_dir, env, run_dir)
    settings = Settings(broker_url=amqp_url, database_url=pg_url, declare_topology=False)
    try:
        supervisor.start()
        started = time.monotonic()
        states = wait_until(supervisor.all_running, 60, "every program RUNNING", interval=0.5, detail=supervisor.logs)
        assert states.get(PRESTART, ("",))[0] == "EXITED", states
        assert "exited: bindpipe-prestart (exit status 0; expected)" in (run_dir / "supervisord.log").read_text()
        # RUNNING means "up for startsecs"; a worker is ready once its consumer is on its queue.
        wait_until(lambda: all(queue_state(amqp_url)[f"binding.{s}"][1] == n for s, n in CONSUMERS.items()), 30,
                 "a consumer per worker process on every stage queue", detail=lambda: str(queue_state(amqp_url)))
        print(f"supervisord up, every worker consuming after {time.monotonic() - started:.1f}s")
        # every worker process answers the readiness check, on the port of BINDPIPE_METRICS_PORT
        status, ready = wait_until(lambda: (answer := healthz(metrics_port))[0] == 200 and answer, 20,
                                   "/healthz 200", detail=lambda: str(healthz(metrics_port)))
        assert len(ready["processes"]) == WORKER_PROCESSES and ready["stages"] == dict.fromkeys(STAGES, True), ready
        assert all(p["broker"] and p["database"] and p["consuming"] for p in ready["processes"]), ready

        with BindingClient(settings=settings) as client, ExitStack() as streams:
            wire = {host: streams.enter_context(client.results_for(host)) for host in HOSTS}

            # Topology first (two validate workers may reorder events), then the first wave.
            topology = topology_events(client)
            client.publish_envelopes(topology)
            wait_until(lambda: count(engine, select(func.count()).select_from(EventLog)) == len(topology), 30,
                     "the topology events logged", detail=supervisor.logs)
            wave_1 = port_events(client, "w1", WAVE_1)
            client.publish_envelopes(wave_1)
            wait_until(lambda: published(engine) == len(wave_1), 60, "every first-wave result published",
                     detail=lambda: f"{published(engine)} of {len(wave_1)}\n{supervisor.logs()}")

            # Before any dead letter, every family is exported already, dead letters as zeros per
            # stage and reason: the initial 0 that increase() in BindpipeDeadLettersGrowing needs.
            def all_families() -> dict[str, Any] | None:
                samples = scrape(metrics_port)
                return samples if all(family_present(samples, f) for f in METRIC_FAMILIES) else None

            samples = wait_until(all_families, 15, "every metric family exported",
                               detail=lambda: str(sorted(scrape(metrics_port))))
            zeros = {(labels["stage"], labels["reason"]) for labels, value in samples["bindpipe_dead_letters_total"]
                     if value == 0}
            assert zeros == {(s, r) for s in STAGES for r in DEAD_LETTER_REASONS}, zeros

            # One undecodable message: dead-lettered by validate, on its DLQ and in the metrics.
            Producer(client.connection.default_channel).publish(
                b"{not json", exchange="binding.events", routing_key="port.create",
                content_type="application/json", content_encoding="utf-8", delivery_mode=2)
            wait_until(lambda: count(engine, select(func.count()).select_from(DeadLetter)) == 1, 30,
                     "the undecodable message dead-lettered")

            # Second wave, published in chunks by another connection while the allocator is killed.
            wave_2 = port_events(client, "w2", WAVE_2)
            publisher_errors: list[BaseException] = []

            def publish_slowly() -> None:
                try:
                    with BindingClient(settings=settings) as second:
                        for start in range(0, len(wave_2), 20):
                            second.publish_envelopes(wave_2[start:start + 20])
                            time.sleep(0.15)
                except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                    publisher_errors.append(exc)

            victim = supervisor.pid(VICTIM)
            publisher = threading.Thread(target=publish_slowly, daemon=True)
            publisher.start()
            wait_until(lambda: published(engine) >= len(wave_1) + 10, 30, "the second wave under way", interval=0.02)
            os.kill(victim, signal.SIGKILL)
            at_kill, publishing = published(engine) - len(wave_1), publisher.is_alive()
            print(f"SIGKILL {VICTIM} (pid {victim}) with {at_kill} of {len(wave_2)} second-wave results published"
                  f"{', events still being published' if publishing else ''}")
            publisher.join(30)
            assert not publisher.is_alive() and not publisher_errors, publisher_errors
            assert at_kill < len(wave_2), "the second wave was over before the kill: nothing was in flight"

            def restarted() -> bool:
                state, pid = supervisor.status().get(VICTIM, ("", None))
                return state == "RUNNING" and pid is not None and pid != victim

            wait_until(restarted, 30, f"{VICTIM} restarted", detail=supervisor.logs)
            new_pid = supervisor.pid(VICTIM)
            assert new_pid != victim and not alive(victim)
            log = (run_dir / "supervisord.log").read_text()
            assert re.search(r"exited: bindpipe-allocate_00 \(terminated by SIGKILL; not expected\)", log), log
            assert supervisor.all_running(), supervisor.status()  # the others carried on

            expected = len(wave_1) + len(wave_2)
            wait_until(lambda: published(engine) >= expected, 60, "every second-wave result published",
                     detail=lambda: f"{published(engine)} of {expected}\n{supervisor.logs()}")

            # --- no message lost, none bound twice ---
            events = {e.payload["id"]: str(e.event_id) for e in wave_1 + wave_2}
            rows = results_by_port(engine, set(events))
            assert set(rows) == set(events), sorted(set(events) - set(rows))[:20]
            several = {port: [r.seq for r in port_rows] for port, port_rows in rows.items() if len(port_rows) != 1}
            assert not several, f"ports with more than one result: {several}"
            results = {port: BindingResult.model_validate(port_rows[0].published()) for port, port_rows in rows.items()}
            for port, result in results.items():
                assert result.event_id == events[port] and result.seq == rows[port][0].seq, (port, result)
                assert rows[port][0].published_at is not None

            allocated: dict[tuple[str, str], str] = {}
            for port, result in results.items():
                if result.pci_device is not None:
                    key = (result.host, result.pci_device.address)
                    assert key not in allocated, f"{key} given to {allocated.get(key)} and {port}"
                    allocated[key] = port
            with Session(engine) as session:
                owners = {(d.host, d.address): d.owner_port_id
                          for d in session.scalars(select(PciDeviceRow).where(PciDeviceRow.owner_port_id.is_not(None)))}
            assert owners == allocated
            assert len(allocated) == 16, allocated  # the 8 VFs of sriov-1 and sriov-2, no more

            outcomes = Counter((r.vif_type or "none", r.outcome) for r in results.values())
            failures = sum(n for (_, outcome), n in outcomes.items() if outcome in ("failed", "error"))
            assert outcomes[("ovs", "bound")] and outcomes[("hw_veb", "bound")] == 16, outcomes
            assert failures >= 4 + 20 + 10, outcomes  # sriov-3 (agent down), ovs-5 (no agent), VFs exhausted

            # On the wire: every port's result reached its host; a copy has the same seq and body.
            received: dict[str, list[dict[str, Any]]] = defaultdict(list)
            for stream in wire.values():
                while True:
                    try:
                        body = stream.simple.get(block=True, timeout=1).decode()
                    except stream.simple.Empty:
                        break
                    received[body["port_id"]].append(body)
            missing = sorted(set(events) - set(received))
            assert not missing, f"{len(missing)} results never reached their host: {missing[:20]}"
            for port, bodies in received.items():
                if port in results:
                    assert all(b == rows[port][0].published() for b in bodies), (port, bodies)
            print(f"{sum(len(b) for b in received.values()) - len(received)} results on the wire more than once")

        # Nothing left behind in the stage queues nor their DLQs; the one dead letter is in the database.
        def drained() -> dict[str, tuple[int, int]] | None:
            queues = queue_state(amqp_url)
            return queues if all(m == 0 for m, _ in queues.values()) else None

        queues = wait_until(drained, 15, "empty stage queues", detail=lambda: str(queue_state(amqp_url)))
        assert all(queues[f"binding.{s}"][1] == n for s, n in CONSUMERS.items()), queues
        with Session(engine) as session:
            assert [(d.stage, d.reason.split(":")[0]) for d in session.scalars(select(DeadLetter))] == [
                ("validate", "bad_json")]

        # --- /metrics: the aggregate of every process, the killed one's counters included ---
        problems: list[str] = []

        def metrics_agree() -> bool:
            problems[:] = metric_problems(scrape(metrics_port), engine, outcomes, failures)
            return not problems

        wait_until(metrics_agree, 20, "/metrics agreeing with the database", interval=1,
                 detail=lambda: "\n".join(problems))
        print(f"total {time.monotonic() - started:.1f}s from supervisord's start")
    finally:
        try:
            supervisor.stop()
        finally:
            engine.dispose()


def test_the_watchdog_aborts_a_stalled_worker_and_supervisord_starts_another(pg_url: str, amqp_url: str,
                                                                             run_dir: Path) -> None:
    """A validate worker whose batch waits on a table lock stops turning its loop: /healthz says
    so, the watchdog aborts it (its log shows where it was), supervisord starts another, and once
    the lock goes the event is handled; the other processes carry on throughout."""
    bin_dir = venv_bin()
    metrics_port = free_port()
    env = {**child_environment(bin_dir, run_dir, run_dir / "metrics", amqp_url, pg_url, metrics_port),
           "BINDPIPE_STALL_SECONDS": "3"}
    migrate_and_declare(bin_dir, env)
    engine = make_engine(pg_url)
    supervisor = Supervisor(bin_dir, env, run_dir)
    try:
        supervisor.start()
        wait_until(supervisor.all_running, 60, "every program RUNNING", interval=0.5, detail=supervisor.logs)
        wait_until(lambda: healthz(metrics_port)[0] == 200, 30, "/healthz 200",
                   detail=lambda: str(healthz(metrics_port)))
        before = {name: pid for name, (_, pid) in supervisor.status().items()}

        with engine.connect() as holder:
            # until this transaction ends; only an agent report's batch needs the table (no gauge reads it)
            holder.execute(text("LOCK TABLE agents IN ACCESS EXCLUSIVE MODE"))
            settings = Settings(broker_url=amqp_url, database_url=pg_url, declare_topology=False)
            with BindingClient(settings=settings) as client:
                client.publish("agent.report", {"agent_type": "Open vSwitch agent", "host": "h1"})

            def stalled() -> dict[str, Any] | None:
                status, report = healthz(metrics_port, "validate")
                return report if status == 503 and any(p["stalled"] for p in report["processes"]) else None

            report = wait_until(stalled, 30, "a stalled validate worker on /healthz",
                                detail=lambda: str(healthz(metrics_port)))
            [victim] = [p["pid"] for p in report["processes"] if p["stalled"]]
            [name] = [n for n, pid in before.items() if pid == victim]
            assert name.startswith(f"{GROUP}:bindpipe-validate_"), (name, before)

            def restarted() -> bool:
                state, pid = supervisor.status().get(name, ("", None))
                return state == "RUNNING" and pid not in (None, victim)

            wait_until(restarted, 40, f"{name} aborted and started again", detail=supervisor.logs)
            holder.rollback()  # the lock goes: the redelivered event can be handled
        wait_until(lambda: count(engine, select(func.count()).select_from(EventLog)) == 1, 30,
                   "the event handled after the restart", detail=supervisor.logs)

        log = (run_dir / "supervisord.log").read_text()
        program = name.split(":", 1)[1]
        assert re.search(rf"exited: {program} \(terminated by SIGABRT", log), log
        worker_log = (run_dir / f"{program}.log").read_text()
        assert "Fatal Python error: Aborted" in worker_log and "Current thread" in worker_log, worker_log[-3000:]
        watchdog_log = (run_dir / "bindpipe-watchdog_00.log").read_text()
        assert "worker stalled, aborting it" in watchdog_log and str(victim) in watchdog_log
        after = {n: pid for n, (_, pid) in supervisor.status().items()}
        assert {n for n in before if before[n] != after[n]} == {name}, (before, after)  # only the victim restarted
        wait_until(lambda: healthz(metrics_port)[0] == 200, 30, "/healthz 200 again",
                   detail=lambda: str(healthz(metrics_port)))
    finally:
        try:
            supervisor.stop()
        finally:
            engine.dispose()
