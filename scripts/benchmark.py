"""Throughput of the whole pipeline on the real RabbitMQ and PostgreSQL, batched vs per-message.

    .venv/bin/python scripts/benchmark.py [--ports 20000] [--modes batched,per-message] [--rounds 1]
                                          [--warmup 1000] [--baseline DIR [--baseline-settings batch-200]]
                                          [--processes validate=2,select=2,compose=2]

For each mode, in a fresh vhost and database: ``bindpipe worker STAGE`` processes (one per stage,
or as ``--processes`` says) are started and the topology loaded; once every worker is consuming,
``--warmup`` ports are bound and the database analyzed (the steady state: statistics as autovacuum
keeps them; on a new database's empty tables PostgreSQL plans scans until its first autoanalyze),
and the machine is let go quiet (RabbitMQ still freeing the previous run's vhost would be counted
in this one's figures). Then the clock starts, ``--ports``
port.create events are published as fast as the broker confirms them, and the clock stops when
every port's result is published (every hop durable: persistent messages, publisher confirms, a
committed transaction per batch; each compute host has its durable results queue, as in production,
so every result is stored by RabbitMQ). Modes run side by side in one invocation (alternating when
``--rounds`` > 1), so their ratio is meaningful on a noisy 2-core machine even when the absolute
figures are not.

Prints bindings/s per mode, the ratio to per-message handling, latency percentiles (event
``occurred_at`` -> result committed), each worker's peak RSS, and the CPU time each worker,
RabbitMQ and PostgreSQL spent per binding while the clock ran (what bounds the rate on 2 cores).
Results of a run are kept in ``benchmarks/RESULTS.md``.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from sqlalchemy import func, select
from sqlalchemy.orm import Session

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.client import BindingClient  # noqa: E402
from pipeline.db import make_engine  # noqa: E402
from pipeline.models.tables import EventLog, ResultRow  # noqa: E402
from pipeline.settings import Settings  # noqa: E402
from pipeline.workers.topology import STAGES, declare_topology, results_queue, stage_queue  # noqa: E402

BROKER = os.environ.get("BINDPIPE_BENCH_BROKER", "amqp://guest:guest@127.0.0.1:5672")
POSTGRES = os.environ.get("BINDPIPE_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
BATCHING = ("batch_size", "batch_wait_ms", "prefetch")
MODES = {"batched": {f"BINDPIPE_{name.upper()}": str(Settings.model_fields[name].default) for name in BATCHING},
         "batch-200": {"BINDPIPE_BATCH_SIZE": "200", "BINDPIPE_BATCH_WAIT_MS": "5", "BINDPIPE_PREFETCH": "400"},
         "per-message": {"BINDPIPE_BATCH_SIZE": "1", "BINDPIPE_BATCH_WAIT_MS": "0", "BINDPIPE_PREFETCH": "1"}}
OVS = {"agent_type": "Open vSwitch agent", "binary": "neutron-openvswitch-agent",
       "configurations": {"bridge_mappings": {"physnet1": "br-ex"}, "tunnel_types": ["vxlan"],
                          "integration_bridge": "br-int", "datapath_type": "system"}}
SRIOV = {"agent_type": "NIC Switch agent", "binary": "neutron-sriov-nic-agent",
         "configurations": {"device_mappings": {"physnet1": ["ens1f0"]}}}


def mode_settings(mode: str) -> dict[str, str]:
    """A mode's batching settings: one of ``MODES``, or ``batch-N`` (N a batch, a prefetch of 2N,
    the default wait)."""
    if mode in MODES:
        return MODES[mode]
    size = mode.removeprefix("batch-")
    if not mode.startswith("batch-") or not size.isdigit() or int(size) < 1:
        raise SystemExit(f"unknown mode {mode!r}: {', '.join(MODES)} or batch-N")
    return {**MODES["batched"], "BINDPIPE_BATCH_SIZE": size, "BINDPIPE_PREFETCH": str(2 * int(size))}


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120)


def topology(client: BindingClient, hosts: int, sriov_hosts: int) -> list:
    events = [client.envelope("network.upsert", {"id": "net-vxlan", "segments": [
                  {"id": "seg-vxlan", "network_type": "vxlan", "segmentation_id": 5001}]}),
              client.envelope("network.upsert", {"id": "net-vlan", "segments": [
                  {"id": "seg-vlan", "network_type": "vlan", "physical_network": "physnet1", "segmentation_id": 101}]})]
    for i in range(hosts):
        events.append(client.envelope("agent.report", {**OVS, "host": f"cmp-{i}"}))
    for i in range(sriov_hosts):
        host = f"sriov-{i}"
        events.append(client.envelope("agent.report", {**SRIOV, "host": host}))
        devices = [{"address": "0000:81:00.0", "vendor_id": "8086", "product_id": "1572", "dev_type": "type-PF",
                    "physical_network": "physnet1"}]
        devices += [{"address": f"0000:81:{0x10 + j // 8:02x}.{j % 8}", "vendor_id": "8086", "product_id": "154c",
                     "dev_type": "type-VF", "parent_addr": "0000:81:00.0", "physical_network": "physnet1"}
                    for j in range(32)]
        events.append(client.envelope("pci.inventory", {"host": host, "devices": devices}))
    return events


def ports(client: BindingClient, first: int, last: int, hosts: int, sriov_hosts: int) -> list:
    """Ports ``first`` to ``last - 1``: four in five are OVS ports on a vxlan network, one in five
    an SR-IOV VF port (allocate)."""
    events = []
    for i in range(first, last):
        if i % 5 == 4:
            port = {"network_id": "net-vlan", "host": f"sriov-{i // 5 % sriov_hosts}", "vnic_type": "direct"}
        else:
            port = {"network_id": "net-vxlan", "host": f"cmp-{i % hosts}", "vnic_type": "normal"}
        events.append(client.envelope("port.create", {"id": str(uuid.uuid4()), "profile": {}, **port}))
    return events


def count_where(engine, model, *criteria) -> int:  # noqa: ANN001
    with Session(engine) as session:
        return session.scalar(select(func.count()).select_from(model).where(*criteria)) or 0


class PublishedCount:
    """Results published so far, counted as the clock runs without charging PostgreSQL for a scan
    of the whole results table each poll (that cost 24 µs a binding, counted in its figure): every
    result below the first unpublished one is published, so each poll counts only the rows between
    the last such watermark and the new one. A row committed below the watermark after it moved
    (none with one compose worker, whose batches commit in seq order) is caught by a whole count
    every few seconds."""

    def __init__(self, engine) -> None:  # noqa: ANN001
        self.engine, self.watermark, self.counted, self.whole_at = engine, 0, 0, time.monotonic()

    def __call__(self) -> int:
        if time.monotonic() - self.whole_at > 5:
            self.whole_at = time.monotonic()
            return count_where(self.engine, ResultRow, ResultRow.published_at.is_not(None))
        with Session(self.engine) as session:
            unpublished = session.scalar(select(func.min(ResultRow.seq)).where(ResultRow.published_at.is_(None)))
            top = unpublished - 1 if unpublished is not None else session.scalar(select(func.max(ResultRow.seq))) or 0
            if top > self.watermark:
                self.counted += session.scalar(select(func.count()).select_from(ResultRow).where(
                    ResultRow.seq > self.watermark, ResultRow.seq <= top)) or 0
                self.watermark = top
        return self.counted


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def service_cpu_seconds() -> dict[str, float]:
    """CPU used so far by every RabbitMQ (beam.smp) and PostgreSQL process on this machine."""
    totals = {"rabbitmq": 0.0, "postgres": 0.0}
    for proc in Path("/proc").iterdir():
        try:
            name = (proc / "comm").read_text().strip()
            service = "rabbitmq" if name == "beam.smp" else "postgres" if name.startswith("postgres") else None
            if service:
                totals[service] += cpu_seconds(int(proc.name))
        except (OSError, ValueError):
            continue
    return totals


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat (idle and iowait are idle)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    clock = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - ticks[3] - ticks[4]) / clock, sum(ticks) / clock


def busy_share(before: tuple[float, float], after: tuple[float, float]) -> float:
    """How busy the machine's CPUs were between two ``machine_busy_seconds`` readings."""
    return (after[0] - before[0]) / max(after[1] - before[1], 1e-9)


def wait_quiet(threshold: float = 0.15, window: float = 0.5, limit: float = 60.0) -> None:
    """Until the machine's CPUs are nearly idle over ``window`` seconds (or ``limit`` has passed):
    RabbitMQ goes on freeing a deleted vhost's queues after the previous run, which otherwise
    lands in the next run's RabbitMQ figure."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = machine_busy_seconds()
        time.sleep(window)
        if busy_share(before, machine_busy_seconds()) < threshold:
            return


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def check_alive(workers: dict[str, subprocess.Popen]) -> None:
    if any(p.poll() is not None for p in workers.values()):
        raise RuntimeError(f"a worker exited: { {s: p.returncode for s, p in workers.items()} }")


def wait_ready(client: BindingClient, engine, workers: dict[str, subprocess.Popen], setup: int) -> None:  # noqa: ANN001
    """Until every stage queue has its consumer and the topology events are stored: start-up
    (imports, connections) is over before the clock starts."""
    channel = client.connection.default_channel
    while (count_where(engine, EventLog) < setup
           or any(channel.queue_declare(queue=stage_queue(s, client.settings).name, passive=True).consumer_count == 0
                  for s in STAGES)):
        check_alive(workers)
        time.sleep(0.1)


def parse_processes(text: str) -> dict[str, int]:
    """``validate=2,compose=2``: worker processes per stage (1 for a stage not named)."""
    counts = dict.fromkeys(STAGES, 1)
    for item in filter(None, text.split(",")):
        stage, _, number = item.partition("=")
        if stage not in counts or not number.isdigit() or int(number) < 1:
            raise SystemExit(f"--processes: {item!r} is not STAGE=N (stages: {', '.join(STAGES)})")
        counts[stage] = int(number)
    return counts


def run_mode(mode: str, count: int, hosts: int, sriov_hosts: int, warmup: int = 0,
             processes: dict[str, int] | None = None) -> dict:
    tag = f"bench{uuid.uuid4().hex[:8]}"
    rabbitmqctl("add_vhost", tag)
    rabbitmqctl("set_permissions", "-p", tag, "guest", ".*", ".*", ".*")
    with psycopg.connect(f"{POSTGRES}/test", autocommit=True) as pg:
        pg.execute(f'CREATE DATABASE "{tag}"')
    broker, database = f"{BROKER}/{tag}", f"postgresql+psycopg://{POSTGRES.split('://', 1)[1]}/{tag}"
    settings = Settings(broker_url=broker, database_url=database)
    env = {**os.environ, "BINDPIPE_BROKER_URL": broker, "BINDPIPE_DATABASE_URL": database,
           "BINDPIPE_LOG_FORMAT": "json", "BINDPIPE_DECLARE_TOPOLOGY": "false", **mode_settings(mode)}
    bindpipe = str(Path(sys.executable).with_name("bindpipe"))
    # the schema of the code under test (a baseline's own migrations and indexes)
    subprocess.run([bindpipe, "migrate"], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    engine = make_engine(database)
    workers: dict[str, subprocess.Popen] = {}
    try:
        with BindingClient(settings=settings) as client:
            declare_topology(client.connection, settings)
            for host in [f"cmp-{i}" for i in range(hosts)] + [f"sriov-{i}" for i in range(sriov_hosts)]:
                results_queue(host, settings)(client.connection.default_channel).declare()  # results are kept
            setup = topology(client, hosts, sriov_hosts)
            client.publish_envelopes(setup)
            workers = {f"{stage}-{i}": subprocess.Popen([bindpipe, "worker", stage], env=env, stdout=subprocess.DEVNULL,
                                                        stderr=subprocess.DEVNULL)
                       for stage in STAGES for i in range((processes or {}).get(stage, 1))}
            wait_ready(client, engine, workers, len(setup))
            if warmup:
                client.publish_envelopes(ports(client, count, count + warmup, hosts, sriov_hosts))
                while count_where(engine, ResultRow, ResultRow.published_at.is_not(None)) < warmup:
                    check_alive(workers)
                    time.sleep(0.1)
                with psycopg.connect(f"{POSTGRES}/{tag}", autocommit=True) as pg:
                    pg.execute("ANALYZE")
            wait_quiet()
            cpu_before = {stage: cpu_seconds(p.pid) for stage, p in workers.items()} | service_cpu_seconds()
            own_before = cpu_seconds(os.getpid())
            machine_before = machine_busy_seconds()
            started, clock_started_at = time.perf_counter(), datetime.now(UTC)
            for first in range(0, count, 500):  # built just before publishing: occurred_at is the publish time
                client.publish_envelopes(ports(client, first, min(count, first + 500), hosts, sriov_hosts))
            published = time.perf_counter() - started
            published_count = PublishedCount(engine)
            while published_count() < count + warmup:
                check_alive(workers)
                time.sleep(0.1)
        elapsed = time.perf_counter() - started
        cpu_after = {stage: cpu_seconds(p.pid) for stage, p in workers.items()} | service_cpu_seconds()
        cpu: dict[str, float] = {}
        for name in cpu_after:  # per stage (its processes together), RabbitMQ, PostgreSQL
            key = name.rsplit("-", 1)[0] if name not in ("rabbitmq", "postgres") else name
            cpu[key] = cpu.get(key, 0.0) + cpu_after[name] - cpu_before[name]
        own = cpu_seconds(os.getpid()) - own_before
        busy = busy_share(machine_before, machine_busy_seconds())
        rss = {name: round(peak_rss_mib(p.pid), 1) for name, p in workers.items()}
        with Session(engine) as session:
            latencies = sorted((r.created_at - e.occurred_at).total_seconds() for r, e in session.execute(
                select(ResultRow, EventLog).join(EventLog, EventLog.event_id == ResultRow.event_id)
                .where(EventLog.occurred_at >= clock_started_at)))
    finally:
        for process in workers.values():
            process.terminate()
        for process in workers.values():
            process.wait(30)
        engine.dispose()
        with psycopg.connect(f"{POSTGRES}/test", autocommit=True) as pg:
            pg.execute(f'DROP DATABASE IF EXISTS "{tag}" WITH (FORCE)')
        rabbitmqctl("delete_vhost", tag)
    return {"mode": mode, "events": count, "seconds": elapsed, "rate": count / elapsed, "published": published,
            "cpu_us": {k: round(v / count * 1e6) for k, v in cpu.items()}, "own_cpu_us": round(own / count * 1e6),
            "p50": statistics.median(latencies), "p99": latencies[int(0.99 * (len(latencies) - 1))],
            "rss": rss, "busy": busy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ports", type=int, default=20000,
                        help="port.create events timed (default 20,000: the rate sustained, not a run's start and "
                             "end, when one stage alone has work; per-message handling takes ~6 minutes for as "
                             "many, give it --ports 3000)")
    parser.add_argument("--modes", default="batched",
                        help="batched (the settings' default batching), batch-200 (the former defaults: 200 "
                             "a batch, 5 ms, prefetch 400), batch-N (N a batch, prefetch 2N), per-message")
    parser.add_argument("--baseline", metavar="DIR",
                        help="also run mode 'baseline': batched, with the workers' code taken from DIR (a checkout "
                             "of another commit), to compare code side by side")
    parser.add_argument("--baseline-settings", default="batched", metavar="MODE",
                        help="the batching the baseline runs with (default: batched's, to compare code alone)")
    parser.add_argument("--processes", default="", metavar="STAGE=N,...",
                        help="worker processes per stage, e.g. validate=2,select=2,compose=2 as "
                             "deploy/supervisord.conf runs them (default: one per stage)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1000, help="ports bound before the clock starts")
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--sriov-hosts", type=int, default=None,
                        help="default: enough for every SR-IOV port to get a VF (32 per host)")
    args = parser.parse_args()
    args.sriov_hosts = args.sriov_hosts or max(20, -(-(args.ports + args.warmup) // 5 // 32))
    modes = args.modes.split(",")
    processes = parse_processes(args.processes)
    if args.baseline:
        MODES["baseline"] = {**mode_settings(args.baseline_settings), "PYTHONPATH": str(Path(args.baseline).resolve())}
        modes.append("baseline")
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for round_number in range(args.rounds):
        for mode in modes if round_number % 2 == 0 else reversed(modes):
            result = run_mode(mode, args.ports, args.hosts, args.sriov_hosts, args.warmup, processes)
            runs[mode].append(result)
            print(f"round {round_number + 1} {mode:<12} {result['events']} ports in {result['seconds']:.2f} s = "
                  f"{result['rate']:.0f}/s (all published in {result['published']:.2f} s; "
                  f"latency p50 {result['p50']:.2f} s, p99 {result['p99']:.2f} s; "
                  f"peak RSS MiB {result['rss']})", flush=True)
            print(f"    CPU µs per binding: {result['cpu_us']} = {sum(result['cpu_us'].values())} "
                  f"(and this script, publishing and polling: {result['own_cpu_us']}); the machine's CPUs "
                  f"{result['busy']:.0%} busy", flush=True)
    shape = ", ".join(f"{stage} x{n}" for stage, n in processes.items())
    print(f"\nsummary ({args.ports} ports; worker processes: {shape}; {os.cpu_count()} cores; every hop durable):")
    baseline = statistics.median(r["rate"] for r in runs.get("per-message", [])) if "per-message" in runs else None
    for mode, results in runs.items():
        rate = statistics.median(r["rate"] for r in results)
        ratio = f"  x{rate / baseline:.1f} vs per-message" if baseline else ""
        print(f"  {mode:<12} {rate:8.0f} bindings/s (median of {len(results)}){ratio}")


if __name__ == "__main__":
    main()
