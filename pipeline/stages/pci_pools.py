"""PciDeviceStats pools and Nova's pool filtering (nova.pci.stats), without placement.

A pool groups free devices with equal product_id, vendor_id, numa_node, dev_type, the tags of
their device_spec entry, and ``address`` = the parent PF address for VFs and vdpa devices (their
own address otherwise), so pools are split per PF. VF/PF/vdpa pools without a remote_managed tag
get remote_managed "false"; a type-PCI pool without the tag has no such key, so no port request
(which always asks for remote_managed) matches it.

``filter_pools`` replays ``PciDeviceStats._filter_pools`` step by step, including its counting
quirks: the NUMA step decides whether the stricter set is "enough" by counting devices that the
later PF / vdpa / remote-managed steps may still drop.
"""

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pipeline.models import vocabulary as v
from pipeline.models.pci import NumaNode, PciDevice

POOL_DEFAULT_REMOTE_MANAGED_TYPES = (v.PCI_DEV_TYPE_VF, v.PCI_DEV_TYPE_PF, v.PCI_DEV_TYPE_VDPA)
TRUE_STRINGS = frozenset({"1", "t", "true", "on", "y", "yes"})


@dataclass(frozen=True)
class NovaPciRequest:
    """An InstancePCIRequest as Nova builds it for one Neutron port."""

    spec: list[dict[str, Any]]
    numa_policy: str | None
    count: int = 1

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "spec": [dict(s) for s in self.spec], "numa_policy": self.numa_policy}


@dataclass
class Pool:
    props: dict[str, Any]
    devices: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.devices)

    def as_dict(self) -> dict[str, Any]:
        return {**self.props, "count": self.count, "devices": sorted(self.devices)}


def pool_props(device: PciDevice, tags: dict[str, str]) -> dict[str, Any]:
    props: dict[str, Any] = {
        "product_id": device.product_id, "vendor_id": device.vendor_id,
        "numa_node": device.numa_node, "dev_type": device.dev_type, **tags,
        "address": device.parent_addr or device.address,
    }
    if device.dev_type in POOL_DEFAULT_REMOTE_MANAGED_TYPES and props.get(v.PCI_TAG_REMOTE_MANAGED) is None:
        props[v.PCI_TAG_REMOTE_MANAGED] = "false"
    return props


def pool_key(props: dict[str, Any]) -> tuple:
    """What makes two devices' pool the same: their props, in key order."""
    return tuple(sorted(props.items(), key=lambda kv: kv[0]))


def group_pools(devices: Iterable[tuple[str, tuple, dict[str, Any]]]) -> list[Pool]:
    """Group ``(address, pool_key(props), props)`` into pools; fewer keys first, as Nova keeps
    them. (The key is the caller's to compute once a device: building it for every device at
    every allocation was half of an allocation's cost.)"""
    pools: dict[tuple, Pool] = {}
    for address, key, props in devices:
        pool = pools.get(key)
        if pool is None:
            pool = pools[key] = Pool(dict(props))
        pool.devices.append(address)
    return sorted(pools.values(), key=lambda p: (len(p.props), min(p.devices)))


def bool_from_string(value: Any) -> bool:
    """oslo strutils.bool_from_string with its default (unknown -> False)."""
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in TRUE_STRINGS if value is not None else False


def prop_match(props: dict[str, Any], specs: list[dict[str, Any]]) -> bool:
    """nova.pci.utils.pci_device_prop_match: any spec whose every key equals the pool's value
    (strings compared case-insensitively, list values as subsets)."""

    def norm(value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    def matches(spec: dict[str, Any]) -> bool:
        for key, wanted in spec.items():
            have = props.get(key)
            if isinstance(wanted, list) and isinstance(have, list):
                if not all(x in have for x in wanted):
                    return False
            elif norm(have) != norm(wanted):
                return False
        return True

    return any(matches(spec) for spec in specs)


def _total(pools: list[Pool]) -> int:
    return sum(p.count for p in pools)


def _on_nodes(pools: list[Pool], nodes: Iterable[int | None]) -> list[Pool]:
    allowed = set(nodes)
    return [p for p in pools if p.props["numa_node"] in allowed]


def _socket_affinity(pools: list[Pool], cells: list[int], host_cells: list[NumaNode]) -> list[Pool]:
    """Pools on any host node sharing a socket with the instance's cells; none without socket info."""
    if any(cell.socket is None for cell in host_cells):
        return []
    sockets = {cell.socket for cell in host_cells if cell.id in cells}
    return _on_nodes(pools, [cell.id for cell in host_cells if cell.socket in sockets])


def _filter_for_numa(pools: list[Pool], request: NovaPciRequest, cells: list[int] | None,
                    host_cells: list[NumaNode]) -> list[Pool]:
    """PciDeviceStats._filter_pools_for_numa_cells: strictest set with enough devices, per policy."""
    if not cells:
        return pools
    policy = request.numa_policy or v.NUMA_POLICY_LEGACY
    local = _on_nodes(pools, cells)
    if policy == v.NUMA_POLICY_REQUIRED or _total(local) >= request.count:
        return local
    if policy == v.NUMA_POLICY_SOCKET:
        return _socket_affinity(pools, cells, host_cells)
    local_or_unknown = _on_nodes(pools, [*cells, None])
    if policy == v.NUMA_POLICY_LEGACY or _total(local_or_unknown) >= request.count:
        return local_or_unknown
    return sorted(pools, key=lambda p: p.props["numa_node"] not in (*cells, None))


def _requested(request: NovaPciRequest, key: str, value: str) -> bool:
    return any(spec.get(key) == value for spec in request.spec)


def filter_pools(pools: list[Pool], request: NovaPciRequest, cells: list[int] | None,
                 host_cells: list[NumaNode]) -> list[Pool] | None:
    """PciDeviceStats._filter_pools: the pools that can serve ``request``, or None."""
    pools = [p for p in pools if prop_match(p.props, request.spec)]
    if _total(pools) < request.count:
        return None
    pools = _filter_for_numa(pools, request, cells, host_cells)
    if _total(pools) < request.count:
        return None
    if not _requested(request, "dev_type", v.PCI_DEV_TYPE_PF):
        pools = [p for p in pools if p.props["dev_type"] != v.PCI_DEV_TYPE_PF]
    if _total(pools) < request.count:
        return None
    if not _requested(request, "dev_type", v.PCI_DEV_TYPE_VDPA):
        pools = [p for p in pools if p.props["dev_type"] != v.PCI_DEV_TYPE_VDPA]
    if not any(bool_from_string(spec.get(v.PCI_TAG_REMOTE_MANAGED)) for spec in request.spec):
        pools = [p for p in pools if not bool_from_string(p.props.get(v.PCI_TAG_REMOTE_MANAGED))]
    if _total(pools) < request.count:
        return None
    return pools
