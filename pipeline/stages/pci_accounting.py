"""Nova 34's PCI device accounting for Neutron ports, as pure logic (no database, no broker).

``PciTracker`` mirrors nova.pci.manager.PciDevTracker on one compute host:

* tracked devices are those the implied ``[pci] device_spec`` matches (``pci_devspec``); PF->child
  links are built as Nova does, walking the tracked devices in address order (a VF or vdpa device
  is linked to a tracked PF listed before it);
* the pools (``pci_pools``) hold exactly the ``available`` devices;
* an allocate builds the port's request as nova.network.neutron does, then runs the claim test
  (no NUMA), the NUMA fit (only when the instance has NUMA cells), and claims: status changes
  follow nova.objects.pci_device claim -> allocate (unless ``claim_only``), release follows free.

Dependency rules this produces: claiming a VF/vdpa makes its available PF ``unclaimable``,
allocating it makes the PF ``unavailable``; claiming a PF makes all its children ``unclaimable``,
allocating it makes them ``unavailable``; a PF goes back to ``available`` only when the freed child
was its last one in use (a PF made ``unavailable`` stays so while a sibling is merely claimed, as in
Nova). A ``pci_slot`` skips the claim test and NUMA fit: the reference checks that one device,
tracked -> status -> spec -> NUMA, the last two through the same pool filters applied to it alone.

Choice among candidates (every free device Nova's pool filtering leaves, all equally good to
Nova, whose own pick depends on pool order): ``prefer`` when it is a candidate, else the first of

1. devices whose parent PF is already not available (a sibling is in use): packing keeps whole
   PFs free for direct-physical ports;
2. devices with no tracked parent PF (PFs, type-PCI, orphan VFs): they block no PF;
3. devices whose parent PF is still free;

then the lowest address. Same state and request, same device.
"""

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from pipeline.models import vocabulary as v
from pipeline.models.pci import HostPciInventory, PciDevice
from pipeline.stages.pci_devspec import FUNCTION_TYPES, DeviceSpec, PciConfigError
from pipeline.stages.pci_pools import NovaPciRequest, Pool, filter_pools, group_pools, pool_key, pool_props

__all__ = ["AllocationOutcome", "PciConfigError", "PciTracker", "ReleaseOutcome", "build_pci_request",
           "invariant_violations"]

IN_USE = (v.PCI_CLAIMED, v.PCI_ALLOCATED)
VNIC_DEV_TYPE = {v.VNIC_DIRECT_PHYSICAL: v.PCI_DEV_TYPE_PF, v.VNIC_VHOST_VDPA: v.PCI_DEV_TYPE_VDPA}
_VF = "a VF or a type-PCI device tagged remote_managed=false (never a PF, vdpa or remote-managed device)"
VNIC_TAKES = {  # for messages: what Nova's pool filters let each vnic type take
    v.VNIC_DIRECT: _VF, v.VNIC_MACVTAP: _VF, v.VNIC_VIRTIO_FORWARDER: _VF,
    v.VNIC_DIRECT_PHYSICAL: "a PF",
    v.VNIC_VHOST_VDPA: "a vdpa device",
    v.VNIC_REMOTE_MANAGED: "a VF tagged remote_managed=true (with a VPD card serial)",
}


class PciRequestLike(Protocol):
    port_id: str
    vnic_type: str
    physical_network: str | None
    numa_policy: str | None
    instance_numa_cells: list[int] | None
    pci_slot: str | None
    claim_only: bool
    trusted: bool | None


@dataclass(frozen=True)
class TrackedDevice:
    device: PciDevice
    pool_props: dict[str, Any]
    pool_key: tuple  # pool_key(pool_props)
    parent: str | None = None
    children: tuple[str, ...] = ()


@dataclass(frozen=True)
class AllocationOutcome:
    port_id: str
    success: bool
    message: str
    stage: str | None = None
    error: str | None = None
    reason: str | None = None
    device: PciDevice | None = None
    candidates: list[str] = field(default_factory=list)
    pci_request: dict[str, Any] | None = None
    pinned: bool = False
    claim_only: bool = False
    blocked: dict[str, str] | None = None
    device_status: str | None = None


@dataclass(frozen=True)
class ReleaseOutcome:
    port_id: str
    released: list[str]
    noop: bool
    message: str


def build_pci_request(request: PciRequestLike) -> NovaPciRequest | None:
    """The InstancePCIRequest nova.network.neutron builds for the port (None: no PCI request)."""
    if request.vnic_type not in v.VNIC_TYPES_NEEDING_PCI:
        return None
    spec: dict[str, Any] = {
        v.PCI_TAG_PHYSICAL_NETWORK: request.physical_network,
        v.PCI_TAG_REMOTE_MANAGED: str(request.vnic_type == v.VNIC_REMOTE_MANAGED),
    }
    if request.vnic_type in VNIC_DEV_TYPE:
        spec["dev_type"] = VNIC_DEV_TYPE[request.vnic_type]
    if request.trusted is not None:
        spec[v.PCI_TAG_TRUSTED] = str(request.trusted)
    return NovaPciRequest(spec=[spec], numa_policy=request.numa_policy)


def _describe(request: PciRequestLike) -> str:
    network = f"physnet {request.physical_network}" if request.physical_network else "a tunnelled network (no physnet)"
    policy = request.numa_policy or f"{v.NUMA_POLICY_LEGACY} (default)"
    cells = (f"instance NUMA cells {request.instance_numa_cells}" if request.instance_numa_cells
             else "no instance NUMA topology, so no NUMA filtering")
    return f"port {request.port_id} (vnic_type {request.vnic_type} on {network}, NUMA policy {policy}, {cells})"


class PciTracker:
    """The PCI devices of one host, their statuses and owners (port ids)."""

    def __init__(self, inventory: HostPciInventory):
        self.inventory = inventory
        self.spec = DeviceSpec(inventory)
        self.spec.check()
        self.host_cells = inventory.numa_topology()
        tracked = {}
        for device in inventory.devices:
            entry = self.spec.match(device)
            if entry is not None:
                props = pool_props(device, entry.tags())
                tracked[device.address] = TrackedDevice(device, props, pool_key(props))
        self._devices = self._link(tracked)
        self._status = dict.fromkeys(self._devices, v.PCI_AVAILABLE)
        self._owner: dict[str, str] = {}

    @staticmethod
    def _link(tracked: dict[str, TrackedDevice]) -> dict[str, TrackedDevice]:
        """Nova's device tree: walking addresses in order, a VF/vdpa hangs under a tracked PF seen before."""
        children: dict[str, list[str]] = {}
        parent_of: dict[str, str] = {}
        for address in sorted(tracked):
            device = tracked[address].device
            if device.dev_type == v.PCI_DEV_TYPE_PF:
                children[address] = []
            elif device.dev_type in FUNCTION_TYPES and device.parent_addr in children:
                children[device.parent_addr].append(address)
                parent_of[address] = device.parent_addr
        return {a: replace(tracked[a], parent=parent_of.get(a), children=tuple(children.get(a, ())))
                for a in sorted(tracked)}

    @classmethod
    def from_inventory(cls, inventory: HostPciInventory) -> "PciTracker":
        """An idle tracker; raises PciConfigError when Nova would reject the implied device_spec."""
        return cls(inventory)

    @classmethod
    def from_snapshot(cls, inventory: HostPciInventory, statuses: Mapping[str, str],
                      owners: Mapping[str, str]) -> "PciTracker":
        """A tracker in a persisted state (tracked devices missing from ``statuses`` are available).

        Only the shape is checked (tracked addresses, known statuses): an inconsistent state is
        loaded as is, so that ``invariant_violations`` can report it.
        """
        return cls(inventory).with_state(statuses, owners)

    def with_state(self, statuses: Mapping[str, str], owners: Mapping[str, str]) -> "PciTracker":
        """A copy of this tracker in a persisted state (see ``from_snapshot``). The copy shares what
        never changes (inventory, device spec, device tree), so an idle tracker built once per
        inventory serves every later load of its host."""
        for name, mapping in (("statuses", statuses), ("owners", owners)):
            unknown = sorted(set(mapping) - set(self._devices))
            if unknown:
                raise ValueError(f"{name}: {', '.join(unknown)} not tracked on this host")
        bad = {a: s for a, s in statuses.items() if s not in v.PCI_STATUSES}
        if bad:
            raise ValueError(f"statuses: unknown status {bad}; expected one of {', '.join(v.PCI_STATUSES)}")
        tracker = copy.copy(self)
        tracker._status = {**dict.fromkeys(self._devices, v.PCI_AVAILABLE), **statuses}
        tracker._owner = {a: p for a, p in owners.items() if p is not None}
        return tracker

    # --- views -------------------------------------------------------------------------------

    @property
    def device_spec(self) -> list[dict]:
        return self.spec.as_config()

    @property
    def untracked(self) -> list[str]:
        return sorted(d.address for d in self.inventory.devices if d.address not in self._devices)

    def tracked(self) -> Mapping[str, TrackedDevice]:
        return self._devices

    def state(self) -> dict[str, str]:
        return dict(self._status)

    def owners(self) -> dict[str, str]:
        return dict(sorted(self._owner.items()))

    def snapshot(self) -> dict[str, tuple[str, str | None]]:
        return {a: (s, self._owner.get(a)) for a, s in self._status.items()}

    def _pools(self, idle: bool = False) -> list[Pool]:
        return group_pools((a, t.pool_key, t.pool_props) for a, t in self._devices.items()
                           if idle or self._status[a] == v.PCI_AVAILABLE)

    def pools(self) -> list[dict[str, Any]]:
        """The PciDeviceStats pools: free devices grouped, with count and addresses."""
        return [p.as_dict() for p in self._pools()]

    # --- allocate ----------------------------------------------------------------------------

    def allocate(self, request: PciRequestLike, prefer: str | None = None) -> AllocationOutcome:
        """Claim (and, unless ``claim_only``, allocate) one device for the port; no change on failure."""
        who = _describe(request)
        held = sorted(a for a, p in self._owner.items() if p == request.port_id)
        if held:
            return AllocationOutcome(request.port_id, False, f"{who}: the port already holds {', '.join(held)}",
                                     v.PCI_STAGE_API, v.PCI_ERR_PORT_IN_USE, v.PCI_REASON_PORT_IN_USE)
        nova_request = build_pci_request(request)
        if nova_request is None:
            return AllocationOutcome(request.port_id, True, f"{who}: Nova builds no PCI request for this vnic type",
                                     v.PCI_STAGE_NO_REQUEST)
        cells = request.instance_numa_cells or None
        pools = self._pools()
        fitting = filter_pools(pools, nova_request, cells, self.host_cells)
        candidates = sorted(a for p in fitting or [] for a in p.devices)
        context = dict(candidates=candidates, pci_request=nova_request.as_dict(), claim_only=request.claim_only)
        if request.pci_slot is not None:
            return self._allocate_pinned(request, nova_request, who, context)
        if filter_pools(pools, nova_request, None, self.host_cells) is None:
            return self._unavailable(v.PCI_STAGE_CLAIM_TEST, request, nova_request, who, context)
        if fitting is None:
            return self._unavailable(v.PCI_STAGE_NUMA_FIT, request, nova_request, who, context)
        address = prefer if prefer in candidates else min(candidates, key=self._choice_rank)
        why = ("the only candidate" if len(candidates) == 1 else "replaying the preferred device" if address == prefer
               else f"chosen among {len(candidates)} candidates: {self._choice_reason(address)}")
        return self._claim(address, request, who, context, why)

    def _choice_rank(self, address: str) -> tuple[int, str]:
        parent = self._devices[address].parent
        if parent is None:
            return 1, address
        return (0 if self._status[parent] != v.PCI_AVAILABLE else 2), address

    def _choice_reason(self, address: str) -> str:
        rank = self._choice_rank(address)[0]
        parent = self._devices[address].parent
        return (f"its PF {parent} already has a function in use (packing keeps whole PFs free)" if rank == 0
                else "it blocks no PF" if rank == 1 else f"lowest address; its PF {parent} becomes blocked")

    def _allocate_pinned(self, request: PciRequestLike, nova_request: NovaPciRequest, who: str,
                         context: dict) -> AllocationOutcome:
        """Claim exactly ``pci_slot``: checks tracked -> status -> spec -> NUMA, on that device alone."""
        slot = request.pci_slot
        context = {**context, "pinned": True}
        tracked = self._devices.get(slot)
        if tracked is None:
            where = "is not in the inventory" if self.inventory.device(slot) is None else "matches no device_spec entry"
            return AllocationOutcome(
                request.port_id, False, f"{who}: pci_slot {slot} {where}, so Nova does not track it",
                v.PCI_STAGE_PCI_CLAIM, v.PCI_ERR_NOT_FOUND, v.PCI_REASON_DEVICE_NOT_FOUND, **context)
        status = self._status[slot]
        if status != v.PCI_AVAILABLE:
            owner = self._owner.get(slot)
            detail = f"held by port {owner}" if owner else self._blocked_by(slot)
            return AllocationOutcome(request.port_id, False, f"{who}: pci_slot {slot} is {status} ({detail})",
                                     v.PCI_STAGE_PCI_CLAIM, v.PCI_ERR_INVALID_STATUS,
                                     v.PCI_REASON_DEVICE_NOT_AVAILABLE, device_status=status, **context)
        alone = [Pool(tracked.pool_props, [slot])]
        if filter_pools(alone, nova_request, None, self.host_cells) is None:
            return AllocationOutcome(
                request.port_id, False,
                f"{who}: pci_slot {slot} ({tracked.device.dev_type}, pool {tracked.pool_props}) does not match "
                f"the request spec {nova_request.spec}", v.PCI_STAGE_PCI_CLAIM, v.PCI_ERR_REQUEST_FAILED,
                v.PCI_REASON_DEVICE_MISMATCH, **context)
        if filter_pools(alone, nova_request, request.instance_numa_cells or None, self.host_cells) is None:
            return AllocationOutcome(
                request.port_id, False,
                f"{who}: pci_slot {slot} is on NUMA node {tracked.device.numa_node}, which that NUMA policy excludes",
                v.PCI_STAGE_PCI_CLAIM, v.PCI_ERR_REQUEST_FAILED, v.PCI_REASON_DEVICE_NUMA_AFFINITY, **context)
        return self._claim(slot, request, who, context, "pinned by pci_slot")

    def _blocked_by(self, address: str) -> str:
        """Which in-use relatives keep ``address`` unclaimable/unavailable, for messages."""
        tracked = self._devices[address]
        relatives = [a for a in (tracked.parent, *tracked.children) if a and self._status[a] in IN_USE]
        if not relatives:
            return "no related device in use"
        return "blocked by " + ", ".join(f"{a} {self._status[a]} by port {self._owner.get(a)}" for a in relatives)

    def _unavailable(self, stage: str, request: PciRequestLike, nova_request: NovaPciRequest, who: str,
                     context: dict) -> AllocationOutcome:
        """ComputeResourcesUnavailable, with why: judged against the same host with every device free."""
        cells = request.instance_numa_cells or None
        idle = self._pools(idle=True)
        matching = filter_pools(idle, nova_request, None, self.host_cells)
        suitable = filter_pools(idle, nova_request, cells, self.host_cells) if matching else None
        blocked = None
        if matching is None:
            reason = v.PCI_REASON_NO_MATCHING_DEVICE
            why = (f"no tracked device can serve it: it needs {VNIC_TAKES[request.vnic_type]} "
                   f"whose device_spec tags match {nova_request.spec}, whatever its state")
        elif suitable is None:
            reason = v.PCI_REASON_NUMA_AFFINITY
            nodes = sorted({self._devices[a].device.numa_node for p in matching for a in p.devices}, key=str)
            why = (f"matching devices exist only on NUMA node(s) {nodes}; even on an idle host none satisfies "
                   "the NUMA policy")
            if any(c.socket is None for c in self.host_cells) and request.numa_policy == v.NUMA_POLICY_SOCKET:
                why += " (the host reports no socket for some NUMA cell, so 'socket' allows only the instance's nodes)"
        else:
            reason = v.PCI_REASON_EXHAUSTED
            blocked = {a: self._status[a] for p in suitable for a in sorted(p.devices)
                       if self._status[a] != v.PCI_AVAILABLE}
            why = "every suitable device is in use or blocked by PF/VF exclusion: " + "; ".join(
                f"{a} {s} ({'port ' + self._owner[a] if a in self._owner else self._blocked_by(a)})"
                for a, s in sorted(blocked.items()))
        return AllocationOutcome(request.port_id, False, f"{who}: {stage} failed: {why}", stage,
                                 v.PCI_ERR_RESOURCES_UNAVAILABLE, reason, blocked=blocked, **context)

    def _claim(self, address: str, request: PciRequestLike, who: str, context: dict, why: str) -> AllocationOutcome:
        conflict = self._claim_conflict(address)
        if conflict:
            error, relative = conflict
            return AllocationOutcome(
                request.port_id, False, f"{who}: {address} cannot be claimed: {relative} is {self._status[relative]}",
                v.PCI_STAGE_PCI_CLAIM, error, v.PCI_REASON_DEVICE_NOT_AVAILABLE, **context)
        self._claim_device(address, request.port_id)
        if not request.claim_only:
            self._allocate_device(address)
        tracked = self._devices[address]
        verb = "claimed" if request.claim_only else "allocated"
        device = tracked.device
        return AllocationOutcome(
            request.port_id, True,
            f"{who}: {verb} {address} ({device.dev_type}, NUMA node {device.numa_node}, "
            f"physnet {device.physical_network}); {why}", device=device, **context)

    # --- Nova's PciDevice transitions --------------------------------------------------------

    def _claim_conflict(self, address: str) -> tuple[str, str] | None:
        """The check PciDevice.claim makes on relatives (fails only on an inconsistent state)."""
        tracked = self._devices[address]
        tolerated = (v.PCI_AVAILABLE, v.PCI_UNCLAIMABLE, v.PCI_UNAVAILABLE)  # bug 1969496: warn, don't fail
        for child in tracked.children:
            if self._status[child] not in tolerated:
                return v.PCI_ERR_VF_INVALID_STATUS, child
        if tracked.parent and self._status[tracked.parent] not in tolerated:
            return v.PCI_ERR_PF_INVALID_STATUS, tracked.parent
        return None

    def _claim_device(self, address: str, port_id: str) -> None:
        tracked = self._devices[address]
        for child in tracked.children:
            self._status[child] = v.PCI_UNCLAIMABLE
        if tracked.parent and self._status[tracked.parent] == v.PCI_AVAILABLE:
            self._status[tracked.parent] = v.PCI_UNCLAIMABLE
        self._status[address] = v.PCI_CLAIMED
        self._owner[address] = port_id

    def _allocate_device(self, address: str) -> None:
        tracked = self._devices[address]
        for child in tracked.children:
            self._status[child] = v.PCI_UNAVAILABLE
        if tracked.parent:
            self._status[tracked.parent] = v.PCI_UNAVAILABLE
        self._status[address] = v.PCI_ALLOCATED

    def _free_device(self, address: str) -> None:
        tracked = self._devices[address]
        for child in tracked.children:
            self._status[child] = v.PCI_AVAILABLE
        if tracked.parent:
            siblings = self._devices[tracked.parent].children
            if all(self._status[s] == v.PCI_AVAILABLE for s in siblings if s != address):
                self._status[tracked.parent] = v.PCI_AVAILABLE
        self._status[address] = v.PCI_AVAILABLE
        del self._owner[address]

    # --- release -----------------------------------------------------------------------------

    def release(self, port_id: str) -> ReleaseOutcome:
        """Free everything the port holds (Nova's free_instance); unknown ports are a no-op."""
        held = sorted(a for a, p in self._owner.items() if p == port_id and self._status[a] in IN_USE)
        for address in held:
            self._free_device(address)
        if not held:
            return ReleaseOutcome(port_id, [], True, f"port {port_id} holds no PCI device; nothing to release")
        return ReleaseOutcome(port_id, held, False, f"port {port_id} released {', '.join(held)}")


def invariant_violations(tracker: PciTracker) -> list[str]:
    """Every way the tracker's statuses and owners break Nova's PF/VF accounting rules."""
    status, owners = tracker.state(), tracker.owners()
    problems = []
    ports: dict[str, list[str]] = {}
    for address, port in owners.items():
        ports.setdefault(port, []).append(address)
        if status[address] not in IN_USE:
            problems.append(f"{address} is {status[address]} but owned by port {port}")
    problems += [f"port {port} holds several devices: {', '.join(held)}"
                 for port, held in ports.items() if len(held) > 1]
    for address, tracked in tracker.tracked().items():
        state = status[address]
        parent = status[tracked.parent] if tracked.parent else None
        children = {c: status[c] for c in tracked.children}
        if state in IN_USE:
            if address not in owners:
                problems.append(f"{address} is {state} without an owner")
            busy = [c for c, s in children.items() if s in IN_USE]
            if busy:
                problems.append(f"PF {address} is {state} together with its functions {', '.join(busy)}")
            blocked = v.PCI_UNCLAIMABLE if state == v.PCI_CLAIMED else v.PCI_UNAVAILABLE
            wrong = [c for c, s in children.items() if s not in IN_USE and s != blocked]
            if wrong:
                problems.append(f"PF {address} is {state} but its functions {', '.join(wrong)} are not {blocked}")
            if parent is not None and parent != v.PCI_UNAVAILABLE and not (
                    parent == v.PCI_UNCLAIMABLE and state == v.PCI_CLAIMED):
                problems.append(f"{address} is {state} but its PF {tracked.parent} is {parent}")
        elif state == v.PCI_UNCLAIMABLE and parent != v.PCI_CLAIMED and v.PCI_CLAIMED not in children.values():
            problems.append(f"{address} is unclaimable but no related device is claimed")
        elif state == v.PCI_UNAVAILABLE and parent != v.PCI_ALLOCATED and not any(
                s in IN_USE for s in children.values()):
            problems.append(f"{address} is unavailable but no related device is in use")
    return problems
