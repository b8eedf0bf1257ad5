"""The runtime's lifecycle promises on the real RabbitMQ and PostgreSQL: duplicates, PCI release on
update/delete, replay of results and of events, rebind on agent revival, and worker processes."""

import os
import signal
import subprocess
import sys
import uuid
from typing import Any

import pytest
from kombu import Connection
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipeline.client import ResultTimeout
from pipeline.models.binding import BindingResult
from pipeline.models.tables import PciDeviceRow, ResultRow, StageMark
from pipeline.settings import Settings
from pipeline.stages.pci_accounting import invariant_violations
from pipeline.store.pci import tracker_for
from pipeline.workers.publisher import BatchPublisher
from pipeline.workers.republish import replay_events, replay_results
from pipeline.workers.topology import STAGES, declare_topology, results_queue
from tests.bus import bus_client, running_worker, wait_until
from tests.factories import OVS_AGENT, SRIOV_AGENT, VLAN_SEGMENT, agent

pytestmark = pytest.mark.services
NETWORK = {"id": "net-1", "segments": [VLAN_SEGMENT]}


def inventory(host: str, vfs: int) -> dict[str, Any]:
    pf = {"address": "0000:81:00.0", "vendor_id": "8086", "product_id": "1572", "dev_type": "type-PF",
          "physical_network": "physnet1"}
    return {"host": host, "devices": [pf] + [
        {"address": f"0000:81:10.{i}", "vendor_id": "8086", "product_id": "154c", "dev_type": "type-VF",
         "parent_addr": "0000:81:00.0", "physical_network": "physnet1"} for i in range(vfs)]}


def port(port_id: str, host: str, vnic_type: str = "direct", **fields: Any) -> dict[str, Any]:
    return {"id": port_id, "network_id": "net-1", "host": host, "vnic_type": vnic_type, "profile": {}, **fields}


def sriov_topology(client, hosts: list[str], vfs: int = 4, alive: bool = True) -> list:  # noqa: ANN001
    events = [client.envelope("network.upsert", NETWORK)]
    for host in hosts:
        events.append(client.envelope("agent.report", agent(SRIOV_AGENT, host=host, alive=alive)))
        events.append(client.envelope("pci.inventory", inventory(host, vfs)))
    return events


def owners(engine) -> dict[str, tuple[str, str]]:  # noqa: ANN001
    """port id -> (host, device address) for every device in use."""
    with Session(engine) as session:
        rows = session.scalars(select(PciDeviceRow).where(PciDeviceRow.owner_port_id.is_not(None))).all()
    return {r.owner_port_id: (r.host, r.address) for r in rows}


def result_count(engine) -> int:  # noqa: ANN001
    with Session(engine) as session:
        return session.scalar(select(func.count()).select_from(ResultRow))


def no_pci_violations(engine, hosts: list[str]) -> None:  # noqa: ANN001
    with Session(engine) as session:
        for host in hosts:
            tracker, _ = tracker_for(session, host)
            assert invariant_violations(tracker) == [], host


@pytest.fixture
def settings(pg_url, amqp_url) -> Settings:
    return Settings(broker_url=amqp_url, database_url=pg_url, batch_wait_ms=2)


def test_duplicate_event_ids_give_one_result(settings, pg_engine):
    with bus_client(settings) as client, running_worker(settings, pg_engine):
        client.publish_envelopes([client.envelope("network.upsert", NETWORK),
                                  client.envelope("agent.report", agent(OVS_AGENT, host="h1"))])
        with client.results_for("h1") as results:
            create = client.envelope("port.create", port("p1", "h1", "normal"))
            client.publish_envelopes([create, create])  # a copy in the same batch
            first = results.wait(port_id="p1")
            results.seen.clear()
            client.publish_envelopes([create])          # and one long after
            with pytest.raises(ResultTimeout):
                results.wait(port_id="p1", timeout=3)
    assert first["vif_type"] == "ovs" and first["event_id"] == str(create.event_id)
    assert result_count(pg_engine) == 1


def test_update_and_delete_release_the_device(settings, pg_engine):
    hosts = ["sr-a", "sr-b"]
    with bus_client(settings) as client, running_worker(settings, pg_engine):
        client.publish_envelopes(sriov_topology(client, hosts))
        with client.results_for("sr-a") as on_a, client.results_for("sr-b") as on_b:
            client.publish("port.create", port("p1", "sr-a"))
            bound = on_a.wait(port_id="p1")
            assert bound["vif_type"] == "hw_veb" and owners(pg_engine) == {"p1": ("sr-a", bound["pci_device"]["address"])}

            moved = client.publish("port.update", port("p1", "sr-b"))
            unbound = on_a.wait(port_id="p1", event_id=moved.event_id)
            rebound = on_b.wait(port_id="p1", event_id=moved.event_id)
            assert unbound["vif_type"] == "unbound"
            assert rebound["vif_type"] == "hw_veb"
            assert owners(pg_engine) == {"p1": ("sr-b", rebound["pci_device"]["address"])}

            deleted = client.publish("port.delete", {"id": "p1"})
            assert on_b.wait(port_id="p1", event_id=deleted.event_id)["vif_type"] == "unbound"
            wait_until(lambda: owners(pg_engine) == {})
    no_pci_violations(pg_engine, hosts)


def test_replay_results_republishes_a_hosts_current_bindings(settings, pg_engine):
    with bus_client(settings) as client, running_worker(settings, pg_engine):
        client.publish_envelopes([client.envelope("network.upsert", NETWORK),
                                  client.envelope("agent.report", agent(OVS_AGENT, host="h1")),
                                  client.envelope("agent.report", agent(OVS_AGENT, host="h2"))])
        client.publish_envelopes([client.envelope("port.create", port(f"p{i}", "h1" if i % 2 else "h2", "normal"))
                                  for i in range(10)])
        wait_until(lambda: result_count(pg_engine) == 10)
        client.publish("port.update", port("p1", "h1", "normal", profile={"trusted": True}))
        wait_until(lambda: result_count(pg_engine) == 11)
        with client.results_for("h1") as replayed, Connection(settings.broker_url) as connection:
            count = replay_results(pg_engine, BatchPublisher(connection), "h1")
            bodies = [replayed.wait(port_id=f"p{i}", timeout=10) for i in (1, 3, 5, 7, 9)]
    latest = {}
    with Session(pg_engine) as session:
        for row in session.scalars(select(ResultRow).where(ResultRow.host == "h1").order_by(ResultRow.seq)):
            latest[row.port_id] = row.seq
    assert count == 5 and sorted(b["seq"] for b in bodies) == sorted(latest.values())
    assert next(b for b in bodies if b["port_id"] == "p1")["profile"] == {"trusted": True}


def test_replay_of_events_allocates_nothing_twice_and_finishes_what_was_lost(settings, pg_engine):
    hosts = ["sr-a"]
    with bus_client(settings) as client:
        with Connection(settings.broker_url) as connection:
            with running_worker(settings, pg_engine, ["validate", "select"]):  # allocate and compose are down
                client.publish_envelopes(sriov_topology(client, hosts, vfs=4))
                client.publish_envelopes([client.envelope("port.create", port(f"p{i}", "sr-a")) for i in range(6)])
                wait_until(lambda: marks(pg_engine, "validate") == 1 + 2 + 6)
                # (validate publishes its hand-off after its commit: the select queue is empty before it too)
                wait_until(lambda: queue_depth(connection, "binding.select") == 0
                           and queue_depth(connection, "binding.allocate") > 0)
            connection.default_channel.queue_purge("binding.allocate")  # the hand-offs are lost
        with running_worker(settings, pg_engine), Connection(settings.broker_url) as connection:
            assert replay_events(pg_engine, BatchPublisher(connection), 1) == 1 + 2 + 6
            wait_until(lambda: result_count(pg_engine) == 6)
            first_owners = owners(pg_engine)
            replay_events(pg_engine, BatchPublisher(connection), 1)  # a second replay changes nothing
            wait_until(lambda: queue_depth(connection, "binding.validate") == 0, timeout=10)
            wait_until(lambda: all(queue_depth(connection, f"binding.{s}") == 0 for s in STAGES), timeout=10)
    assert len(first_owners) == 4 and owners(pg_engine) == first_owners
    assert result_count(pg_engine) == 6
    no_pci_violations(pg_engine, hosts)


def marks(engine, stage: str) -> int:  # noqa: ANN001
    with Session(engine) as session:
        return session.scalar(select(func.count()).select_from(StageMark).where(StageMark.stage == stage))


def queue_depth(connection: Connection, name: str) -> int:
    return connection.default_channel.queue_declare(name, passive=True).message_count


def test_failed_ports_rebind_when_their_agent_comes_back(settings, pg_engine):
    with bus_client(settings) as client, running_worker(settings, pg_engine):
        client.publish_envelopes(sriov_topology(client, ["sr-a"], alive=False))
        with client.results_for("sr-a") as results:
            client.publish_envelopes([client.envelope("port.create", port(f"p{i}", "sr-a")) for i in range(3)])
            failed = [results.wait(port_id=f"p{i}") for i in range(3)]
            revival = client.publish("agent.report", agent(SRIOV_AGENT, host="sr-a"))
            rebound = [results.wait(port_id=f"p{i}", event_id=revival.event_id) for i in range(3)]
    assert {r["vif_type"] for r in failed} == {"binding_failed"}
    assert {BindingResult.model_validate(r).reason for r in failed} == {"sriovnicswitch: NIC Switch agent on sr-a is dead"}
    assert {r["vif_type"] for r in rebound} == {"hw_veb"}
    assert len(owners(pg_engine)) == 3


def test_a_process_per_stage_and_sigterm_with_messages_in_flight(settings, pg_engine, tmp_path):
    """Four `bindpipe worker STAGE` processes; one is stopped with SIGTERM mid-stream and started
    again: it exits cleanly and every port still gets exactly one result."""
    env = {**os.environ, "BINDPIPE_BROKER_URL": settings.broker_url, "BINDPIPE_DATABASE_URL": settings.database_url,
           "BINDPIPE_LOG_FORMAT": "json", "BINDPIPE_BATCH_WAIT_MS": "2"}
    bindpipe = os.path.join(os.path.dirname(sys.executable), "bindpipe")

    def start(stage: str) -> subprocess.Popen:
        return subprocess.Popen([bindpipe, "worker", stage], env=env, stdout=open(tmp_path / f"{stage}.log", "ab"),
                                stderr=subprocess.STDOUT)

    hosts = [f"h{i}" for i in range(4)]
    ports = 400
    workers = {stage: start(stage) for stage in STAGES}
    try:
        with bus_client(settings) as client:
            client.publish_envelopes([client.envelope("network.upsert", NETWORK)] + [
                client.envelope("agent.report", agent(OVS_AGENT, host=h)) for h in hosts])
            events = [client.envelope("port.create", port(str(uuid.uuid4()), hosts[i % 4], "normal"))
                      for i in range(ports)]
            client.publish_envelopes(events)
            wait_until(lambda: result_count(pg_engine) >= 50, timeout=60)
            workers["select"].send_signal(signal.SIGTERM)
            assert workers["select"].wait(timeout=30) == 0, (tmp_path / "select.log").read_text()[-2000:]
            workers["select"] = start("select")
            wait_until(lambda: result_count(pg_engine) >= ports, timeout=90)
            wait_until(lambda: (tmp_path / "select.log").read_text().count("worker started") == 2, timeout=30)
    finally:
        for process in workers.values():
            process.send_signal(signal.SIGTERM)
        codes = {stage: process.wait(timeout=30) for stage, process in workers.items()}
    assert codes == dict.fromkeys(STAGES, 0)
    with Session(pg_engine) as session:
        per_port = session.execute(select(ResultRow.port_id, func.count()).group_by(ResultRow.port_id)).all()
    assert len(per_port) == ports and {count for _, count in per_port} == {1}


def test_results_queue_of_a_host_is_durable(settings):
    """A compute host that is down when its results are published finds them in its queue later."""
    with Connection(settings.broker_url) as connection:
        declare_topology(connection, settings)
        bound = results_queue("h9", settings)(connection.default_channel)
        bound.declare()
        assert bound.queue_declare(passive=True).message_count == 0
        BatchPublisher(connection).publish([("binding.results", "host.h9", {"port_id": "p", "seq": 1})])
        assert bound.queue_declare(passive=True).message_count == 1


def test_a_one_stage_worker_acks_every_delivery_of_its_batches(settings, pg_engine):
    """Batches are acked with one ``multiple`` ack: once the worker has stopped, nothing it took
    may come back to the queue (a missed ack would be redelivered, and only marks would hide it)."""
    with bus_client(settings) as client, Connection(settings.broker_url) as connection:
        client.publish_envelopes([client.envelope("agent.report", agent(OVS_AGENT, host=f"h{i}")) for i in range(60)])
        with running_worker(settings, pg_engine, ["validate"]):
            wait_until(lambda: marks(pg_engine, "validate") == 60)
        assert queue_depth(connection, "binding.validate") == 0
        assert connection.default_channel.queue_declare("binding.validate", passive=True).consumer_count == 0
