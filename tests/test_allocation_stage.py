"""Stages 3 and 4 together: a bound SR-IOV port gets its device, or fails with Nova's reason."""

from pipeline.dry_run import evaluate_scenario
from tests.factories import SRIOV_AGENT, VXLAN_SEGMENT, scenario

PF = {"address": "0000:81:00.0", "vendor_id": "8086", "product_id": "1572", "dev_type": "type-PF",
      "parent_addr": None, "numa_node": 0, "physical_network": "physnet1"}
VFS = [{"address": f"0000:81:10.{i}", "vendor_id": "8086", "product_id": "154c", "dev_type": "type-VF",
        "parent_addr": PF["address"], "numa_node": 0, "physical_network": "physnet1"} for i in range(2)]
INVENTORY = {"compute-1": {"devices": [PF, *VFS]}}


def bind(vnic_type="direct", profile=None, inventory=INVENTORY, **kw):
    return evaluate_scenario(scenario(["sriovnicswitch", "openvswitch"], agents=[SRIOV_AGENT], vnic_type=vnic_type,
                                      profile=profile, pci_devices=inventory, **kw))


def test_vf_chosen_deterministically_and_profile_enriched_as_nova_writes_it():
    result = bind()
    assert result["vif_type"] == "hw_veb" and result["pci_device"]["address"] == "0000:81:10.0"
    assert result["profile"] == {"pci_vendor_info": "8086:154c", "pci_slot": "0000:81:10.0",
                                 "physical_network": "physnet1"}
    assert bind() == result


def test_direct_physical_takes_the_pf():
    result = bind("direct-physical")
    assert result["vif_type"] == "hostdev_physical" and result["pci_device"]["address"] == PF["address"]


def test_pinned_slot_is_claimed_exactly():
    assert bind(profile={"pci_slot": "0000:81:10.1"})["pci_device"]["address"] == "0000:81:10.1"


def test_unknown_pinned_slot_fails_binding_with_reason():
    result = bind(profile={"pci_slot": "0000:99:00.1"})
    assert result["vif_type"] == "binding_failed" and result["binding_levels"] == []
    assert result["explanation"][-1]["reason"].startswith("PciDeviceNotFound")


def test_malformed_pinned_slot_fails_binding():
    result = bind(profile={"pci_slot": "garbage"})
    assert result["vif_type"] == "binding_failed"
    assert "is not a PCI address" in result["explanation"][-1]["reason"]


def test_no_device_on_physnet_fails_with_nova_reason():
    other = {"compute-1": {"devices": [dict(d, physical_network="physnet9") for d in (PF, *VFS)]}}
    result = bind(inventory=other)
    assert result["vif_type"] == "binding_failed"
    assert "ComputeResourcesUnavailable" in result["explanation"][-1]["reason"]


def test_host_without_inventory_trusts_the_profile():
    result = bind(profile={"pci_slot": "0000:04:00.1"}, inventory={})
    assert result["vif_type"] == "hw_veb" and result["pci_device"] is None
    assert result["profile"] == {"pci_slot": "0000:04:00.1"}


def test_normal_port_takes_no_device():
    result = evaluate_scenario(scenario(["openvswitch"], agents=[], pci_devices=INVENTORY, segments=[VXLAN_SEGMENT]))
    assert result["pci_device"] is None
