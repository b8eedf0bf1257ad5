"""The bus runtime on the embedded default (kombu memory transport, SQLite), in one process."""

import threading
import time

import sqlalchemy as sa
from kombu import Connection, Producer

from pipeline.db import create_schema, make_engine
from pipeline.models.events import Envelope
from pipeline.settings import Settings
from pipeline.workers.consumer import Worker
from pipeline.workers.topology import EVENTS, STAGES, declare_topology, results_queue

NETWORK = {"id": "net-1", "segments": [{"id": "seg-1", "network_type": "vlan", "physical_network": "physnet1",
                                        "segmentation_id": 101}]}
AGENT = {"agent_type": "Open vSwitch agent", "host": "compute-1",
         "configurations": {"bridge_mappings": {"physnet1": "br"}, "integration_bridge": "br-int"}}
PORT = {"id": "p1", "network_id": "net-1", "host": "compute-1", "vnic_type": "normal", "profile": {}}


def test_events_flow_through_all_stages_to_the_hosts_queue(tmp_path):
    settings = Settings(database_url=f"sqlite:///{tmp_path}/db.sqlite", queue_type="classic")
    engine = make_engine(settings.database_url)
    create_schema(engine)
    conn = Connection("memory://", transport_options={"polling_interval": 0.001})
    declare_topology(conn, settings)
    host_queue = results_queue("compute-1", settings)(conn.default_channel)
    host_queue.declare()
    producer = Producer(conn.channel())
    events = [Envelope.new(k, p) for k, p in [("network.upsert", NETWORK), ("agent.report", AGENT),
                                              ("port.create", PORT)]]
    for env in [*events, events[2]]:  # the last one twice: a duplicate event_id
        producer.publish(env.model_dump(mode="json"), exchange=EVENTS.name, routing_key=env.event_type,
                         serializer="json")
    producer.publish(b"{not json", exchange=EVENTS.name, routing_key="port.create",
                     content_type="application/json", content_encoding="utf-8")

    worker = Worker(settings, engine, list(STAGES), connection=conn)
    thread = threading.Thread(target=lambda: worker.run(safety_interval=0.005), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    results = []
    while time.monotonic() < deadline and not results:
        message = host_queue.get(no_ack=True)
        if message is not None:
            results.append(message.payload)
        time.sleep(0.01)
    time.sleep(0.3)
    worker.should_stop = True
    thread.join(5)

    assert [(r["port_id"], r["host"], r["vif_type"], r["event_id"]) for r in results] == [
        ("p1", "compute-1", "ovs", str(events[2].event_id))]
    assert host_queue.get(no_ack=True) is None, "the duplicate event must not produce a second result"
    with engine.connect() as db:
        assert db.execute(sa.text("select port_id, host, vif_type from bindings")).all() == [("p1", "compute-1", "ovs")]
        (reason,) = db.execute(sa.text("select reason from dead_letters")).scalars().all()
        assert reason.startswith("bad_json:")
        assert db.execute(sa.text("select count(*) from event_log")).scalar() == 3


def test_bindpipe_run_feeds_a_file_of_events_and_prints_the_results(tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from pipeline.cli import app

    events = [Envelope.new(k, p).model_dump(mode="json") for k, p in
              [("network.upsert", NETWORK), ("agent.report", AGENT), ("port.create", PORT)]]
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(json.dumps(e) for e in events) + "\n{not json\n")
    monkeypatch.setenv("BINDPIPE_DATABASE_URL", f"sqlite:///{tmp_path}/run.sqlite")
    outcome = CliRunner().invoke(app, ["run", "--events", str(path)])
    assert outcome.exit_code == 0, outcome.output
    results = [json.loads(line) for line in outcome.stdout.splitlines() if line.startswith("{")]
    assert [(r["port_id"], r["vif_type"]) for r in results] == [("p1", "ovs")]
    engine = make_engine(f"sqlite:///{tmp_path}/run.sqlite")
    with engine.connect() as db:
        assert db.execute(sa.text("select reason from dead_letters")).scalar().startswith("bad_json:")


def test_event_log_lag_counts_port_events_without_a_result(tmp_path):
    from datetime import UTC, datetime

    from sqlalchemy.orm import Session

    from pipeline.models.tables import ResultRow
    from pipeline.observability import metrics
    from pipeline.store.marks import record_events
    from pipeline.workers.gauges import refresh_event_log_lag

    engine = make_engine(f"sqlite:///{tmp_path}/lag.sqlite")
    create_schema(engine)
    done, waiting = Envelope.new("port.create", PORT), Envelope.new("port.create", {**PORT, "id": "p2"})
    with Session(engine) as session, session.begin():
        record_events(session, [done, Envelope.new("agent.report", AGENT), waiting, Envelope.new("agent.report", AGENT)])
        session.add(ResultRow(event_id=str(done.event_id), port_id="p1", host="compute-1", body={},
                              published_at=datetime.now(UTC)))
    with Session(engine) as session:
        refresh_event_log_lag(session)
    assert metrics.EVENT_LOG_LAG.labels(stage="compose")._value.get() == 1  # p2; agent reports do not count
