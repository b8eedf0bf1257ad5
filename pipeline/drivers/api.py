"""The mechanism-driver contract: what a driver may read and how it answers.

Mirrors neutron-lib's ``MechanismDriver`` / ``PortContext`` closely enough that the reference
drivers port over line by line, with one addition operators asked for: ``context.decline`` records
*why* a driver did not bind, so an unbound port is always explained.
"""

import abc
import uuid
from dataclasses import dataclass, field
from typing import Any

from pipeline.models import vocabulary as v
from pipeline.models.binding import BindingLevel, Decline, DriverConfig
from pipeline.models.topology import Agent, Network, Port, Segment


@dataclass(frozen=True)
class OriginalBinding:
    """The port's previous binding, when this one replaces it (live migration checks read it)."""

    host: str
    profile: dict[str, Any]
    vif_details: dict[str, Any]


@dataclass
class PortContext:
    """Everything a driver may read during ``bind_port``, and the calls it answers with.

    A driver chooses among ``segments_to_bind`` itself, then calls exactly one of
    ``set_binding`` (this level completes the binding) or ``continue_binding`` (a lower level
    must bind the segments it names). Calling neither means "declined".
    """

    port: Port
    vnic_type: str
    profile: dict[str, Any]
    network: Network
    agents: list[Agent]
    original: OriginalBinding | None = None
    segments_to_bind: list[Segment] = field(default_factory=list)
    binding_levels: list[BindingLevel] = field(default_factory=list)
    declines: list[Decline] = field(default_factory=list)
    dynamic_segments: list[Segment] = field(default_factory=list)
    # Set by set_binding / continue_binding, consumed by the manager.
    new_bound_segment: str | None = None
    next_segments_to_bind: list[Segment] | None = None
    vif_type: str | None = None
    vif_details: dict[str, Any] | None = None
    status: str | None = None
    _current_driver: str = ""

    @property
    def host(self) -> str:
        return self.port.host

    @property
    def has_fixed_ips(self) -> bool:
        return bool(self.port.fixed_ips)

    def host_agents(self, agent_type: str, host: str | None = None) -> list[Agent]:
        """Agents of ``agent_type`` registered on ``host`` (default: the port's host), in report order."""
        host = self.host if host is None else host
        return [a for a in self.agents if a.agent_type == agent_type and a.host == host]

    def agents_of_types(self, agent_types: tuple[str, ...]) -> list[Agent]:
        return [a for a in self.agents if a.agent_type in agent_types]

    def prepare_to_bind(self, driver: str, segments: list[Segment]) -> None:
        self._current_driver = driver
        self.segments_to_bind = segments
        self.new_bound_segment = None
        self.next_segments_to_bind = None

    def set_binding(
        self, segment_id: str, vif_type: str, vif_details: dict[str, Any], status: str | None = None
    ) -> None:
        """Complete the binding at this level. ``vif_details`` is copied: drivers may reuse dicts."""
        self.new_bound_segment = segment_id
        self.vif_type = vif_type
        self.vif_details = dict(vif_details)
        self.status = status

    def continue_binding(self, segment_id: str, next_segments_to_bind: list[Segment]) -> None:
        """Bind ``segment_id`` at this level and ask the next level to bind one of the given segments."""
        self.new_bound_segment = segment_id
        self.next_segments_to_bind = list(next_segments_to_bind)

    def decline(self, reason: str, segment: Segment | None = None) -> None:
        """Record why the current driver did not bind (on ``segment``, if segment-specific)."""
        self.declines.append(
            Decline(driver=self._current_driver, segment_id=segment.id if segment else None, reason=reason)
        )

    def allocate_dynamic_segment(self, network_type: str, physical_network: str | None,
                                 segmentation_id: int | None = None) -> Segment:
        """Reuse the network's dynamic segment for (type, physnet[, id]) or reserve a new one.

        A new VLAN id is the lowest one no segment of that physnet on the network uses, and the
        segment id is derived from the network and the values, so the same inputs always give the
        same segment (replay and dry-run stay deterministic).
        """
        for seg in [*self.network.segments, *self.dynamic_segments]:
            if (seg.is_dynamic and seg.network_type == network_type
                    and seg.physical_network == physical_network
                    and (segmentation_id is None or seg.segmentation_id == segmentation_id)):
                return seg
        if segmentation_id is None and network_type == v.TYPE_VLAN:
            used = {s.segmentation_id for s in [*self.network.segments, *self.dynamic_segments]
                    if s.physical_network == physical_network}
            segmentation_id = next(i for i in range(1, 4095) if i not in used)
        seed = f"{self.network.id}:{network_type}:{physical_network}:{segmentation_id}"
        segment = Segment(id=str(uuid.uuid5(uuid.NAMESPACE_URL, seed)), network_type=network_type,
                          physical_network=physical_network, segmentation_id=segmentation_id,
                          is_dynamic=True)
        self.dynamic_segments.append(segment)
        return segment


class MechanismDriver(abc.ABC):
    """A way to attach ports to networks. Subclasses are registered as entry points in the
    ``pipeline.mechanism_drivers`` group and tried in the configured order; the first that binds wins.

    Contract:

    * ``__init__(config)`` reads the options it needs from :class:`DriverConfig` and raises
      :class:`~pipeline.stages.errors.ConfigError` for a configuration it cannot serve (Neutron
      refuses to start in that case).
    * ``bind_port(context)`` looks at ``context.segments_to_bind`` and, if it can serve the port on
      its host, calls ``context.set_binding`` or ``context.continue_binding`` once; otherwise it
      returns after ``context.decline(reason, segment)`` for every reason it had.
    * ``bind_port`` has no side effects: its result may be discarded (a later stage fails, or a
      newer event supersedes it). An exception is recorded and the next driver is tried.
    * ``connectivity`` is ``l2``, ``l3`` or ``legacy``; only ``l2`` drivers may bind a port that has
      no fixed IPs.
    """

    name: str = ""
    connectivity: str = v.CONNECTIVITY_LEGACY

    def __init__(self, config: DriverConfig):
        self.config = config

    @abc.abstractmethod
    def bind_port(self, context: PortContext) -> None:
        """Try to bind ``context.port``; see the class docstring for the contract."""
