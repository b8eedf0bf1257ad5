"""Order on the compute hosts' side, on the real PostgreSQL (and RabbitMQ): a host is told a device
is free before it is told another port has it, and however a port's events overtake each other,
every host that was told the port is bound there is told when it no longer is."""

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.db import create_schema, make_engine
from pipeline.models.tables import BindingRow, PciDeviceRow, ResultRow
from pipeline.settings import Settings
from tests.bus import bus_client, running_worker, wait_until
from tests.factories import SRIOV_AGENT, VLAN_SEGMENT, agent
from tests.faults.checker import ReceivedResult, device_conflicts
from tests.test_reports import T0, Pipeline, sriov_port

pytestmark = pytest.mark.services
NETWORK = {"id": "net-1", "segments": [VLAN_SEGMENT]}
PF = {"address": "0000:81:00.0", "vendor_id": "8086", "product_id": "1572", "dev_type": "type-PF",
      "physical_network": "physnet1"}


def vfs(count: int) -> list[dict[str, Any]]:
    return [{"address": f"0000:81:10.{i}", "vendor_id": "8086", "product_id": "154c", "dev_type": "type-VF",
             "parent_addr": PF["address"], "physical_network": "physnet1"} for i in range(count)]


def told(engine, host: str) -> list[ReceivedResult]:  # noqa: ANN001
    """What ``host`` was told, every result published to it, as it receives them."""
    with Session(engine) as session:
        return [ReceivedResult(host, r.published()) for r in session.scalars(
            select(ResultRow).where(ResultRow.host == host).order_by(ResultRow.seq))]


@pytest.fixture
def on_postgres(pg_url) -> Pipeline:
    engine = make_engine(pg_url)
    create_schema(engine)
    pipe = Pipeline(engine, Settings(database_url=pg_url))
    pipe.topology()
    yield pipe
    engine.dispose()


def test_a_released_device_is_told_free_before_it_is_told_taken(on_postgres: Pipeline):
    """p's delete frees VF0 and q's create takes it; the two jobs reach compose in the other order
    (two compose workers, say). The host must still learn of the release first."""
    pipe = on_postgres
    pipe.send("port.create", sriov_port("p"), T0 + timedelta(seconds=1))
    pipe.send("port.create", sriov_port("r"), T0 + timedelta(seconds=1))  # the other VF: q can only take p's
    _, p_jobs = pipe.send("port.delete", {"id": "p"}, T0 + timedelta(seconds=2), until="select")
    _, q_jobs = pipe.send("port.create", sriov_port("q"), T0 + timedelta(seconds=3), until="select")
    p_composed = pipe.run(p_jobs, "allocate", "allocate")
    q_composed = pipe.run(q_jobs, "allocate", "allocate")
    assert q_composed[0].allocation.device.address == "0000:81:10.0"
    pipe.run(q_composed, "compose")
    pipe.run(p_composed, "compose")
    stream = told(pipe.engine, "compute-2")
    assert device_conflicts(stream) == []
    assert [(r.body["port_id"], r.body["vif_type"]) for r in stream] == [
        ("p", "hw_veb"), ("r", "hw_veb"), ("p", "unbound"), ("q", "hw_veb")]


@pytest.mark.parametrize("then", [["sb", None], ["sb", "sc"]], ids=["move then delete", "move twice"])
def test_events_that_overtake_each_other_leave_no_host_bound_by_mistake(then, pg_url, amqp_url, pg_engine):
    """P is bound on sa with a VF; its next two events go out back to back, before any result. Every
    host told P is bound there is told when it no longer is, no binding of a deleted port stays, and
    the VF P held on sa is free for the next port there, told in that order."""
    settings = Settings(broker_url=amqp_url, database_url=pg_url, batch_wait_ms=50)
    hosts = ["sa", "sb", "sc"]
    with bus_client(settings) as client, running_worker(settings, pg_engine), \
            client.results_for("sa") as on_sa:
        events = [client.envelope("network.upsert", NETWORK)]
        for host in hosts:
            events += [client.envelope("agent.report", agent(SRIOV_AGENT, host=host)),
                       client.envelope("pci.inventory", {"host": host, "devices": [PF, *vfs(1)]})]
        client.publish_envelopes(events)
        create = client.publish("port.create", {**sriov_port("P"), "host": "sa"})
        assert on_sa.wait(port_id="P", event_id=create.event_id, timeout=30)["pci_device"]["address"] == "0000:81:10.0"
        follow = [client.envelope("port.update", {**sriov_port("P"), "host": then[0]})]
        follow.append(client.envelope("port.delete", {"id": "P"}) if then[1] is None
                      else client.envelope("port.update", {**sriov_port("P"), "host": then[1]}))
        client.publish_envelopes(follow)  # one publish: the second overtakes the first's results
        assert on_sa.wait(port_id="P", timeout=30, event_id=None) is not None
        wait_until(lambda: [r.body["vif_type"] for r in told(pg_engine, "sa")][-1:] == ["unbound"],
                   what="sa told P is gone")
        reuse = client.publish("port.create", {**sriov_port("Q"), "host": "sa"})
        assert on_sa.wait(port_id="Q", event_id=reuse.event_id, timeout=30)["pci_device"]["address"] == "0000:81:10.0"

    last = {host: [r.body for r in told(pg_engine, host) if r.body["port_id"] == "P"][-1:] for host in hosts}
    assert [b["vif_type"] for b in last["sa"]] == ["unbound"]
    assert all(b["vif_type"] in ("unbound", "binding_failed") for b in last["sb"]), last["sb"]
    with Session(pg_engine) as session:
        rows = {(b.host, b.vif_type) for b in session.scalars(select(BindingRow).where(BindingRow.port_id == "P"))}
        owned = {(d.host, d.address) for d in session.scalars(
            select(PciDeviceRow).where(PciDeviceRow.owner_port_id == "P"))}
    if then[1] is None:
        assert rows == set() and owned == set(), "a deleted port keeps a binding or a device"
        assert all(b["vif_type"] == "unbound" for host in hosts for b in last[host])
    else:
        assert rows == {("sc", "hw_veb")} and owned == {("sc", "0000:81:10.0")}
        assert [b["vif_type"] for b in last["sc"]] == ["hw_veb"]
    for host in hosts:
        assert device_conflicts(told(pg_engine, host)) == [], host


def test_a_creation_and_its_newer_deletion_taken_by_two_workers_at_once_leave_no_port(pg_url, pg_engine):
    """Neither transaction finds the port stored; without a lock on its id both would decide on its
    absence (one laying a tombstone, the other creating it). The second waits for the first."""
    import threading

    from pipeline.db import run_transaction
    from pipeline.models.tables import PortRow
    from pipeline.workers.handlers import ValidateHandler
    from tests.test_stage_batches import envelope

    settings = Settings(database_url=pg_url)
    handler = ValidateHandler(settings)
    run_transaction(pg_engine, lambda s: handler.handle(s, handler.decode(envelope("network.upsert", NETWORK, 0),
                                                                          {}, "application/json")))
    create = handler.decode(envelope("port.create", {**sriov_port("P"), "host": "sa"}, 1), {}, "application/json")
    delete = ValidateHandler(settings).decode(envelope("port.delete", {"id": "P"}, 2), {}, "application/json")
    handled, release = threading.Event(), threading.Event()

    def deleting() -> None:
        with Session(pg_engine) as session, session.begin():
            ValidateHandler(settings).handle(session, delete)
            handled.set()
            release.wait(10)

    first = threading.Thread(target=deleting)
    first.start()
    assert handled.wait(10)
    second = threading.Thread(target=lambda: run_transaction(pg_engine, lambda s: handler.handle(s, create)))
    second.start()
    second.join(1.0)
    assert second.is_alive(), "the creation did not wait for the deletion's transaction"
    release.set()
    first.join(10)
    second.join(10)
    with Session(pg_engine) as session:
        assert session.get(PortRow, "P") is None, "an overtaken creation stored the port"
