"""Several events of one port in one batch, through the real stage handlers on PostgreSQL and
SQLite: each stage works on a whole batch at once, and its end state must be the last event's."""

import uuid
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from pipeline.db import run_transaction
from pipeline.models.binding import RequestContext
from pipeline.models.events import Envelope
from pipeline.models.tables import BindingRow, PortRow, ResultRow
from pipeline.settings import Settings
from pipeline.workers import handlers
from pipeline.workers.handlers import HANDLERS
from pipeline.workers.messages import handoff_messages
from pipeline.workers.topology import STAGES

T0 = datetime(2025, 1, 1, tzinfo=UTC)
NETWORK = {"id": "net-1", "segments": [{"id": "seg-1", "network_type": "vxlan", "segmentation_id": 7}]}


def agent(host: str) -> dict:
    return {"agent_type": "Open vSwitch agent", "host": host,
            "configurations": {"tunnel_types": ["vxlan"], "integration_bridge": "br-int"}}


def envelope(kind: str, payload: dict, seconds: int) -> bytes:
    env = Envelope(event_id=uuid.uuid4(), event_type=kind, occurred_at=T0 + timedelta(seconds=seconds),
                   payload=payload, context=RequestContext.service())
    return orjson.dumps(env.model_dump(mode="json"))


def run_batch(engine: Engine, settings: Settings, bodies: list[bytes]) -> None:
    """One batch per stage: every message of the previous stage's output at once."""
    for stage in STAGES:
        handler = HANDLERS[stage](settings)
        items = [item for body in bodies for item in handler.decode(body, {}, "application/json")]
        outputs = run_transaction(engine, lambda session, h=handler, i=items: h.handle(session, i)).publishes
        bodies = [body if isinstance(body, bytes) else orjson.dumps(body)
                  for exchange, _, body in handoff_messages(outputs) if exchange == "binding.stages"]


@pytest.fixture
def engine(any_engine: Engine) -> Engine:
    return any_engine


def test_a_port_moved_away_and_back_in_one_batch_is_bound_once_where_it_ended(engine):
    settings = Settings(database_url=str(engine.url))
    run_batch(engine, settings, [envelope("network.upsert", NETWORK, 0)]
              + [envelope("agent.report", agent(h), 0) for h in ("cmp-a", "cmp-b")])
    port = {"id": "p1", "network_id": "net-1", "vnic_type": "normal"}
    run_batch(engine, settings, [envelope("port.create", {**port, "host": "cmp-a"}, 1)])
    run_batch(engine, settings, [envelope("port.update", {**port, "host": "cmp-b"}, 2),
                                 envelope("port.update", {**port, "host": "cmp-a"}, 3),
                                 envelope("port.update", {**port, "host": "cmp-b"}, 4)])
    with Session(engine) as session:
        bindings = session.scalars(select(BindingRow)).all()
        results = session.scalars(select(ResultRow).order_by(ResultRow.seq)).all()
    assert [(b.port_id, b.host, b.vif_type) for b in bindings] == [("p1", "cmp-b", "ovs")]
    last = results[-1]
    assert bindings[0].result_seq == last.seq and (last.host, last.body["vif_type"]) == ("cmp-b", "ovs")
    # the earlier moves of the batch were superseded (stale revisions), their unbinds still told
    assert [(r.host, r.body["vif_type"]) for r in results] == [
        ("cmp-a", "ovs"), ("cmp-a", "unbound"), ("cmp-b", "ovs")]


def test_a_port_deleted_and_created_again_in_one_batch_keeps_only_its_new_binding(engine):
    settings = Settings(database_url=str(engine.url))
    run_batch(engine, settings, [envelope("network.upsert", NETWORK, 0)]
              + [envelope("agent.report", agent(h), 0) for h in ("cmp-a", "cmp-b")])
    port = {"id": "p1", "network_id": "net-1", "vnic_type": "normal"}
    run_batch(engine, settings, [envelope("port.create", {**port, "host": "cmp-a"}, 1),
                                 envelope("port.delete", {"id": "p1"}, 2),
                                 envelope("port.create", {**port, "host": "cmp-b"}, 3),
                                 envelope("port.delete", {"id": "p1"}, 4),
                                 envelope("port.create", {**port, "host": "cmp-a"}, 5)])
    with Session(engine) as session:
        bindings = session.scalars(select(BindingRow)).all()
        results = session.scalars(select(ResultRow).order_by(ResultRow.seq)).all()
    assert [(b.port_id, b.host) for b in bindings] == [("p1", "cmp-a")]
    assert bindings[0].result_seq == results[-1].seq
    # revisions go on across the port's incarnations: the jobs of the deleted ones are stale, and no
    # host is told of a binding that was already gone
    assert [(r.host, r.body["vif_type"]) for r in results] == [("cmp-a", "ovs")]


def test_the_event_log_keeps_each_envelope_as_it_arrived(engine):
    """Byte for byte (spacing and key order included), not the model's re-encoding."""
    settings = Settings(database_url=str(engine.url))
    body = ('{ "payload": {"id": "net-9", "segments": []},  "event_type": "network.upsert",\n'
            f'  "occurred_at": "2025-01-01T00:00:00Z", "event_id": "{uuid.uuid4()}" }}').encode()
    run_batch(engine, settings, [body])
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT CAST(envelope AS TEXT) FROM event_log")).scalar_one()
    assert stored == body.decode()


def test_only_a_remote_managed_port_is_offered_every_ovn_chassis(engine, monkeypatch):
    """In an OVN cloud every compute host is a chassis: a batch of ordinary ports must not read them
    all, nor offer them all to each port; a remote-managed port needs them to find its DPU."""
    chassis = {"agent_type": "OVN Controller agent", "configurations": {"datapath-type": "system"}}
    offered: dict[str, tuple[int, object]] = {}
    real = handlers.manager_for

    def spying_manager(config):  # noqa: ANN001, ANN202
        manager = real(config)

        class Spy:
            def bind_port(self, request, network, agents, original):  # noqa: ANN001, ANN201
                selection = manager.bind_port(request, network, agents, original)
                offered[request.port.id] = (len(agents), selection)
                return selection
        return Spy()

    monkeypatch.setattr(handlers, "manager_for", spying_manager)
    settings = Settings(database_url=str(engine.url))
    run_batch(engine, settings, [envelope("network.upsert", NETWORK, 0)]
              + [envelope("agent.report", {**chassis, "host": f"c{i}"}, 0) for i in range(120)]
              + [envelope("agent.report", {**chassis, "host": "dpu-1",
                                           "configurations": {"ovn-cms-options": "card-serial-number=MT42"}}, 0)])
    dpu_profile = {"pci_vendor_info": "15b3:101e", "pci_slot": "0000:03:00.2", "card_serial_number": "MT42",
                   "physical_network": None,
                   "pf_mac_address": "aa:bb:cc:dd:ee:ff", "vf_num": 2}
    run_batch(engine, settings, [envelope("port.create", {"id": f"p{i}", "network_id": "net-1", "host": f"c{i}"}, 1)
                                 for i in range(20)]
              + [envelope("port.create", {"id": "p-dpu", "network_id": "net-1", "host": "c5",
                                          "vnic_type": "remote-managed", "profile": dpu_profile}, 1)])
    assert {offered[f"p{i}"][0] for i in range(20)} == {1}  # its own host's chassis only
    count, selection = offered["p-dpu"]
    assert count == 121 and selection.vif_type == "ovs" and selection.levels[0].driver == "ovn"


def test_an_event_that_arrives_after_a_newer_one_of_its_port_changes_nothing(engine):
    """Competing workers may take a port's events out of order: the newer one wins, whichever
    arrives first, and a port deleted before its creation arrives is not created."""
    settings = Settings(database_url=str(engine.url))
    run_batch(engine, settings, [envelope("network.upsert", NETWORK, 0)]
              + [envelope("agent.report", agent(h), 0) for h in ("cmp-a", "cmp-b")])
    port = {"id": "p1", "network_id": "net-1", "vnic_type": "normal"}
    run_batch(engine, settings, [envelope("port.create", {**port, "host": "cmp-a"}, 1)])
    run_batch(engine, settings, [envelope("port.update", {**port, "host": "cmp-a", "profile": {"n": 3}}, 3)])
    run_batch(engine, settings, [envelope("port.update", {**port, "host": "cmp-b"}, 2)])  # older: overtaken
    run_batch(engine, settings, [envelope("port.delete", {"id": "p2"}, 5)])
    run_batch(engine, settings, [envelope("port.create", {**port, "id": "p2", "host": "cmp-b"}, 4)])
    with Session(engine) as session:
        ports = {p.id: (p.host, p.profile) for p in session.scalars(select(PortRow))}
        bindings = [(b.port_id, b.host) for b in session.scalars(select(BindingRow))]
        told = [(r.port_id, r.host, r.body["vif_type"]) for r in session.scalars(select(ResultRow).order_by(ResultRow.seq))]
    assert ports == {"p1": ("cmp-a", {"n": 3})} and bindings == [("p1", "cmp-a")]
    assert told == [("p1", "cmp-a", "ovs"), ("p1", "cmp-a", "ovs")], "neither late event reached a host"
