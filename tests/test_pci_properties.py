"""PciTracker: properties over random hosts and operation sequences, then one test per rule."""

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from pipeline.models import vocabulary as v
from pipeline.models.pci import HostPciInventory, PciReleaseOp, PciRequest
from pipeline.stages.pci_accounting import AllocationOutcome, PciTracker, build_pci_request, invariant_violations
from pipeline.stages.pci_devspec import DeviceSpec, PciConfigError

PF, VF, PCI, VDPA = v.PCI_DEV_TYPE_PF, v.PCI_DEV_TYPE_VF, v.PCI_DEV_TYPE_PCI, v.PCI_DEV_TYPE_VDPA
AV, CL, AL, UN, UC = v.PCI_AVAILABLE, v.PCI_CLAIMED, v.PCI_ALLOCATED, v.PCI_UNAVAILABLE, v.PCI_UNCLAIMABLE
PHYSNETS = [None, "physnet1", "physnet2"]
PORTS = [f"p{i}" for i in range(8)]
SERIAL = {"vpd": {"card_serial_number": "MT0001"}}


# --- builders ------------------------------------------------------------------------------------

def pf(address: str, numa: int | None = 0, physnet: str | None = "physnet1", **extra: Any) -> dict:
    return {"address": address, "vendor_id": "8086", "product_id": "1572", "dev_type": PF, "numa_node": numa,
            "physical_network": physnet, **extra}


def fn(address: str, parent: str | None, numa: int | None = 0, physnet: str | None = "physnet1",
       dev_type: str = VF, **extra: Any) -> dict:
    return {"address": address, "vendor_id": "8086", "product_id": "154c", "dev_type": dev_type,
            "parent_addr": parent, "numa_node": numa, "physical_network": physnet, **extra}


def pci(address: str, numa: int | None = 0, physnet: str | None = "physnet1", **extra: Any) -> dict:
    return {"address": address, "vendor_id": "10de", "product_id": "1eb8", "dev_type": PCI, "numa_node": numa,
            "physical_network": physnet, **extra}


def host(*devices: dict, numa_nodes: list[dict] | None = None) -> HostPciInventory:
    return HostPciInventory.model_validate({"devices": list(devices), "numa_nodes": numa_nodes})


def req(port: str, vnic: str = v.VNIC_DIRECT, physnet: str | None = "physnet1", **kw: Any) -> PciRequest:
    return PciRequest(port_id=port, vnic_type=vnic, physical_network=physnet, **kw)


def two_pfs() -> HostPciInventory:
    """PF A (node 0) with VFs .0/.1, PF B (node 1) with one VF, all on physnet1."""
    return host(pf("0000:81:00.0"), fn("0000:81:10.0", "0000:81:00.0"), fn("0000:81:10.1", "0000:81:00.0"),
                pf("0000:82:00.0", numa=1), fn("0000:82:10.0", "0000:82:00.0", numa=1),
                numa_nodes=[{"id": 0, "socket": 0}, {"id": 1, "socket": 1}])


def fork(tracker: PciTracker) -> PciTracker:
    snapshot = tracker.snapshot()
    return PciTracker.from_snapshot(tracker.inventory, {a: s for a, (s, _) in snapshot.items()},
                                    {a: o for a, (_, o) in snapshot.items() if o})


def summary(outcome: AllocationOutcome) -> tuple:
    return (outcome.success, outcome.error, outcome.reason, outcome.stage,
            outcome.device.address if outcome.device else None, tuple(outcome.candidates))


# --- random hosts and sequences ------------------------------------------------------------------

@st.composite
def inventories(draw: st.DrawFn) -> HostPciInventory:
    nodes = draw(st.integers(1, 3))
    numa = st.sampled_from([None, *range(nodes)])
    tracked = st.sampled_from([True, True, True, False])
    devices: list[dict] = []
    for i in range(draw(st.integers(0, 3))):
        parent = f"0000:{0x81 + i:02x}:00.0"
        physnet, node = draw(st.sampled_from(PHYSNETS)), draw(numa)
        devices.append(pf(parent, node, physnet, remote_managed=draw(st.sampled_from([None, None, False])),
                          tracked=draw(tracked)))
        for j in range(draw(st.integers(0, 4))):
            devices.append(fn(f"0000:{0x81 + i:02x}:10.{j}", parent, node,
                              draw(st.sampled_from([physnet, physnet, physnet, *PHYSNETS])),
                              draw(st.sampled_from([VF, VF, VF, VDPA])),
                              remote_managed=draw(st.sampled_from([None, None, None, True, False])),
                              capabilities=draw(st.sampled_from([None, SERIAL])), tracked=draw(tracked)))
    for k in range(draw(st.integers(0, 2))):
        devices.append(pci(f"0000:{5 + k:02x}:00.0", draw(numa), draw(st.sampled_from(PHYSNETS)),
                           remote_managed=draw(st.sampled_from([None, False]))))
    if draw(st.booleans()):
        devices.append(fn("0000:90:10.0", "0000:90:00.0", draw(numa), "physnet1"))
    sockets = draw(st.sampled_from(["own", "shared", "missing", "default"]))
    cells = None if sockets == "default" else [
        {"id": n, "socket": {"own": n, "shared": 0, "missing": None}[sockets]} for n in range(nodes)]
    return host(*devices, numa_nodes=cells)


@st.composite
def operations(draw: st.DrawFn, inventory: HostPciInventory) -> PciRequest | PciReleaseOp:
    """Mostly requests the host can serve: its own physnets, free choice more often than pinning."""
    port = draw(st.sampled_from(PORTS))
    if draw(st.integers(0, 4)) == 0:
        return PciReleaseOp(op="release", port_id=port)
    physnets = sorted({d.physical_network for d in inventory.devices}, key=str) or [None]
    addresses = [d.address for d in inventory.devices] + ["0000:99:00.0"]
    return req(port,
               draw(st.sampled_from([v.VNIC_DIRECT, v.VNIC_DIRECT, v.VNIC_MACVTAP, v.VNIC_DIRECT_PHYSICAL,
                                     v.VNIC_VHOST_VDPA, v.VNIC_REMOTE_MANAGED, v.VNIC_VIRTIO_FORWARDER,
                                     v.VNIC_NORMAL])),
               draw(st.sampled_from([*physnets, *physnets, "physnet9"])),
               numa_policy=draw(st.sampled_from([None, *v.NUMA_POLICIES])),
               instance_numa_cells=draw(st.one_of(st.none(), st.just([]),
                                                  st.lists(st.integers(0, 2), min_size=1, max_size=2, unique=True))),
               pci_slot=draw(st.one_of(st.none(), st.none(), st.none(), st.sampled_from(addresses))),
               claim_only=draw(st.sampled_from([False, False, False, True])))


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[HostPciInventory, list]:
    inventory = draw(inventories())
    return inventory, draw(st.lists(operations(inventory), max_size=20))


PROPERTY_SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run(tracker: PciTracker, op: PciRequest | PciReleaseOp) -> tuple:
    if isinstance(op, PciReleaseOp):
        released = tracker.release(op.port_id)
        return tuple(released.released), released.noop
    return summary(tracker.allocate(op))


@PROPERTY_SETTINGS
@given(scenarios())
def test_every_operation_keeps_nova_invariants(scenario: tuple) -> None:
    inventory, ops = scenario
    tracker = PciTracker.from_inventory(inventory)
    assert invariant_violations(tracker) == []
    for op in ops:
        before, owners_before = tracker.state(), tracker.owners()
        rebuilt = fork(tracker)
        assert rebuilt.snapshot() == tracker.snapshot()
        if isinstance(op, PciReleaseOp):
            outcome = tracker.release(op.port_id)
            assert outcome.noop == (op.port_id not in owners_before.values())
            assert outcome.released == sorted(a for a, p in owners_before.items() if p == op.port_id)
            assert all(tracker.state()[a] == AV and a not in tracker.owners() for a in outcome.released)
        else:
            outcome = tracker.allocate(op)
            assert summary(rebuilt.allocate(op)) == summary(outcome), "a rebuilt tracker must choose the same"
            if outcome.device is not None:
                assert before[outcome.device.address] == AV
                assert tracker.owners()[outcome.device.address] == op.port_id
                assert tracker.state()[outcome.device.address] == (CL if op.claim_only else AL)
                if op.pci_slot is None:
                    assert outcome.device.address in outcome.candidates
            else:
                assert (tracker.state(), tracker.owners()) == (before, owners_before)
        assert invariant_violations(tracker) == []


@PROPERTY_SETTINGS
@given(scenarios())
def test_same_inputs_same_outcomes(scenario: tuple) -> None:
    inventory, ops = scenario
    first, second = PciTracker.from_inventory(inventory), PciTracker.from_inventory(inventory)
    assert [run(first, op) for op in ops] == [run(second, op) for op in ops]
    assert first.snapshot() == second.snapshot()


@PROPERTY_SETTINGS
@given(scenarios(), st.data())
def test_release_restores_the_state_before_the_allocate(scenario: tuple, data: st.DataObject) -> None:
    """Exactly, except Nova's one quirk: a PF made unavailable stays so while a sibling is still claimed."""
    inventory, ops = scenario
    tracker = PciTracker.from_inventory(inventory)
    for op in ops:
        run(tracker, op)
    probe = data.draw(operations(inventory).filter(lambda o: isinstance(o, PciRequest)))
    probe = probe.model_copy(update={"port_id": "probe"})
    before = tracker.snapshot()
    outcome = tracker.allocate(probe)
    if outcome.device is None:
        assert tracker.snapshot() == before
        return
    assert tracker.release("probe").released == [outcome.device.address]
    after = tracker.snapshot()
    changed = {a for a in before if before[a] != after[a]}
    if changed:
        parent = tracker.tracked()[outcome.device.address].parent
        assert changed == {parent}
        assert (before[parent][0], after[parent][0]) == (UC, UN)
        assert any(tracker.state()[s] == CL for s in tracker.tracked()[parent].children)


# --- PF/VF dependency ------------------------------------------------------------------------------

def test_vf_claim_makes_pf_unclaimable_and_allocation_makes_it_unavailable() -> None:
    tracker = PciTracker.from_inventory(two_pfs())
    assert tracker.allocate(req("p1", pci_slot="0000:81:10.0", claim_only=True)).success
    assert tracker.state()["0000:81:00.0"] == UC
    assert tracker.allocate(req("p2", pci_slot="0000:81:10.1")).success
    assert tracker.state()["0000:81:00.0"] == UN
    tracker.release("p2")  # a sibling is still claimed: Nova leaves the PF unavailable
    assert tracker.state()["0000:81:00.0"] == UN
    tracker.release("p1")
    assert set(tracker.state().values()) == {AV}


def test_pf_claim_makes_vfs_unclaimable_and_allocation_makes_them_unavailable() -> None:
    tracker = PciTracker.from_inventory(two_pfs())
    assert tracker.allocate(req("p1", v.VNIC_DIRECT_PHYSICAL, pci_slot="0000:81:00.0", claim_only=True)).success
    assert [tracker.state()[a] for a in ("0000:81:00.0", "0000:81:10.0", "0000:81:10.1")] == [CL, UC, UC]
    tracker.release("p1")
    assert tracker.allocate(req("p2", v.VNIC_DIRECT_PHYSICAL, pci_slot="0000:81:00.0")).success
    assert [tracker.state()[a] for a in ("0000:81:00.0", "0000:81:10.0", "0000:81:10.1")] == [AL, UN, UN]
    blocked = tracker.allocate(req("p3", pci_slot="0000:81:10.1"))
    assert (blocked.error, blocked.reason, blocked.device_status) == (
        v.PCI_ERR_INVALID_STATUS, v.PCI_REASON_DEVICE_NOT_AVAILABLE, UN)
    assert "0000:81:00.0 allocated by port p2" in blocked.message


def test_a_pf_is_claimable_only_while_all_its_functions_are_free() -> None:
    tracker = PciTracker.from_inventory(two_pfs())
    assert tracker.allocate(req("p1")).device.address == "0000:81:10.0"
    physical = tracker.allocate(req("p2", v.VNIC_DIRECT_PHYSICAL))
    assert physical.candidates == ["0000:82:00.0"]
    exhausted = tracker.allocate(req("p3", v.VNIC_DIRECT_PHYSICAL))
    assert (exhausted.error, exhausted.stage, exhausted.reason) == (
        v.PCI_ERR_RESOURCES_UNAVAILABLE, v.PCI_STAGE_CLAIM_TEST, v.PCI_REASON_EXHAUSTED)
    assert exhausted.blocked == {"0000:81:00.0": UN, "0000:82:00.0": AL}


def test_vdpa_functions_count_as_vfs() -> None:
    inventory = host(pf("0000:81:00.0"), fn("0000:81:10.0", "0000:81:00.0", dev_type=VDPA))
    tracker = PciTracker.from_inventory(inventory)
    assert tracker.allocate(req("p1", v.VNIC_VHOST_VDPA)).success
    assert tracker.state()["0000:81:00.0"] == UN


# --- which devices a vnic type may take ------------------------------------------------------------

def mixed_host() -> HostPciInventory:
    return host(pf("0000:81:00.0"), fn("0000:81:10.0", "0000:81:00.0"),
                fn("0000:81:10.1", "0000:81:00.0", dev_type=VDPA),
                fn("0000:81:10.2", "0000:81:00.0", remote_managed=True, capabilities=SERIAL),
                pf("0000:82:00.0", physnet=None), fn("0000:82:10.0", "0000:82:00.0", physnet=None),
                pci("0000:05:00.0", remote_managed=False), pci("0000:06:00.0"))


@pytest.mark.parametrize(("vnic", "physnet", "candidates"), [
    (v.VNIC_DIRECT, "physnet1", ["0000:05:00.0", "0000:81:10.0"]),
    (v.VNIC_MACVTAP, "physnet1", ["0000:05:00.0", "0000:81:10.0"]),
    (v.VNIC_VIRTIO_FORWARDER, "physnet1", ["0000:05:00.0", "0000:81:10.0"]),
    (v.VNIC_DIRECT_PHYSICAL, "physnet1", ["0000:81:00.0"]),
    (v.VNIC_VHOST_VDPA, "physnet1", ["0000:81:10.1"]),
    (v.VNIC_REMOTE_MANAGED, "physnet1", ["0000:81:10.2"]),
    (v.VNIC_DIRECT, None, ["0000:82:10.0"]),
    (v.VNIC_DIRECT_PHYSICAL, None, ["0000:82:00.0"]),
])
def test_each_vnic_type_takes_only_its_kind_of_device(vnic: str, physnet: str | None, candidates: list) -> None:
    assert PciTracker.from_inventory(mixed_host()).allocate(req("p1", vnic, physnet)).candidates == candidates


def test_request_specs_as_nova_builds_them() -> None:
    def spec(vnic: str, **kw: Any) -> list[dict]:
        return build_pci_request(req("p", vnic, **kw)).spec

    assert spec(v.VNIC_DIRECT) == [{"physical_network": "physnet1", "remote_managed": "False"}]
    assert spec(v.VNIC_DIRECT_PHYSICAL)[0]["dev_type"] == PF
    assert spec(v.VNIC_VHOST_VDPA)[0]["dev_type"] == VDPA
    assert spec(v.VNIC_REMOTE_MANAGED)[0]["remote_managed"] == "True"
    assert spec(v.VNIC_DIRECT, physnet=None, trusted=True) == [
        {"physical_network": None, "remote_managed": "False", "trusted": "True"}]
    assert build_pci_request(req("p", v.VNIC_NORMAL)) is None
    # no device_spec entry here carries a trusted tag, so no pool can satisfy trusted=...
    outcome = PciTracker.from_inventory(mixed_host()).allocate(req("p", trusted=False))
    assert outcome.reason == v.PCI_REASON_NO_MATCHING_DEVICE


# --- NUMA policies ---------------------------------------------------------------------------------

def numa_host(sockets: tuple = (0, 0, 1)) -> HostPciInventory:
    """One VF per PF on node 0, node 1, node 2 and on no node; nodes 0/1 share a socket."""
    devices = []
    for bus, node in (("81", 0), ("82", 1), ("83", 2), ("84", None)):
        devices += [pf(f"0000:{bus}:00.0", numa=node), fn(f"0000:{bus}:10.0", f"0000:{bus}:00.0", numa=node)]
    return host(*devices, numa_nodes=[{"id": i, "socket": s} for i, s in enumerate(sockets)])


VF0, VF1, VF2, VFN = "0000:81:10.0", "0000:82:10.0", "0000:83:10.0", "0000:84:10.0"


@pytest.mark.parametrize(("policy", "rounds", "last"), [
    (v.NUMA_POLICY_REQUIRED, [[VF0]], (v.PCI_STAGE_NUMA_FIT, v.PCI_REASON_EXHAUSTED)),
    (v.NUMA_POLICY_LEGACY, [[VF0], [VFN]], (v.PCI_STAGE_NUMA_FIT, v.PCI_REASON_EXHAUSTED)),
    (None, [[VF0], [VFN]], (v.PCI_STAGE_NUMA_FIT, v.PCI_REASON_EXHAUSTED)),
    (v.NUMA_POLICY_SOCKET, [[VF0], [VF1]], (v.PCI_STAGE_NUMA_FIT, v.PCI_REASON_EXHAUSTED)),
    (v.NUMA_POLICY_PREFERRED, [[VF0], [VFN], [VF1, VF2], [VF2]], (v.PCI_STAGE_CLAIM_TEST, v.PCI_REASON_EXHAUSTED)),
])
def test_numa_policies_strictest_set_first(policy: str | None, rounds: list, last: tuple) -> None:
    tracker = PciTracker.from_inventory(numa_host())
    for index, expected in enumerate(rounds):
        outcome = tracker.allocate(req(f"p{index}", numa_policy=policy, instance_numa_cells=[0]))
        assert (outcome.success, outcome.candidates) == (True, expected)
    failed = tracker.allocate(req("last", numa_policy=policy, instance_numa_cells=[0]))
    assert (failed.error, failed.stage, failed.reason) == (v.PCI_ERR_RESOURCES_UNAVAILABLE, *last)


def test_no_instance_numa_topology_means_no_numa_filtering() -> None:
    for cells in (None, []):
        outcome = PciTracker.from_inventory(numa_host()).allocate(
            req("p", numa_policy=v.NUMA_POLICY_REQUIRED, instance_numa_cells=cells))
        assert outcome.candidates == [VF0, VF1, VF2, VFN]


def test_socket_policy_without_socket_info_allows_only_local_devices() -> None:
    tracker = PciTracker.from_inventory(numa_host(sockets=(0, None, 1)))
    assert tracker.allocate(req("p1", numa_policy=v.NUMA_POLICY_SOCKET, instance_numa_cells=[0])).candidates == [VF0]
    failed = tracker.allocate(req("p2", numa_policy=v.NUMA_POLICY_SOCKET, instance_numa_cells=[0]))
    assert (failed.stage, failed.reason) == (v.PCI_STAGE_NUMA_FIT, v.PCI_REASON_EXHAUSTED)


def test_numa_affinity_when_even_an_idle_host_has_nothing_close() -> None:
    outcome = PciTracker.from_inventory(numa_host()).allocate(
        req("p", numa_policy=v.NUMA_POLICY_REQUIRED, instance_numa_cells=[3]))
    assert (outcome.error, outcome.stage, outcome.reason) == (
        v.PCI_ERR_RESOURCES_UNAVAILABLE, v.PCI_STAGE_NUMA_FIT, v.PCI_REASON_NUMA_AFFINITY)
    assert "NUMA policy required" in outcome.message and "[3]" in outcome.message


def test_preferred_counts_a_local_pf_before_dropping_it_as_nova_does() -> None:
    """Nova's NUMA step judges "enough local devices" before the PF filter runs, so a free local
    PF (whose VF is not tracked) pins even a 'preferred' request to node 0, where it then fails."""
    inventory = host(pf("0000:81:00.0"), fn("0000:81:10.0", "0000:81:00.0", tracked=False),
                     pf("0000:82:00.0", numa=1), fn("0000:82:10.0", "0000:82:00.0", numa=1))
    outcome = PciTracker.from_inventory(inventory).allocate(
        req("p", numa_policy=v.NUMA_POLICY_PREFERRED, instance_numa_cells=[0]))
    assert (outcome.stage, outcome.reason) == (v.PCI_STAGE_NUMA_FIT, v.PCI_REASON_NUMA_AFFINITY)


# --- errors and reasons ----------------------------------------------------------------------------

def test_no_matching_device_port_in_use_and_no_pci_request() -> None:
    tracker = PciTracker.from_inventory(two_pfs())
    missing = tracker.allocate(req("p1", physnet="physnet9"))
    assert (missing.error, missing.stage, missing.reason) == (
        v.PCI_ERR_RESOURCES_UNAVAILABLE, v.PCI_STAGE_CLAIM_TEST, v.PCI_REASON_NO_MATCHING_DEVICE)
    assert "physnet9" in missing.message and missing.blocked is None
    assert tracker.allocate(req("p1")).success
    again = tracker.allocate(req("p1"))
    assert (again.error, again.stage, again.reason) == (v.PCI_ERR_PORT_IN_USE, v.PCI_STAGE_API,
                                                       v.PCI_REASON_PORT_IN_USE)
    before = tracker.snapshot()
    normal = tracker.allocate(req("p2", v.VNIC_NORMAL))
    assert (normal.success, normal.stage, normal.device, normal.pci_request) == (
        True, v.PCI_STAGE_NO_REQUEST, None, None)
    assert tracker.snapshot() == before


def test_release_of_an_unknown_port_is_a_noop() -> None:
    tracker = PciTracker.from_inventory(two_pfs())
    outcome = tracker.release("nobody")
    assert (outcome.released, outcome.noop) == ([], True)


@pytest.mark.parametrize(("slot", "request_kw", "error", "reason"), [
    ("0000:99:00.0", {}, v.PCI_ERR_NOT_FOUND, v.PCI_REASON_DEVICE_NOT_FOUND),
    ("0000:81:10.1", {}, v.PCI_ERR_NOT_FOUND, v.PCI_REASON_DEVICE_NOT_FOUND),  # in the inventory, untracked
    ("0000:81:00.0", {}, v.PCI_ERR_INVALID_STATUS, v.PCI_REASON_DEVICE_NOT_AVAILABLE),  # status before spec
    ("0000:81:00.0", {"vnic": v.VNIC_DIRECT_PHYSICAL}, v.PCI_ERR_INVALID_STATUS, v.PCI_REASON_DEVICE_NOT_AVAILABLE),
    ("0000:82:10.0", {"physnet": "physnet9", "numa_policy": v.NUMA_POLICY_REQUIRED, "instance_numa_cells": [0]},
     v.PCI_ERR_REQUEST_FAILED, v.PCI_REASON_DEVICE_MISMATCH),  # spec before NUMA
    ("0000:82:00.0", {}, v.PCI_ERR_REQUEST_FAILED, v.PCI_REASON_DEVICE_MISMATCH),  # direct never takes a PF
    ("0000:82:10.0", {"numa_policy": v.NUMA_POLICY_REQUIRED, "instance_numa_cells": [0]},
     v.PCI_ERR_REQUEST_FAILED, v.PCI_REASON_DEVICE_NUMA_AFFINITY),
])
def test_pinned_slot_checks_tracked_status_spec_numa_in_order(slot: str, request_kw: dict, error: str,
                                                              reason: str) -> None:
    inventory = host(pf("0000:81:00.0"), fn("0000:81:10.0", "0000:81:00.0"),
                     fn("0000:81:10.1", "0000:81:00.0", tracked=False),
                     pf("0000:82:00.0", numa=1), fn("0000:82:10.0", "0000:82:00.0", numa=1))
    tracker = PciTracker.from_inventory(inventory)
    assert tracker.allocate(req("holder", pci_slot="0000:81:10.0")).success
    before = tracker.snapshot()
    outcome = tracker.allocate(req("p", request_kw.pop("vnic", v.VNIC_DIRECT), pci_slot=slot, **request_kw))
    assert (outcome.success, outcome.stage, outcome.error, outcome.reason, outcome.pinned) == (
        False, v.PCI_STAGE_PCI_CLAIM, error, reason, True)
    assert tracker.snapshot() == before


def test_pinned_legacy_slot_is_judged_on_its_own() -> None:
    """A pinned device with no NUMA node satisfies 'legacy' even while local devices are free."""
    tracker = PciTracker.from_inventory(numa_host())
    outcome = tracker.allocate(req("p", numa_policy=v.NUMA_POLICY_LEGACY, instance_numa_cells=[0], pci_slot=VFN))
    assert outcome.success and outcome.candidates == [VF0]


# --- deterministic choice --------------------------------------------------------------------------

def test_choice_packs_functions_onto_busy_pfs_then_lowest_address() -> None:
    inventory = host(pf("0000:81:00.0"), fn("0000:81:10.0", "0000:81:00.0"),
                     pf("0000:82:00.0"), fn("0000:82:10.0", "0000:82:00.0"), fn("0000:82:10.1", "0000:82:00.0"),
                     fn("0000:90:10.0", "0000:90:00.0"))
    tracker = PciTracker.from_inventory(inventory)
    assert tracker.allocate(req("p1", pci_slot="0000:82:10.0")).success
    assert tracker.allocate(req("p2")).device.address == "0000:82:10.1"  # PF 82 is already busy
    assert tracker.allocate(req("p3")).device.address == "0000:90:10.0"  # blocks no PF
    assert tracker.allocate(req("p4")).device.address == "0000:81:10.0"


def test_prefer_is_followed_only_within_the_candidates() -> None:
    tracker = PciTracker.from_inventory(two_pfs())
    assert tracker.allocate(req("p1"), prefer="0000:82:00.0").device.address == "0000:81:10.0"
    assert tracker.allocate(req("p2"), prefer="0000:82:10.0").device.address == "0000:82:10.0"


# --- device_spec -----------------------------------------------------------------------------------

def test_device_spec_one_entry_per_uniform_pf_else_per_device() -> None:
    inventory = host(pf("0000:81:00.0"), fn("0000:81:10.0", "0000:81:00.0"),
                     pf("0000:82:00.0"), fn("0000:82:10.0", "0000:82:00.0", physnet="physnet2"),
                     fn("0000:82:10.1", "0000:82:00.0", tracked=False), pci("0000:05:00.0", remote_managed=False))
    tracker = PciTracker.from_inventory(inventory)
    regex = {"domain": "^0000$", "bus": "^82$", "slot": "^00$", "function": "^0$"}
    assert tracker.device_spec == [
        {"address": "0000:81:00.0", "physical_network": "physnet1"},
        {"address": "0000:82:10.0", "physical_network": "physnet2"},
        {"address": regex, "physical_network": "physnet1"},
        {"address": "0000:05:00.0", "physical_network": "physnet1", "remote_managed": "false"},
    ]
    assert tracker.untracked == ["0000:82:10.1"]


def test_remote_managed_needs_a_card_serial_from_the_vf_or_its_pf() -> None:
    inventory = host(pf("0000:81:00.0", capabilities=SERIAL),
                     fn("0000:81:10.0", "0000:81:00.0", remote_managed=True),
                     fn("0000:81:10.1", "0000:81:00.0", remote_managed=True, dev_type=VDPA),
                     pf("0000:82:00.0", remote_managed=True), fn("0000:82:10.0", "0000:82:00.0"))
    tracker = PciTracker.from_inventory(inventory)
    # libvirt hands a VF its PF's serial, not a vdpa device; a regex PF entry without a serial is skipped
    assert tracker.untracked == ["0000:81:10.1", "0000:82:00.0"]
    assert tracker.allocate(req("p", v.VNIC_REMOTE_MANAGED)).device.address == "0000:81:10.0"
    assert tracker.tracked()["0000:82:10.0"].pool_props["address"] == "0000:82:00.0"


def test_remote_managed_pf_address_is_a_config_error() -> None:
    inventory = host(pf("0000:81:00.0", remote_managed=True),
                     fn("0000:81:10.0", "0000:81:00.0", remote_managed=True, capabilities=SERIAL))
    with pytest.raises(PciConfigError) as raised:
        PciTracker.from_inventory(inventory)
    assert raised.value.error == v.PCI_ERR_NOT_FOUND_BY_ID and "0000:81:00.0" in raised.value.message
    assert DeviceSpec(inventory).as_config() == [
        {"address": "0000:81:00.0", "physical_network": "physnet1", "remote_managed": "true"}]


# --- snapshots and invariants ----------------------------------------------------------------------

def test_from_snapshot_checks_shape_only() -> None:
    inventory = two_pfs()
    with pytest.raises(ValueError, match="0000:99:00.0 not tracked"):
        PciTracker.from_snapshot(inventory, {"0000:99:00.0": AV}, {})
    with pytest.raises(ValueError, match="unknown status"):
        PciTracker.from_snapshot(inventory, {"0000:81:00.0": "reserved"}, {})
    partial = PciTracker.from_snapshot(inventory, {"0000:82:10.0": AL, "0000:82:00.0": UN}, {"0000:82:10.0": "p"})
    assert partial.state()["0000:81:00.0"] == AV and invariant_violations(partial) == []


@pytest.mark.parametrize(("statuses", "owners", "needle"), [
    ({"0000:81:00.0": AL, "0000:81:10.0": AL}, {"0000:81:00.0": "a", "0000:81:10.0": "b"}, "together with"),
    ({}, {"0000:81:10.0": "a"}, "is available but owned"),
    ({"0000:81:10.0": AL, "0000:81:00.0": UN}, {}, "without an owner"),
    ({"0000:81:10.0": AL, "0000:81:00.0": UC}, {"0000:81:10.0": "a"}, "its PF 0000:81:00.0 is unclaimable"),
    ({"0000:81:10.1": UC}, {}, "unclaimable but no related device is claimed"),
    ({"0000:81:00.0": UN}, {}, "unavailable but no related device is in use"),
    ({"0000:81:10.0": AL, "0000:81:10.1": AL, "0000:81:00.0": UN}, {"0000:81:10.0": "a", "0000:81:10.1": "a"},
     "holds several devices"),
])
def test_invariant_violations_finds_inconsistent_states(statuses: dict, owners: dict, needle: str) -> None:
    problems = invariant_violations(PciTracker.from_snapshot(two_pfs(), statuses, owners))
    assert any(needle in p for p in problems), problems


# --- input models ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("device", "field", "reason"), [
    (fn("0000:81:10.0", None, vendor_id="80861"), "vendor_id", "not 4 hex digits"),
    (fn("0000:81:20.0", None), "address", "is not a PCI address"),
    (fn("0000:81:10.0", None, numa="0"), "numa_node", "valid integer"),
    (pf("0000:81:00.0", parent_addr="0000:80:00.0"), "parent_addr", "has no parent"),
    (fn("0000:81:10.0", None, colour="red"), "colour", "Extra inputs"),
])
def test_bad_devices_are_rejected_naming_the_field(device: dict, field: str, reason: str) -> None:
    with pytest.raises(ValidationError) as raised:
        host(device)
    assert field in str(raised.value) and reason in str(raised.value)


def test_bad_requests_are_rejected_naming_the_field() -> None:
    with pytest.raises(ValidationError, match="numa_policy"):
        req("p", numa_policy="strict")
    with pytest.raises(ValidationError, match="pci_slot"):
        req("p", pci_slot="81:10.0")
    with pytest.raises(ValidationError, match="listed twice"):
        host(pf("0000:81:00.0"), pf("0000:81:00.0"))
