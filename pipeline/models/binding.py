"""Binding configuration, request context and the result a compute host consumes."""

from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from pipeline.models import vocabulary as v
from pipeline.models.reasons import primary_decline
from pipeline.models.topology import Segment

#: The version of the bus contract (envelopes in, results out) this code speaks; every result says it.
CONTRACT_VERSION: Final = "1.0"


class DriverConfig(BaseModel):
    """The neutron-server options that change a binding (``[ml2]``, ``[OVS_DRIVER]``, ...).

    ``strict_profile`` and ``legacy_profile_policy`` are this project's own: the first turns
    profile format findings into errors (the reference only warns about nothing), the second lets
    ``admin`` write ``binding:profile`` as Neutron's deprecated policy did.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mechanism_drivers: tuple[str, ...] = ("openvswitch",)
    enable_security_group: StrictBool = True
    ovs_vnic_type_prohibit_list: tuple[str, ...] = ()
    ovs_create_tap: StrictBool = True
    sriov_vnic_type_prohibit_list: tuple[str, ...] = ()
    ovn_ovs_create_tap: StrictBool = True
    ovn_vhost_sock_dir: str = v.DEFAULT_VHOST_SOCKET_DIR
    ovn_logical_switch_per_vlan_segment: StrictBool = False
    strict_profile: StrictBool = False
    legacy_profile_policy: StrictBool = False


class RequestContext(BaseModel):
    """Who asked. Only the ``service`` role may write ``binding:profile``."""

    model_config = ConfigDict(frozen=True)

    user_id: str | None = None
    project_id: str | None = None
    roles: tuple[str, ...] = ()

    @classmethod
    def service(cls) -> "RequestContext":
        """The service's own context: one shared instance (the model is frozen; a job that
        carries none gets it when decoded, so it is asked for very often)."""
        return _SERVICE


_SERVICE = RequestContext(user_id="service", roles=("service",))


class BindingLevel(BaseModel):
    level: int
    driver: str
    segment_id: str


class Decline(BaseModel):
    """Why one driver did not bind (on one segment, when the reason is segment-specific)."""

    driver: str
    segment_id: str | None = None
    reason: str


class PciDeviceRef(BaseModel):
    address: str
    vendor_id: str | None = None
    product_id: str | None = None
    dev_type: str | None = None
    parent_addr: str | None = None
    numa_node: int | None = None
    physical_network: str | None = None


class SelectionOutcome(BaseModel):
    """Stage 2's outcome: the chosen binding (vif_type ``unbound``/``binding_failed`` if none)."""

    vif_type: str
    vif_details: dict[str, Any] = Field(default_factory=dict)
    levels: list[BindingLevel] = Field(default_factory=list)
    status: str | None = None
    declines: list[Decline] = Field(default_factory=list)
    driver_errors: list[str] = Field(default_factory=list)
    dynamic_segments: list[Segment] = Field(default_factory=list)

    @property
    def bound(self) -> bool:
        return self.vif_type not in v.VIF_UNPLUGGED_TYPES

    @property
    def bottom_segment_id(self) -> str | None:
        return self.levels[-1].segment_id if self.levels else None


class AllocationDecision(BaseModel):
    """Stage 3's outcome: the device chosen, or why none was (``failed``), or why none was
    needed (``reason`` only)."""

    device: PciDeviceRef | None = None
    failed: bool = False
    error: str | None = None
    reason: str | None = None


class BindingResult(BaseModel):
    """One binding outcome. The first keys are exactly the dry-run contract's."""

    id: str
    error: str | None = None
    vif_type: str | None = None
    vif_details: dict[str, Any] | None = None
    bound_driver: str | None = None
    bound_segment_id: str | None = None
    binding_levels: list[BindingLevel] = Field(default_factory=list)
    port_status: str | None = None
    driver_errors: list[str] = Field(default_factory=list)
    explanation: list[Decline] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    port_id: str | None = None
    host: str | None = None
    vnic_type: str | None = None
    profile: dict[str, Any] | None = None
    pci_device: PciDeviceRef | None = None
    dynamic_segments: list[dict[str, Any]] = Field(default_factory=list)
    event_id: str | None = None
    seq: int | None = None
    contract_version: Literal[CONTRACT_VERSION] = Field(
        CONTRACT_VERSION, description="the bus contract's version this result follows")

    @property
    def bound(self) -> bool:
        return self.error is None and self.vif_type not in (None, *v.VIF_UNPLUGGED_TYPES)

    @property
    def outcome(self) -> str:
        """``error``, ``bound``, ``failed`` or ``unbound``: one word for logs, metrics and watchers."""
        if self.error:
            return "error"
        if self.bound:
            return "bound"
        return "failed" if self.vif_type == v.VIF_TYPE_BINDING_FAILED else "unbound"

    @property
    def reason(self) -> str:
        """Why the port is not bound, in one line ("" when it is): the error, else the decline that
        explains it best (see ``pipeline.models.reasons``)."""
        if self.error:
            return self.error
        if self.bound or self.vif_type == v.VIF_TYPE_UNBOUND:
            return ""
        decline = primary_decline(self.explanation)
        return f"{decline.driver}: {decline.reason}" if decline else "no mechanism driver could bind the port"
