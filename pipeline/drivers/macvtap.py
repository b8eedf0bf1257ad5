"""``macvtap``: the Macvtap agent driver (vnic_type ``normal`` on a host interface)."""

import hashlib
from typing import Any

from pipeline.drivers.agent_base import AgentMechanismDriverBase
from pipeline.drivers.api import PortContext
from pipeline.models import vocabulary as v
from pipeline.models.topology import Agent, Segment

DEVICE_NAME_MAX_LEN = 15
MAX_VLAN_POSTFIX_LEN = 5
INTERFACE_HASH_LEN = 6


def interface_name(name: str, max_len: int) -> str:
    """Neutron's name shortening: keep a prefix and add a hash, so long names stay unique."""
    if len(name) <= max_len:
        return name
    digest = hashlib.sha1(name.encode("utf-8"), usedforsecurity=False).hexdigest()
    return name[: max_len - INTERFACE_HASH_LEN] + digest[:INTERFACE_HASH_LEN]


def vlan_device_name(interface: str, vlan: int) -> str:
    return f"{interface_name(interface, DEVICE_NAME_MAX_LEN - MAX_VLAN_POSTFIX_LEN)}.{vlan}"


class MacvtapMechanismDriver(AgentMechanismDriverBase):
    name = "macvtap"
    agent_type = v.AGENT_TYPE_MACVTAP
    vif_type = v.VIF_TYPE_MACVTAP
    mappings_name = "interface_mappings"

    def get_allowed_network_types(self, agent: Agent | None) -> list[str]:
        return [v.TYPE_FLAT, v.TYPE_VLAN]

    def try_to_bind_segment_for_agent(self, context: PortContext, segment: Segment, agent: Agent) -> bool:
        if not self.check_segment_for_agent(context, segment, agent):
            return False
        details = self.get_vif_details(context, agent, segment)
        original = context.original
        # Nova marks a live migration with migrating_to on the source binding's profile; the
        # target must then use the same macvtap source device as the source host did.
        if original is not None and original.profile.get(v.PROFILE_MIGRATING_TO):
            source = original.vif_details.get(v.VIF_DETAILS_MACVTAP_SOURCE)
            if source != details[v.VIF_DETAILS_MACVTAP_SOURCE]:
                context.decline(
                    f"live migration from {original.host}: macvtap source {details[v.VIF_DETAILS_MACVTAP_SOURCE]!r} "
                    f"on {agent.host} differs from {source!r}; interface mappings must be equal for "
                    f"{segment.physical_network}", segment)
                return False
        context.set_binding(segment.id, self.vif_type, details)
        return True

    def get_vif_details(self, context: PortContext, agent: Agent, segment: Segment) -> dict[str, Any]:
        # Built fresh each time: the reference mutates one shared dict, so a VLAN binding's
        # ``vlan`` leaks into later flat bindings. Here a flat binding never carries ``vlan``.
        interface = self.get_mappings(agent)[segment.physical_network]
        details: dict[str, Any] = {v.VIF_DETAILS_CONNECTIVITY: self.connectivity, v.CAP_PORT_FILTER: False}
        if segment.network_type == v.TYPE_VLAN:
            source = vlan_device_name(interface, segment.segmentation_id)
            details[v.VIF_DETAILS_VLAN] = segment.segmentation_id
        else:
            source = interface
        details[v.VIF_DETAILS_PHYSICAL_INTERFACE] = interface
        details[v.VIF_DETAILS_MACVTAP_SOURCE] = source
        details[v.VIF_DETAILS_MACVTAP_MODE] = v.MACVTAP_MODE_BRIDGE
        return details
