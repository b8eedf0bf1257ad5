"""The bus contract rejects what it cannot mean (issue #13, part 6): booleans and numbers are strict
in every inbound model, dry-run scenarios included, and every result carries the contract's
version."""

import json
import uuid
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.dry_run import evaluate_scenario
from pipeline.models.binding import BindingResult
from pipeline.models.events import Envelope
from pipeline.models.scenario import Scenario
from pipeline.models.topology import Agent, Port, Segment
from pipeline.workers.messages import PoisonMessage, decode_envelope

OVS_AGENT = {"agent_type": "Open vSwitch agent", "host": "h1",
             "configurations": {"bridge_mappings": {"physnet1": "br-eth1"}, "integration_bridge": "br-int"}}


def field_error(model: type, data: dict) -> tuple[str, str]:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(data)
    error = caught.value.errors()[0]
    return ".".join(str(p) for p in error["loc"]), error["msg"]


@pytest.mark.parametrize("value", ["yes", "true", 1, 0, 1.0])
def test_an_agents_booleans_take_only_booleans(value):
    assert field_error(Agent, {**OVS_AGENT, "alive": value}) == ("alive", "Input should be a valid boolean")
    assert field_error(Agent, {**OVS_AGENT, "admin_state_up": value}) == ("admin_state_up",
                                                                          "Input should be a valid boolean")


def test_null_still_means_the_default():
    agent = Agent.model_validate({**OVS_AGENT, "alive": None, "admin_state_up": None})
    assert agent.alive is True and agent.admin_state_up is True
    assert Agent.model_validate({**OVS_AGENT, "alive": False}).alive is False


def test_numbers_take_only_numbers():
    segment = {"id": "s", "network_type": "vlan", "physical_network": "physnet1"}
    assert field_error(Segment, {**segment, "segmentation_id": "101"})[0] == "segmentation_id"
    assert field_error(Segment, {**segment, "segmentation_id": 101.0})[0] == "segmentation_id"
    assert field_error(Segment, {**segment, "is_dynamic": "false"})[0] == "is_dynamic"
    assert Segment.model_validate({**segment, "segmentation_id": 101}).segmentation_id == 101
    assert field_error(Port, {"id": "p", "instance_numa_cells": ["0"]})[0] == "instance_numa_cells.0"


def test_a_published_event_with_a_string_for_a_boolean_is_refused_naming_the_field():
    body = json.dumps({"event_id": str(uuid.uuid4()), "event_type": "agent.report",
                       "occurred_at": datetime.now(UTC).isoformat(), "payload": {**OVS_AGENT, "alive": "yes"}})
    with pytest.raises(PoisonMessage) as caught:
        decode_envelope(body.encode(), 65536)
    assert (caught.value.category, caught.value.reason) == ("bad_schema", "alive: Input should be a valid boolean")
    network = {"id": "n", "segments": [{"id": "s", "network_type": "vlan", "segmentation_id": "7"}]}
    with pytest.raises(ValidationError):
        Envelope.new("network.upsert", network)


def test_dry_run_scenarios_are_strict_too():
    scenario = {"id": "s1", "mechanism_drivers": ["openvswitch"], "agents": [{**OVS_AGENT, "alive": "yes"}],
                "network": {"segments": [{"id": "seg", "network_type": "vlan", "physical_network": "physnet1",
                                          "segmentation_id": 5}]},
                "port": {"id": "p1", "host": "h1", "vnic_type": "normal"}}
    assert evaluate_scenario(scenario)["error"] == "InvalidInput: agents.0.alive: Input should be a valid boolean"
    good = {**scenario, "agents": [OVS_AGENT]}
    assert evaluate_scenario(good)["vif_type"] == "ovs"
    refused = evaluate_scenario({**good, "config": {"ovs_create_tap": 1}})
    assert refused["error"] == "ConfigError: config.ovs_create_tap: Input should be a valid boolean"
    assert refused["warnings"] == [], "an error's result carries warnings as every result does"
    assert Scenario.model_validate({**good, "config": {"ovs_create_tap": False}}).config == {"ovs_create_tap": False}


def test_every_result_carries_the_contract_version():
    from pipeline.models.binding import CONTRACT_VERSION

    assert BindingResult(id="p").model_dump(mode="json")["contract_version"] == CONTRACT_VERSION
    scenario = {"id": "s1", "mechanism_drivers": ["openvswitch"], "agents": [OVS_AGENT],
                "network": {"segments": [{"id": "seg", "network_type": "vxlan", "segmentation_id": 5}]},
                "port": {"id": "p1", "host": "h1", "vnic_type": "normal"}}
    assert evaluate_scenario(scenario)["contract_version"] == CONTRACT_VERSION
    with pytest.raises(ValidationError):  # a result of another version is not read as this one
        BindingResult.model_validate({"id": "p", "contract_version": "0.9"})
    schema = json.loads(CliRunner().invoke(app, ["schema"]).stdout)["result"]
    assert schema["properties"]["contract_version"]["const"] == CONTRACT_VERSION
