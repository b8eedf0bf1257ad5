"""Stage 2 — driver selection: ML2's ``MechanismManager.bind_port``, with the reasons kept.

Drivers are tried in configured order at each level; the first that binds wins. A driver that
continues the binding hands the next level its segments; if no driver can complete that level
the upper binding is undone and the next upper driver is tried (backtracking), to at most
``MAX_BINDING_LEVELS`` levels.
"""

import functools
from collections.abc import Mapping
from importlib.metadata import entry_points

from pipeline.drivers.api import MechanismDriver, OriginalBinding, PortContext
from pipeline.models import vocabulary as v
from pipeline.models.binding import BindingLevel, Decline, DriverConfig, SelectionOutcome
from pipeline.models.topology import Agent, Network, Segment
from pipeline.stages.errors import ConfigError
from pipeline.stages.validation import ValidatedRequest

ENTRY_POINT_GROUP = "pipeline.mechanism_drivers"
MAX_BINDING_LEVELS = 10


@functools.cache
def registered_drivers() -> dict[str, type[MechanismDriver]]:
    return {ep.name: ep.load() for ep in entry_points(group=ENTRY_POINT_GROUP)}


class MechanismManager:
    """Loads the configured drivers (a bad configuration is a ``ConfigError``) and binds ports."""

    def __init__(self, config: DriverConfig, extra_drivers: Mapping[str, type[MechanismDriver]] | None = None):
        known = {**registered_drivers(), **(extra_drivers or {})}
        unknown = [name for name in config.mechanism_drivers if name not in known]
        if unknown:
            raise ConfigError("mechanism_drivers", f"unknown mechanism driver(s) {unknown}; known: {sorted(known)}")
        if len(set(config.mechanism_drivers)) != len(config.mechanism_drivers):
            raise ConfigError("mechanism_drivers", f"duplicate names in {list(config.mechanism_drivers)}")
        self.config = config
        self.drivers: list[tuple[str, MechanismDriver]] = [
            (name, known[name](config)) for name in config.mechanism_drivers]

    def bind_port(self, request: ValidatedRequest, network: Network, agents: list[Agent],
                  original: OriginalBinding | None = None) -> SelectionOutcome:
        port = request.port
        if not port.host:
            return SelectionOutcome(vif_type=v.VIF_TYPE_UNBOUND, declines=[
                Decline(driver="ml2", reason="port has no binding:host_id; nothing to bind")])
        if not network.segments:
            return SelectionOutcome(vif_type=v.VIF_TYPE_UNBOUND, declines=[
                Decline(driver="ml2", reason="network has no segments")])
        context = PortContext(port=port, vnic_type=request.vnic_type, profile=request.profile,
                              network=network, agents=agents, original=original)
        driver_errors: list[str] = []
        segments = routed_segments(network, port)
        for segment in network.segments:
            if segment not in segments:
                context.declines.append(Decline(driver="ml2", segment_id=segment.id, reason=(
                    "not offered: the port's fixed IPs are on subnets of other segments (routed network)")))
        if not self._bind_level(context, 0, segments, driver_errors):
            return SelectionOutcome(vif_type=v.VIF_TYPE_BINDING_FAILED, declines=context.declines,
                                    driver_errors=driver_errors)
        levels = list(context.binding_levels)
        # built in one call: a pydantic __setattr__ per field afterwards cost ~1.4 µs each
        return SelectionOutcome(
            vif_type=context.vif_type or v.VIF_TYPE_BINDING_FAILED, vif_details=context.vif_details or {},
            status=context.status, levels=levels, declines=context.declines, driver_errors=driver_errors,
            dynamic_segments=[s for s in context.dynamic_segments if any(lv.segment_id == s.id for lv in levels)])

    def _bind_level(self, context: PortContext, level: int, segments: list[Segment],
                    driver_errors: list[str]) -> bool:
        if level == MAX_BINDING_LEVELS:
            context.declines.append(Decline(driver="ml2", reason=(
                f"exceeded {MAX_BINDING_LEVELS} binding levels")))
            return False
        drivers = self.drivers
        if not context.has_fixed_ips:
            drivers = [(n, d) for n, d in drivers if d.connectivity == v.CONNECTIVITY_L2]
            for name, driver in self.drivers:
                if driver.connectivity != v.CONNECTIVITY_L2:
                    context.declines.append(Decline(driver=name, reason=(
                        f"connectivity {driver.connectivity}: cannot bind a port without fixed IPs")))
        for name, driver in drivers:
            offered = {s.id for s in segments}
            if any(lv.driver == name and lv.segment_id in offered for lv in context.binding_levels):
                continue  # loop guard: this driver already bound one of these segments above
            context.prepare_to_bind(name, segments)
            try:
                driver.bind_port(context)
            except Exception as exc:  # a faulty driver must not stop the others
                message = f"{name}: {type(exc).__name__}: {exc}"
                driver_errors.append(message)
                context.declines.append(Decline(driver=name, reason=f"raised {type(exc).__name__}: {exc}"))
                continue
            segment_id = context.new_bound_segment
            if not segment_id:
                continue
            context.binding_levels.append(BindingLevel(level=level, driver=name, segment_id=segment_id))
            next_segments = context.next_segments_to_bind
            if not next_segments:
                return True
            if self._bind_level(context, level + 1, next_segments, driver_errors):
                return True
            context.declines.append(Decline(driver=name, segment_id=segment_id, reason=(
                f"continued binding at level {level} but no driver could bind level {level + 1}")))
            context.binding_levels.pop()
        return False


def routed_segments(network: Network, port) -> list[Segment]:
    """Routed networks: a port with fixed IPs may only bind the segments of its subnets.

    A subnet without a segment (or one this network does not list) does not restrict.
    """
    if not port.fixed_ips:
        return list(network.segments)
    subnets = {s.id: s for s in network.subnets}
    allowed: set[str] = set()
    for ip in port.fixed_ips:
        subnet = subnets.get(ip.subnet_id)
        if subnet is None or subnet.segment_id is None:
            return list(network.segments)
        allowed.add(subnet.segment_id)
    return [s for s in network.segments if s.id in allowed]


@functools.lru_cache(maxsize=256)
def manager_for(config: DriverConfig) -> MechanismManager:
    """Managers are immutable once built: share one per configuration."""
    return MechanismManager(config)
