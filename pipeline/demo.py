"""``bindpipe demo`` and ``bindpipe run --events``: the whole pipeline in one process.

Loads the sample topology shipped with the package (OVS, SR-IOV and OVN hosts with a PCI
inventory), publishes it and a few hundred ports as events on kombu's in-memory transport, runs
all four stages, and prints what came out of it.
"""

import json
import shlex
import sys
import time
import uuid
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

from kombu import Connection, Producer
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from pipeline.client import BindingClient
from pipeline.db import create_schema, make_engine
from pipeline.models.binding import BindingResult
from pipeline.models.events import Envelope
from pipeline.models.tables import ResultRow
from pipeline.progress import Progress, progress
from pipeline.settings import Settings
from pipeline.workers.consumer import Worker, reason_category
from pipeline.workers.topology import EVENTS, STAGES, declare_topology

PORT_NAMESPACE = uuid.UUID("6f1c1d2e-7b7a-4c59-9a55-3f0d2a1b9e10")


def load_topology() -> dict[str, Any]:
    return json.loads(resources.files("pipeline").joinpath("data", "demo_topology.json").read_text())


def demo_events(topology: dict[str, Any], ports: int, client: BindingClient) -> list[Envelope]:
    """Networks, agents and inventories first, then ``ports`` port.create events spread over the
    topology's port mix (deterministic: the same ports every run)."""
    events = [client.envelope("network.upsert", n) for n in topology["networks"]]
    events += [client.envelope("agent.report", a) for a in topology["agents"]]
    events += [client.envelope("pci.inventory", inv) for inv in topology["pci_inventories"]]
    mix = topology["port_mix"]
    counts = [round(kind["share"] * ports) for kind in mix]
    counts[0] += ports - sum(counts)
    number = 0
    for kind, count in zip(mix, counts, strict=True):
        for i in range(count):
            number += 1
            port = {"id": str(uuid.uuid5(PORT_NAMESPACE, str(number))), "network_id": kind["network_id"],
                    "host": kind["hosts"][i % len(kind["hosts"])], "vnic_type": kind["vnic_type"],
                    "fixed_ips": [{"subnet_id": "demo-subnet", "ip_address": f"10.{number // 250}.{number % 250}.10"}]}
            events.append(client.envelope("port.create", port))
    return events


def run_demo(ports: int, database: Path) -> dict[str, Any]:
    """Run the demo; the summary (also what ``print_summary`` shows)."""
    database.unlink(missing_ok=True)
    settings = Settings(broker_url="memory://localhost/", database_url=f"sqlite:///{database}", queue_type="classic")
    engine = make_engine(settings.database_url)
    create_schema(engine)
    with BindingClient(settings=settings) as client:
        declare_topology(client.connection, settings)  # before publishing: no queue, no delivery
        events = demo_events(load_topology(), ports, client)
        started = time.perf_counter()
        with Worker(settings, engine, list(STAGES)).running_in_thread():
            with progress("events published", len(events)) as shown:
                for first in range(0, len(events), PUBLISH_CHUNK):  # the workers start on the first chunk
                    client.publish_envelopes(events[first:first + PUBLISH_CHUNK])
                    shown.update(min(first + PUBLISH_CHUNK, len(events)))
            with progress("ports bound", ports) as shown:
                published = wait_for_results(engine, ports, timeout=120, shown=shown)
            elapsed = time.perf_counter() - started
    return summarize(engine, len(events), published, elapsed, database)


PUBLISH_CHUNK = 1000


def wait_for_results(engine: Engine, expected: int, timeout: float, shown: Progress | None = None) -> int:
    deadline = time.monotonic() + timeout
    count = 0
    while time.monotonic() < deadline:
        with Session(engine) as session:
            count = session.scalar(select(func.count()).select_from(ResultRow)
                                   .where(ResultRow.published_at.is_not(None))) or 0
        if shown is not None:
            shown.update(count)
        if count >= expected:
            break
        time.sleep(0.05)
    return count


def summarize(engine: Engine, events: int, published: int, elapsed: float, database: Path) -> dict[str, Any]:
    with Session(engine) as session:
        results = [BindingResult.model_validate(body) for body in session.scalars(select(ResultRow.body))]
    bound = Counter(r.vif_type for r in results if r.bound)
    failed = [r for r in results if not r.bound]
    failures = Counter(reason_category(r) for r in failed)
    examples = {reason_category(r): r for r in reversed(failed)}
    return {"events": events, "results": published, "seconds": round(elapsed, 3),
            "bound_by_vif_type": dict(bound.most_common()), "failures_by_reason": {
                category: {"ports": count, "example": examples[category].reason,
                           "example_port": examples[category].port_id}
                for category, count in failures.most_common()},
            "database": str(database)}


def print_summary(summary: dict[str, Any]) -> None:
    failures = summary["failures_by_reason"]
    rate = summary["events"] / summary["seconds"] if summary["seconds"] else 0.0
    print(f"{summary['events']} events -> {summary['results']} binding results in {summary['seconds']:.2f} s "
          f"({rate:.0f} events/s; one process, in-memory broker, SQLite)\n")
    print(f"{'bound, by vif_type':<28}{'ports':>6}")
    for vif_type, count in summary["bound_by_vif_type"].items():
        print(f"  {vif_type:<26}{count:>6}")
    print(f"  {'total':<26}{sum(summary['bound_by_vif_type'].values()):>6}\n")
    print(f"{'not bound, by reason':<28}{'ports':>6}  example")
    for category, failure in failures.items():
        print(f"  {category:<26}{failure['ports']:>6}  {failure['example'][:110]}")
    print(f"  {'total':<26}{sum(f['ports'] for f in failures.values()):>6}")
    url = shlex.quote(f"sqlite:///{summary['database']}")
    for category, failure in failures.items():
        print(f"\nWhy did port {failure['example_port']} fail ({category})?\n"
              f"  BINDPIPE_DATABASE_URL={url} {shlex.quote(invoked_as())} explain {failure['example_port']}")
        break


def invoked_as() -> str:
    """The ``bindpipe`` this process runs, as it was invoked (``.venv/bin/bindpipe`` from
    scripts/demo): a command printed with it runs as typed, the virtualenv activated or not."""
    argv0 = sys.argv[0] if sys.argv else ""
    if Path(argv0).name == "bindpipe":
        return argv0
    beside = Path(sys.executable).with_name("bindpipe")  # e.g. run through the Python API
    return str(beside) if beside.exists() else "bindpipe"


def run_events(settings: Settings, engine: Engine, path: str, out: TextIO | None = None) -> int:
    """``bindpipe run --events FILE``: feed a file of envelopes (a JSON list, or one per line) to
    the pipeline in this process, run it until every queue is drained, and print each result
    produced as a JSON line. Bad envelopes go where they would on a broker: dead letters."""
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    if text.lstrip().startswith("["):
        raw = [json.dumps(item) for item in json.loads(text)]
    else:
        raw = [line for line in text.splitlines() if line.strip()]
    with Session(engine) as session:
        first_seq = session.scalar(select(func.max(ResultRow.seq))) or 0
    with BindingClient(settings=settings) as client:
        declare_topology(client.connection, settings)
        producer = Producer(client.connection.channel())
        for body in raw:  # as published by others: the validate stage judges them
            producer.publish(body.encode(), exchange=EVENTS.name, routing_key=routing_key_of(body),
                             content_type="application/json", content_encoding="utf-8")
        with Worker(settings, engine, list(STAGES)).running_in_thread() as worker:
            wait_until_idle(client.connection, worker)
    out = out or sys.stdout  # looked up now: a caller may have replaced it since import
    with Session(engine) as session:
        for row in session.scalars(select(ResultRow).where(ResultRow.seq > first_seq).order_by(ResultRow.seq)):
            out.write(json.dumps(row.published(), sort_keys=True) + "\n")
    return 0


def routing_key_of(body: str) -> str:
    try:
        return str(json.loads(body).get("event_type", "unknown"))
    except (ValueError, AttributeError):
        return "unknown"


def wait_until_idle(connection: Connection, worker: Worker, timeout: float = 600) -> None:
    """Until every stage queue is empty and the worker is idle (nothing buffered, no batch in
    hand), twice in a row."""
    channel = connection.channel()
    deadline = time.monotonic() + timeout
    quiet = 0
    while quiet < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
        depth = sum(channel.queue_declare(f"binding.{s}", passive=True).message_count for s in STAGES)
        quiet = quiet + 1 if depth == 0 and worker.idle else 0
    channel.close()
