"""``sriovnicswitch``: SR-IOV VFs (``hw_veb``) through the NIC Switch agent, and PFs
(``hostdev_physical``) with no agent at all."""

from typing import Any

from pipeline.drivers.agent_base import AgentMechanismDriverBase, has_capability
from pipeline.drivers.api import PortContext
from pipeline.models import vocabulary as v
from pipeline.models.topology import Agent, Segment

FLAT_VLAN = 0


class SriovNicSwitchMechanismDriver(AgentMechanismDriverBase):
    name = "sriovnicswitch"
    agent_type = v.AGENT_TYPE_NIC_SWITCH
    vif_type = v.VIF_TYPE_HW_VEB
    all_vnic_types = [v.VNIC_DIRECT, v.VNIC_MACVTAP, v.VNIC_DIRECT_PHYSICAL, v.VNIC_ACCELERATOR_DIRECT]
    prohibit_option = "sriov_vnic_type_prohibit_list"
    mappings_name = "device_mappings"

    def bind_port(self, context: PortContext) -> None:
        if not self.accepts_vnic_type(context):
            return
        if context.vnic_type == v.VNIC_DIRECT_PHYSICAL:
            # The agent does not manage PFs: bind on the network type alone, port ACTIVE at once.
            for segment in context.segments_to_bind:
                if self.try_to_bind_segment_for_agent(context, segment, None):
                    return
            return
        if context.vnic_type == v.VNIC_DIRECT and has_capability(context.profile, v.CAP_SWITCHDEV):
            context.decline("vnic_type direct with the switchdev capability belongs to OVS/OVN offload")
            return
        agents = context.host_agents(self.agent_type)
        if not agents:
            context.decline(f"no {self.agent_type} registered on host {context.host!r}")
        for agent in agents:
            if not agent.alive:
                context.decline(f"{self.agent_type} on {agent.host} is dead")
                continue
            for segment in context.segments_to_bind:
                if self.try_to_bind_segment_for_agent(context, segment, agent):
                    return

    def try_to_bind_segment_for_agent(self, context: PortContext, segment: Segment, agent: Agent | None) -> bool:
        if not self.check_segment_for_agent(context, segment, agent):
            return False
        vif_type = v.VIF_TYPE_HOSTDEV_PHY if context.vnic_type == v.VNIC_DIRECT_PHYSICAL else v.VIF_TYPE_HW_VEB
        status = v.PORT_STATUS_ACTIVE if agent is None else v.PORT_STATUS_DOWN
        context.set_binding(segment.id, vif_type, self.get_vif_details(context, agent, segment), status)
        return True

    def get_allowed_network_types(self, agent: Agent | None) -> list[str]:
        return [v.TYPE_FLAT, v.TYPE_VLAN]

    def get_vif_details(self, context: PortContext, agent: Agent | None, segment: Segment) -> dict[str, Any]:
        vlan = FLAT_VLAN if segment.network_type == v.TYPE_FLAT else segment.segmentation_id
        # A string, unlike macvtap's int: Nova's hw_veb path reads it as such.
        return {v.VIF_DETAILS_CONNECTIVITY: self.connectivity, v.CAP_PORT_FILTER: False,
                v.VIF_DETAILS_VLAN: str(vlan)}
