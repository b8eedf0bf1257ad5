"""Hierarchical binding: continue_binding, dynamic segments, backtracking and the level limit."""

from pipeline.models.binding import DriverConfig, RequestContext
from pipeline.models.topology import Agent, FixedIP, Network, Port
from pipeline.stages.selection import MAX_BINDING_LEVELS, MechanismManager
from pipeline.stages.validation import validate_request
from tests.factories import OVS_AGENT, VXLAN_SEGMENT
from tests.tor_driver import TEST_DRIVERS

NETWORK = Network(id="net-1", segments=[VXLAN_SEGMENT])
OVS_NO_TUNNELS = Agent.model_validate({**OVS_AGENT, "configurations": {
    **OVS_AGENT["configurations"], "tunnel_types": []}})


def select(drivers, port=None, agents=(OVS_NO_TUNNELS,)):
    config = DriverConfig(mechanism_drivers=tuple(drivers))
    port = port or Port(id="p1", host="compute-1")
    request = validate_request(port, config, RequestContext.service())
    return MechanismManager(config, extra_drivers=TEST_DRIVERS).bind_port(request, NETWORK, list(agents))


def test_two_level_binding_with_dynamic_vlan():
    outcome = select(["tor", "openvswitch"])
    assert outcome.vif_type == "ovs"
    (dynamic,) = outcome.dynamic_segments
    assert (dynamic.network_type, dynamic.physical_network, dynamic.segmentation_id) == ("vlan", "physnet1", 1)
    assert [(lv.level, lv.driver, lv.segment_id) for lv in outcome.levels] == [
        (0, "tor", "seg-vxlan"), (1, "openvswitch", dynamic.id)]


def test_dynamic_segment_is_deterministic():
    assert select(["tor", "openvswitch"]).dynamic_segments == select(["tor", "openvswitch"]).dynamic_segments


def test_backtracks_to_next_upper_driver_when_lower_level_fails():
    outcome = select(["tor_wrong", "tor", "openvswitch"])
    assert [lv.driver for lv in outcome.levels] == ["tor", "openvswitch"]
    assert outcome.levels[1].segment_id == outcome.dynamic_segments[0].id
    reasons = [d.reason for d in outcome.declines]
    assert "physnet-unwired not in bridge_mappings on compute-1" in reasons
    assert "continued binding at level 0 but no driver could bind level 1" in reasons


def test_level_limit_stops_endless_continuation():
    outcome = select(["endless"])
    assert outcome.vif_type == "binding_failed" and outcome.levels == []
    assert outcome.declines[-1].reason.startswith("continued binding at level 0")
    assert any(d.reason == f"exceeded {MAX_BINDING_LEVELS} binding levels" for d in outcome.declines)


def test_driver_exception_recorded_and_next_driver_tried():
    outcome = select(["faulty", "tor", "openvswitch"])
    # all drivers are offered every level again, so the faulty one raises at levels 0 and 1
    assert outcome.bound and outcome.driver_errors == ["faulty: KeyError: 'boom'"] * 2


def test_legacy_driver_only_binds_ports_with_fixed_ips():
    ipless = select(["legacy"])
    assert ipless.vif_type == "binding_failed"
    assert "cannot bind a port without fixed IPs" in ipless.declines[0].reason
    with_ip = select(["legacy"], port=Port(id="p1", host="compute-1", fixed_ips=[FixedIP(subnet_id="s")]))
    assert with_ip.vif_type == "tap"


def test_same_driver_never_rebinds_a_segment_it_bound_above():
    """Loop guard: 'tor' may not bind the dynamic VLAN it itself asked for, OVS binds it instead."""
    outcome = select(["tor", "openvswitch"])
    assert outcome.levels[1].driver == "openvswitch"
