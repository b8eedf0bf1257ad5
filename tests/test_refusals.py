"""A refused request has no effect, now or later (on the real RabbitMQ and PostgreSQL).

As in Neutron, where a 403 or a 400 writes nothing: a binding request refused by policy or by
validation never becomes the port's stored state, does not unbind the port nor free its device, and
does not tell the host that holds the port anything; every later (re)bind — an agent's revival, a
``binding.request``, another caller's ``port.update``, ``replay events`` — reads only inputs that
passed validation under the context that wrote them.
"""

import contextlib
import json
import uuid
from typing import Any

import pytest
from kombu import Connection
from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.client import ResultTimeout
from pipeline.models.binding import RequestContext
from pipeline.models.tables import BindingRow, PciDeviceRow, PortRow, ResultRow
from pipeline.settings import Settings
from pipeline.workers.publisher import BatchPublisher
from pipeline.workers.republish import replay_events
from tests.bus import bus_client, running_worker, wait_until
from tests.factories import OVN_CHASSIS, OVS_AGENT, SRIOV_AGENT, VLAN_SEGMENT, agent

pytestmark = pytest.mark.services
NETWORK = {"id": "net-1", "segments": [VLAN_SEGMENT]}
MEMBER = RequestContext(user_id="mallory", project_id="p", roles=["member"])
HOST = "h1"

#: (kind, fields of the refused request, its context, the error class it must get)
REFUSALS = [
    ("policy", {"profile": {"trusted": True, "capabilities": ["switchdev"]}}, MEMBER, "PolicyNotAuthorized"),
    ("size", {"profile": {"note": "x" * 5000}}, None, "InvalidInput"),
    ("vnic_type", {"vnic_type": "turbo"}, None, "InvalidInput"),
    ("ovn parameter set", {"profile": {"parent_name": "parent-port"}}, None, "InvalidInput"),
    ("strict format", {"profile": {"trusted": "yes"}}, None, "InvalidInput"),
]


def port(port_id: str, **fields: Any) -> dict[str, Any]:
    return {"id": port_id, "network_id": "net-1", "host": HOST, "vnic_type": "normal", "profile": {}, **fields}


@pytest.fixture
def settings(pg_url, amqp_url) -> Settings:
    return Settings(broker_url=amqp_url, database_url=pg_url, batch_wait_ms=2,
                    mechanism_drivers=("openvswitch", "ovn"), ml2={"strict_profile": True})


def publish_raw(settings: Settings, event_type: str, payload: Any, **fields: Any) -> str:
    """An envelope the client would not build (it validates), as any publisher may send it; its event id."""
    body = {"event_id": str(uuid.uuid4()), "event_type": event_type, "occurred_at": "2026-12-04T10:00:00Z",
            "context": {"roles": ["service"]}, "payload": payload, **fields}
    with Connection(settings.broker_url) as connection:
        connection.Producer().publish(json.dumps(body).encode(), exchange="binding.events", routing_key=event_type,
                                      content_type="application/json", content_encoding="utf-8", delivery_mode=2)
    return body["event_id"]


def stored(engine, model, **where) -> list:  # noqa: ANN001
    with Session(engine) as session:
        return list(session.scalars(select(model).filter_by(**where)))


def results_of(engine, port_id: str) -> list[dict[str, Any]]:  # noqa: ANN001
    return [{**r.body, "seq": r.seq, "row_host": r.host} for r in stored(engine, ResultRow, port_id=port_id)]


def gather(results) -> None:  # noqa: ANN001
    """Everything still on its way into ``results.seen``."""
    with contextlib.suppress(ResultTimeout):
        results.wait(port_id="nothing-is-called-this", timeout=1.5)


@pytest.mark.parametrize(("kind", "fields", "context", "error"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_a_refused_request_has_no_effect_now_or_later(kind, fields, context, error, settings, pg_engine):
    good, fresh = f"good-{uuid.uuid4().hex[:6]}", f"new-{uuid.uuid4().hex[:6]}"
    extra = {"context": context} if context else {}
    with bus_client(settings) as client, running_worker(settings, pg_engine), \
            client.results_for(HOST) as results:
        client.publish_envelopes([client.envelope("network.upsert", NETWORK),
                                  client.envelope("agent.report", agent(OVS_AGENT, host=HOST)),
                                  client.envelope("agent.report", agent(OVN_CHASSIS, host="other"))])
        bound = client.publish("port.create", port(good))
        assert results.wait(port_id=good, event_id=bound.event_id, timeout=30)["vif_type"] == "ovs"

        # a refused update of a bound port, twice (the second used to pass: it matched what was stored)
        updates = [client.publish("port.update", port(good, **fields), **extra) for _ in range(2)]
        # a refused create: the host it names is told binding_failed, and nothing is stored
        create = client.publish("port.create", port(fresh, **fields), **extra)
        refusal = results.wait(port_id=fresh, event_id=create.event_id, timeout=30)
        assert refusal["vif_type"] == "binding_failed" and refusal["error"].startswith(error)
        assert refusal["warnings"] == []
        wait_until(lambda: len(stored(pg_engine, ResultRow, port_id=good)) == 3, what="the refusals recorded")

        # every later trigger: an agent's revival, a binding.request, another caller's update, a replay
        client.publish("agent.report", agent(OVS_AGENT, host=HOST, alive=False))
        revival = client.publish("agent.report", agent(OVS_AGENT, host=HOST))
        request = client.publish("binding.request", {"port_id": good, "host": HOST})
        rebound = results.wait(port_id=good, event_id=request.event_id, timeout=30)
        service_update = client.publish("port.update", port(fresh, profile={"ok": 1}))
        created_properly = results.wait(port_id=fresh, event_id=service_update.event_id, timeout=30)
        with Connection(settings.broker_url) as connection:
            replay_events(pg_engine, BatchPublisher(connection), 1)
        gather(results)

    refused_ids = {str(e.event_id) for e in updates}
    told = [r for r in results.seen if r["event_id"] in refused_ids or r["event_id"] == str(revival.event_id)]
    assert told == [], f"{kind}: the host holding the port was told something: {told}"
    assert rebound["vif_type"] == "ovs" and rebound["profile"] == {} and rebound["error"] is None
    assert created_properly["vif_type"] == "ovs" and created_properly["profile"] == {"ok": 1}
    (row,) = stored(pg_engine, PortRow, id=good)
    assert (row.vnic_type, row.profile) == ("normal", {}), f"{kind}: refused input was stored"
    for body in results_of(pg_engine, good) + results_of(pg_engine, fresh):
        if body["event_id"] in refused_ids or body["event_id"] == str(create.event_id):
            assert body["error"].startswith(error) and body["vif_type"] == "binding_failed"
        else:
            assert body["error"] is None, body
            assert body["profile"] in ({}, {"ok": 1}), f"{kind}: bound with refused input: {body}"
    refused_rows = [b for b in results_of(pg_engine, good) if b["event_id"] in refused_ids]
    assert len(refused_rows) == 2 and all(b["row_host"] == "" for b in refused_rows), \
        "a refusal for a bound port is kept for explain, never published"


def test_a_refused_update_keeps_the_device_and_the_binding(pg_url, amqp_url, pg_engine):
    """The member's update of a bound SR-IOV port used to unbind it and free its VF."""
    settings = Settings(broker_url=amqp_url, database_url=pg_url, batch_wait_ms=2,
                        mechanism_drivers=("sriovnicswitch",))
    pf = {"address": "0000:81:00.0", "vendor_id": "8086", "product_id": "1572", "dev_type": "type-PF",
          "physical_network": "physnet1"}
    vf = {"address": "0000:81:10.0", "vendor_id": "8086", "product_id": "154c", "dev_type": "type-VF",
          "parent_addr": pf["address"], "physical_network": "physnet1"}
    with bus_client(settings) as client, running_worker(settings, pg_engine), client.results_for(HOST) as results:
        client.publish_envelopes([client.envelope("network.upsert", NETWORK),
                                  client.envelope("agent.report", agent(SRIOV_AGENT, host=HOST)),
                                  client.envelope("pci.inventory", {"host": HOST, "devices": [pf, vf]})])
        create = client.publish("port.create", port("vm", vnic_type="direct"))
        assert results.wait(port_id="vm", event_id=create.event_id, timeout=30)["pci_device"]["address"] == vf["address"]
        refused = client.publish("port.update", port("vm", vnic_type="direct", profile={"trusted": True}),
                                 context=MEMBER)
        malformed = publish_raw(settings, "port.update", {"id": "vm", "host": HOST, "vnic_type": "direct"})  # no network_id
        wait_until(lambda: len(stored(pg_engine, ResultRow, port_id="vm")) == 3, what="both refusals recorded")
        gather(results)
    assert [r for r in results.seen if r["event_id"] in (str(refused.event_id), malformed)] == []
    (device,) = stored(pg_engine, PciDeviceRow, address=vf["address"])
    assert device.owner_port_id == "vm"
    (binding,) = stored(pg_engine, BindingRow, port_id="vm")
    assert (binding.host, binding.vif_type) == (HOST, "hw_veb")
