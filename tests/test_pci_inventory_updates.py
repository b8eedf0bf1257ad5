"""Inventory updates on the database allocator (``pipeline.store.pci``), on the real PostgreSQL.

Nova's ``PciDevTracker._set_hvdevs``: a device that an inventory no longer reports (or reports but
no longer tracks) is removed at once when free, and marked ``to_be_removed_when_freed`` while it
is in use. Freeing it runs Nova's ``PciDevice.free`` first (its PF becomes available when no other
function is in use, its VFs become available), then removes it: it must never be allocated again.
A device reported and tracked again before it is freed is an ordinary device once more.
"""

from typing import Any

import pytest
from sqlalchemy import Engine, text

from pipeline.db import run_transaction
from pipeline.models import vocabulary as v
from pipeline.models.events import PciInventoryPayload
from pipeline.stages.pci_accounting import invariant_violations
from pipeline.store.pci import allocate, release_port
from tests.factories import sriov_binding
from tests.test_pci_store_postgres import (DIRECT, HOST, ONE_PF_THREE_VFS, PHYSICAL, Ops, assert_exhausted,
                                           db_state, db_tracker, inventory, load, pf_group, sql_violations)

pytestmark = pytest.mark.services

PF, VF0, VF1, VF2 = "0000:81:00.0", "0000:81:10.0", "0000:81:10.1", "0000:81:10.2"
AVAILABLE, UNAVAILABLE, ALLOCATED, CLAIMED = v.PCI_AVAILABLE, v.PCI_UNAVAILABLE, v.PCI_ALLOCATED, v.PCI_CLAIMED


def devices(*addresses: str, untracked: tuple[str, ...] = ()) -> PciInventoryPayload:
    """ONE_PF_THREE_VFS restricted to ``addresses``, those in ``untracked`` reported ``tracked: false``."""
    return inventory([{**d, "tracked": d["address"] not in untracked} for d in pf_group(0x81, 3)
                      if d["address"] in addresses])


def stored(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        return conn.execute(text("SELECT inventory FROM pci_inventories WHERE host = :h"), {"h": HOST}).scalar_one()


def stored_addresses(engine: Engine) -> list[str]:
    return [d["address"] for d in stored(engine)["devices"]]


def pending(engine: Engine) -> dict[str, Any]:
    return stored(engine).get("pending_removal", {})


def release(engine: Engine, port_id: str) -> list[str]:
    return run_transaction(engine, lambda session: release_port(session, port_id))


def assert_sound(engine: Engine) -> None:
    """Nova's PF/VF rules hold on what the database holds, every row is a tracked device, and the
    SQL constraints' own checks find nothing."""
    tracker = db_tracker(engine)
    assert invariant_violations(tracker) == []
    assert sorted(tracker.tracked()) == sorted(db_state(engine))
    assert sql_violations(engine) == []


def allocated(ops: Ops, port_id: str, vnic_type: str = DIRECT) -> str:
    decision = ops.allocate(port_id, vnic_type)["decision"]
    assert decision.device is not None, decision.reason
    return decision.device.address


# --- a VF vanishes while allocated ----------------------------------------------------------------

def test_vanished_vf_in_use_is_removed_when_freed_and_never_allocated_again(pg_engine: Engine):
    load(pg_engine, ONE_PF_THREE_VFS)
    ops = Ops(pg_engine)
    assert allocated(ops, "port-a") == VF0

    load(pg_engine, devices(PF, VF1, VF2))  # VF0 hot-unplugged while port-a holds it
    assert db_state(pg_engine) == {PF: (UNAVAILABLE, None), VF0: (ALLOCATED, "port-a"),
                                   VF1: (AVAILABLE, None), VF2: (AVAILABLE, None)}
    assert pending(pg_engine) == {VF0: None}
    assert stored_addresses(pg_engine) == [PF, VF1, VF2, VF0]  # still tracked: still a child of PF
    assert db_tracker(pg_engine).tracked()[PF].children == (VF0, VF1, VF2)
    assert_sound(pg_engine)

    assert release(pg_engine, "port-a") == [VF0]
    # freed (PF back to available: its last function in use), then removed
    assert db_state(pg_engine) == {PF: (AVAILABLE, None), VF1: (AVAILABLE, None), VF2: (AVAILABLE, None)}
    assert stored_addresses(pg_engine) == [PF, VF1, VF2]
    assert pending(pg_engine) == {}
    assert db_tracker(pg_engine).tracked()[PF].children == (VF1, VF2)
    assert_sound(pg_engine)

    assert [allocated(ops, p) for p in ("port-b", "port-c")] == [VF1, VF2]
    assert_exhausted(ops.allocate("port-d"))  # VF0 is not handed out again
    assert db_state(pg_engine) == {PF: (UNAVAILABLE, None), VF1: (ALLOCATED, "port-b"), VF2: (ALLOCATED, "port-c")}
    assert_sound(pg_engine)

    load(pg_engine, devices(PF, VF1, VF2))  # the same report again changes nothing
    assert db_state(pg_engine) == {PF: (UNAVAILABLE, None), VF1: (ALLOCATED, "port-b"), VF2: (ALLOCATED, "port-c")}
    assert pending(pg_engine) == {}


def test_release_then_allocate_in_one_transaction_sees_the_removal(pg_engine: Engine):
    """The allocate stage releases the port's old devices and allocates in the same transaction."""
    load(pg_engine, inventory(pf_group(0x81, 2)))
    ops = Ops(pg_engine)
    assert allocated(ops, "port-a") == VF0
    load(pg_engine, devices(PF, VF1))
    request, selection, network = sriov_binding("port-a")

    def rebind(session):  # noqa: ANN001, ANN202
        return release_port(session, "port-a"), allocate(session, request, selection, network)

    released, decision = run_transaction(pg_engine, rebind)
    assert released == [VF0]
    assert decision.device.address == VF1
    assert db_state(pg_engine) == {PF: (UNAVAILABLE, None), VF1: (ALLOCATED, "port-a")}
    assert pending(pg_engine) == {}
    assert_sound(pg_engine)


# --- PF states when a vanished VF is freed ---------------------------------------------------------

def test_pf_stays_unavailable_while_another_vf_is_allocated_and_frees_with_the_last(pg_engine: Engine):
    load(pg_engine, ONE_PF_THREE_VFS)
    ops = Ops(pg_engine)
    assert [allocated(ops, p) for p in ("port-a", "port-b")] == [VF0, VF1]
    load(pg_engine, devices(PF, VF1, VF2))

    assert release(pg_engine, "port-a") == [VF0]
    assert db_state(pg_engine) == {PF: (UNAVAILABLE, None), VF1: (ALLOCATED, "port-b"), VF2: (AVAILABLE, None)}
    assert_sound(pg_engine)
    assert_exhausted(ops.allocate("port-pf", PHYSICAL))  # the PF is still blocked by VF1

    assert release(pg_engine, "port-b") == [VF1]
    assert db_state(pg_engine) == {PF: (AVAILABLE, None), VF1: (AVAILABLE, None), VF2: (AVAILABLE, None)}
    assert_sound(pg_engine)
    assert allocated(ops, "port-pf", PHYSICAL) == PF
    assert db_state(pg_engine) == {PF: (ALLOCATED, "port-pf"), VF1: (UNAVAILABLE, None), VF2: (UNAVAILABLE, None)}


def test_pf_stays_unavailable_while_a_sibling_is_merely_claimed(pg_engine: Engine):
    """Nova's free: the PF becomes available only when every other function is available; a claimed
    sibling (the PF was made unavailable by the allocated VF) leaves it unavailable."""
    load(pg_engine, ONE_PF_THREE_VFS)
    ops = Ops(pg_engine)
    assert allocated(ops, "port-a") == VF0
    with pg_engine.begin() as conn:  # a claim (prep_resize) of VF1 for port-b
        conn.execute(text("UPDATE pci_devices SET status = 'claimed', owner_port_id = 'port-b' "
                          "WHERE host = :h AND address = :a"), {"h": HOST, "a": VF1})
    load(pg_engine, devices(PF, VF1, VF2))
    assert pending(pg_engine) == {VF0: None}

    assert release(pg_engine, "port-a") == [VF0]
    assert db_state(pg_engine) == {PF: (UNAVAILABLE, None), VF1: (CLAIMED, "port-b"), VF2: (AVAILABLE, None)}
    assert_sound(pg_engine)
    assert release(pg_engine, "port-b") == [VF1]
    assert db_state(pg_engine) == {PF: (AVAILABLE, None), VF1: (AVAILABLE, None), VF2: (AVAILABLE, None)}
    assert_sound(pg_engine)


def test_vanished_pf_and_vf_in_use_the_free_pf_goes_at_once_the_vf_when_freed(pg_engine: Engine):
    """The PF is only unavailable (not in use): Nova removes it at once; its VF, now without a
    tracked parent, is removed when freed; the sibling that stays is an ordinary orphan VF."""
    load(pg_engine, ONE_PF_THREE_VFS)
    ops = Ops(pg_engine)
    assert allocated(ops, "port-a") == VF0
    load(pg_engine, devices(VF2))
    assert db_state(pg_engine) == {VF0: (ALLOCATED, "port-a"), VF2: (AVAILABLE, None)}
    assert pending(pg_engine) == {VF0: None}
    assert db_tracker(pg_engine).tracked()[VF0].parent is None
    assert_sound(pg_engine)

    assert release(pg_engine, "port-a") == [VF0]
    assert db_state(pg_engine) == {VF2: (AVAILABLE, None)}
    assert stored_addresses(pg_engine) == [VF2]
    assert_sound(pg_engine)
    assert allocated(ops, "port-b") == VF2
    assert_exhausted(ops.allocate("port-c"))


def test_vanished_pf_in_use_frees_its_vfs_when_released(pg_engine: Engine):
    load(pg_engine, ONE_PF_THREE_VFS)
    ops = Ops(pg_engine)
    assert allocated(ops, "port-pf", PHYSICAL) == PF
    load(pg_engine, devices(VF0, VF1, VF2))  # the PF vanished; its VFs are still reported
    assert db_state(pg_engine) == {PF: (ALLOCATED, "port-pf"), VF0: (UNAVAILABLE, None),
                                   VF1: (UNAVAILABLE, None), VF2: (UNAVAILABLE, None)}
    assert pending(pg_engine) == {PF: None}
    assert db_tracker(pg_engine).tracked()[PF].children == (VF0, VF1, VF2)
    assert_sound(pg_engine)
    assert_exhausted(ops.allocate("port-a"))  # the VFs stay blocked while the PF is in use

    assert release(pg_engine, "port-pf") == [PF]
    assert db_state(pg_engine) == {VF0: (AVAILABLE, None), VF1: (AVAILABLE, None), VF2: (AVAILABLE, None)}
    assert stored_addresses(pg_engine) == [VF0, VF1, VF2]
    assert pending(pg_engine) == {}
    assert_sound(pg_engine)
    decision = ops.allocate("port-pf2", PHYSICAL)["decision"]
    assert decision.device is None and decision.error == v.PCI_ERR_RESOURCES_UNAVAILABLE
    assert "no tracked device can serve it" in decision.reason  # the PF is gone, not merely busy
    assert allocated(ops, "port-a") == VF0


# --- a device that comes back before it is freed ------------------------------------------------------

def test_vanished_vf_reported_again_before_release_is_an_ordinary_device(pg_engine: Engine):
    load(pg_engine, ONE_PF_THREE_VFS)
    ops = Ops(pg_engine)
    assert allocated(ops, "port-a") == VF0
    load(pg_engine, devices(PF, VF1, VF2))
    assert pending(pg_engine) == {VF0: None}

    load(pg_engine, ONE_PF_THREE_VFS)  # back again, still in use
    assert stored_addresses(pg_engine) == [PF, VF0, VF1, VF2]
    assert_vf0_in_use_as_ordinary_then_freed(pg_engine)
    assert allocated(ops, "port-b") == VF0  # allocatable again


def assert_vf0_in_use_as_ordinary_then_freed(engine: Engine) -> None:
    """VF0, held by port-a, is an ordinary tracked device again: not pending, and freed as usual."""
    assert pending(engine) == {}
    assert db_state(engine) == {PF: (UNAVAILABLE, None), VF0: (ALLOCATED, "port-a"),
                                VF1: (AVAILABLE, None), VF2: (AVAILABLE, None)}
    assert release(engine, "port-a") == [VF0]
    assert db_state(engine) == {PF: (AVAILABLE, None), VF0: (AVAILABLE, None),
                                VF1: (AVAILABLE, None), VF2: (AVAILABLE, None)}
    assert_sound(engine)


# --- a device still reported but no longer tracked ----------------------------------------------------

def test_untracked_vf_in_use_stays_tracked_until_freed_then_is_dropped(pg_engine: Engine):
    """Used to raise ValueError ("owners: ... not tracked on this host"), dead-lettering the inventory."""
    load(pg_engine, ONE_PF_THREE_VFS)
    ops = Ops(pg_engine)
    assert allocated(ops, "port-a") == VF0

    load(pg_engine, devices(PF, VF0, VF1, VF2, untracked=(VF0,)))  # VF0 taken out of the device_spec
    assert db_state(pg_engine) == {PF: (UNAVAILABLE, None), VF0: (ALLOCATED, "port-a"),
                                   VF1: (AVAILABLE, None), VF2: (AVAILABLE, None)}
    reported = {d.address: d for d in devices(PF, VF0, VF1, VF2, untracked=(VF0,)).devices}
    assert pending(pg_engine) == {VF0: reported[VF0].model_dump(mode="json")}
    assert {d["address"]: d["tracked"] for d in stored(pg_engine)["devices"]} == {PF: True, VF0: True,
                                                                                VF1: True, VF2: True}
    assert_sound(pg_engine)

    assert release(pg_engine, "port-a") == [VF0]
    assert db_state(pg_engine) == {PF: (AVAILABLE, None), VF1: (AVAILABLE, None), VF2: (AVAILABLE, None)}
    assert {d["address"]: d["tracked"] for d in stored(pg_engine)["devices"]} == {PF: True, VF0: False,
                                                                                VF1: True, VF2: True}
    assert pending(pg_engine) == {}
    tracker = db_tracker(pg_engine)
    assert tracker.untracked == [VF0] and tracker.tracked()[PF].children == (VF1, VF2)
    assert_sound(pg_engine)
    assert [allocated(ops, p) for p in ("port-b", "port-c")] == [VF1, VF2]
    assert_exhausted(ops.allocate("port-d"))


def test_untracked_pf_in_use_frees_its_vfs_and_is_dropped(pg_engine: Engine):
    load(pg_engine, ONE_PF_THREE_VFS)
    ops = Ops(pg_engine)
    assert allocated(ops, "port-pf", PHYSICAL) == PF
    load(pg_engine, devices(PF, VF0, VF1, VF2, untracked=(PF,)))
    assert db_state(pg_engine) == {PF: (ALLOCATED, "port-pf"), VF0: (UNAVAILABLE, None),
                                   VF1: (UNAVAILABLE, None), VF2: (UNAVAILABLE, None)}
    assert list(pending(pg_engine)) == [PF]
    assert_sound(pg_engine)

    assert release(pg_engine, "port-pf") == [PF]
    assert db_state(pg_engine) == {VF0: (AVAILABLE, None), VF1: (AVAILABLE, None), VF2: (AVAILABLE, None)}
    tracker = db_tracker(pg_engine)
    assert tracker.untracked == [PF] and tracker.tracked()[VF0].parent is None
    assert_sound(pg_engine)
    decision = ops.allocate("port-pf2", PHYSICAL)["decision"]
    assert decision.device is None
    assert "no tracked device can serve it" in decision.reason


def test_untracked_vf_tracked_again_before_release_is_an_ordinary_device(pg_engine: Engine):
    load(pg_engine, ONE_PF_THREE_VFS)
    ops = Ops(pg_engine)
    assert allocated(ops, "port-a") == VF0
    load(pg_engine, devices(PF, VF0, VF1, VF2, untracked=(VF0,)))
    assert list(pending(pg_engine)) == [VF0]
    load(pg_engine, devices(PF, VF1, VF2))  # then vanished altogether: still pending, nothing to restore
    assert pending(pg_engine) == {VF0: None}
    load(pg_engine, ONE_PF_THREE_VFS)  # the device_spec change reverted: tracked again
    assert_vf0_in_use_as_ordinary_then_freed(pg_engine)


def test_untracked_free_device_is_dropped_at_once(pg_engine: Engine):
    load(pg_engine, ONE_PF_THREE_VFS)
    load(pg_engine, devices(PF, VF0, VF1, VF2, untracked=(VF1,)))
    assert db_state(pg_engine) == {PF: (AVAILABLE, None), VF0: (AVAILABLE, None), VF2: (AVAILABLE, None)}
    assert pending(pg_engine) == {}
    assert_sound(pg_engine)


# --- a remote-managed VF that matched through its PF's VPD serial ---------------------------------------

RM_PF, RM_VF = "0000:83:00.0", "0000:83:10.0"
SERIAL = "MT2113X00000"


def remote_managed(*addresses: str) -> PciInventoryPayload:
    """A PF with a VPD card serial and its VF tagged remote_managed=true, which has no serial of its own:
    libvirt reports the PF's for it, so the VF is tracked only while its PF is reported."""
    group = [{"address": RM_PF, "vendor_id": "15b3", "product_id": "101d", "dev_type": v.PCI_DEV_TYPE_PF,
              "numa_node": 0, "physical_network": "physnet1", "remote_managed": False,
              "capabilities": {"vpd": {"card_serial_number": SERIAL}}},
             {"address": RM_VF, "vendor_id": "15b3", "product_id": "101e", "dev_type": v.PCI_DEV_TYPE_VF,
              "parent_addr": RM_PF, "numa_node": 0, "physical_network": "physnet1", "remote_managed": True}]
    return inventory([d for d in group if d["address"] in addresses])


@pytest.mark.parametrize("report", [(RM_VF,), ()], ids=["vf-still-reported-but-untracked", "both-vanished"])
def test_in_use_vf_that_matched_through_its_pfs_serial_outlives_the_pf(pg_engine: Engine, report: tuple[str, ...]):
    load(pg_engine, remote_managed(RM_PF, RM_VF))
    assert db_state(pg_engine) == {RM_PF: (AVAILABLE, None), RM_VF: (AVAILABLE, None)}
    with pg_engine.begin() as conn:  # a remote-managed port holds the VF (the OVN path, not modelled here)
        conn.execute(text("UPDATE pci_devices SET status = 'unavailable' WHERE address = :a"), {"a": RM_PF})
        conn.execute(text("UPDATE pci_devices SET status = 'allocated', owner_port_id = 'port-rm' "
                          "WHERE address = :a"), {"a": RM_VF})
    assert_sound(pg_engine)

    load(pg_engine, remote_managed(*report))  # the PF is gone: the VF alone would match no device_spec entry
    assert db_state(pg_engine) == {RM_VF: (ALLOCATED, "port-rm")}
    kept = next(d for d in stored(pg_engine)["devices"] if d["address"] == RM_VF)
    assert kept["capabilities"] == {"vpd": {"card_serial_number": SERIAL}} and kept["tracked"] is True
    reported = {d.address: d.model_dump(mode="json") for d in remote_managed(*report).devices}
    assert pending(pg_engine) == {RM_VF: reported.get(RM_VF)}
    assert_sound(pg_engine)

    assert release(pg_engine, "port-rm") == [RM_VF]
    assert db_state(pg_engine) == {}
    assert stored(pg_engine)["devices"] == list(reported.values())
    assert db_tracker(pg_engine).untracked == sorted(reported)
    assert_sound(pg_engine)
