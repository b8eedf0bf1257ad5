"""A generator of random dry-run scenarios, independent of the conformance examples.

It covers the whole input space the scenario format allows, and more: malformed profiles,
unknown vnic types and drivers, bad prohibit lists, odd agent configurations, routed subnets.
"""

from hypothesis import strategies as st

from pipeline.models import vocabulary as v

PHYSNETS = ["physnet1", "physnet2", "datacentre"]
DRIVERS = ["openvswitch", "sriovnicswitch", "macvtap", "ovn", "l2population"]
HOSTS = ["compute-1", "compute-2"]

ids = st.uuids().map(str)
physnet = st.sampled_from(PHYSNETS)


@st.composite
def segments(draw):
    kind = draw(st.sampled_from(v.NETWORK_TYPES))
    seg = {"id": draw(ids), "network_type": kind, "physical_network": None, "segmentation_id": None}
    if kind in v.PHYSNET_TYPES:
        seg["physical_network"] = draw(physnet)
    if kind == v.TYPE_VLAN:
        seg["segmentation_id"] = draw(st.integers(1, 4094))
    elif kind in v.TUNNEL_TYPES:
        seg["segmentation_id"] = draw(st.integers(1, 2**24 - 1))
    return seg


mapping_names = st.dictionaries(physnet, st.sampled_from(["eth1", "eth2", "a-very-long-ifname0"]), max_size=3)


@st.composite
def agents(draw, host):
    kind = draw(st.sampled_from([v.AGENT_TYPE_OVS, v.AGENT_TYPE_NIC_SWITCH, v.AGENT_TYPE_MACVTAP,
                                 v.AGENT_TYPE_OVN_CONTROLLER, v.AGENT_TYPE_OVN_CONTROLLER_GW]))
    conf: dict = {}
    if kind == v.AGENT_TYPE_OVS:
        conf = {"bridge_mappings": draw(st.dictionaries(physnet, st.just("br-x"), max_size=3)),
                "tunnel_types": draw(st.lists(st.sampled_from(v.TUNNEL_TYPES), unique=True)),
                "datapath_type": draw(st.sampled_from(["system", "netdev"])),
                "ovs_hybrid_plug": draw(st.booleans()),
                "baremetal_smartnic": draw(st.booleans()),
                "ovs_capabilities": {"iface_types": draw(st.lists(st.sampled_from(
                    ["dpdkvhostuser", "dpdkvhostuserclient", "tap", "system"]), unique=True))}}
        if draw(st.booleans()):
            conf["integration_bridge"] = draw(st.sampled_from(["br-int", "br-int2"]))
    elif kind == v.AGENT_TYPE_NIC_SWITCH:
        conf = {"device_mappings": draw(st.dictionaries(physnet, st.just(["ens1f0"]), max_size=3))}
    elif kind == v.AGENT_TYPE_MACVTAP:
        conf = {"interface_mappings": draw(mapping_names)}
    else:
        conf = {"ovn-bridge-mappings": ",".join(f"{p}:br-{p}" for p in draw(st.lists(physnet, unique=True))),
                "datapath-type": draw(st.sampled_from(["", "system", "netdev"])),
                "iface-types": draw(st.sampled_from(["geneve,tap", "dpdkvhostuser,tap"])),
                "ovn-cms-options": draw(st.sampled_from(["", "enable-chassis-as-gw", "card-serial-number=MT1"]))}
    return {"agent_type": kind, "host": host, "alive": draw(st.booleans()),
            "admin_state_up": draw(st.booleans()), "configurations": conf}


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-5, 5000), st.text(max_size=12))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=10)

nova_profile = st.fixed_dictionaries({}, optional={
    "pci_vendor_info": st.sampled_from(["15b3:1018", "8086:154c", "zzzz:1018", "15b3-1018", ""]),
    "pci_slot": st.sampled_from(["0000:81:00.2", "0000:04:14.4", "garbage"]),
    "physical_network": st.one_of(st.none(), physnet, st.just(42)),
    "capabilities": st.one_of(st.lists(st.sampled_from(["switchdev", "rx", "tx"]), unique=True),
                              st.just("switchdev"), st.just(7), st.none()),
    "trusted": st.one_of(st.booleans(), st.just("true")),
    "migrating_to": st.sampled_from(HOSTS),
    "card_serial_number": st.sampled_from(["MT1", "MT2"]),
    "pf_mac_address": st.just("aa:bb:cc:dd:ee:ff"),
    "vf_num": st.integers(0, 7),
    "parent_name": st.text(max_size=5),
    "tag": st.integers(-1, 5000),
})
profiles = st.one_of(nova_profile, st.none(), json_value, st.just("string-profile"),
                     st.just({"k": "x" * 5000}))


@st.composite
def scenarios(draw):
    segs = draw(st.lists(segments(), max_size=4))
    subnets = []
    fixed_ips = []
    if segs and draw(st.booleans()):
        subnet = {"id": draw(ids), "segment_id": draw(st.sampled_from([s["id"] for s in segs] + [None])),
                  "cidr": "10.0.0.0/24"}
        subnets.append(subnet)
        if draw(st.booleans()):
            fixed_ips.append({"subnet_id": subnet["id"], "ip_address": "10.0.0.5"})
    host = draw(st.sampled_from(HOSTS + [""]))
    config = draw(st.fixed_dictionaries({}, optional={
        "enable_security_group": st.booleans(),
        "ovs_create_tap": st.booleans(),
        "ovn_ovs_create_tap": st.booleans(),
        "ovs_vnic_type_prohibit_list": st.lists(st.sampled_from(["normal", "direct", "macvtap"]), max_size=2),
        "sriov_vnic_type_prohibit_list": st.lists(st.sampled_from(["direct", "macvtap", "normal"]), max_size=2),
    }))
    return {
        "id": draw(ids),
        "mechanism_drivers": draw(st.one_of(
            st.lists(st.sampled_from(DRIVERS), min_size=1, max_size=4, unique=True),
            st.just(["linuxbridge"]))),
        "config": config,
        "network": {"id": draw(ids), "segments": segs, "subnets": subnets},
        "agents": draw(st.lists(st.sampled_from(HOSTS).flatmap(agents), max_size=5)),
        "port": {"id": draw(ids), "mac": "fa:16:3e:00:00:01", "host": host,
                 "vnic_type": draw(st.one_of(st.sampled_from(v.VNIC_TYPES), st.just("bogus"))),
                 "profile": draw(profiles), "device_owner": "compute:nova", "fixed_ips": fixed_ips},
    }
