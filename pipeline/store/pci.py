"""The database allocator: Nova's rules (``pipeline.stages.pci_accounting``) over locked rows.

A host's device rows are locked (``FOR UPDATE``, in address order), the in-memory tracker is
rebuilt from them, the stage logic runs, and only the rows whose status or owner changed are
written back. The row lock orders one host's allocations; the owner column, the partial unique
index and the PF/VF exclusion constraint make double allocation impossible even if code erred.
"""

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from pipeline.models import vocabulary as v
from pipeline.models.binding import AllocationDecision, SelectionOutcome
from pipeline.models.pci import HostPciInventory
from pipeline.models.tables import HostInventoryRow, PciDeviceRow
from pipeline.models.topology import Network
from pipeline.stages.allocation import allocate_device
from pipeline.stages.pci_accounting import PciTracker
from pipeline.stages.validation import ValidatedRequest


def lock_host_devices(session: Session, host: str) -> dict[str, PciDeviceRow]:
    rows = session.scalars(select(PciDeviceRow).where(PciDeviceRow.host == host)
                           .order_by(PciDeviceRow.address).with_for_update()).all()
    return {r.address: r for r in rows}


def tracker_for(session: Session, host: str) -> tuple[PciTracker | None, dict[str, PciDeviceRow]]:
    inventory_row = session.get(HostInventoryRow, host, with_for_update=True)
    if inventory_row is None:
        return None, {}
    rows = lock_host_devices(session, host)
    inventory = HostPciInventory.model_validate(inventory_row.inventory)
    tracker = PciTracker.from_snapshot(inventory, {a: r.status for a, r in rows.items()},
                                       {a: r.owner_port_id for a, r in rows.items() if r.owner_port_id})
    return tracker, rows


def write_back(session: Session, host: str, tracker: PciTracker, rows: dict[str, PciDeviceRow]) -> None:
    """Persist changed statuses and owners; owners are cleared (and flushed) before new ones are set,
    so the PF/VF constraint never sees a transient overlap."""
    snapshot = tracker.snapshot()
    changed = {a: s for a, s in snapshot.items() if a in rows and (rows[a].status, rows[a].owner_port_id) != s}
    for address, (status, owner) in changed.items():
        if owner is None:
            rows[address].status, rows[address].owner_port_id = status, None
    session.flush()
    for address, (status, owner) in changed.items():
        if owner is not None:
            rows[address].status, rows[address].owner_port_id = status, owner
    session.flush()


def lock_inventory_row(session: Session, host: str) -> HostInventoryRow:
    """The host's inventory row, locked; inserted empty first when missing (``ON CONFLICT DO NOTHING``),
    so that two first inventories of a host queue on the lock instead of one failing on the key."""
    insert = {"postgresql": pg_insert, "sqlite": sqlite_insert}[session.get_bind().dialect.name]
    session.execute(insert(HostInventoryRow).values(host=host, inventory={}).on_conflict_do_nothing())
    return session.get(HostInventoryRow, host, with_for_update=True)


def store_inventory(session: Session, payload) -> None:  # noqa: ANN001 - PciInventoryPayload
    """Replace a host's inventory. Devices in use keep their state; a vanished device still in use
    stays tracked until it is freed (Nova's ``to_be_removed_when_freed``)."""
    host = payload.host
    inventory = HostPciInventory.model_validate(payload.model_dump(exclude={"host"}))
    old_row = lock_inventory_row(session, host)
    rows = lock_host_devices(session, host)
    if old_row.inventory:
        present = {d.address for d in inventory.devices}
        old = HostPciInventory.model_validate(old_row.inventory)
        kept = [d for d in old.devices if d.address not in present and rows.get(d.address)
                and rows[d.address].owner_port_id]
        inventory = inventory.model_copy(update={"devices": [*inventory.devices, *kept]})
    tracked = PciTracker.from_inventory(inventory).tracked()  # a free device no longer tracked is dropped
    tracker = PciTracker.from_snapshot(inventory, {a: r.status for a, r in rows.items()
                                                   if a in tracked or r.owner_port_id},
                                       {a: r.owner_port_id for a, r in rows.items() if r.owner_port_id})
    devices = {d.address: d for d in inventory.devices}
    snapshot = tracker.snapshot()
    for address, row in rows.items():
        if address not in snapshot:
            session.delete(row)
    session.flush()
    for address, (status, owner) in snapshot.items():
        device = devices[address]
        row = rows.get(address) or PciDeviceRow(host=host, address=address)
        row.vendor_id, row.product_id, row.dev_type = device.vendor_id, device.product_id, device.dev_type
        row.parent_addr, row.numa_node, row.physical_network = device.parent_addr, device.numa_node, device.physical_network
        row.pf_group = device.parent_addr or device.address
        row.is_pf = int(device.dev_type == v.PCI_DEV_TYPE_PF)
        row.inventory = device.model_dump(mode="json")
        row.status, row.owner_port_id = status, owner
        session.add(row)
    old_row.inventory = inventory.model_dump(mode="json")


def release_port(session: Session, port_id: str) -> list[str]:
    """Free every device ``port_id`` holds, on any host; the addresses freed."""
    hosts = sorted(set(session.scalars(select(PciDeviceRow.host).where(PciDeviceRow.owner_port_id == port_id))))
    released: list[str] = []
    for host in hosts:
        tracker, rows = tracker_for(session, host)
        if tracker is None:
            continue
        released += tracker.release(port_id).released
        write_back(session, host, tracker, rows)
    return released


def allocate(session: Session, request: ValidatedRequest, selection: SelectionOutcome,
             network: Network) -> AllocationDecision:
    tracker, rows = tracker_for(session, request.port.host)
    decision = allocate_device(request, selection, network, tracker)
    if tracker is not None and decision.device is not None:
        write_back(session, request.port.host, tracker, rows)
    return decision
