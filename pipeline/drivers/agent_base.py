"""Shared logic of the agent-based drivers (Neutron's ``mech_agent.py``)."""

import abc
from typing import Any

from pipeline.drivers.api import MechanismDriver, PortContext
from pipeline.models import vocabulary as v
from pipeline.models.binding import DriverConfig
from pipeline.models.topology import Agent, Segment
from pipeline.stages.errors import ConfigError


def prohibit_vnic_types(agent_type: str, supported: list[str], prohibit: tuple[str, ...]) -> list[str]:
    """Remove administratively prohibited vnic types; an unknown or all-prohibiting list is fatal."""
    if not prohibit:
        return list(supported)
    if not all(p in supported for p in prohibit):
        raise ConfigError(
            None,
            "Not all of the items from vnic_type_prohibit_list are valid vnic_types for "
            f"{agent_type} mechanism driver. The valid values are: {supported}.",
        )
    remaining = [t for t in supported if t not in prohibit]
    if not remaining:
        raise ConfigError(None, f"All possible vnic_types were prohibited for {agent_type} mechanism driver!")
    return remaining


def has_capability(profile: dict[str, Any], capability: str) -> bool:
    """``capability in profile['capabilities']`` with Python's own semantics, as the reference.

    A non-list value behaves as it does in Neutron: a string matches by substring, and a number or
    ``null`` raises ``TypeError`` (recorded as a driver error, as ML2 logs it).
    """
    return capability in profile.get(v.PROFILE_CAPABILITIES, [])


class AgentMechanismDriverBase(MechanismDriver, abc.ABC):
    """Binds when an alive agent of ``agent_type`` on the port's host can reach a segment."""

    agent_type: str = ""
    vif_type: str = ""
    connectivity = v.CONNECTIVITY_L2
    all_vnic_types: list[str] = [v.VNIC_NORMAL]
    prohibit_option: str | None = None
    mappings_name: str = "mappings"

    def __init__(self, config: DriverConfig):
        super().__init__(config)
        prohibit = getattr(config, self.prohibit_option) if self.prohibit_option else ()
        self.supported_vnic_types = prohibit_vnic_types(self.agent_type, self.all_vnic_types, prohibit)

    def bind_port(self, context: PortContext) -> None:
        if not self.accepts_vnic_type(context):
            return
        agents = context.host_agents(self.agent_type)
        if not agents:
            context.decline(f"no {self.agent_type} registered on host {context.host!r}")
        for agent in agents:
            if not agent.alive:
                context.decline(f"{self.agent_type} on {agent.host} is dead")
                continue
            if context.vnic_type == v.VNIC_SMARTNIC and not agent.configurations.get("baremetal_smartnic"):
                context.decline(f"{self.agent_type} on {agent.host} does not report baremetal_smartnic")
                continue
            for segment in context.segments_to_bind:
                if self.try_to_bind_segment_for_agent(context, segment, agent):
                    return

    def accepts_vnic_type(self, context: PortContext) -> bool:
        if context.vnic_type in self.supported_vnic_types:
            return True
        if context.vnic_type in self.all_vnic_types:
            context.decline(f"vnic_type {context.vnic_type} prohibited by configuration")
        else:
            context.decline(f"vnic_type {context.vnic_type} not supported")
        return False

    def try_to_bind_segment_for_agent(self, context: PortContext, segment: Segment, agent: Agent) -> bool:
        if not self.check_segment_for_agent(context, segment, agent):
            return False
        context.set_binding(segment.id, self.get_vif_type(context, agent),
                            self.get_vif_details(context, agent, segment))
        return True

    def check_segment_for_agent(self, context: PortContext, segment: Segment, agent: Agent | None) -> bool:
        """Network type allowed for the agent, and a flat/vlan physnet present in its mappings."""
        allowed = self.get_allowed_network_types(agent)
        where = f" on {agent.host}" if agent else ""
        if segment.network_type not in allowed:
            context.decline(f"network type {segment.network_type} not supported by {self.agent_type}{where} "
                            f"(allowed: {', '.join(allowed)})", segment)
            return False
        if agent is not None and segment.network_type in v.PHYSNET_TYPES:
            mappings = self.get_mappings(agent)
            if segment.physical_network not in mappings:
                context.decline(f"{segment.physical_network} not in {self.mappings_name}{where}", segment)
                return False
        return True

    def get_mappings(self, agent: Agent) -> dict[str, Any]:
        return agent.configurations.get(self.mappings_name) or {}

    @abc.abstractmethod
    def get_allowed_network_types(self, agent: Agent | None) -> list[str]:
        """Network types this driver (and, when given, this agent) can serve."""

    def get_vif_type(self, context: PortContext, agent: Agent) -> str:
        return self.vif_type

    @abc.abstractmethod
    def get_vif_details(self, context: PortContext, agent: Agent, segment: Segment) -> dict[str, Any]:
        """A fresh vif_details dict for this binding (never a shared, mutable one)."""
