"""``bindpipe explain`` and ``bindpipe status`` over history made by the real stage handlers.

Each event goes through ``handle(session, items)`` of validate, select, allocate and compose in
turn, each in its own transaction, exactly as the worker runs them (minus the broker): what
explain reads is what the pipeline stores.
"""

import json
import subprocess
import uuid
from datetime import UTC, datetime, timedelta

import kombu.transport.memory as memory_transport
import pytest
from kombu import Connection, Producer
from kombu.transport.virtual import BrokerState
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from pipeline.db import create_schema, make_engine, run_transaction
from pipeline.reports import (collect_status, explain_port, main_explain, main_status, queue_depths, render_explain,
                              render_status)
from pipeline.models.binding import RequestContext
from pipeline.models.events import Envelope
from pipeline.models.jobs import BindingJob
from pipeline.models.tables import EventLog, ResultRow
from pipeline.store import dead_letters
from pipeline.settings import Settings
from pipeline.workers.handlers import HANDLERS
from pipeline.workers.messages import PoisonMessage
from pipeline.workers.topology import DEAD_LETTERS, EVENTS, STAGE_EXCHANGE, STAGES, declare_topology

T0 = datetime(2025, 1, 1, tzinfo=UTC)
NETWORK = {"id": "net-1", "segments": [{"id": "seg-1", "network_type": "vlan", "physical_network": "physnet1",
                                        "segmentation_id": 101}]}
OVS_AGENT = {"agent_type": "Open vSwitch agent", "host": "compute-1",
             "configurations": {"bridge_mappings": {"physnet1": "br-physnet1"}, "integration_bridge": "br-int"}}
SRIOV_AGENT = {"agent_type": "NIC Switch agent", "host": "compute-2",
               "configurations": {"device_mappings": {"physnet1": ["ens1f0"]}}}
PF = {"address": "0000:81:00.0", "vendor_id": "8086", "product_id": "1572", "dev_type": "type-PF",
      "numa_node": 0, "physical_network": "physnet1"}
VFS = [{"address": f"0000:81:10.{i}", "vendor_id": "8086", "product_id": "154c", "dev_type": "type-VF",
        "parent_addr": PF["address"], "numa_node": 0, "physical_network": "physnet1"} for i in range(2)]
NOVA = RequestContext(user_id="nova", project_id="svc", roles=("service",))


def ovs_port(port_id: str, **changes):
    return {"id": port_id, "network_id": "net-1", "host": "compute-1", "vnic_type": "normal", **changes}


def sriov_port(port_id: str, **changes):
    return {"id": port_id, "network_id": "net-1", "host": "compute-2", "vnic_type": "direct", **changes}


class Pipeline:
    """The four stage handlers over one database, driven one event at a time."""

    def __init__(self, engine: Engine, settings: Settings):
        self.engine, self.settings = engine, settings
        self.handlers = {stage: HANDLERS[stage](settings) for stage in STAGES}

    def send(self, kind: str, payload: dict, at: datetime, until: str = "compose") -> tuple[Envelope, list[BindingJob]]:
        """Publish an event and run it through the stages up to ``until``; the jobs still pending."""
        raw = {"event_id": str(uuid.uuid4()), "event_type": kind, "occurred_at": at.isoformat(),
               "context": NOVA.model_dump(mode="json"), "payload": payload}
        items = self.handlers["validate"].decode(json.dumps(raw).encode(), {}, "application/json")
        return items[0], self.run(items, "validate", until)

    def run(self, items: list, first: str, last: str = "compose") -> list[BindingJob]:
        for stage in STAGES[STAGES.index(first):STAGES.index(last) + 1]:
            handler = self.handlers[stage]
            out = run_transaction(self.engine, lambda session, h=handler, i=items: h.handle(session, i)).publishes
            items = [BindingJob.model_validate_json(p.body) for p in out if p.exchange == STAGE_EXCHANGE.name]
        return items

    def send_or_dead_letter(self, kind: str, payload: dict, at: datetime) -> None:
        """As the worker does with a poison message: record it in ``dead_letters``."""
        try:
            self.send(kind, payload, at)
        except PoisonMessage as refusal:
            poison = refusal
            run_transaction(self.engine, lambda s: dead_letters.add(
                s, dead_letters.Arrival("validate", json.dumps(payload).encode()), poison))
        else:
            raise AssertionError(f"{kind} {payload} was not refused")

    def mark_published(self) -> None:
        run_transaction(self.engine, lambda s: s.execute(update(ResultRow).values(published_at=T0)))

    def topology(self) -> None:
        self.send("network.upsert", NETWORK, T0)
        self.send("agent.report", OVS_AGENT, T0)
        self.send("agent.report", SRIOV_AGENT, T0)
        self.send("pci.inventory", {"host": "compute-2", "devices": [PF, *VFS]}, T0)

    def explain(self, port_id: str) -> dict:
        with Session(self.engine) as session:
            return explain_port(session, port_id)

    def status(self, now: datetime, connection: Connection | None = None) -> dict:
        with Session(self.engine) as session:
            return collect_status(session, self.settings, now, connection)


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(database_url=f"sqlite:///{tmp_path}/db.sqlite", queue_type="classic")


@pytest.fixture
def pipeline(settings) -> Pipeline:
    engine = make_engine(settings.database_url)
    create_schema(engine)
    pipe = Pipeline(engine, settings)
    pipe.topology()
    yield pipe
    engine.dispose()


def seq_of(pipe: Pipeline, env: Envelope) -> int:
    with Session(pipe.engine) as session:
        return session.scalar(select(EventLog.seq).where(EventLog.event_id == str(env.event_id)))


# --- explain ------------------------------------------------------------------------------------------


def test_bound_ovs_port_is_explained_with_its_event_inputs_drivers_and_result(pipeline):
    env, _ = pipeline.send("port.create", ovs_port("p-ovs"), T0 + timedelta(seconds=5))
    pipeline.mark_published()
    report = pipeline.explain("p-ovs")

    assert report["state"] == "present"
    assert report["summary"]["outcome"] == "bound"
    assert report["summary"]["reason"] == "ovs on compute-1 by openvswitch on segment seg-1"
    (attempt,) = report["attempts"]
    assert attempt["event"] == {"event_id": str(env.event_id), "event_type": "port.create",
                                "seq": seq_of(pipeline, env), "occurred_at": "2025-01-01T00:00:05+00:00"}
    assert attempt["action"] == "bind" and attempt["stages"] == list(STAGES)
    inputs = attempt["inputs"]
    assert (inputs["host"], inputs["old_host"], inputs["vnic_type"], inputs["profile"]) == (
        "compute-1", None, "normal", {})
    assert (inputs["user_id"], inputs["roles"], inputs["error"]) == ("nova", ["service"], None)
    assert attempt["selection"]["bound"] == [{"level": 0, "driver": "openvswitch", "segment_id": "seg-1"}]
    assert {d["driver"] for d in attempt["selection"]["declines"]} == {"l2population"}
    assert attempt["allocation"] == {"device": None, "failed": False, "error": None, "category": None,
                                     "reason": "no PCI request for this binding"}
    assert [(r["host"], r["vif_type"], r["outcome"], r["published_at"]) for r in attempt["results"]] == [
        ("compute-1", "ovs", "bound", "2025-01-01T00:00:00+00:00")]
    assert [(b["host"], b["status"], b["vif_type"], b["event_id"]) for b in report["bindings"]] == [
        ("compute-1", "ACTIVE", "ovs", str(env.event_id))]
    assert report["port"]["revision"] == 1 and report["devices"] == []

    text = render_explain(report)
    assert text.splitlines()[0] == "port p-ovs: BOUND: ovs on compute-1 by openvswitch on segment seg-1"
    assert "binding   compute-1 ACTIVE ovs (levels openvswitch@seg-1" in text
    assert "bound    openvswitch on segment seg-1 (level 0)" in text


def test_sriov_port_without_a_free_vf_names_the_pci_refusal(pipeline):
    for port_id in ("s1", "s2", "s3"):
        pipeline.send("port.create", sriov_port(port_id), T0 + timedelta(seconds=5))
    report = pipeline.explain("s3")

    assert report["summary"]["outcome"] == "failed"
    reason = report["summary"]["reason"]
    assert reason.startswith("PCI allocation on compute-2: ComputeResourcesUnavailable: port s3")
    assert "every suitable device is in use" in reason
    assert "0000:81:10.0 allocated (port s1)" in reason and "0000:81:10.1 allocated (port s2)" in reason
    (attempt,) = report["attempts"]
    # the drivers agreed (SR-IOV bound the segment); the PCI stage said no
    assert attempt["selection"]["bound"] == [{"level": 0, "driver": "sriovnicswitch", "segment_id": "seg-1"}]
    assert attempt["allocation"]["failed"] is True
    assert attempt["allocation"]["error"] == "ComputeResourcesUnavailable"
    assert attempt["allocation"]["category"] == "pci_exhausted"
    assert [(r["host"], r["vif_type"]) for r in attempt["results"]] == [("compute-2", "binding_failed")]
    assert [b["vif_type"] for b in report["bindings"]] == ["binding_failed"] and report["devices"] == []
    text = render_explain(report)
    assert text.startswith("port s3: FAILED: PCI allocation on compute-2: ComputeResourcesUnavailable")
    assert "pci      FAILED ComputeResourcesUnavailable" in text

    owner = pipeline.explain("s1")
    assert [(d["address"], d["status"], d["vendor_product"]) for d in owner["devices"]] == [
        ("0000:81:10.0", "allocated", "8086:154c")]
    assert owner["attempts"][0]["allocation"]["device"]["address"] == "0000:81:10.0"


def test_sriov_port_on_a_dead_agent_names_the_agent_then_binds_after_its_revival(pipeline):
    created, _ = pipeline.send("port.create", sriov_port("d1"), T0 + timedelta(seconds=500))  # agent silent 500s
    failed = pipeline.explain("d1")
    assert failed["summary"] == {"outcome": "failed", "event": failed["attempts"][0]["event"],
                                 "reason": "on compute-2: sriovnicswitch: NIC Switch agent on compute-2 is dead"}
    declines = {d["driver"]: d["category"] for d in failed["attempts"][0]["selection"]["declines"]}
    assert declines["sriovnicswitch"] == "agent_dead"
    assert declines["macvtap"] == "vnic_type_unsupported"  # the last driver tried, but not the reason

    revival, _ = pipeline.send("agent.report", SRIOV_AGENT, T0 + timedelta(seconds=600))  # re-binds failed ports
    report = pipeline.explain("d1")
    assert [(a["event"]["event_id"], a["event"]["event_type"], a["outcome"]) for a in report["attempts"]] == [
        (str(created.event_id), "port.create", "failed"), (str(revival.event_id), "agent.report", "bound")]
    assert report["summary"]["outcome"] == "bound"
    assert report["summary"]["reason"] == "hw_veb on compute-2 by sriovnicswitch on segment seg-1, device 0000:81:10.0"
    assert [(b["host"], b["vif_type"]) for b in report["bindings"]] == [("compute-2", "hw_veb")]
    assert [d["address"] for d in report["devices"]] == ["0000:81:10.0"]


def test_deleted_port_keeps_its_history_and_frees_its_device(pipeline):
    created, _ = pipeline.send("port.create", sriov_port("gone"), T0 + timedelta(seconds=5))
    deleted, _ = pipeline.send("port.delete", {"id": "gone"}, T0 + timedelta(seconds=9))
    report = pipeline.explain("gone")

    assert report["state"] == "deleted"
    assert report["port"] is None and report["bindings"] == [] and report["devices"] == []
    assert report["summary"]["outcome"] == "deleted"
    assert report["summary"]["reason"] == (f"deleted by port.delete {deleted.event_id} at 2025-01-01T00:00:09+00:00 "
                                           "(unbound from compute-2); its history remains")
    first, last = report["attempts"]
    assert (first["event"]["event_id"], first["outcome"]) == (str(created.event_id), "bound")
    assert first["allocation"]["device"]["address"] == "0000:81:10.0"
    assert (last["action"], last["inputs"]["old_host"], last["outcome"]) == ("unbind", "compute-2", "unbound")
    assert [(r["host"], r["vif_type"]) for r in last["results"]] == [("compute-2", "unbound")]
    text = render_explain(report)
    assert text.startswith(f"port gone: DELETED: deleted by port.delete {deleted.event_id}")
    assert "port      deleted (no port row)" in text and "inputs   unbind from compute-2" in text


def test_superseded_in_progress_and_unchanged_events_are_told_apart(pipeline):
    pipeline.send("port.create", ovs_port("q"), T0 + timedelta(seconds=1))
    a, pending = pipeline.send("port.update", ovs_port("q", profile={"note": "a"}), T0 + timedelta(seconds=2),
                               until="select")
    in_flight = pipeline.explain("q")
    assert in_flight["summary"]["outcome"] == "in_progress"
    assert in_flight["summary"]["reason"].startswith(  # select keeps no marks
        "handled up to validate; waiting in queue binding.select or binding.allocate")

    b, _ = pipeline.send("port.update", ovs_port("q", profile={"note": "b"}), T0 + timedelta(seconds=3))
    assert pipeline.run(pending, "allocate") == []  # A's job is stale now: dropped, not applied
    c, _ = pipeline.send("port.update", ovs_port("q", profile={"note": "b"}), T0 + timedelta(seconds=4))
    report = pipeline.explain("q")

    outcomes = [(a_["event"]["event_type"], a_["outcome"]) for a_ in report["attempts"]]
    assert outcomes == [("port.create", "bound"), ("port.update", "superseded"), ("port.update", "bound"),
                        ("port.update", "no_change")]
    superseded = report["attempts"][1]
    assert superseded["event"]["event_id"] == str(a.event_id)
    assert superseded["reason"].startswith("dropped at allocate: revision 2 is stale")
    assert report["attempts"][2]["inputs"]["profile"] == {"note": "b"}
    assert report["attempts"][3]["event"]["event_id"] == str(c.event_id)
    assert report["attempts"][3]["action"] is None
    assert report["summary"]["event"]["event_id"] == str(b.event_id)  # the latest attempt that decided something
    assert report["bindings"][0]["profile"] == {"note": "b"}


def test_invalid_request_shows_the_validation_error(pipeline):
    pipeline.send("port.create", ovs_port("bad", vnic_type="warp-drive"), T0 + timedelta(seconds=5))
    report = pipeline.explain("bad")
    assert report["state"] == "refused" and report["port"] is None, "a refused create stores no port"
    assert report["summary"]["outcome"] == "refused"
    assert report["summary"]["reason"].startswith("InvalidInput")
    assert "warp-drive" in report["summary"]["reason"]
    assert report["attempts"][0]["inputs"]["vnic_type"] == "warp-drive"
    assert report["attempts"][0]["inputs"]["error"].startswith("InvalidInput: binding:vnic_type")
    assert report["attempts"][0]["selection"] is None


def test_port_without_host_is_unbound_with_the_reason(pipeline):
    pipeline.send("port.create", ovs_port("idle", host=""), T0 + timedelta(seconds=5))
    report = pipeline.explain("idle")
    assert report["summary"]["outcome"] == "unbound"
    assert report["summary"]["reason"] == "on no host: ml2: port has no binding:host_id; nothing to bind"
    assert report["bindings"] == [] and report["attempts"][0]["inputs"]["host"] == ""


def test_unknown_port_is_a_clear_no_with_the_dead_letters_that_name_it(pipeline):
    assert pipeline.explain("never")["state"] == "unknown"
    pipeline.send_or_dead_letter("port.update", {"id": "ghost", "host": "compute-1"}, T0)  # no network_id
    report = pipeline.explain("ghost")

    assert report["state"] == "unknown" and report["attempts"] == [] and report["port"] is None
    assert report["summary"]["outcome"] == "unknown"
    assert report["summary"]["reason"].startswith("no such port")
    assert [(d["stage"], d["reason"]) for d in report["dead_letters"]] == [
        ("validate", "bad_schema: network_id: Field required")]
    text = render_explain(report)
    assert text.startswith("port ghost: UNKNOWN: no such port")
    assert "dead letter [validate]" in text and "network_id: Field required" in text


def test_a_binding_request_for_an_unknown_port_is_refused_and_stores_nothing(pipeline):
    pipeline.send("binding.request", {"port_id": "ghost", "host": "compute-1"}, T0)
    report = pipeline.explain("ghost")
    assert report["state"] == "refused" and report["port"] is None and report["bindings"] == []
    assert report["summary"]["reason"].startswith("InvalidInput: port_id: port ghost is not known; nothing changed, "
                                                  "compute-1 was told binding_failed")


def test_main_explain_exit_codes_and_json(pipeline, settings, capsys):
    pipeline.send("port.create", ovs_port("p1"), T0 + timedelta(seconds=5))
    pipeline.send("port.delete", {"id": "p1"}, T0 + timedelta(seconds=6))

    assert main_explain(make_engine(settings.database_url), "p1", as_json=True) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["state"] == "deleted" and [a["outcome"] for a in report["attempts"]] == ["bound", "unbound"]

    assert main_explain(make_engine(settings.database_url), "nope", as_json=False) == 1
    assert capsys.readouterr().out.startswith("port nope: UNKNOWN: no such port")


# --- status -------------------------------------------------------------------------------------------


@pytest.fixture
def memory_broker(monkeypatch) -> Connection:
    """A memory-transport connection with a broker state of this test's own (kombu's is global)."""
    monkeypatch.setattr(memory_transport.Transport, "global_state", BrokerState())
    monkeypatch.setattr(memory_transport.Channel, "queues", {})
    connection = Connection("memory://")
    yield connection
    connection.release()


def test_status_reports_agents_pci_pools_bindings_and_dead_letters(pipeline, settings):
    for port_id in ("s1", "s2", "s3"):
        pipeline.send("port.create", sriov_port(port_id), T0 + timedelta(seconds=5))
    pipeline.send("port.create", ovs_port("o1"), T0 + timedelta(seconds=5))
    pipeline.send("agent.report", OVS_AGENT, T0 + timedelta(seconds=60))
    pipeline.send_or_dead_letter("port.update", {"id": "ghost", "host": "compute-1"}, T0)  # no network_id
    pipeline.mark_published()
    pipeline.send("port.create", ovs_port("o2"), T0 + timedelta(seconds=61))  # its result is not published yet
    report = pipeline.status(T0 + timedelta(seconds=100))

    ovs, = report["hosts"]["compute-1"]["agents"]
    assert (ovs["agent_type"], ovs["alive"], ovs["why_dead"], ovs["heartbeat_age_s"]) == (
        "Open vSwitch agent", True, None, 40.0)
    sriov, = report["hosts"]["compute-2"]["agents"]
    assert (sriov["alive"], sriov["why_dead"]) == (False, "no heartbeat for 100s (agent_down_time 75s)")
    pools = [(p["physical_network"], p["vendor_product"], p["dev_type"], p["total"], p["counts"])
             for p in report["hosts"]["compute-2"]["pci_pools"]]
    assert pools == [("physnet1", "8086:154c", "type-VF", 2, {"allocated": 2}),
                     ("physnet1", "8086:1572", "type-PF", 1, {"unavailable": 1})]
    assert report["hosts"]["compute-2"]["bindings"] == {"hw_veb": 2, "binding_failed": 1}
    assert report["hosts"]["compute-1"]["bindings"] == {"ovs": 2}
    assert report["dead_letters"]["total"] == 1 and report["dead_letters"]["by_stage"] == {"validate": 1}
    (latest,) = report["dead_letters"]["latest"]
    assert (latest["reason"], latest["port_id"]) == ("bad_schema: network_id: Field required", "ghost")
    assert report["results_unpublished"] == 1
    assert report["broker"] is None

    text = render_status(report)
    assert "DEAD: no heartbeat for 100s (agent_down_time 75s)" in text
    assert "pci      physnet1 8086:154c type-VF: 2 device(s): allocated 2" in text
    assert "dead letters: 1 (validate 1)" in text and "results not yet published: 1" in text

    pipeline.send("port.delete", {"id": "s1"}, T0 + timedelta(seconds=101))  # frees its VF
    vf_pool = pipeline.status(T0 + timedelta(seconds=102))["hosts"]["compute-2"]["pci_pools"][0]
    assert vf_pool["counts"] == {"allocated": 1, "available": 1}


def test_queue_depths_by_passive_declare_and_missing_queues(pipeline, settings, memory_broker):
    declare_topology(memory_broker, settings)
    producer = Producer(memory_broker.channel())
    for _ in range(2):
        env = Envelope.new("port.delete", {"id": "x"})
        producer.publish(env.model_dump(mode="json"), exchange=EVENTS.name, routing_key="port.delete",
                         serializer="json")
    producer.publish({"poison": True}, exchange=DEAD_LETTERS.name, routing_key="select", serializer="json")
    memory_broker.default_channel.queue_delete("binding.allocate.dlq")

    report = pipeline.status(T0, memory_broker)
    empty = {"messages": 0, "consumers": 0}
    assert report["broker"] == {"reachable": True, "queues": {
        "binding.validate": {"messages": 2, "consumers": 0}, "binding.validate.dlq": empty,
        "binding.select": empty, "binding.select.dlq": {"messages": 1, "consumers": 0},
        "binding.allocate": empty, "binding.allocate.dlq": {"missing": True},
        "binding.compose": empty, "binding.compose.dlq": empty}}
    text = render_status(report)
    assert "binding.allocate.dlq     MISSING" in text
    assert "binding.validate         2 message(s), 0 consumer(s)" in text


def test_main_status_on_the_embedded_broker_skips_queues(pipeline, settings, capsys):
    assert main_status(settings, make_engine(settings.database_url), as_json=True) == 0
    report = json.loads(capsys.readouterr().out)
    assert "embedded memory://" in report["broker"]["note"]
    assert [a["agent_type"] for a in report["hosts"]["compute-2"]["agents"]] == ["NIC Switch agent"]


def test_unreachable_broker_is_reported_not_raised(pipeline):
    connection = Connection("amqp://guest:guest@127.0.0.1:1//", connect_timeout=1)
    report = pipeline.status(T0, connection)
    assert report["broker"]["reachable"] is False and report["broker"]["error"]
    assert "broker unreachable" in render_status(report)


# --- the real services --------------------------------------------------------------------------------


@pytest.mark.services
def test_explain_on_postgresql(pg_url):
    settings = Settings(database_url=pg_url)
    engine = make_engine(pg_url)
    create_schema(engine)
    try:
        pipe = Pipeline(engine, settings)
        pipe.topology()
        pipe.send("port.create", sriov_port("d_1%"), T0 + timedelta(seconds=500))  # LIKE wildcards in the id
        pipe.send("port.create", sriov_port("xd_1%"), T0 + timedelta(seconds=500))
        pipe.send("agent.report", SRIOV_AGENT, T0 + timedelta(seconds=600))
        report = pipe.explain("d_1%")
        assert [(a["event"]["event_type"], a["outcome"]) for a in report["attempts"]] == [
            ("port.create", "failed"), ("agent.report", "bound")]
    finally:
        engine.dispose()
    assert main_explain(make_engine(pg_url), "d_1%", as_json=False) == 0  # REPEATABLE READ, read-only session


@pytest.mark.services
def test_queue_depths_for_a_user_without_configure_permission(amqp_url):
    """Passive declares need no configure (or read/write) permission; a 404 closes only its channel."""
    settings = Settings(broker_url=amqp_url)
    vhost = amqp_url.rsplit("/", 1)[1]
    user, password = f"inspect-{uuid.uuid4().hex[:8]}", "inspect-test-password"
    with Connection(amqp_url) as admin:
        declare_topology(admin, settings)
        producer = Producer(admin.channel())
        for _ in range(3):
            producer.publish({"x": 1}, exchange=EVENTS.name, routing_key="port.create", serializer="json",
                             delivery_mode=2)
        admin.default_channel.queue_delete("binding.select.dlq")
    subprocess.run(["rabbitmqctl", "-q", "add_user", user, password], check=True, capture_output=True, timeout=120)
    try:
        subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", vhost, user, "^$", "^$", "^$"], check=True,
                       capture_output=True, timeout=120)
        limited = amqp_url.replace("guest:guest@", f"{user}:{password}@")
        with Connection(limited, connect_timeout=5) as connection:
            depths = queue_depths(connection, settings)
    finally:
        subprocess.run(["rabbitmqctl", "-q", "delete_user", user], capture_output=True, timeout=120)
    assert depths["binding.validate"] == {"messages": 3, "consumers": 0}
    assert depths["binding.select.dlq"] == {"missing": True}
    assert all(depths[name] == {"messages": 0, "consumers": 0} for name in (
        "binding.validate.dlq", "binding.select", "binding.allocate", "binding.allocate.dlq",
        "binding.compose", "binding.compose.dlq"))
