"""Test-only drivers that exercise hierarchical binding, backtracking and the manager's guards."""

from pipeline.drivers.api import MechanismDriver, PortContext
from pipeline.models import vocabulary as v


class TopOfRackDriver(MechanismDriver):
    """Binds a VXLAN segment at the top and asks for a VLAN on ``uplink_physnet`` below it."""

    connectivity = v.CONNECTIVITY_L2
    uplink_physnet = "physnet1"

    def bind_port(self, context: PortContext) -> None:
        for segment in context.segments_to_bind:
            if segment.network_type == v.TYPE_VXLAN:
                vlan = context.allocate_dynamic_segment(v.TYPE_VLAN, self.uplink_physnet)
                context.continue_binding(segment.id, [vlan])
                return
        context.decline("no vxlan segment to terminate")


class WrongUplinkTorDriver(TopOfRackDriver):
    """Continues onto a physnet no agent has, so the level below fails and binding backtracks."""

    uplink_physnet = "physnet-unwired"


class EndlessDriver(MechanismDriver):
    """Always continues onto a fresh segment: only the level limit stops it."""

    connectivity = v.CONNECTIVITY_L2

    def bind_port(self, context: PortContext) -> None:
        segment = context.segments_to_bind[0]
        fresh = context.allocate_dynamic_segment(v.TYPE_VLAN, "loop", len(context.binding_levels) + 1)
        context.continue_binding(segment.id, [fresh])


class FaultyDriver(MechanismDriver):
    connectivity = v.CONNECTIVITY_L2

    def bind_port(self, context: PortContext) -> None:
        raise KeyError("boom")


class LegacyDriver(MechanismDriver):
    """Binds anything, but has ``legacy`` connectivity: never for a port without fixed IPs."""

    def bind_port(self, context: PortContext) -> None:
        context.set_binding(context.segments_to_bind[0].id, v.VIF_TYPE_TAP, {})


TEST_DRIVERS = {"tor": TopOfRackDriver, "tor_wrong": WrongUplinkTorDriver, "endless": EndlessDriver,
                "faulty": FaultyDriver, "legacy": LegacyDriver}
