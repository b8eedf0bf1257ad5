"""Stage 2 per reference driver: what binds, with which vif_details, and why not."""

import pytest

from pipeline.drivers.macvtap import interface_name, vlan_device_name
from pipeline.drivers.ovn import parse_mappings
from pipeline.dry_run import evaluate_scenario
from tests.factories import (FLAT_SEGMENT, MACVTAP_AGENT, OVN_CHASSIS, OVS_AGENT, SRIOV_AGENT, VLAN_SEGMENT,
                             VXLAN_SEGMENT, agent, scenario)

PORT_ID = "0a1b2c3d-0000-4000-8000-000000000001"


def bind(*args, **kwargs):
    return evaluate_scenario(scenario(*args, **kwargs))


def reasons(result):
    return [d["reason"] for d in result["explanation"]]


class TestOpenvswitch:
    def test_kernel_datapath(self):
        r = bind(["openvswitch"], agents=[OVS_AGENT])
        assert r["vif_type"] == "ovs" and r["bound_driver"] == "openvswitch"
        assert r["vif_details"] == {"connectivity": "l2", "port_filter": True, "ovs_hybrid_plug": False,
                                    "datapath_type": "system", "ovs_create_tap": True, "bridge_name": "br-int",
                                    "bound_drivers": {"0": "openvswitch"}}
        assert r["port_status"] is None

    def test_hybrid_plug_drops_create_tap(self):
        r = bind(["openvswitch"], agents=[agent(OVS_AGENT, configurations={"ovs_hybrid_plug": True})])
        assert r["vif_details"]["ovs_hybrid_plug"] is True and "ovs_create_tap" not in r["vif_details"]

    def test_hybrid_plug_defaults_to_security_groups_when_agent_silent(self):
        silent = agent(OVS_AGENT)
        del silent["configurations"]["ovs_hybrid_plug"]
        assert bind(["openvswitch"], agents=[silent])["vif_details"]["ovs_hybrid_plug"] is True
        off = bind(["openvswitch"], agents=[silent], config={"enable_security_group": False})
        assert off["vif_details"]["ovs_hybrid_plug"] is False and off["vif_details"]["port_filter"] is False

    @pytest.mark.parametrize(("iface", "mode"), [("dpdkvhostuser", "client"), ("dpdkvhostuserclient", "server")])
    def test_vhostuser(self, iface, mode):
        dpdk = agent(OVS_AGENT, configurations={"datapath_type": "netdev", "vhostuser_socket_dir": "/run/vhu",
                                                "ovs_capabilities": {"iface_types": [iface]}})
        r = bind(["openvswitch"], agents=[dpdk])
        assert r["vif_type"] == "vhostuser"
        details = r["vif_details"]
        assert "connectivity" not in details and details["vhostuser_mode"] == mode
        assert details["vhostuser_socket"] == "/run/vhu/" + ("vhu" + PORT_ID)[:14]
        assert details["port_filter"] is False and details["vhostuser_ovs_plug"] is True
        assert details["datapath_type"] == "netdev"

    def test_direct_needs_switchdev_and_is_always_ovs(self):
        r = bind(["openvswitch"], agents=[OVS_AGENT], vnic_type="direct")
        assert r["vif_type"] == "binding_failed" and "without the switchdev capability" in reasons(r)[0]
        offload = bind(["openvswitch"], agents=[OVS_AGENT], vnic_type="direct",
                       profile={"capabilities": ["rx", "switchdev"]})
        assert offload["vif_type"] == "ovs" and "ovs_create_tap" not in offload["vif_details"]

    def test_smartnic_needs_baremetal_smartnic(self):
        r = bind(["openvswitch"], agents=[OVS_AGENT], vnic_type="smart-nic")
        assert r["vif_type"] == "binding_failed" and "baremetal_smartnic" in reasons(r)[0]
        ok = bind(["openvswitch"], agents=[agent(OVS_AGENT, configurations={"baremetal_smartnic": True})],
                  vnic_type="smart-nic")
        assert ok["vif_type"] == "ovs"

    def test_missing_bridge_mapping_and_tunnel_type_explained(self):
        r = bind(["openvswitch"], agents=[agent(OVS_AGENT, configurations={"tunnel_types": []})],
                 segments=[dict(VLAN_SEGMENT, physical_network="physnet2"), VXLAN_SEGMENT])
        assert r["vif_type"] == "binding_failed"
        assert reasons(r) == ["physnet2 not in bridge_mappings on compute-1",
                              "network type vxlan not supported by Open vSwitch agent on compute-1 "
                              "(allowed: local, flat, vlan)"]

    def test_prohibited_vnic_type(self):
        r = bind(["openvswitch"], agents=[OVS_AGENT], config={"ovs_vnic_type_prohibit_list": ["normal"]})
        assert r["vif_type"] == "binding_failed" and reasons(r) == ["vnic_type normal prohibited by configuration"]

    def test_bad_prohibit_list_is_config_error(self):
        assert bind(["openvswitch"], config={"ovs_vnic_type_prohibit_list": ["macvtap"]})["error"].startswith(
            "ConfigError: Not all of the items")
        all_off = bind(["openvswitch"], config={"ovs_vnic_type_prohibit_list": ["normal", "direct", "smart-nic",
                                                                                "vdpa"]})
        assert "All possible vnic_types were prohibited" in all_off["error"]

    def test_dead_agent_skipped_for_alive_one(self):
        dead = agent(OVS_AGENT, alive=False, configurations={"integration_bridge": "br-dead"})
        r = bind(["openvswitch"], agents=[dead, OVS_AGENT])
        assert r["vif_details"]["bridge_name"] == "br-int"
        assert reasons(r) == ["Open vSwitch agent on compute-1 is dead"]

    def test_agent_on_other_host_does_not_count(self):
        r = bind(["openvswitch"], agents=[agent(OVS_AGENT, host="compute-2")])
        assert reasons(r) == ["no Open vSwitch agent registered on host 'compute-1'"]


class TestSriov:
    def test_vf_on_vlan_is_hw_veb_down_with_string_vlan(self):
        r = bind(["sriovnicswitch"], agents=[SRIOV_AGENT], vnic_type="direct")
        assert (r["vif_type"], r["port_status"]) == ("hw_veb", "DOWN")
        assert r["vif_details"]["vlan"] == "101" and r["vif_details"]["port_filter"] is False

    def test_flat_vlan_is_string_zero(self):
        r = bind(["sriovnicswitch"], agents=[SRIOV_AGENT], vnic_type="macvtap", segments=[FLAT_SEGMENT])
        assert r["vif_details"]["vlan"] == "0"

    def test_direct_physical_needs_no_agent_and_is_active(self):
        r = bind(["sriovnicswitch"], agents=[], vnic_type="direct-physical")
        assert (r["vif_type"], r["port_status"]) == ("hostdev_physical", "ACTIVE")

    def test_direct_physical_still_needs_flat_or_vlan(self):
        r = bind(["sriovnicswitch"], vnic_type="direct-physical", segments=[VXLAN_SEGMENT])
        assert r["vif_type"] == "binding_failed" and "network type vxlan" in reasons(r)[0]

    def test_switchdev_direct_left_to_ovs(self):
        r = bind(["sriovnicswitch", "openvswitch"], agents=[SRIOV_AGENT, OVS_AGENT], vnic_type="direct",
                 profile={"capabilities": ["switchdev"]})
        assert r["bound_driver"] == "openvswitch"
        assert "switchdev" in reasons(r)[0]

    def test_dead_agent_and_missing_device_mapping(self):
        dead = bind(["sriovnicswitch"], agents=[agent(SRIOV_AGENT, alive=False)], vnic_type="direct")
        assert reasons(dead) == ["NIC Switch agent on compute-1 is dead"]
        unmapped = bind(["sriovnicswitch"], agents=[agent(SRIOV_AGENT, configurations={"device_mappings": {}})],
                        vnic_type="direct")
        assert reasons(unmapped) == ["physnet1 not in device_mappings on compute-1"]


class TestMacvtap:
    def test_vlan_int_and_vlan_subinterface(self):
        r = bind(["macvtap"], agents=[MACVTAP_AGENT])
        assert r["vif_type"] == "macvtap"
        assert r["vif_details"] == {"connectivity": "l2", "port_filter": False, "vlan": 101,
                                    "physical_interface": "eth1", "macvtap_source": "eth1.101",
                                    "macvtap_mode": "bridge", "bound_drivers": {"0": "macvtap"}}

    def test_flat_after_vlan_carries_no_vlan(self):
        """The reference leaks ``vlan`` from a VLAN binding into later flat ones; we must not."""
        bind(["macvtap"], agents=[MACVTAP_AGENT])
        flat = bind(["macvtap"], agents=[MACVTAP_AGENT], segments=[FLAT_SEGMENT])
        assert "vlan" not in flat["vif_details"] and flat["vif_details"]["macvtap_source"] == "eth1"

    def test_long_interface_names_are_hashed_to_fit(self):
        assert interface_name("eth1", 10) == "eth1"
        short = interface_name("a-very-long-ifname0", 10)
        assert len(short) == 10 and short.startswith("a-ve") and short != interface_name("a-very-long-ifname1", 10)
        assert len(vlan_device_name("a-very-long-ifname0", 4094)) <= 15

    def test_live_migration_needs_same_source(self):
        original = {"host": "compute-0", "profile": {"migrating_to": "compute-1"},
                    "vif_details": {"macvtap_source": "eth9.101"}}
        refused = bind(["macvtap"], agents=[MACVTAP_AGENT], original=original,
                       profile={"migrating_to": "compute-1"})
        assert refused["vif_type"] == "binding_failed" and "live migration from compute-0" in reasons(refused)[0]
        original["vif_details"]["macvtap_source"] = "eth1.101"
        assert bind(["macvtap"], agents=[MACVTAP_AGENT], original=original,
                    profile={"migrating_to": "compute-1"})["vif_type"] == "macvtap"


class TestOvn:
    def test_normal_port(self):
        r = bind(["ovn"], agents=[OVN_CHASSIS])
        assert r["vif_type"] == "ovs"
        assert r["vif_details"] == {"port_filter": True, "connectivity": "l2", "ovs_create_tap": True,
                                    "bridge_name": "br-int", "datapath_type": "system",
                                    "bound_drivers": {"0": "ovn"}}

    def test_external_ports_declined(self):
        for vnic in ("direct", "direct-physical", "macvtap", "baremetal"):
            r = bind(["ovn"], agents=[OVN_CHASSIS], vnic_type=vnic)
            assert r["vif_type"] == "binding_failed" and "external port" in reasons(r)[0]

    def test_vhostuser_and_virtio_forwarder(self):
        dpdk = agent(OVN_CHASSIS, configurations={"datapath-type": "netdev", "iface-types": "dpdkvhostuser,tap"})
        r = bind(["ovn"], agents=[dpdk], config={"ovn_vhost_sock_dir": "/run/ovn"})
        assert r["vif_type"] == "vhostuser"
        assert r["vif_details"]["vhostuser_socket"] == "/run/ovn/" + ("vhu" + PORT_ID)[:14]
        assert r["vif_details"]["vhostuser_mode"] == "server"
        fwd = bind(["ovn"], agents=[OVN_CHASSIS], vnic_type="virtio-forwarder")
        assert fwd["vif_type"] == "agilio_ovs" and fwd["vif_details"]["vhostuser_mode"] == "client"

    def test_physnet_must_be_in_bridge_mappings_tunnels_need_none(self):
        r = bind(["ovn"], agents=[OVN_CHASSIS], segments=[dict(VLAN_SEGMENT, physical_network="physnet9"),
                                                          VXLAN_SEGMENT])
        assert r["bound_segment_id"] == "seg-vxlan"
        assert reasons(r) == ["physnet9 not in ovn-bridge-mappings of chassis compute-1"]

    def test_remote_managed_binds_on_dpu_chassis(self):
        dpu = agent(OVN_CHASSIS, host="dpu-1", configurations={"ovn-cms-options": "card-serial-number=MT42"})
        profile = {"pci_vendor_info": "15b3:101e", "pci_slot": "0000:03:00.2", "physical_network": None,
                   "card_serial_number": "MT42", "pf_mac_address": "aa:bb:cc:dd:ee:ff", "vf_num": 2}
        r = bind(["ovn"], agents=[dpu], vnic_type="remote-managed", profile=profile, segments=[VXLAN_SEGMENT])
        assert r["vif_type"] == "ovs" and r["bound_driver"] == "ovn"

    def test_unknown_card_serial_is_a_driver_error_and_next_driver_tried(self):
        profile = {"pci_vendor_info": "15b3:101e", "pci_slot": "0000:03:00.2", "physical_network": None,
                   "card_serial_number": "NOPE", "pf_mac_address": "aa:bb:cc:dd:ee:ff", "vf_num": 2}
        r = bind(["ovn", "l2population"], agents=[OVN_CHASSIS], vnic_type="remote-managed", profile=profile,
                 segments=[VXLAN_SEGMENT])
        assert r["vif_type"] == "binding_failed"
        assert r["driver_errors"] == ["ovn: RuntimeError: Chassis with specified card serial number NOPE not found."]

    def test_first_chassis_decides_and_dead_one_refuses(self):
        r = bind(["ovn"], agents=[agent(OVN_CHASSIS, alive=False), OVN_CHASSIS])
        assert r["vif_type"] == "binding_failed" and reasons(r) == ["OVN chassis on compute-1 is dead"]

    def test_bad_bridge_mappings_raise_like_neutron(self):
        with pytest.raises(ValueError, match="Invalid mapping"):
            parse_mappings("physnet1")
        with pytest.raises(ValueError, match="not unique"):
            parse_mappings("a:br,b:br")
        assert parse_mappings(" a:br1 , ,b:br2") == {"a": "br1", "b": "br2"}


def test_driver_order_first_binder_wins():
    both = [OVS_AGENT, MACVTAP_AGENT]
    assert bind(["macvtap", "openvswitch"], agents=both)["bound_driver"] == "macvtap"
    assert bind(["openvswitch", "macvtap"], agents=both)["bound_driver"] == "openvswitch"


def test_unknown_driver_and_unknown_option_are_config_errors():
    assert bind(["linuxbridge"])["error"].startswith("ConfigError: mechanism_drivers: unknown")
    assert bind(["openvswitch"], config={"no_such_option": 1})["error"].startswith("ConfigError: config.no_such_option")


def test_no_host_or_no_segments_stays_unbound():
    assert bind(["openvswitch"], agents=[OVS_AGENT], host="")["vif_type"] == "unbound"
    assert bind(["openvswitch"], agents=[OVS_AGENT], segments=[])["vif_type"] == "unbound"


def test_routed_network_offers_only_the_subnets_segment():
    segments = [VLAN_SEGMENT, dict(VLAN_SEGMENT, id="seg-2", segmentation_id=202)]
    r = bind(["openvswitch"], agents=[OVS_AGENT], segments=segments,
             network={"subnets": [{"id": "sub-2", "segment_id": "seg-2"}]},
             port={"fixed_ips": [{"subnet_id": "sub-2", "ip_address": "10.0.0.5"}]})
    assert r["bound_segment_id"] == "seg-2"
    assert r["explanation"][0]["segment_id"] == "seg-vlan"


def test_capabilities_not_a_list_raises_inside_driver_like_reference():
    r = bind(["openvswitch", "sriovnicswitch"], agents=[OVS_AGENT, SRIOV_AGENT], vnic_type="direct",
             profile={"capabilities": 7})
    assert r["vif_type"] == "binding_failed"
    assert [e.split(":")[0] for e in r["driver_errors"]] == ["openvswitch", "sriovnicswitch"]
