"""A host's PCI inventory and the operations run against it, in the pci-dry-run scenario format.

Field names are those of ``conformance/pci/README.md``. Types are strict (a numa_node of ``"1"`` or
a claim_only of ``"yes"`` is an error, not a guess), and unknown keys are rejected wherever a
misspelt key would silently change the outcome (devices, NUMA nodes, operations).
"""

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pipeline.models import vocabulary as v

PCI_ADDRESS_RE = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
MAX_SLOT = 0x1F

DevType = Literal[v.PCI_DEV_TYPE_PF, v.PCI_DEV_TYPE_VF, v.PCI_DEV_TYPE_PCI, v.PCI_DEV_TYPE_VDPA]
NumaPolicy = Literal[v.NUMA_POLICY_REQUIRED, v.NUMA_POLICY_PREFERRED, v.NUMA_POLICY_LEGACY, v.NUMA_POLICY_SOCKET]


def check_pci_address(value: str | None) -> str | None:
    if value is None:
        return None
    if not PCI_ADDRESS_RE.match(value) or int(value[8:10], 16) > MAX_SLOT:
        raise ValueError(f"{value!r} is not a PCI address 'dddd:bb:ss.f' in lowercase hex (slot <= 1f, function <= 7)")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class PciDevice(_Strict):
    """One PCI device as libvirt reports it, with the device_spec tags the operator gave it."""

    address: str
    vendor_id: str
    product_id: str
    dev_type: DevType
    parent_addr: str | None = None
    numa_node: Annotated[int, Field(ge=0)] | None = None
    physical_network: Annotated[str, Field(min_length=1)] | None = None
    remote_managed: bool | None = None
    capabilities: dict[str, Any] | None = None
    tracked: bool = True

    _address = field_validator("address", "parent_addr")(check_pci_address)

    @field_validator("vendor_id", "product_id")
    @classmethod
    def _hex4(cls, value: str) -> str:
        if not re.fullmatch(r"[0-9a-fA-F]{4}", value):
            raise ValueError(f"{value!r} is not 4 hex digits")
        return value.lower()

    @model_validator(mode="after")
    def _parent_only_for_functions(self) -> "PciDevice":
        if self.parent_addr is not None:
            if self.dev_type not in (v.PCI_DEV_TYPE_VF, v.PCI_DEV_TYPE_VDPA):
                raise ValueError(f"parent_addr: a {self.dev_type} device has no parent (only type-VF and vdpa do)")
            if self.parent_addr == self.address:
                raise ValueError("parent_addr: a device cannot be its own parent")
        return self

    @property
    def card_serial_number(self) -> str | None:
        """The VPD card serial number libvirt found on the device itself (empty counts as none)."""
        vpd = (self.capabilities or {}).get("vpd")
        serial = vpd.get("card_serial_number") if isinstance(vpd, dict) else None
        return serial if isinstance(serial, str) and serial else None


class NumaNode(_Strict):
    id: Annotated[int, Field(ge=0)]
    socket: Annotated[int, Field(ge=0)] | None = None


class HostPciInventory(_Strict):
    """The devices of one compute host and, optionally, its NUMA cells."""

    numa_nodes: list[NumaNode] | None = None
    devices: list[PciDevice] = Field(default_factory=list)

    @field_validator("devices")
    @classmethod
    def _unique_addresses(cls, devices: list[PciDevice]) -> list[PciDevice]:
        seen: set[str] = set()
        for device in devices:
            if device.address in seen:
                raise ValueError(f"address {device.address} is listed twice")
            seen.add(device.address)
        return devices

    @field_validator("numa_nodes")
    @classmethod
    def _unique_cells(cls, nodes: list[NumaNode] | None) -> list[NumaNode] | None:
        ids = [n.id for n in nodes or []]
        if len(ids) != len(set(ids)):
            raise ValueError("NUMA node ids must be unique")
        return nodes

    def numa_topology(self) -> list[NumaNode]:
        """The host cells: as given, else one per distinct device NUMA node (node 0 if none), socket = id."""
        if self.numa_nodes is not None:
            return list(self.numa_nodes)
        ids = sorted({d.numa_node for d in self.devices if d.numa_node is not None}) or [0]
        return [NumaNode(id=i, socket=i) for i in ids]

    def device(self, address: str) -> PciDevice | None:
        return next((d for d in self.devices if d.address == address), None)


class PciRequest(_Strict):
    """What Nova knows of a Neutron port when it builds the port's PCI request."""

    port_id: Annotated[str, Field(min_length=1)]
    vnic_type: str
    physical_network: str | None = None
    numa_policy: NumaPolicy | None = None
    instance_numa_cells: list[Annotated[int, Field(ge=0)]] | None = None
    pci_slot: str | None = None
    claim_only: bool = False
    trusted: bool | None = None

    _slot = field_validator("pci_slot")(check_pci_address)


class PciAllocateOp(PciRequest):
    op: Literal["allocate"]


class PciReleaseOp(_Strict):
    op: Literal["release"]
    port_id: Annotated[str, Field(min_length=1)]


PciOperation = Annotated[PciAllocateOp | PciReleaseOp, Field(discriminator="op")]


class PciScenario(_Strict):
    """One what-if: a host inventory and allocate/release operations, in order.

    Keys other than these four are ignored at this level only (free-form annotations).
    """

    model_config = ConfigDict(extra="ignore")

    id: str
    description: str | None = None
    host: HostPciInventory
    operations: list[PciOperation] = Field(default_factory=list)
