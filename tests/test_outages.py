"""An outage of the database that outlasts every retry costs no message its delivery budget (on
the real RabbitMQ and PostgreSQL, the database behind a TCP proxy).

The worker holds the batch in hand, unacked, and tries again with a growing pause; while a query
waits on a database that answers nothing, a thread sends the broker connection's heartbeats. With a
delivery limit of 2, a single return of a message to its queue would be one of its two lives: the
test sees every event answered, nothing dead-lettered, the DLQs empty and no reconnection.
"""

import time

import pytest
from kombu import Connection
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pipeline.db import make_engine
from pipeline.models.tables import DeadLetter
from pipeline.settings import Settings
from pipeline.workers.topology import STAGES
from tests.bus import bus_client, running_worker
from tests.factories import OVS_AGENT, VLAN_SEGMENT, agent
from tests.faults.harness import _with_host_port
from tests.faults.proxy import Proxy

pytestmark = [pytest.mark.services, pytest.mark.timeout(240)]
NETWORK = {"id": "net-1", "segments": [VLAN_SEGMENT]}
OUTAGE_S = 20.0  # twenty times the retry budget, five heartbeat intervals


def port(n: int) -> dict:
    return {"id": f"p{n}", "network_id": "net-1", "host": "h1", "vnic_type": "normal"}


@pytest.mark.parametrize("mode", ["refused", "blackhole"])
def test_a_database_outage_longer_than_every_retry_costs_no_delivery(mode, pg_url, amqp_url, pg_engine):
    proxy = Proxy({"pg": f"127.0.0.1:{pg_engine.url.port or 5432}"})
    proxied = _with_host_port(pg_url, proxy.port("pg"))
    settings = Settings(broker_url=amqp_url, database_url=proxied, delivery_limit=2, heartbeat=4, batch_wait_ms=2,
                        transaction_retry_seconds=1, hold_backoff_max=2)
    listener = settings.model_copy(update={"heartbeat": 0})  # the test's own client waits without ticking
    engine = make_engine(proxied)
    try:
        with bus_client(listener) as client, running_worker(settings, engine) as worker, \
                client.results_for("h1") as results:
            client.publish_envelopes([client.envelope("network.upsert", NETWORK),
                                      client.envelope("agent.report", agent(OVS_AGENT, host="h1"))])
            client.publish("port.create", port(0))
            assert results.wait(port_id="p0", timeout=30)["vif_type"] == "ovs"
            if mode == "refused":
                proxy.refuse("pg", OUTAGE_S)
                proxy.cut("pg")
            else:
                proxy.hold("pg", OUTAGE_S)
            started = time.monotonic()
            client.publish_envelopes([client.envelope("port.create", port(n)) for n in range(1, 21)])
            answered = [results.wait(port_id=f"p{n}", timeout=OUTAGE_S + 60) for n in range(1, 21)]
            waited = time.monotonic() - started
        assert {r["vif_type"] for r in answered} == {"ovs"}
        assert waited >= OUTAGE_S - 2, f"answered after {waited:.1f}s: the outage did not hold them up"
        assert worker.connections_made == 1, "the broker connection was lost: deliveries went back"
        if mode == "blackhole":
            assert worker.keepalive.beats > 0, "no heartbeat sent while the queries waited"
        with Session(pg_engine) as session:
            assert session.scalar(select(func.count()).select_from(DeadLetter)) == 0
        with Connection(amqp_url) as connection:
            channel = connection.channel()
            depths = {s: channel.queue_declare(f"binding.{s}.dlq", passive=True).message_count for s in STAGES}
        assert set(depths.values()) == {0}, depths
    finally:
        engine.dispose()
        proxy.close()
