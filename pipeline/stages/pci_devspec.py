"""The ``[pci] device_spec`` a host inventory implies, and Nova's first-match matching of it.

Derivation (conformance/pci README), walking the inventory in order:

* a tracked PF whose VF/vdpa children are all tracked and carry the PF's tags gets one entry on
  its address; sysfs says that address is a PF, so Nova matches the children through it too;
* any other PF group gets one exact-address entry per tracked child, then (if the PF is tracked)
  an anchored-regex entry for the PF, which does not pull the children in;
* each tracked type-PCI device, and each tracked VF/vdpa whose parent is not a PF of the
  inventory, gets one exact-address entry.

Entries never carry vendor_id/product_id, only the tags ``physical_network`` and
``remote_managed`` ("true"/"false").

Matching follows nova.pci.devspec / whitelist: the *first* entry that matches a device supplies its
tags, and a device no entry matches is not tracked at all. An entry tagged remote_managed=true
matches only a device with a VPD card serial number; libvirt reports the PF's serial for a type-VF
that has none of its own (not for vdpa devices). Nova refuses at start-up a remote_managed=true entry
on a PF address: it looks the PF's VF product id up in sysfs, which raises PciDeviceNotFoundById.
"""

from dataclasses import dataclass

from pipeline.models import vocabulary as v
from pipeline.models.pci import HostPciInventory, PciDevice

FUNCTION_TYPES = (v.PCI_DEV_TYPE_VF, v.PCI_DEV_TYPE_VDPA)


class PciConfigError(Exception):
    """A device_spec Nova would reject; ``error`` is the Nova exception class name."""

    def __init__(self, error: str, message: str):
        super().__init__(f"{error}: {message}")
        self.error = error
        self.message = message


@dataclass(frozen=True)
class SpecEntry:
    """One device_spec entry, written for one device address.

    ``by_regex``: the address is given as anchored per-field regexes, so it matches exactly that
    address; a plain address that names a PF also matches the PF's children.
    """

    address: str
    by_regex: bool
    physical_network: str | None
    remote_managed: bool | None

    def tags(self) -> dict[str, str]:
        tags = {}
        if self.physical_network is not None:
            tags[v.PCI_TAG_PHYSICAL_NETWORK] = self.physical_network
        if self.remote_managed is not None:
            tags[v.PCI_TAG_REMOTE_MANAGED] = "true" if self.remote_managed else "false"
        return tags

    def as_config(self) -> dict:
        """The entry as an operator would write it in nova.conf."""
        address: str | dict[str, str] = self.address
        if self.by_regex:
            domain, bus, rest = self.address.split(":")
            slot, function = rest.split(".")
            address = {"domain": f"^{domain}$", "bus": f"^{bus}$", "slot": f"^{slot}$", "function": f"^{function}$"}
        return {"address": address, **self.tags()}


def _entry(device: PciDevice, by_regex: bool = False) -> SpecEntry:
    return SpecEntry(device.address, by_regex, device.physical_network, device.remote_managed)


def _same_tags(a: PciDevice, b: PciDevice) -> bool:
    return (a.physical_network, a.remote_managed) == (b.physical_network, b.remote_managed)


class DeviceSpec:
    """The device_spec implied by ``inventory`` (``check`` says whether Nova would accept it)."""

    def __init__(self, inventory: HostPciInventory):
        self._inventory = inventory
        self._pfs = {d.address: d for d in inventory.devices if d.dev_type == v.PCI_DEV_TYPE_PF}
        self.entries = self._derive()

    def _derive(self) -> list[SpecEntry]:
        entries: list[SpecEntry] = []
        for device in self._inventory.devices:
            if device.dev_type == v.PCI_DEV_TYPE_PF:
                children = [d for d in self._inventory.devices
                            if d.dev_type in FUNCTION_TYPES and d.parent_addr == device.address]
                if device.tracked and all(c.tracked and _same_tags(c, device) for c in children):
                    entries.append(_entry(device))
                    continue
                entries += [_entry(c) for c in children if c.tracked]
                if device.tracked:
                    entries.append(_entry(device, by_regex=True))
            elif device.tracked and (device.dev_type == v.PCI_DEV_TYPE_PCI or device.parent_addr not in self._pfs):
                entries.append(_entry(device))
        return entries

    def check(self) -> None:
        """Raise PciConfigError where Nova refuses the device_spec at start-up."""
        for index, entry in enumerate(self.entries):
            if entry.remote_managed and not entry.by_regex and entry.address in self._pfs:
                raise PciConfigError(
                    v.PCI_ERR_NOT_FOUND_BY_ID,
                    f"PCI device {entry.address} not found: device_spec entry {index} tags the PF "
                    f"{entry.address} remote_managed=true; Nova then looks up the product id of that "
                    "PF's VFs in sysfs and refuses to start (remote-managed PFs are not supported, "
                    "tag its VFs instead)")

    def card_serial_number(self, device: PciDevice) -> str | None:
        """The serial libvirt reports: the device's own VPD, or for a type-VF its PF's."""
        serial = device.card_serial_number
        if serial is None and device.dev_type == v.PCI_DEV_TYPE_VF and device.parent_addr:
            parent = self._inventory.device(device.parent_addr)
            serial = parent.card_serial_number if parent else None
        return serial

    def _matches(self, entry: SpecEntry, device: PciDevice) -> bool:
        if entry.remote_managed and not self.card_serial_number(device):
            return False
        if device.address == entry.address:
            return True
        return not entry.by_regex and entry.address in self._pfs and device.parent_addr == entry.address

    def match(self, device: PciDevice) -> SpecEntry | None:
        """The first entry matching ``device`` (None: Nova does not track it)."""
        return next((e for e in self.entries if self._matches(e, device)), None)

    def as_config(self) -> list[dict]:
        return [e.as_config() for e in self.entries]
