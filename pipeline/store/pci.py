"""The database allocator: Nova's rules (``pipeline.stages.pci_accounting``) over locked rows.

A host's inventory row is its lock: every writer of the host's device rows locks it first
(``FOR UPDATE``), then reads the device rows (a fresh snapshot, taken once the lock is held), the
in-memory tracker is rebuilt from them, the stage logic runs, and only the rows whose status or
owner changed are written back. The device rows themselves are not locked: a row lock writes its
tuple, and a batch reads every device of its hosts (measured: 6.6 row locks a binding, one WAL
record each). The lock orders one host's allocations; the owner column, the partial unique index
and the PF/VF exclusion constraint make double allocation impossible even if code erred.

Devices pending removal (Nova's ``PciDevTracker.to_be_removed_when_freed``): a device in use that
an inventory no longer reports, or reports without Nova tracking it any more (``tracked: false``,
i.e. dropped from the device_spec), keeps its last tracked entry in the stored inventory, its row
and its allocation. The host's stored inventory (``HostInventoryRow.inventory``) remembers it under
``pending_removal``: address -> the entry last reported for it (``null`` when it was not reported).
When its port releases it, it is freed first (PF/VF dependents change as Nova's free says: its PF
becomes available if no other function is in use, its VFs become available), then removed: its
row is deleted and its inventory entry dropped (or replaced by the untracked reported one), so it
is never allocated again. A later inventory that reports it tracked again un-marks it.
"""

import collections
import threading
from typing import Any

import orjson
from sqlalchemy import bindparam, delete, literal_column, select, text, update
from sqlalchemy.orm import Session

from pipeline.db import among, insert_rows
from pipeline.models import vocabulary as v
from pipeline.models.binding import AllocationDecision, SelectionOutcome
from pipeline.models.pci import HostPciInventory, PciDevice
from pipeline.models.tables import HostInventoryRow, PciDeviceRow, utcnow
from pipeline.models.topology import Network
from pipeline.stages.allocation import allocate_device, pci_request_for
from pipeline.stages.pci_accounting import PciTracker
from pipeline.stages.pci_devspec import DeviceSpec
from pipeline.stages.validation import ValidatedRequest

PENDING_REMOVAL = "pending_removal"
DeviceStates = dict[str, tuple[str, str | None]]  # a host's devices as loaded: address -> (status, owner)
STATE_COLUMNS = (PciDeviceRow.host, PciDeviceRow.address, PciDeviceRow.status, PciDeviceRow.owner_port_id)


def host_devices(session: Session, host: str) -> dict[str, PciDeviceRow]:
    """The host's device rows (its inventory row locked first: see the module's docstring)."""
    rows = session.scalars(select(PciDeviceRow).where(PciDeviceRow.host == host).order_by(PciDeviceRow.address)).all()
    return {r.address: r for r in rows}


def stored_inventory(inventory_row: HostInventoryRow) -> tuple[HostPciInventory, dict[str, dict[str, Any] | None]]:
    """The stored (tracked) inventory of a host and its devices pending removal."""
    return _parse_inventory(inventory_row.inventory or {})


def _parse_inventory(stored: dict[str, Any]) -> tuple[HostPciInventory, dict[str, dict[str, Any] | None]]:
    data = dict(stored)
    pending = data.pop(PENDING_REMOVAL, None) or {}
    return HostPciInventory.model_validate(data), dict(pending)


def _save_inventory(inventory_row: HostInventoryRow, inventory: HostPciInventory,
                    pending: dict[str, dict[str, Any] | None]) -> None:
    data = inventory.model_dump(mode="json")
    if pending:
        data[PENDING_REMOVAL] = dict(sorted(pending.items()))
    inventory_row.inventory = data  # a new dict: JSON columns do not track in-place changes


def _load(session: Session, host: str):  # noqa: ANN202
    """(tracker, device states, pending) for ``host``, locked; tracker None when it has no inventory."""
    return _load_hosts(session, [host])[host]


class _IdleTrackers:
    """Parsed idle trackers by inventory version, the least recently used dropped beyond ``kept``
    (512 hosts of ~65 KiB each, for a PF and 32 VFs). Thread-safe: tests allocate from threads."""

    def __init__(self, kept: int = 512):
        self.kept, self.lock = kept, threading.Lock()
        self.entries: collections.OrderedDict[tuple, tuple[PciTracker, dict[str, Any]]] = collections.OrderedDict()

    def get(self, key: tuple) -> tuple[PciTracker, dict[str, Any]] | None:
        with self.lock:
            entry = self.entries.get(key)
            if entry is not None:
                self.entries.move_to_end(key)
            return entry

    def put(self, key: tuple, entry: tuple[PciTracker, dict[str, Any]]) -> None:
        with self.lock:
            self.entries[key] = entry
            while len(self.entries) > self.kept:
                self.entries.popitem(last=False)


# On PostgreSQL a stored inventory is known by its row version: the transaction that wrote it
# (``xmin``, never reused while the row lives) and its ``updated_at`` (which tells apart two writes
# of one transaction). Locking a host reads only that; the inventory itself (~65 KiB a host) is
# read and parsed only when that version's tracker is not kept. SQLite reads the inventory with
# the lock, and its content is its version.
_ROW_VERSION = literal_column("xmin::text")
_IDLE_TRACKERS = _IdleTrackers()


def _load_hosts(session: Session, hosts: list[str]) -> dict[str, tuple]:
    """``_load`` for many hosts in a few statements; their inventory rows are locked in host order,
    as everywhere else, so two workers never wait for each other in a cycle."""
    hosts = sorted(set(hosts))
    postgres = session.get_bind().dialect.name == "postgresql"
    keys: dict[str, tuple] = {}
    inventories: dict[str, Any] = {}
    for host, version, updated_at in session.execute(
            select(HostInventoryRow.host, _ROW_VERSION if postgres else HostInventoryRow.inventory,
                   HostInventoryRow.updated_at)
            .where(among(session, HostInventoryRow.host, hosts)).order_by(HostInventoryRow.host).with_for_update()):
        if postgres:
            keys[host] = (host, version, updated_at)
        else:
            keys[host], inventories[host] = (host, orjson.dumps(version)), version
    idle = {host: _IDLE_TRACKERS.get(key) for host, key in keys.items()}
    missing = [host for host, entry in idle.items() if entry is None]
    if missing and postgres:
        inventories = dict(session.execute(select(HostInventoryRow.host, HostInventoryRow.inventory)
                                           .where(among(session, HostInventoryRow.host, missing))).all())
    for host in missing:
        idle[host] = _idle_tracker(inventories[host] or {})
        _IDLE_TRACKERS.put(keys[host], idle[host])
    devices: dict[str, DeviceStates] = {}
    for host, address, status, owner in session.execute(
            select(*STATE_COLUMNS).where(among(session, PciDeviceRow.host, keys))
            .order_by(PciDeviceRow.host, PciDeviceRow.address)):
        devices.setdefault(host, {})[address] = (status, owner)
    loaded: dict[str, tuple] = {}
    for host in hosts:
        if host not in idle:
            loaded[host] = (None, {}, {})
            continue
        tracker, pending = idle[host]
        rows = devices.get(host, {})
        loaded[host] = (tracker.with_state({a: status for a, (status, _) in rows.items()},
                                           {a: owner for a, (_, owner) in rows.items() if owner}),
                        rows, dict(pending))
    return loaded


def _idle_tracker(stored: dict[str, Any]) -> tuple[PciTracker, dict[str, dict[str, Any] | None]]:
    """The idle tracker of a stored inventory (and its devices pending removal): parsing an
    inventory and matching its devices to the device spec cost ~0.2 ms a host, so it is kept
    (``_IDLE_TRACKERS``) for as long as the inventory does not change."""
    inventory, pending = _parse_inventory(stored)
    return PciTracker.from_inventory(inventory), pending


def tracker_for(session: Session, host: str) -> tuple[PciTracker | None, DeviceStates]:
    tracker, rows, _ = _load(session, host)
    return tracker, rows


class PciStateConflict(Exception):
    """A device's stored state was not the one loaded under its host's lock: some writer did not
    take the lock. Raised rather than overwriting it (an overwrite could hand a device to two ports)."""


def write_back(session: Session, hosts: list[tuple[str, PciTracker, DeviceStates]]) -> None:
    """Persist changed statuses and owners (``hosts``: name, tracker, the states as loaded), in two
    steps: first every row that loses its owner (or changes only its status), then every row that
    gains one. So no port is ever seen holding two devices of a host (a device passed from one port
    to another while the first takes a new one), nor the PF/VF constraint a transient overlap.
    Each row is written only if it still holds the state it was loaded with (``PciStateConflict``
    otherwise). On PostgreSQL each step is one statement over a JSON recordset (one UPDATE per
    device was ~10 µs of PostgreSQL a binding)."""
    losing: list[dict[str, Any]] = []
    gaining: list[dict[str, Any]] = []
    for host, tracker, rows in hosts:
        for address, (status, owner) in tracker.snapshot().items():
            if address not in rows or rows[address] == (status, owner):
                continue
            old_status, old_owner = rows[address]
            if owner is None or owner == old_owner:
                losing.append(_change(host, address, (old_status, old_owner), (status, owner)))
                continue
            if old_owner is not None:  # passed on: let go first
                losing.append(_change(host, address, (old_status, old_owner), (status, None)))
                old_status = status
            gaining.append(_change(host, address, (old_status, None), (status, owner)))
    for step in (losing, gaining):
        if step:
            written = _update_devices(session, step)
            if written != len(step):
                raise PciStateConflict(f"{len(step) - written} of {len(step)} PCI device rows changed under "
                                       f"their host's lock (hosts {sorted({c['h'] for c in step})})")


def _change(host: str, address: str, old: tuple[str, str | None], new: tuple[str, str | None]) -> dict[str, Any]:
    return {"h": host, "a": address, "old_s": old[0], "old_o": old[1], "s": new[0], "o": new[1]}


_PG_UPDATE_DEVICES = text(
    "UPDATE pci_devices AS d SET status = c.s, owner_port_id = c.o, updated_at = :now "
    "FROM json_to_recordset(CAST(:rows AS json)) AS c(h varchar, a varchar, s varchar, o varchar, "
    "old_s varchar, old_o varchar) "
    "WHERE d.host = c.h AND d.address = c.a AND d.status = c.old_s AND d.owner_port_id IS NOT DISTINCT FROM c.old_o")


def _update_devices(session: Session, changes: list[dict[str, Any]]) -> int:
    """Apply ``changes`` (host, address, new and loaded state); how many rows were written."""
    if session.get_bind().dialect.name == "postgresql":
        return session.execute(_PG_UPDATE_DEVICES, {"rows": orjson.dumps(changes).decode(), "now": utcnow()}).rowcount
    table = PciDeviceRow.__table__
    statement = (update(table).where(table.c.host == bindparam("h"), table.c.address == bindparam("a"),
                                     table.c.status == bindparam("old_s"),
                                     table.c.owner_port_id.is_not_distinct_from(bindparam("old_o")))
                 .values(status=bindparam("s"), owner_port_id=bindparam("o")))
    return sum(session.execute(statement, [change]).rowcount for change in changes)


def lock_inventory_row(session: Session, host: str) -> HostInventoryRow:
    """The host's inventory row, locked; inserted empty first when missing (``ON CONFLICT DO NOTHING``),
    so that two first inventories of a host queue on the lock instead of one failing on the key."""
    insert_rows(session, HostInventoryRow.__table__, [{"host": host, "inventory": {}, "updated_at": utcnow()}],
                on_conflict="nothing")
    return session.get(HostInventoryRow, host, with_for_update=True)


def _kept_entry(old: HostPciInventory | None, row: PciDeviceRow) -> PciDevice:
    """The last tracked entry of an in-use device, self-contained: a type-VF that had no VPD serial of
    its own but matched through its PF's (libvirt reports the PF's) keeps that serial, so the device
    stays matched whatever becomes of the PF's entry."""
    entry = old.device(row.address) if old is not None else None
    if entry is None:
        entry = PciDevice.model_validate(row.inventory)
    entry = entry.model_copy(update={"tracked": True})
    if old is not None and entry.dev_type == v.PCI_DEV_TYPE_VF and entry.card_serial_number is None:
        inherited = DeviceSpec(old).card_serial_number(entry)
        if inherited is not None:
            capabilities = dict(entry.capabilities or {})
            vpd = capabilities.get("vpd")
            capabilities["vpd"] = {**(vpd if isinstance(vpd, dict) else {}), "card_serial_number": inherited}
            entry = entry.model_copy(update={"capabilities": capabilities})
    return entry


def store_inventory(session: Session, payload) -> None:  # noqa: ANN001 - PciInventoryPayload
    """Replace a host's inventory, as Nova's ``PciDevTracker._set_hvdevs`` does.

    New devices are available; free devices no longer reported, or reported but no longer tracked,
    are removed; devices in use keep their state. A device in use that is no longer reported, or no
    longer tracked, keeps its last tracked entry and is marked pending removal (removed when freed,
    see ``release_port``); one reported and tracked again is un-marked and is an ordinary device.
    """
    host = payload.host
    reported = HostPciInventory.model_validate(payload.model_dump(exclude={"host"}))
    inventory_row = lock_inventory_row(session, host)
    rows = host_devices(session, host)
    old = stored_inventory(inventory_row)[0] if inventory_row.inventory else None
    reported_tracked = PciTracker.from_inventory(reported).tracked()
    kept: dict[str, PciDevice] = {}
    pending: dict[str, dict[str, Any] | None] = {}
    for address, row in rows.items():
        if row.owner_port_id and address not in reported_tracked:
            kept[address] = _kept_entry(old, row)
            entry = reported.device(address)
            pending[address] = entry.model_dump(mode="json") if entry is not None else None
    reported_addresses = {d.address for d in reported.devices}
    devices = [kept.get(d.address, d) for d in reported.devices]
    devices += [kept[a] for a in sorted(kept) if a not in reported_addresses]
    inventory = reported.model_copy(update={"devices": devices})
    tracked = PciTracker.from_inventory(inventory).tracked()
    tracker = PciTracker.from_snapshot(inventory, {a: r.status for a, r in rows.items() if a in tracked},
                                       {a: r.owner_port_id for a, r in rows.items() if r.owner_port_id})
    by_address = {d.address: d for d in inventory.devices}
    snapshot = tracker.snapshot()
    for address, row in rows.items():
        if address not in snapshot:
            session.delete(row)
    session.flush()
    for address, (status, owner) in snapshot.items():
        device = by_address[address]
        row = rows.get(address) or PciDeviceRow(host=host, address=address)
        row.vendor_id, row.product_id, row.dev_type = device.vendor_id, device.product_id, device.dev_type
        row.parent_addr, row.numa_node, row.physical_network = device.parent_addr, device.numa_node, device.physical_network
        row.pf_group = device.parent_addr or device.address
        row.is_pf = int(device.dev_type == v.PCI_DEV_TYPE_PF)
        row.inventory = device.model_dump(mode="json")
        row.status, row.owner_port_id = status, owner
        session.add(row)
    _save_inventory(inventory_row, inventory, pending)


def _remove_freed(session: Session, inventory_row: HostInventoryRow, rows: DeviceStates,
                  pending: dict[str, dict[str, Any] | None], addresses: list[str]) -> None:
    """Remove freed devices that were pending removal: row deleted; inventory entry dropped, or
    replaced by the untracked entry last reported for it."""
    inventory = stored_inventory(inventory_row)[0]
    replaced = {a: PciDevice.model_validate(pending[a]) for a in addresses if pending[a] is not None}
    devices = [replaced.get(d.address, d) for d in inventory.devices
               if d.address not in addresses or d.address in replaced]
    table = PciDeviceRow.__table__
    session.execute(delete(table).where(table.c.host == inventory_row.host, table.c.address.in_(addresses)))
    for address in addresses:
        del rows[address], pending[address]
    _save_inventory(inventory_row, inventory.model_copy(update={"devices": devices}), pending)
    session.flush()


def device_holders(session: Session, port_ids: list[str]) -> dict[str, set[str]]:
    """Which of ``port_ids`` hold a device, and on which hosts."""
    held: dict[str, set[str]] = {}
    if port_ids:
        for port_id, host in session.execute(select(PciDeviceRow.owner_port_id, PciDeviceRow.host)
                                             .where(among(session, PciDeviceRow.owner_port_id, port_ids))):
            held.setdefault(port_id, set()).add(host)
    return held


class HostCache:
    """One transaction's locked PCI state per host: each host is loaded (and locked) once and
    written back once, by ``flush``, however many ports of the batch it serves."""

    def __init__(self, session: Session):
        self.session = session
        self.loaded: dict[str, tuple] = {}

    def lock(self, hosts: set[str]) -> None:
        """Load ``hosts`` now, in name order: every worker locks hosts in that order, so no deadlock."""
        if hosts - set(self.loaded):
            self.loaded.update(_load_hosts(self.session, sorted(hosts - set(self.loaded))))

    def get(self, host: str) -> tuple:
        if host not in self.loaded:
            self.loaded[host] = _load(self.session, host)
        return self.loaded[host]

    def flush(self, host: str | None = None) -> None:
        """Write back ``host`` (or every host) and forget it: the next use loads it afresh."""
        names = [host] if host is not None else list(self.loaded)
        flushed = {name: self.loaded.pop(name, (None, None, None)) for name in names}
        write_back(self.session, [(name, tracker, rows) for name, (tracker, rows, _) in flushed.items()
                                  if tracker is not None])


def release_port(session: Session, port_id: str, cache: HostCache | None = None) -> list[str]:
    """Free every device ``port_id`` holds, on any host; the addresses freed. A freed device pending
    removal is then removed (Nova frees it, with its PF/VF dependents, then removes it)."""
    own = cache is None
    cache = cache or HostCache(session)
    hosts = set(session.scalars(select(PciDeviceRow.host).where(PciDeviceRow.owner_port_id == port_id)))
    cache.lock(hosts)
    released: list[str] = []
    for host in sorted(hosts):
        tracker, rows, pending = cache.get(host)
        if tracker is None:
            continue
        freed = tracker.release(port_id).released
        released += freed
        removed = [a for a in freed if a in pending]
        if removed:
            _remove_freed(session, session.get(HostInventoryRow, host), rows, pending, removed)
            cache.flush(host)  # the tracker still holds the removed devices: reload on next use
    if own:
        cache.flush()
    return released


def allocate(session: Session, request: ValidatedRequest, selection: SelectionOutcome,
             network: Network, cache: HostCache | None = None) -> AllocationDecision:
    """Stage 3 on the host's locked devices; written back at once, or by ``cache.flush()``."""
    if pci_request_for(request, selection, network) is None:
        return allocate_device(request, selection, network, None)  # no device: no host to load and lock
    own = cache is None
    cache = cache or HostCache(session)
    tracker = cache.get(request.port.host)[0]
    decision = allocate_device(request, selection, network, tracker)
    if own:
        cache.flush()
    return decision
