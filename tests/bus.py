"""Helpers for tests that run the pipeline on a broker: workers in threads, scenarios as events."""

import copy
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine

from pipeline.client import BindingClient
from pipeline.models.events import Envelope
from pipeline.settings import Settings
from pipeline.workers.consumer import Worker
from pipeline.workers.topology import STAGES, declare_topology


@contextmanager
def running_worker(settings: Settings, engine: Engine, stages: list[str] | None = None) -> Iterator[Worker]:
    """A worker consuming ``stages`` (default all four) in a thread, stopped gracefully at exit."""
    worker = Worker(settings, engine, list(stages or STAGES))
    with worker.running_in_thread(safety_interval=0.005):
        yield worker
    assert worker.stopped, "the worker did not stop"


@contextmanager
def bus_client(settings: Settings) -> Iterator[BindingClient]:
    with BindingClient(settings=settings) as client:
        declare_topology(client.connection, settings)
        yield client


def wait_until(condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition",
               interval: float = 0.05, detail: Callable[[], str] = lambda: "") -> Any:
    """Poll ``condition`` until it returns something true (returned), or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s\n{detail()}".rstrip())
        time.sleep(interval)


def renamed_scenario(scenario: dict[str, Any], tag: str) -> dict[str, Any]:
    """The scenario with hosts, network and segment ids prefixed by ``tag``, so that many
    scenarios share one database and broker without colliding."""
    renamed = copy.deepcopy(scenario)
    network = renamed["network"]
    network["id"] = f"{tag}-{network.get('id', 'net')}"
    for segment in network.get("segments", []):
        segment["id"] = f"{tag}-{segment['id']}"
    for subnet in network.get("subnets", []):
        if subnet.get("segment_id"):
            subnet["segment_id"] = f"{tag}-{subnet['segment_id']}"
    for number, agent in enumerate(renamed["agents"]):
        agent["host"] = f"{tag}-{agent['host']}"
        agent.setdefault("id", f"{tag}-agent-{number}")  # some scenarios hold two agents of one type on a host
    port = renamed["port"]
    port["network_id"] = network["id"]
    if port.get("host"):
        port["host"] = f"{tag}-{port['host']}"
    renamed["pci_devices"] = {f"{tag}-{host}": inv for host, inv in renamed.get("pci_devices", {}).items()}
    return renamed


def scenario_events(client: BindingClient, scenario: dict[str, Any]) -> list[Envelope]:
    """network.upsert, one agent.report per agent, pci.inventory per host, then port.create."""
    context = scenario.get("context")
    events = [client.envelope("network.upsert", scenario["network"])]
    events += [client.envelope("agent.report", agent) for agent in scenario["agents"]]
    events += [client.envelope("pci.inventory", {"host": host, **inventory})
               for host, inventory in scenario.get("pci_devices", {}).items()]
    fields = {"context": context} if context else {}
    events.append(client.envelope("port.create", scenario["port"], **fields))
    return events
