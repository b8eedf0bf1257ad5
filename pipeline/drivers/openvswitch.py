"""``openvswitch``: the Open vSwitch agent driver (kernel, DPDK vhost-user, hardware offload)."""

import os
from typing import Any

from pipeline.drivers.agent_base import AgentMechanismDriverBase, has_capability
from pipeline.drivers.api import PortContext
from pipeline.models import vocabulary as v
from pipeline.models.topology import Agent, Segment


class OpenvswitchMechanismDriver(AgentMechanismDriverBase):
    name = "openvswitch"
    agent_type = v.AGENT_TYPE_OVS
    vif_type = v.VIF_TYPE_OVS
    all_vnic_types = [v.VNIC_NORMAL, v.VNIC_DIRECT, v.VNIC_SMARTNIC, v.VNIC_VHOST_VDPA]
    prohibit_option = "ovs_vnic_type_prohibit_list"
    mappings_name = "bridge_mappings"

    def bind_port(self, context: PortContext) -> None:
        # A direct (VF) port is OVS's only with hardware offload; otherwise it is SR-IOV's.
        if context.vnic_type == v.VNIC_DIRECT and not has_capability(context.profile, v.CAP_SWITCHDEV):
            context.decline("vnic_type direct without the switchdev capability")
            return
        super().bind_port(context)

    def get_allowed_network_types(self, agent: Agent | None) -> list[str]:
        tunnel_types = list(agent.configurations.get("tunnel_types") or []) if agent else []
        return tunnel_types + [v.TYPE_LOCAL, v.TYPE_FLAT, v.TYPE_VLAN]

    def get_vif_type(self, context: PortContext, agent: Agent) -> str:
        if context.vnic_type == v.VNIC_DIRECT:
            return v.VIF_TYPE_OVS
        conf = agent.configurations
        iface_types = (conf.get("ovs_capabilities") or {}).get("iface_types", [])
        vhost_user = v.OVS_DPDK_VHOST_USER in iface_types or v.OVS_DPDK_VHOST_USER_CLIENT in iface_types
        if vhost_user and conf.get("datapath_type") == v.OVS_DATAPATH_NETDEV:
            return v.VIF_TYPE_VHOST_USER
        return v.VIF_TYPE_OVS

    def get_vif_details(self, context: PortContext, agent: Agent, segment: Segment) -> dict[str, Any]:
        conf = agent.configurations
        datapath_type = conf.get("datapath_type", v.OVS_DATAPATH_SYSTEM)
        if self.get_vif_type(context, agent) == v.VIF_TYPE_VHOST_USER:
            iface_types = (conf.get("ovs_capabilities") or {}).get("iface_types", [])
            # OVS as vhost-user client means QEMU is the server, and the reverse.
            mode = (v.VHOST_USER_MODE_SERVER if v.OVS_DPDK_VHOST_USER_CLIENT in iface_types
                    else v.VHOST_USER_MODE_CLIENT)
            sock_dir = conf.get("vhostuser_socket_dir", v.DEFAULT_VHOST_SOCKET_DIR)
            details: dict[str, Any] = {
                v.CAP_PORT_FILTER: False,
                v.OVS_HYBRID_PLUG: False,
                v.VHOST_USER_MODE: mode,
                v.VHOST_USER_OVS_PLUG: True,
                v.VHOST_USER_SOCKET: os.path.join(sock_dir, (v.VHOST_USER_DEVICE_PREFIX + context.port.id)[:14]),
            }
        else:
            sg_enabled = self.config.enable_security_group
            details = {
                v.VIF_DETAILS_CONNECTIVITY: self.connectivity,
                v.CAP_PORT_FILTER: sg_enabled,
                # The server's default firewall driver implies hybrid plug; the agent's report wins.
                v.OVS_HYBRID_PLUG: conf.get(v.OVS_HYBRID_PLUG, sg_enabled),
            }
        details[v.OVS_DATAPATH_TYPE] = datapath_type
        if (self.config.ovs_create_tap and datapath_type == v.OVS_DATAPATH_SYSTEM
                and context.vnic_type != v.VNIC_DIRECT and not details[v.OVS_HYBRID_PLUG]):
            details[v.OVS_CREATE_TAP] = True
        if conf.get("integration_bridge"):
            details[v.VIF_DETAILS_BRIDGE_NAME] = conf["integration_bridge"]
        return details
