"""``ovn``: OVN chassis (ovn-controller) binding, including DPU-hosted (remote-managed) ports.

For OVN agents, ``configurations`` is the chassis ``other_config`` map (``ovn-bridge-mappings``,
``datapath-type``, ``iface-types``, ``ovn-cms-options``) plus ``ovn_bridge``.
"""

import os
from typing import Any

from pipeline.drivers.agent_base import has_capability
from pipeline.drivers.api import MechanismDriver, PortContext
from pipeline.models import vocabulary as v
from pipeline.models.topology import Agent
from pipeline.stages.validation import ovn_profile_params

SUPPORTED_VNIC_TYPES = (v.VNIC_NORMAL, v.VNIC_DIRECT, v.VNIC_DIRECT_PHYSICAL, v.VNIC_MACVTAP,
                        v.VNIC_VHOST_VDPA, v.VNIC_REMOTE_MANAGED, v.VNIC_BAREMETAL,
                        v.VNIC_VIRTIO_FORWARDER)
# OVN models these as "external" logical ports and leaves their binding to SR-IOV drivers,
# unless the VF is a switchdev representor (hardware offload).
EXTERNAL_PORT_TYPES = (v.VNIC_DIRECT, v.VNIC_DIRECT_PHYSICAL, v.VNIC_MACVTAP, v.VNIC_BAREMETAL)


def parse_mappings(text: str) -> dict[str, str]:
    """Parse ``"physnet1:br-ex,physnet2:br-p2"`` with neutron-lib's rules (unique keys and values)."""
    mappings: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.split(":")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise ValueError(f"Invalid mapping: '{item}'")
        key, value = parts[0].strip(), parts[1].strip()
        if key in mappings:
            raise ValueError(f"Key {key} in mapping: '{item}' not unique")
        if value in mappings.values():
            raise ValueError(f"Value {value} in mapping: '{item}' not unique")
        mappings[key] = value
    return mappings


def cms_options(agent: Agent) -> list[str]:
    return [opt.strip() for opt in str(agent.configurations.get("ovn-cms-options", "")).split(",")]


class OVNMechanismDriver(MechanismDriver):
    name = "ovn"
    connectivity = v.CONNECTIVITY_L2

    def bind_port(self, context: PortContext) -> None:
        vnic_type = context.vnic_type
        if vnic_type not in SUPPORTED_VNIC_TYPES:
            context.decline(f"vnic_type {vnic_type} not supported")
            return
        if vnic_type in EXTERNAL_PORT_TYPES and not has_capability(context.profile, v.CAP_SWITCHDEV):
            context.decline(f"vnic_type {vnic_type} without switchdev is an OVN external port "
                            "(left to an SR-IOV driver)")
            return
        bind_host = self.bind_host(context)
        agents = [a for a in context.agents_of_types(v.OVN_CONTROLLER_TYPES) if a.host == bind_host]
        if not agents:
            context.decline(f"no OVN chassis for host {bind_host!r}")
            return
        agent = agents[0]
        if not agent.alive:
            context.decline(f"OVN chassis on {agent.host} is dead")
            return
        conf = agent.configurations
        datapath_type = conf.get("datapath-type", "")
        iface_types = [t for t in str(conf.get("iface-types", "")).split(",") if t]
        physnets = parse_mappings(str(conf.get("ovn-bridge-mappings", "")))
        for segment in context.segments_to_bind:
            if segment.network_type in v.PHYSNET_TYPES and segment.physical_network not in physnets:
                context.decline(f"{segment.physical_network} not in ovn-bridge-mappings of chassis {agent.host}",
                                segment)
                continue
            vif_type, details = self.vif_for(context, datapath_type, iface_types)
            details[v.VIF_DETAILS_BRIDGE_NAME] = conf.get("ovn_bridge") or v.DEFAULT_BR_INT
            details[v.OVS_DATAPATH_TYPE] = datapath_type
            context.set_binding(segment.id, vif_type, details)
            return

    def bind_host(self, context: PortContext) -> str:
        """The port's host, except for remote-managed ports: the DPU chassis with the card serial."""
        if context.vnic_type == v.VNIC_REMOTE_MANAGED:
            serial = ovn_profile_params(context.profile, context.vnic_type).get(v.PROFILE_CARD_SERIAL_NUMBER)
            if serial:
                wanted = f"card-serial-number={serial}"
                for agent in context.agents_of_types(v.OVN_CONTROLLER_TYPES):
                    if wanted in cms_options(agent):
                        return agent.host
                raise RuntimeError(f"Chassis with specified card serial number {serial} not found.")
        return context.host

    def vif_for(self, context: PortContext, datapath_type: str, iface_types: list[str]) -> tuple[str, dict[str, Any]]:
        sg = self.config.enable_security_group
        socket = os.path.join(self.config.ovn_vhost_sock_dir, (v.VHOST_USER_DEVICE_PREFIX + context.port.id)[:14])
        if datapath_type == v.OVS_DATAPATH_NETDEV and v.OVS_DPDK_VHOST_USER in iface_types:
            return v.VIF_TYPE_VHOST_USER, {
                v.CAP_PORT_FILTER: False, v.VHOST_USER_MODE: v.VHOST_USER_MODE_SERVER,
                v.VHOST_USER_OVS_PLUG: True, v.VIF_DETAILS_CONNECTIVITY: self.connectivity,
                v.VHOST_USER_SOCKET: socket}
        if context.vnic_type == v.VNIC_VIRTIO_FORWARDER:
            return v.VIF_TYPE_AGILIO_OVS, {
                v.CAP_PORT_FILTER: sg, v.VIF_DETAILS_CONNECTIVITY: self.connectivity,
                v.VHOST_USER_SOCKET: socket, v.VHOST_USER_MODE: v.VHOST_USER_MODE_CLIENT}
        return v.VIF_TYPE_OVS, {v.CAP_PORT_FILTER: sg, v.VIF_DETAILS_CONNECTIVITY: self.connectivity,
                                v.OVS_CREATE_TAP: self.config.ovn_ovs_create_tap}
