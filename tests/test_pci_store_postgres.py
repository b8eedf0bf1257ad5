"""The database PCI allocator (``pipeline.store.pci``) on the real PostgreSQL, under concurrency.

Every operation runs in its own transaction (``run_transaction``) from its own thread. The host's
inventory row is locked by each allocate/release, so the transactions commit one after another;
each records a sequence number while it still holds that lock, which gives the commit order. The
same operations replayed in that order on a fresh in-memory ``PciTracker`` must give the same
decisions and, at the end, exactly the state in the database. The constraints themselves (owner
index, PF/VF exclusion) are checked with raw SQL, on PostgreSQL and on SQLite.
"""

import itertools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError, OperationalError

from pipeline.db import run_transaction
from pipeline.models import vocabulary as v
from pipeline.models.events import PciInventoryPayload
from pipeline.models.pci import HostPciInventory
from pipeline.stages.allocation import allocate_device
from pipeline.stages.pci_accounting import PciTracker, invariant_violations
from pipeline.store.pci import HostCache, PciStateConflict, allocate, release_port, store_inventory, tracker_for
from tests.factories import sriov_binding

pytestmark = pytest.mark.services

HOST = "compute-1"
DIRECT, PHYSICAL = v.VNIC_DIRECT, v.VNIC_DIRECT_PHYSICAL
EXHAUSTED = "every suitable device is in use or blocked by PF/VF exclusion"

PF_VF_OVERLAP_SQL = text(
    "SELECT host, pf_group FROM pci_devices WHERE owner_port_id IS NOT NULL "
    "GROUP BY host, pf_group HAVING count(DISTINCT is_pf) > 1")
PORT_HOLDS_SEVERAL_SQL = text(
    "SELECT host, owner_port_id FROM pci_devices WHERE owner_port_id IS NOT NULL "
    "GROUP BY host, owner_port_id HAVING count(*) > 1")


# --- builders ------------------------------------------------------------------------------------

def pf_group(bus: int, vfs: int) -> list[dict[str, Any]]:
    """A PF ``0000:<bus>:00.0`` on physnet1 and its ``vfs`` VFs ``0000:<bus>:10.<i>``."""
    pf = f"0000:{bus:02x}:00.0"
    return [{"address": pf, "vendor_id": "8086", "product_id": "1572", "dev_type": v.PCI_DEV_TYPE_PF,
             "numa_node": 0, "physical_network": "physnet1"},
            *({"address": f"0000:{bus:02x}:10.{i}", "vendor_id": "8086", "product_id": "154c",
               "dev_type": v.PCI_DEV_TYPE_VF, "parent_addr": pf, "numa_node": 0,
               "physical_network": "physnet1"} for i in range(vfs))]


def inventory(*groups: list[dict[str, Any]], host: str = HOST) -> PciInventoryPayload:
    return PciInventoryPayload(host=host, devices=[d for g in groups for d in g])


EIGHT_VFS = inventory(pf_group(0x81, 4), pf_group(0x82, 4))
ONE_PF_THREE_VFS = inventory(pf_group(0x81, 3))
VF_ADDRESSES = sorted(d.address for d in EIGHT_VFS.devices if d.dev_type == v.PCI_DEV_TYPE_VF)


def load(engine: Engine, payload: PciInventoryPayload) -> None:
    run_transaction(engine, lambda session: store_inventory(session, payload))


def fresh_tracker(payload: PciInventoryPayload) -> PciTracker:
    return PciTracker.from_inventory(HostPciInventory.model_validate(payload.model_dump(exclude={"host"})))


def db_state(engine: Engine, host: str = HOST) -> dict[str, tuple[str, str | None]]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT address, status, owner_port_id FROM pci_devices WHERE host = :h"),
                            {"h": host})
        return {address: (status, owner) for address, status, owner in rows}


def db_tracker(engine: Engine, host: str = HOST) -> PciTracker:
    tracker = run_transaction(engine, lambda session: tracker_for(session, host)[0])
    assert tracker is not None
    return tracker


def sql_violations(engine: Engine) -> list[tuple]:
    with engine.connect() as conn:
        return [*conn.execute(PF_VF_OVERLAP_SQL).all(), *conn.execute(PORT_HOLDS_SEVERAL_SQL).all()]


class Ops:
    """Allocate / release, each in its own transaction; ``seq`` is taken while the host lock is held,
    so sorting the returned records by it gives the commit order."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.counter = itertools.count()

    def allocate(self, port_id: str, vnic_type: str = DIRECT) -> dict[str, Any]:
        request, selection, network = sriov_binding(port_id, vnic_type)

        def work(session):  # noqa: ANN001, ANN202
            decision = allocate(session, request, selection, network)
            return next(self.counter), decision

        seq, decision = run_transaction(self.engine, work)
        return {"seq": seq, "op": "allocate", "port": port_id, "vnic": vnic_type, "decision": decision}

    def release(self, port_id: str) -> dict[str, Any]:
        def work(session):  # noqa: ANN001, ANN202
            released = release_port(session, port_id)
            return next(self.counter), released

        seq, released = run_transaction(self.engine, work)
        return {"seq": seq, "op": "release", "port": port_id, "released": released}


def race(tasks: list[Callable[[], Any]]) -> list[Any]:
    """Run every task on its own thread, all released at once; their results (exceptions re-raised)."""
    barrier = threading.Barrier(len(tasks))

    def start(task: Callable[[], Any]) -> Any:
        barrier.wait(timeout=30)
        return task()

    with ThreadPoolExecutor(max_workers=len(tasks)) as pool:
        futures = [pool.submit(start, task) for task in tasks]
        return [f.result(timeout=120) for f in futures]


def replay(tracker: PciTracker, records: list[dict[str, Any]]) -> None:
    """Replay ``records`` in commit order on the in-memory tracker; every outcome must be the DB's."""
    for record in sorted(records, key=lambda r: r["seq"]):
        if record["op"] == "allocate":
            expected = allocate_device(*sriov_binding(record["port"], record["vnic"]), tracker)
            assert record["decision"] == expected, f"seq {record['seq']}: DB and replay disagree"
        else:
            assert tracker.release(record["port"]).released == record["released"], f"seq {record['seq']}"


def assert_consistent(engine: Engine, replayed: PciTracker) -> None:
    """The DB equals the replay, and breaks no rule (Nova's, checked in memory, and the SQL ones)."""
    assert db_state(engine) == replayed.snapshot()
    assert invariant_violations(db_tracker(engine)) == []
    assert sql_violations(engine) == []


def succeeded(records: list[dict[str, Any]]) -> dict[str, str]:
    """port -> device address, for the allocations that got a device."""
    return {r["port"]: r["decision"].device.address for r in records
            if r["op"] == "allocate" and r["decision"].device is not None}


def assert_exhausted(record: dict[str, Any]) -> None:
    decision = record["decision"]
    assert decision.failed and decision.device is None
    assert decision.error == v.PCI_ERR_RESOURCES_UNAVAILABLE
    assert decision.reason.startswith(f"ComputeResourcesUnavailable: port {record['port']} ")
    assert EXHAUSTED in decision.reason, decision.reason


# --- 1. many ports racing for few VFs ------------------------------------------------------------

def test_64_ports_racing_for_8_vfs_get_exactly_8_and_the_db_equals_a_replay(pg_engine: Engine):
    load(pg_engine, EIGHT_VFS)
    ops, replayed = Ops(pg_engine), fresh_tracker(EIGHT_VFS)
    for round_ in range(5):
        ports = [f"r{round_}-port-{i:02d}" for i in range(64)]
        records = race([lambda p=p: ops.allocate(p) for p in ports])

        winners = succeeded(records)
        assert len(winners) == 8
        assert sorted(winners.values()) == VF_ADDRESSES  # every VF given once, no PF to a direct port
        for record in records:
            if record["port"] not in winners:
                assert_exhausted(record)
        owned = {a: o for a, (_, o) in db_state(pg_engine).items() if o}
        assert owned == {address: port for port, address in winners.items()}
        replay(replayed, records)
        assert_consistent(pg_engine, replayed)

        releases = race([lambda p=p: ops.release(p) for p in winners])
        assert sorted(a for r in releases for a in r["released"]) == VF_ADDRESSES
        replay(replayed, releases)
        assert {s for s, _ in db_state(pg_engine).values()} == {v.PCI_AVAILABLE}
        assert_consistent(pg_engine, replayed)


# --- 2. PF and VF requests racing on one PF group ------------------------------------------------

def test_pf_and_vf_requests_racing_never_share_a_pf_group(pg_engine: Engine):
    load(pg_engine, ONE_PF_THREE_VFS)
    ops, replayed = Ops(pg_engine), fresh_tracker(ONE_PF_THREE_VFS)
    seen_by_monitor: list[tuple] = []
    outcomes = set()
    for round_ in range(8):
        done = threading.Event()

        def monitor() -> None:
            while not done.is_set():
                seen_by_monitor.extend(sql_violations(pg_engine))

        watcher = threading.Thread(target=monitor)
        watcher.start()
        try:
            tasks = [lambda p=f"r{round_}-pf-{i}": ops.allocate(p, PHYSICAL) for i in range(6)]
            tasks += [lambda p=f"r{round_}-vf-{i}": ops.allocate(p, DIRECT) for i in range(6)]
            records = race(tasks)
        finally:
            done.set()
            watcher.join()

        winners = succeeded(records)
        pfs = [p for p in winners if "-pf-" in p]
        vfs = [p for p in winners if "-vf-" in p]
        # first committer decides: the PF (then every VF is blocked) or a VF (then all 3 VFs, no PF)
        assert (len(pfs), len(vfs)) in {(1, 0), (0, 3)}, winners
        outcomes.add((len(pfs), len(vfs)))
        for record in records:
            if record["port"] not in winners:
                assert_exhausted(record)
        replay(replayed, records)
        assert_consistent(pg_engine, replayed)
        replay(replayed, race([lambda p=p: ops.release(p) for p in winners]))
        assert_consistent(pg_engine, replayed)
    assert seen_by_monitor == [], "a concurrent reader saw a PF and its VF (or two devices of a port) in use"
    print(f"PF/VF race outcomes seen (PFs, VFs): {sorted(outcomes)}")


# --- 3. the constraints, not the code, are the guarantee ------------------------------------------

def raw_update(engine: Engine, address: str, owner: str, host: str = HOST) -> None:
    with engine.begin() as conn:
        conn.execute(text("UPDATE pci_devices SET owner_port_id = :o, status = 'allocated' "
                          "WHERE host = :h AND address = :a"), {"o": owner, "h": host, "a": address})


def test_database_refuses_double_ownership_and_pf_vf_overlap_written_behind_the_codes_back(any_engine: Engine):
    engine = any_engine
    load(engine, ONE_PF_THREE_VFS)
    load(engine, inventory(pf_group(0x81, 3), host="compute-2"))
    pf, vf0, vf1, vf2 = "0000:81:00.0", "0000:81:10.0", "0000:81:10.1", "0000:81:10.2"
    assert Ops(engine).allocate("port-a")["decision"].device.address == vf0
    before = db_state(engine)

    with pytest.raises(IntegrityError):  # a port holds at most one device per host
        raw_update(engine, vf1, "port-a")
    with pytest.raises(IntegrityError):  # the PF while its VF is owned
        raw_update(engine, pf, "port-b")
    with pytest.raises(IntegrityError):  # one transaction: VF freed, PF taken, then another VF taken
        with engine.begin() as conn:
            conn.execute(text("UPDATE pci_devices SET owner_port_id = NULL, status = 'available' "
                              "WHERE host = :h AND address = :a"), {"h": HOST, "a": vf0})
            conn.execute(text("UPDATE pci_devices SET owner_port_id = 'port-c', status = 'allocated' "
                              "WHERE host = :h AND address = :a"), {"h": HOST, "a": pf})
            conn.execute(text("UPDATE pci_devices SET owner_port_id = 'port-d', status = 'allocated' "
                              "WHERE host = :h AND address = :a"), {"h": HOST, "a": vf2})
    assert db_state(engine) == before  # every refused transaction left nothing behind

    # the constraints are no blanket refusal: a sibling VF for another port, and the same PF
    # address owned on another host, are legal
    raw_update(engine, vf1, "port-b")
    raw_update(engine, pf, "port-a", host="compute-2")
    assert db_state(engine)[vf1] == (v.PCI_ALLOCATED, "port-b")
    assert db_state(engine, "compute-2")[pf] == (v.PCI_ALLOCATED, "port-a")


def test_postgres_exclusion_also_refuses_an_inserted_vf_beside_an_owned_pf(pg_engine: Engine):
    load(pg_engine, inventory(pf_group(0x81, 1)))
    assert Ops(pg_engine).allocate("port-pf", PHYSICAL)["decision"].device.address == "0000:81:00.0"
    with pytest.raises(IntegrityError), pg_engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO pci_devices (host, address, vendor_id, product_id, dev_type, parent_addr, pf_group, "
            "is_pf, inventory, status, owner_port_id, updated_at) VALUES (:h, '0000:81:10.5', '8086', '154c', "
            "'type-VF', '0000:81:00.0', '0000:81:00.0', 0, '{}', 'allocated', 'port-vf', now())"), {"h": HOST})


def test_a_device_passed_from_one_port_to_another_in_one_batch_is_written(pg_engine: Engine):
    """In one transaction port-1 lets go of VF .1 and takes .0 while port-2 takes .1: were .0
    written first, port-1 would hold two VFs of the host for a moment, which the owner index
    refuses. The write-back lets every owner go before it sets any."""
    load(pg_engine, ONE_PF_THREE_VFS)
    vf0, vf1 = "0000:81:10.0", "0000:81:10.1"
    run_transaction(pg_engine, lambda session: allocate(session, *sriov_binding("port-1", profile={"pci_slot": vf1})))

    def pass_it_on(session):  # noqa: ANN001, ANN202
        cache = HostCache(session)
        assert release_port(session, "port-1", cache) == [vf1]
        assert allocate(session, *sriov_binding("port-2", profile={"pci_slot": vf1}), cache).device.address == vf1
        assert allocate(session, *sriov_binding("port-1", profile={"pci_slot": vf0}), cache).device.address == vf0
        cache.flush()

    run_transaction(pg_engine, pass_it_on)
    state = db_state(pg_engine)
    assert (state[vf0], state[vf1]) == ((v.PCI_ALLOCATED, "port-1"), (v.PCI_ALLOCATED, "port-2"))


def test_a_device_row_changed_behind_the_hosts_lock_is_not_overwritten(pg_engine: Engine):
    """Device rows are read, not locked, under their host's inventory row lock; the write-back
    still writes a row only if it holds the state that was loaded, so a writer that skipped the
    lock makes the transaction fail instead of a device going to two ports."""
    load(pg_engine, ONE_PF_THREE_VFS)
    request, selection, network = sriov_binding("port-late")
    vf0 = "0000:81:10.0"

    def allocate_after_a_rogue_write(session):  # noqa: ANN001, ANN202
        cache = HostCache(session)
        cache.lock({HOST})  # loaded: every device available
        raw_update(pg_engine, vf0, "port-rogue")  # another connection, without the lock
        assert allocate(session, request, selection, network, cache).device.address == vf0
        cache.flush()

    with pytest.raises(PciStateConflict, match="1 of 1 PCI device rows changed under their host's lock"):
        run_transaction(pg_engine, allocate_after_a_rogue_write)
    assert db_state(pg_engine)[vf0] == (v.PCI_ALLOCATED, "port-rogue")
    assert [owner for _, owner in db_state(pg_engine).values() if owner] == ["port-rogue"]


# --- 4. a rolled-back allocation leaks nothing ---------------------------------------------------

class Boom(Exception):
    pass


def test_allocation_in_a_rolled_back_transaction_leaks_nothing(pg_engine: Engine):
    load(pg_engine, ONE_PF_THREE_VFS)
    idle = db_state(pg_engine)
    request, selection, network = sriov_binding("port-doomed")
    attempts = []

    def doomed(session):  # noqa: ANN001, ANN202
        attempts.append(1)
        decision = allocate(session, request, selection, network)
        assert decision.device.address == "0000:81:10.0"
        owner = session.execute(text("SELECT owner_port_id FROM pci_devices WHERE address = '0000:81:10.0'"))
        assert owner.scalar_one() == "port-doomed"  # written (flushed) inside the transaction
        raise Boom

    with pytest.raises(Boom):
        run_transaction(pg_engine, doomed)
    assert len(attempts) == 1  # not a transient error: no retry
    assert db_state(pg_engine) == idle
    assert Ops(pg_engine).allocate("port-next")["decision"].device.address == "0000:81:10.0"


def test_a_retried_transaction_allocates_once(pg_engine: Engine):
    load(pg_engine, ONE_PF_THREE_VFS)
    request, selection, network = sriov_binding("port-retried")
    attempts = []

    def flaky(session):  # noqa: ANN001, ANN202
        attempts.append(1)
        decision = allocate(session, request, selection, network)
        if len(attempts) == 1:
            raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))
        return decision

    assert run_transaction(pg_engine, flaky).device.address == "0000:81:10.0"
    assert len(attempts) == 2
    replayed = fresh_tracker(ONE_PF_THREE_VFS)
    allocate_device(request, selection, network, replayed)
    assert_consistent(pg_engine, replayed)


# --- 5. releases and allocations interleaved ------------------------------------------------------

def test_releases_and_allocations_interleaved_leave_exactly_the_replayed_state(pg_engine: Engine):
    load(pg_engine, EIGHT_VFS)
    ops, replayed = Ops(pg_engine), fresh_tracker(EIGHT_VFS)
    first = [ops.allocate(f"holder-{i}") for i in range(8)]
    replay(replayed, first)
    holders = list(succeeded(first))
    assert len(holders) == 8
    for round_ in range(4):
        newcomers = [(f"r{round_}-new-{i:02d}", PHYSICAL if i % 4 == 0 else DIRECT) for i in range(24)]
        tasks = [lambda p=p: ops.release(p) for p in holders]
        tasks += [lambda p=p, vnic=vnic: ops.allocate(p, vnic) for p, vnic in newcomers]
        records = race(tasks)

        assert all(r["released"] for r in records if r["op"] == "release")  # each held a committed device
        replay(replayed, records)
        assert_consistent(pg_engine, replayed)
        winners = succeeded(records)
        owned = {o: a for a, (_, o) in db_state(pg_engine).items() if o}
        assert owned == winners  # the released holders are gone, only this round's winners hold devices
        for record in records:
            if record["op"] == "allocate" and record["port"] not in winners:
                assert_exhausted(record)
        holders = list(winners)


# --- inventories (regressions for two bugs found while writing this file) -------------------------

def test_first_inventories_of_a_new_host_racing_both_commit_and_the_last_wins(pg_engine: Engine):
    """Both used to INSERT the missing inventory row: one failed on its primary key (dead-lettered)."""
    for i in range(5):
        host = f"new-host-{i}"
        payloads = [inventory(pf_group(0x81, 2), host=host), inventory(pf_group(0x82, 1), host=host)]
        race([lambda p=p: load(pg_engine, p) for p in payloads])
        addresses = sorted(db_state(pg_engine, host))
        assert addresses in [sorted(d.address for d in p.devices) for p in payloads]
        stored = db_tracker(pg_engine, host)
        assert sorted(stored.tracked()) == addresses and invariant_violations(stored) == []


def test_inventory_update_drops_vanished_free_devices_and_keeps_one_in_use_until_freed(pg_engine: Engine):
    """A vanished free device used to make every later inventory of the host fail (ValueError); more in
    test_pci_inventory_updates.py."""
    load(pg_engine, ONE_PF_THREE_VFS)
    assert Ops(pg_engine).allocate("port-a")["decision"].device.address == "0000:81:10.0"
    shrunk = inventory(pf_group(0x81, 3)[:1] + pf_group(0x81, 3)[2:3])  # PF and VF .1 remain
    load(pg_engine, shrunk)
    assert db_state(pg_engine) == {"0000:81:00.0": (v.PCI_UNAVAILABLE, None),
                                   "0000:81:10.0": (v.PCI_ALLOCATED, "port-a"),  # gone, but in use
                                   "0000:81:10.1": (v.PCI_AVAILABLE, None)}
    assert invariant_violations(db_tracker(pg_engine)) == []
    assert run_transaction(pg_engine, lambda session: release_port(session, "port-a")) == ["0000:81:10.0"]
    # removed as soon as freed (it used to become available, and be allocated again, until the next inventory)
    freed = {"0000:81:00.0": (v.PCI_AVAILABLE, None), "0000:81:10.1": (v.PCI_AVAILABLE, None)}
    assert db_state(pg_engine) == freed
    assert Ops(pg_engine).allocate("port-b")["decision"].device.address == "0000:81:10.1"
    load(pg_engine, shrunk)
    assert db_state(pg_engine) == {"0000:81:00.0": (v.PCI_UNAVAILABLE, None),
                                   "0000:81:10.1": (v.PCI_ALLOCATED, "port-b")}
    assert invariant_violations(db_tracker(pg_engine)) == []


def test_a_hosts_inventory_is_parsed_once_per_version_and_a_new_one_is_never_missed(pg_engine: Engine, monkeypatch):
    """Locking a host reads its inventory's row version only; the inventory is read and parsed again
    only when another transaction (or this one) has written it since."""
    from pipeline.store import pci

    parsed = []
    real = pci._idle_tracker
    monkeypatch.setattr(pci, "_idle_tracker", lambda stored: parsed.append(1) or real(stored))
    load(pg_engine, ONE_PF_THREE_VFS)
    ops = Ops(pg_engine)
    assert ops.allocate("port-a")["decision"].device.address == "0000:81:10.0"
    assert ops.allocate("port-b")["decision"].device.address == "0000:81:10.1"
    assert len(parsed) == 1  # the second batch found the host's version known
    load(pg_engine, inventory(pf_group(0x81, 3), pf_group(0x82, 2)))  # two more VFs
    assert ops.allocate("port-c")["decision"].device.address == "0000:81:10.2"
    assert ops.allocate("port-d")["decision"].device.address == "0000:82:10.0"  # only in the new inventory
    assert len(parsed) == 2
    load(pg_engine, inventory(pf_group(0x82, 2)))  # the 0x81 group vanishes while three of its VFs are in use

    def release_two(session):  # noqa: ANN001, ANN202 - two writes of the inventory in one transaction
        cache = HostCache(session)
        return release_port(session, "port-a", cache) + release_port(session, "port-b", cache)

    assert run_transaction(pg_engine, release_two) == ["0000:81:10.0", "0000:81:10.1"]
    assert "0000:81:10.0" not in db_state(pg_engine) and "0000:81:10.1" not in db_state(pg_engine)
    assert ops.allocate("port-e")["decision"].device.address == "0000:82:10.1"
    assert invariant_violations(db_tracker(pg_engine)) == []
