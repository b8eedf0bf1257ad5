"""``l2population``: forwarding-table population for tunnels. It never binds a port."""

from pipeline.drivers.api import MechanismDriver, PortContext


class L2populationMechanismDriver(MechanismDriver):
    name = "l2population"

    def bind_port(self, context: PortContext) -> None:
        context.decline("l2population never binds ports")
