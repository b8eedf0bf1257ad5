"""Why a port did not bind, in a bounded vocabulary: categories for metrics labels, and the one
decline that best explains a failure to a person.

First matching rule wins (case-insensitive search in the text); a text that already is a
category maps to itself; anything else is "other".
"""

import functools
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.models.binding import Decline

FAILURE_REASONS = (
    "no_agent", "agent_dead", "vnic_type_unsupported", "vnic_type_prohibited", "physnet_unmapped",
    "network_type_unsupported", "switchdev_mismatch", "pci_exhausted", "pci_no_matching_device",
    "pci_numa_affinity", "pci_pinned_device", "driver_error", "invalid_input", "policy", "config_error",
    "not_applicable", "other",
)

# | category                 | texts it covers (as the stages and drivers write them)                          |
# |--------------------------|----------------------------------------------------------------------------------|
# | invalid_input            | "InvalidInput: …" (validation)                                                   |
# | policy                   | "PolicyNotAuthorized: …", "… not authorized …"                                   |
# | config_error             | "ConfigError: …"                                                                 |
# | driver_error             | "raised KeyError: …" (a driver raised), "driver error"                           |
# | pci_no_matching_device   | "no tracked device matches the request spec …", no_matching_device                |
# | pci_numa_affinity        | "… the NUMA policy", "… on NUMA node N …", numa_affinity, device_numa_affinity    |
# | pci_exhausted            | "every suitable device is in use …", exhausted, no_vf_available,                 |
# |                          | a bare ComputeResourcesUnavailable                                               |
# | pci_pinned_device        | a profile pci_slot that is not tracked / not free / not matching:                |
# |                          | "pci_slot …", device_not_found, device_not_available, device_mismatch,           |
# |                          | PciDeviceNotFound, PciDeviceInvalidStatus, PciDeviceRequestFailed, PciDevice*…  |
# | switchdev_mismatch       | "vnic_type direct without/with the switchdev capability", OVN external ports     |
# | vnic_type_prohibited     | "vnic_type X prohibited by configuration"                                        |
# | vnic_type_unsupported    | "vnic_type X not supported", "does not report baremetal_smartnic"                |
# | network_type_unsupported | "network type X not supported by …"                                              |
# | physnet_unmapped         | "physnet1 not in bridge_mappings / device_mappings / interface_mappings /        |
# |                          | ovn-bridge-mappings …"                                                           |
# | agent_dead               | "NIC Switch agent on host-1 is dead", "OVN chassis on host-1 is dead"            |
# | no_agent                 | "no Open vSwitch agent registered on host …", "no OVN chassis for host …"        |
# | not_applicable           | "l2population never binds ports"                                                 |
# | other                    | everything else (e.g. "network has no segments", routed-network and binding-level |
# |                          | declines, macvtap live-migration mismatch, PortInUse)                            |
_REASON_RULES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (category, re.compile(pattern, re.IGNORECASE)) for category, pattern in (
        ("invalid_input", r"^\s*InvalidInput\b"),
        ("policy", r"^\s*PolicyNotAuthorized\b|\bnot authori[sz]ed\b"),
        ("config_error", r"^\s*ConfigError\b"),
        ("driver_error", r"\braised [A-Za-z_][\w.]*|\bdriver error\b"),
        ("pci_no_matching_device", r"no_matching_device|no tracked device matches|no matching (pci )?device"),
        ("pci_exhausted", r"\bexhausted\b|every suitable device is in use|no_vf_available"
                          r"|no (free|available) (vfs?|devices?)\b"),
        ("pci_numa_affinity", r"\bNUMA (policy|node)\b|numa_affinity"),
        ("pci_pinned_device", r"pci_slot|device_not_found|device_not_available|device_mismatch"
                              r"|PciDevice(NotFound|InvalidStatus|RequestFailed|VFInvalidStatus|PFInvalidStatus)"),
        ("pci_exhausted", r"ComputeResourcesUnavailable"),
        ("switchdev_mismatch", r"\b(with|without)( the)? switchdev\b"),
        ("vnic_type_prohibited", r"vnic_type \S+ prohibited"),
        ("vnic_type_unsupported", r"vnic_type \S+ not supported|baremetal_smartnic"),
        ("network_type_unsupported", r"network[ _]type \S+ not supported"),
        ("physnet_unmapped", r"\bnot in \S*mappings\b"),
        ("agent_dead", r"\bis dead\b"),
        ("no_agent", r"^\s*no \b.*\b(agent|chassis)\b"),
        ("not_applicable", r"\bnever binds\b"),
    ))


@functools.lru_cache(maxsize=4096)
def failure_reason_category(text: str) -> str:
    """The bounded ``reason`` label for a free-text decline or error (see the table above)."""
    if not text:
        return "other"
    stripped = text.strip()
    if stripped in FAILURE_REASONS:
        return stripped
    for category, pattern in _REASON_RULES:
        if pattern.search(stripped):
            return category
    return "other"



#: Most telling first: a driver that could have served the port and why it could not beats a
#: driver for which the port was never a candidate.
EXPLAINING_ORDER = (
    "invalid_input", "policy", "config_error", "pci_pinned_device", "pci_numa_affinity", "pci_exhausted",
    "pci_no_matching_device", "agent_dead", "physnet_unmapped", "network_type_unsupported", "driver_error",
    "vnic_type_prohibited", "no_agent", "other", "switchdev_mismatch", "vnic_type_unsupported", "not_applicable",
)


def primary_decline(declines: list["Decline"]) -> "Decline | None":
    """The decline that explains a failed binding best (ties: the earliest driver tried)."""
    if not declines:
        return None
    return min(declines, key=lambda d: EXPLAINING_ORDER.index(failure_reason_category(d.reason)))
