"""The 60 conformance scenarios as events on the real RabbitMQ and PostgreSQL.

Each scenario becomes a network.upsert, its agent reports, its PCI inventories and a port.create,
with hosts and ids prefixed per scenario so all share one vhost and database. Scenarios that share
a deployment (driver order and config) run under one worker configured like that deployment. The
result received on ``host.<host>`` must equal the dry-run's for the same scenario (and the
dry-run's agrees with the reference: tests/test_conformance.py), but that a refused request tells
its host ``binding_failed`` where the dry-run leaves the binding keys null.
"""

import json
from collections import defaultdict
from contextlib import ExitStack
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from pipeline.dry_run import evaluate_scenario
from pipeline.models.tables import ResultRow
from pipeline.settings import Settings
from tests.bus import bus_client, renamed_scenario, running_worker, scenario_events, wait_until
from tests.conformance import COMPARED_KEYS, load_pairs

pytestmark = pytest.mark.services
ALSO_COMPARED = ("error", "explanation", "profile", "pci_device", "warnings")


def deployment(scenario: dict[str, Any]) -> str:
    return json.dumps([scenario["mechanism_drivers"], scenario["config"]], sort_keys=True)


def test_conformance_scenarios_as_events(pg_engine, pg_url, amqp_url):
    groups: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = defaultdict(list)
    for index, (scenario, expected) in enumerate(load_pairs()):
        groups[deployment(scenario)].append((renamed_scenario(scenario, f"sc{index:02d}"), expected))

    received: dict[str, tuple[str, dict[str, Any]]] = {}
    for scenarios in groups.values():
        drivers, config = scenarios[0][0]["mechanism_drivers"], scenarios[0][0]["config"]
        settings = Settings(broker_url=amqp_url, database_url=pg_url, mechanism_drivers=drivers, ml2=config,
                            batch_wait_ms=2)
        with bus_client(settings) as client, ExitStack() as streams, running_worker(settings, pg_engine):
            waiting = {}
            events = []
            for scenario, _ in scenarios:
                host = scenario["port"].get("host")
                if host:
                    waiting[scenario["id"]] = streams.enter_context(client.results_for(host))
                events += scenario_events(client, scenario)
            client.publish_envelopes(events)
            for scenario, _ in scenarios:
                port_id = scenario["port"]["id"]
                if scenario["id"] in waiting:
                    body = waiting[scenario["id"]].wait(port_id=port_id, timeout=30)
                    received[scenario["id"]] = (scenario["port"]["host"], body)
                else:
                    received[scenario["id"]] = ("", stored_result(pg_engine, port_id))

    assert len(received) == 60
    problems = {}
    for scenarios in groups.values():
        for scenario, _ in scenarios:
            host, result = received[scenario["id"]]
            dry = evaluate_scenario(scenario)
            if dry.get("error"):  # a refusal on the bus tells its host binding_failed (the dry-run leaves it null)
                dry.update(vif_type="binding_failed", vif_details={})
            keys = [k for k in (*COMPARED_KEYS, *ALSO_COMPARED) if k in dry]
            different = {k: (result.get(k), dry[k]) for k in keys if result.get(k) != dry[k]}
            if result["host"] != host or result["port_id"] != scenario["port"]["id"]:
                different["routing"] = (result["host"], host)
            if different:
                problems[scenario["id"]] = different
    assert not problems, json.dumps(problems, indent=1, default=str)[:4000]


def stored_result(engine, port_id: str) -> dict[str, Any]:  # noqa: ANN001
    """A port without a host has no one to publish to: its result is only recorded."""
    def recorded() -> dict[str, Any] | None:
        with Session(engine) as session:
            return session.scalar(select(ResultRow.body).where(ResultRow.port_id == port_id))

    return wait_until(recorded, timeout=30)
