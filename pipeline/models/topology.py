"""What the binding reads: networks with their segments, agents on hosts, and the port itself.

Field names follow the dry-run scenario format of the conformance suite, which the bus payloads reuse.
Values a driver must judge (the port's ``vnic_type`` and ``profile``) are kept raw here: the
validation stage turns a bad value into a specific ``InvalidInput``, not a model error. Booleans
and numbers are strict: ``"alive": "yes"`` or ``1`` is refused, not taken for ``true``.
"""

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from pipeline.models import vocabulary as v

NetworkType = Literal["flat", "vlan", "vxlan", "gre", "geneve", "local"]


class Model(BaseModel):
    """Base: unknown keys are kept (agents and Nova add keys we do not read)."""

    model_config = ConfigDict(extra="allow", frozen=False)


class Segment(Model):
    id: str
    network_type: NetworkType
    physical_network: str | None = None
    segmentation_id: StrictInt | None = None
    is_dynamic: StrictBool = False


class Subnet(Model):
    id: str
    segment_id: str | None = None
    cidr: str | None = None


class Network(Model):
    id: str | None = None
    segments: list[Segment] = Field(default_factory=list)
    subnets: list[Subnet] = Field(default_factory=list)

    def segment(self, segment_id: str | None) -> Segment | None:
        return next((s for s in self.segments if s.id == segment_id), None)


class Agent(Model):
    """An L2 agent (or OVN chassis) as Neutron's agents table holds it."""

    id: str | None = Field(None, description="the agent's identity; default: type, host and binary")
    agent_type: str
    host: str
    alive: StrictBool = True
    admin_state_up: StrictBool = True
    binary: str | None = None
    configurations: dict[str, Any] = Field(default_factory=dict)
    heartbeat_at: datetime | None = None

    @field_validator("alive", "admin_state_up", mode="before")
    @classmethod
    def _none_is_default(cls, value: Any) -> Any:
        return True if value is None else value


class FixedIP(Model):
    subnet_id: str
    ip_address: str | None = None


class Port(Model):
    """A port with its binding inputs (``host``, ``vnic_type``, ``profile``)."""

    id: str
    mac: str | None = None
    host: str = ""
    vnic_type: Any = v.VNIC_NORMAL
    profile: Any = None
    device_owner: str | None = None
    device_id: str | None = None
    network_id: str | None = None
    fixed_ips: list[FixedIP] = Field(default_factory=list)
    numa_affinity_policy: Literal["required", "preferred", "legacy", "socket"] | None = None
    instance_numa_cells: list[StrictInt] | None = None

    @field_validator("host", mode="before")
    @classmethod
    def _no_host_is_empty(cls, value: Any) -> Any:
        return "" if value is None else value
