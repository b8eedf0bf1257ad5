"""Hostile and forged input on the real RabbitMQ and PostgreSQL: every bad message ends after one
delivery with a recorded reason (and a binding_failed result where it names a port), good events
behind it are not held up, signatures are enforced, and forged contexts cannot write profiles."""

import contextlib
import json
import uuid
from collections import Counter

import pytest
from kombu import Connection, Producer
from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.client import BindingClient, ResultTimeout
from pipeline.models.binding import RequestContext
from pipeline.models.tables import DeadLetter, PortRow, ResultRow
from pipeline.settings import Settings
from pipeline.workers.signing import KEY_ID_HEADER, SIGNATURE_HEADER, signature
from tests.bus import bus_client, running_worker, wait_until
from tests.factories import OVS_AGENT, VLAN_SEGMENT, agent

pytestmark = pytest.mark.services
NETWORK = {"id": "net-1", "segments": [VLAN_SEGMENT]}


def envelope(event_type: str, payload: object, **fields: object) -> dict:
    return {"event_id": str(uuid.uuid4()), "event_type": event_type, "occurred_at": "2026-11-23T10:00:00Z",
            "context": {"roles": ["service"]}, "payload": payload, **fields}


def deeply_nested_profile(port: dict, depth: int = 2000) -> bytes:
    """An envelope whose profile nests ``depth`` objects (beyond what any JSON parser here takes)."""
    text = json.dumps(envelope("port.create", {**port, "profile": "PROFILE"}))
    return text.replace('"PROFILE"', '{"x":' * depth + "{}" + "}" * depth).encode()


def hostile_messages() -> list[tuple[str, bytes, str, str | None]]:
    """(name, body, expected dead-letter category, port id of the refused event or None). Those
    whose event id can be read are the ones with a port id, bar "missing event_id"."""
    port = {"id": "hp1", "network_id": "net-1", "host": "h1", "vnic_type": "normal"}
    no_id = envelope("port.create", port)
    del no_id["event_id"]
    return [
        ("bad json", b'{"event_id": "x", "event_type": ', "bad_json", None),
        ("not utf-8", b'{"event_id": "\xff\xfe"}', "not_utf8", None),
        ("not an object", b"[1, 2, 3]", "bad_schema", None),
        ("unknown type", json.dumps(envelope("port.explode", port)).encode(), "unknown_event_type", "hp1"),
        ("wrong schema", json.dumps(envelope("port.create", {**port, "id": "hp2", "network_id": 7})).encode(),
         "bad_schema", "hp2"),
        ("missing event_id", json.dumps(no_id).encode(), "missing_event_id", "hp1"),
        ("oversized", json.dumps(envelope("port.create", {**port, "id": "hp3", "junk": "x" * 70_000})).encode(),
         "too_large", None),
        ("deeply nested", deeply_nested_profile({**port, "id": "hp4"}), "bad_json", None),
        ("bad event_id", json.dumps(envelope("port.create", {**port, "id": "hp5"}, event_id="not-a-uuid")).encode(),
         "bad_schema", "hp5"),
        ("NUL byte", b"\x00 not json at all", "bad_json", None),
        ("binary", bytes(range(256)) * 4, "not_utf8", None),
        ("NUL in a string", json.dumps(envelope("port.create", {**port, "id": "hp6", "profile": {"k\u0000": 1}})
                                       ).encode(), "bad_schema", "hp6"),
    ]


@pytest.fixture
def settings(pg_url, amqp_url) -> Settings:
    return Settings(broker_url=amqp_url, database_url=pg_url, batch_wait_ms=2)


def dead_letters(engine) -> list[DeadLetter]:  # noqa: ANN001
    with Session(engine) as session:
        return list(session.scalars(select(DeadLetter).order_by(DeadLetter.id)))


def test_hostile_messages_end_after_one_delivery_and_do_not_hold_up_others(settings, pg_engine):
    """Each is sent five times. A copy of a refused event that has an event id is recognised and
    dropped (as a copy of a good event is); a message with no readable event id is each time a
    message of its own."""
    hostile = hostile_messages() * 5
    with_id = {name for name, _, _, port_id in hostile if port_id and name != "missing event_id"}
    seen: set[str] = set()
    recorded = [(name, category) for name, _, category, _ in hostile
                if name not in with_id or not (name in seen or seen.add(name))]
    with bus_client(settings) as client, running_worker(settings, pg_engine), \
            Connection(settings.broker_url) as raw, client.results_for("h1") as results:
        client.publish_envelopes([client.envelope("network.upsert", NETWORK),
                                  client.envelope("agent.report", agent(OVS_AGENT, host="h1"))])
        producer = Producer(raw.channel())
        good = []
        for number, (_, body, _, _) in enumerate(hostile):
            producer.publish(body, exchange="binding.events", routing_key="port.create",
                             content_type="application/json", content_encoding="binary", delivery_mode=2)
            good.append(client.publish("port.create", {"id": f"good-{number}", "network_id": "net-1",
                                                       "host": "h1", "vnic_type": "normal"}))
        bound = [results.wait(port_id=f"good-{n}", timeout=30) for n in range(len(good))]
        wait_until(lambda: len(dead_letters(pg_engine)) >= len(recorded))
        channel = raw.default_channel
        wait_until(lambda: channel.queue_declare("binding.validate", passive=True).message_count == 0)
        dlq = channel.queue_declare("binding.validate.dlq", passive=True).message_count
        bodies = {name: body for name, body, _, _ in hostile}
        refused = {port_id: results.wait(port_id=port_id, timeout=10) for _, _, _, port_id in hostile if port_id}
        with contextlib.suppress(ResultTimeout):
            results.wait(port_id="none", timeout=1)  # gathers every result still on its way into results.seen
        refusals = Counter(r["port_id"] for r in results.seen if r["vif_type"] == "binding_failed")

    assert {r["vif_type"] for r in bound} == {"ovs"}
    assert refusals["hp2"] == refusals["hp5"] == 1, "five copies of a refused event, refused once"
    letters = dead_letters(pg_engine)
    assert len(letters) == len(recorded), "each hostile message dead-lettered exactly once"
    assert dlq == 0, "recorded in the database and acked: nothing parked on the broker's DLQ"
    assert [d.body for d in letters] == [bodies[name] for name, _ in recorded], "every body kept byte for byte"
    assert [d.category for d in letters] == [category for _, category in recorded]
    assert [d.reason.split(":")[0] for d in letters] == [category for _, category in recorded]
    assert all(d.stage == "validate" and len(d.reason) > len(d.reason.split(":")[0]) + 2 for d in letters)
    for port_id, result in refused.items():
        assert result["vif_type"] == "binding_failed" and result["error"].startswith("Refused: ")
        assert result["host"] == "h1" and result["seq"] is not None, port_id


def test_signatures_are_required_and_checked(pg_url, amqp_url, pg_engine):
    keys = {"nova": "nova-secret-value", "other": "other-secret-value"}
    worker_settings = Settings(broker_url=amqp_url, database_url=pg_url, signing_keys=keys,
                               signing_key_roles={"nova": ["service"], "other": []}, require_signatures=True,
                               batch_wait_ms=2)
    nova = Settings(broker_url=amqp_url, database_url=pg_url, signing_keys=keys, signing_key_id="nova")
    port = {"id": "p1", "network_id": "net-1", "host": "h1", "vnic_type": "normal"}
    with running_worker(worker_settings, pg_engine), bus_client(nova) as signed, \
            Connection(amqp_url) as raw, signed.results_for("h1") as results:
        signed.publish_envelopes([signed.envelope("network.upsert", NETWORK),
                                  signed.envelope("agent.report", agent(OVS_AGENT, host="h1"))])
        producer = Producer(raw.channel())
        body = json.dumps(envelope("port.create", {**port, "id": "unsigned"})).encode()
        tampered = json.dumps(envelope("port.create", {**port, "id": "tampered"})).encode()
        sent = [
            (body, {}),
            (body, {KEY_ID_HEADER: "nova", SIGNATURE_HEADER: signature("wrong-secret", body)}),
            (body, {KEY_ID_HEADER: "stranger", SIGNATURE_HEADER: signature("x", body)}),
            (tampered, {KEY_ID_HEADER: "nova", SIGNATURE_HEADER: signature(keys["nova"], body)}),
        ]
        for raw_body, headers in sent:
            producer.publish(raw_body, exchange="binding.events", routing_key="port.create", headers=headers,
                             content_type="application/json", content_encoding="utf-8", delivery_mode=2)
        signed.publish("port.create", port)
        assert results.wait(port_id="p1", timeout=30)["vif_type"] == "ovs"
        wait_until(lambda: len(dead_letters(pg_engine)) == 4)
    reasons = [d.reason for d in dead_letters(pg_engine)]
    assert all(r.startswith("bad_signature: ") for r in reasons)
    assert "unsigned" in reasons[0] and "does not match" in reasons[1] and "unknown signing key" in reasons[2]
    assert "does not match" in reasons[3]
    assert not any(secret in r for r in reasons for secret in keys.values())
    with Session(pg_engine) as session:  # nothing of a refused event was stored as a port
        assert session.scalar(select(ResultRow.port_id).where(ResultRow.port_id == "unsigned")) is None


def test_a_signing_key_may_assert_only_its_roles(pg_url, amqp_url, pg_engine):
    """A key holder who signs a context claiming a role its key is not given is refused, and the
    port's host hears why; what a key may assert passes."""
    keys = {"nova": "nova-secret-value", "agent": "agent-secret-value"}
    worker_settings = Settings(broker_url=amqp_url, database_url=pg_url, signing_keys=keys, require_signatures=True,
                               signing_key_roles={"nova": ["service"], "agent": ["member"]}, batch_wait_ms=2)
    signer = {key: Settings(broker_url=amqp_url, signing_keys={key: secret}, signing_key_id=key)
              for key, secret in keys.items()}
    service = RequestContext(user_id="nova", project_id="service", roles=["service"])
    member = RequestContext(user_id="bob", project_id="p", roles=["member"])
    port = {"network_id": "net-1", "host": "h1", "vnic_type": "normal"}
    with running_worker(worker_settings, pg_engine), bus_client(signer["nova"]) as nova, \
            BindingClient(settings=signer["agent"]) as agent_key, nova.results_for("h1") as results:
        nova.publish_envelopes([nova.envelope("network.upsert", NETWORK),
                                nova.envelope("agent.report", agent(OVS_AGENT, host="h1"))])
        agent_key.publish("port.create", {**port, "id": "agent-as-service"}, context=service)
        agent_key.publish("port.create", {**port, "id": "agent-as-member"}, context=member)
        nova.publish("port.create", {**port, "id": "nova-as-service"}, context=service)
        refused = results.wait(port_id="agent-as-service", timeout=30)
        allowed = [results.wait(port_id=p, timeout=30) for p in ("agent-as-member", "nova-as-service")]
        wait_until(lambda: len(dead_letters(pg_engine)) == 1)
    assert [r["vif_type"] for r in allowed] == ["ovs", "ovs"]
    assert refused["error"] == ("Refused: bad_signature: signing key 'agent' may not assert the role(s) ['service']: "
                                "BINDPIPE_SIGNING_KEY_ROLES gives it ['member']")
    [letter] = dead_letters(pg_engine)
    assert letter.port_id == "agent-as-service" and letter.reason == refused["error"].removeprefix("Refused: ")


def test_forged_contexts_cannot_write_the_profile(settings, pg_engine):
    with bus_client(settings) as client, running_worker(settings, pg_engine), client.results_for("h1") as results:
        client.publish_envelopes([client.envelope("network.upsert", NETWORK),
                                  client.envelope("agent.report", agent(OVS_AGENT, host="h1"))])
        member = RequestContext(user_id="mallory", project_id="p", roles=["member"])
        admin = RequestContext(user_id="root", project_id="p", roles=["admin"])
        port = {"network_id": "net-1", "host": "h1", "vnic_type": "normal", "profile": {"trusted": True}}
        client.publish("port.create", {**port, "id": "by-member"}, context=member)
        client.publish("port.create", {**port, "id": "by-admin"}, context=admin)
        client.publish("port.create", {**port, "id": "by-service"})
        forged = [results.wait(port_id=p, timeout=30) for p in ("by-member", "by-admin")]
        allowed = results.wait(port_id="by-service", timeout=30)
    assert all(r["error"].startswith("PolicyNotAuthorized: binding:profile") for r in forged)
    assert allowed["vif_type"] == "ovs" and allowed["profile"] == {"trusted": True}


def test_client_signs_what_it_publishes(amqp_url):
    settings = Settings(broker_url=amqp_url, signing_keys={"nova": "k"}, signing_key_id="nova")
    with BindingClient(settings=settings) as client, Connection(amqp_url) as raw:
        queue = raw.SimpleQueue("sig-probe", no_ack=True)
        raw.default_channel.queue_bind("sig-probe", "amq.topic", "sig.#")
        client.publisher.publish([("amq.topic", "sig.x", {"a": 1})])
        message = queue.get(timeout=5)
        assert message.headers[KEY_ID_HEADER] == "nova"
        assert message.headers[SIGNATURE_HEADER] == signature("k", message.body if isinstance(message.body, bytes)
                                                              else message.body.encode())
        queue.close()


def test_a_nul_body_is_refused_once_and_the_good_events_behind_it_are_answered(settings, pg_engine):
    """A NUL byte used to kill the worker while it recorded the refusal (a text column), and the
    good events delivered with it were lost with it."""
    nul = b"\x00 \x00{}"
    with bus_client(settings) as client, running_worker(settings, pg_engine), \
            Connection(settings.broker_url) as raw, client.results_for("h1") as results:
        client.publish_envelopes([client.envelope("network.upsert", NETWORK),
                                  client.envelope("agent.report", agent(OVS_AGENT, host="h1"))])
        Producer(raw.channel()).publish(nul, exchange="binding.events", routing_key="port.create",
                                        content_type="application/json", delivery_mode=2)
        client.publish_envelopes([client.envelope("port.create", {"id": f"after-{n}", "network_id": "net-1",
                                                                  "host": "h1", "vnic_type": "normal"})
                                  for n in range(100)])
        answered = [results.wait(port_id=f"after-{n}", timeout=30) for n in range(100)]
    assert {r["vif_type"] for r in answered} == {"ovs"}
    (letter,) = dead_letters(pg_engine)
    assert (letter.category, letter.body) == ("bad_json", nul)


def test_a_conflicting_body_under_a_known_event_id_is_refused_as_such(settings, pg_engine):
    """Another body under an accepted event's id, or under a refused message's id, is refused as a
    conflict: no second result under that event id reaches a host."""
    port = {"id": "c1", "network_id": "net-1", "host": "h1", "vnic_type": "normal"}
    with bus_client(settings) as client, running_worker(settings, pg_engine), \
            Connection(settings.broker_url) as raw, client.results_for("h1") as results:
        client.publish_envelopes([client.envelope("network.upsert", NETWORK),
                                  client.envelope("agent.report", agent(OVS_AGENT, host="h1"))])
        good = envelope("port.create", port)
        refused = envelope("port.create", {**port, "id": "c2", "network_id": 7})  # bad schema, names port c2
        producer = Producer(raw.channel())

        def send(body: dict, content_type: str = "application/json") -> None:
            producer.publish(json.dumps(body).encode(), exchange="binding.events", routing_key=body["event_type"],
                             content_type=content_type, delivery_mode=2)

        send(good)
        send(refused)
        first = results.wait(port_id="c1", event_id=good["event_id"], timeout=30)
        results.wait(port_id="c2", event_id=refused["event_id"], timeout=30)
        send({**good, "payload": {**port, "host": "h2"}})  # a good body, another port state
        send({**good, "payload": {**port, "network_id": 7}})  # malformed, under the good event's id
        send({**refused, "payload": {**port, "id": "c2"}})  # well formed, under the refused one's id
        send(envelope("port.create", {**port, "id": "c3"}), content_type="text/plain")
        wait_until(lambda: len(dead_letters(pg_engine)) == 5, what="every refusal recorded")
        with contextlib.suppress(ResultTimeout):
            results.wait(port_id="none", timeout=1.5)
    categories = Counter(d.category for d in dead_letters(pg_engine))
    assert categories == {"bad_schema": 1, "conflicting_event_id": 3, "bad_content_type": 1}, categories
    by_event = Counter(r["event_id"] for r in results.seen)
    assert by_event[good["event_id"]] == 1 and by_event[refused["event_id"]] == 1, "one result per event id"
    assert first["vif_type"] == "ovs" and "c3" not in {r["port_id"] for r in results.seen}
    with Session(pg_engine) as session:
        assert session.get(PortRow, "c1").host == "h1" and session.get(PortRow, "c2") is None
