"""Small builders for scenarios, so each test states only what matters to it."""

import copy
from typing import Any

OVS_AGENT = {
    "agent_type": "Open vSwitch agent", "host": "compute-1", "alive": True,
    "configurations": {"bridge_mappings": {"physnet1": "br-physnet1"}, "tunnel_types": ["vxlan"],
                       "integration_bridge": "br-int", "datapath_type": "system", "ovs_hybrid_plug": False,
                       "ovs_capabilities": {"iface_types": ["system", "tap", "vxlan"]}},
}
SRIOV_AGENT = {"agent_type": "NIC Switch agent", "host": "compute-1", "alive": True,
               "configurations": {"device_mappings": {"physnet1": ["ens1f0"]}}}
MACVTAP_AGENT = {"agent_type": "Macvtap agent", "host": "compute-1", "alive": True,
                 "configurations": {"interface_mappings": {"physnet1": "eth1"}}}
OVN_CHASSIS = {"agent_type": "OVN Controller agent", "host": "compute-1", "alive": True,
               "configurations": {"ovn-bridge-mappings": "physnet1:br-ex", "datapath-type": "system",
                                  "iface-types": "geneve,system,tap"}}

VLAN_SEGMENT = {"id": "seg-vlan", "network_type": "vlan", "physical_network": "physnet1", "segmentation_id": 101}
FLAT_SEGMENT = {"id": "seg-flat", "network_type": "flat", "physical_network": "physnet1", "segmentation_id": None}
VXLAN_SEGMENT = {"id": "seg-vxlan", "network_type": "vxlan", "physical_network": None, "segmentation_id": 5001}


def agent(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A copy of ``base`` with top-level changes; ``configurations`` entries are merged."""
    result = copy.deepcopy(base)
    result["configurations"].update(changes.pop("configurations", {}))
    result.update(changes)
    return result


def scenario(drivers: list[str], *, segments: list[dict] | None = None, agents: list[dict] | None = None,
             vnic_type: str = "normal", profile: Any = None, host: str = "compute-1",
             config: dict | None = None, **extra: Any) -> dict[str, Any]:
    port = {"id": "0a1b2c3d-0000-4000-8000-000000000001", "mac": "fa:16:3e:00:00:01", "host": host,
            "vnic_type": vnic_type, "profile": {} if profile is None else profile,
            "device_owner": "compute:nova"}
    port.update(extra.pop("port", {}))
    return {"id": "t", "mechanism_drivers": drivers, "config": config or {},
            "network": {"id": "net-1", "segments": segments if segments is not None else [VLAN_SEGMENT],
                        **extra.pop("network", {})},
            "agents": agents if agents is not None else [], "port": port, **extra}


def sriov_binding(port_id: str, vnic_type: str = "direct", host: str = "compute-1", profile: Any = None):  # noqa: ANN201
    """Stages 1 and 2 run for real on ``scenario()``'s vlan/physnet1 network with the SR-IOV agent:
    the ``(ValidatedRequest, SelectionOutcome, Network)`` that the allocation stage takes."""
    from pipeline.models.binding import DriverConfig, RequestContext
    from pipeline.models.scenario import Scenario
    from pipeline.stages.selection import manager_for
    from pipeline.stages.validation import validate_request

    raw = scenario(["sriovnicswitch"], agents=[agent(SRIOV_AGENT, host=host)], vnic_type=vnic_type,
                   profile=profile, host=host, port={"id": port_id})
    parsed = Scenario.model_validate(raw)
    config = DriverConfig(mechanism_drivers=tuple(parsed.mechanism_drivers))
    request = validate_request(parsed.port, config, RequestContext.service())
    selection = manager_for(config).bind_port(request, parsed.network, parsed.agents, None)
    assert selection.bound, f"{vnic_type} port {port_id} did not bind: {selection.declines}"
    return request, selection, parsed.network
