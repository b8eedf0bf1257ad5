"""``bindpipe dlq list|show|redrive|purge`` on the real RabbitMQ and PostgreSQL: a dead letter is
found, read byte for byte, redriven once the cause is fixed (the stage judges it afresh), and a
redriven message refused again names the dead letter it came from."""

import json
import uuid

import pytest
from kombu import Connection, Producer
from sqlalchemy import select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.models.tables import DeadLetter
from pipeline.settings import Settings
from pipeline.workers.signing import KEY_ID_HEADER, SIGNATURE_HEADER, signature
from tests.bus import bus_client, running_worker, wait_until
from tests.factories import OVS_AGENT, VLAN_SEGMENT, agent

pytestmark = pytest.mark.services
NETWORK = {"id": "net-1", "segments": [VLAN_SEGMENT]}
KEYS = {"nova": "nova-secret-value"}
LATE_KEY = {"neutron": "a-key-not-configured-yet"}


def cli(settings: Settings, *args: str) -> str:
    env = {"BINDPIPE_BROKER_URL": settings.broker_url, "BINDPIPE_DATABASE_URL": settings.database_url}
    done = CliRunner().invoke(app, ["dlq", *args], env=env, catch_exceptions=False)
    assert done.exit_code == 0, done.output
    return done.stdout_bytes.decode("utf-8", "replace") if "--raw" not in args else done.stdout_bytes


def letters(engine) -> list[DeadLetter]:  # noqa: ANN001
    with Session(engine) as session:
        return list(session.scalars(select(DeadLetter).order_by(DeadLetter.id)))


def test_a_dead_letter_is_listed_shown_redriven_once_fixed_and_purged(pg_url, amqp_url, pg_engine):
    roles = {"nova": ["service"], "neutron": ["service"]}
    before = Settings(broker_url=amqp_url, database_url=pg_url, batch_wait_ms=2, require_signatures=True,
                      signing_keys=KEYS, signing_key_roles=roles, signing_key_id="nova")
    body = json.dumps({"event_id": str(uuid.uuid4()), "event_type": "port.create",
                       "occurred_at": "2026-12-04T10:00:00Z", "context": {"roles": ["service"]},
                       "payload": {"id": "late", "network_id": "net-1", "host": "h1", "vnic_type": "normal"}}).encode()
    signed_late = {KEY_ID_HEADER: "neutron", SIGNATURE_HEADER: signature(LATE_KEY["neutron"], body)}
    garbage = b"\x00 not an envelope \x00"
    with bus_client(before) as client, running_worker(before, pg_engine), Connection(amqp_url) as raw:
        client.publish_envelopes([client.envelope("network.upsert", NETWORK),
                                  client.envelope("agent.report", agent(OVS_AGENT, host="h1"))])
        producer = Producer(raw.channel())
        producer.publish(body, exchange="binding.events", routing_key="port.create", headers=signed_late,
                         content_type="application/json", delivery_mode=2)
        producer.publish(garbage, exchange="binding.events", routing_key="port.create",
                         headers={KEY_ID_HEADER: "nova", SIGNATURE_HEADER: signature(KEYS["nova"], garbage)},
                         content_type="application/json", delivery_mode=2)
        wait_until(lambda: len(letters(pg_engine)) == 2, what="both dead-lettered")

    listed = json.loads(cli(before, "list", "--json"))
    by_category = {r["category"]: r for r in listed}
    unsigned, junk = by_category["bad_signature"], by_category["bad_json"]
    assert (unsigned["category"], unsigned["port_id"], unsigned["routing_key"]) == ("bad_signature", "late",
                                                                                   "port.create")
    assert junk["category"] == "bad_json" and junk["bytes"] == len(garbage)
    assert cli(before, "show", str(junk["id"]), "--raw") == garbage
    assert "unknown signing key 'neutron'" in cli(before, "show", str(unsigned["id"]))

    # the operator adds the key, then redrives: the event is judged afresh and binds
    after = Settings(**{**before.model_dump(exclude={"signing_keys"}), "signing_keys": {**KEYS, **LATE_KEY}})
    with bus_client(after) as client, running_worker(after, pg_engine), client.results_for("h1") as results:
        assert "redrove 2 dead letter(s)" in cli(after, "redrive", "--all")
        bound = results.wait(port_id="late", timeout=30)
        wait_until(lambda: len(letters(pg_engine)) == 3, what="the garbage refused again")
    assert bound["vif_type"] == "ovs" and bound["event_id"] == unsigned["event_id"]
    rows = {r.id: r for r in letters(pg_engine)}
    again = rows[max(rows)]
    assert (again.category, again.redrive_of, again.body) == ("bad_json", junk["id"], garbage)
    assert rows[unsigned["id"]].redriven_at is not None and rows[junk["id"]].redriven_at is not None
    assert [r["id"] for r in json.loads(cli(after, "list", "--json"))] == [again.id], "only the new one waits"
    assert len(json.loads(cli(after, "list", "--all", "--json"))) == 3
    assert "redrove 0 dead letter(s)" in cli(after, "redrive", str(unsigned["id"])), "redriven once"

    assert "purged 3 dead letter(s)" in cli(after, "purge", "--stage", "validate")
    assert letters(pg_engine) == []


def test_dlq_commands_need_something_to_act_on(pg_url):
    done = CliRunner().invoke(app, ["dlq", "purge"], env={"BINDPIPE_DATABASE_URL": pg_url})
    assert done.exit_code == 2 and "name dead letters" in done.output
    done = CliRunner().invoke(app, ["dlq", "list", "--stage", "nope"], env={"BINDPIPE_DATABASE_URL": pg_url})
    assert done.exit_code == 2 and "unknown stage 'nope'" in done.output
