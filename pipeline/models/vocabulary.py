"""The wire vocabulary: every string that crosses a boundary, spelled as neutron-lib spells it.

Data only. Behaviour lives in ``pipeline.stages`` and ``pipeline.drivers``.
"""

from typing import Final

# --- binding:vnic_type (neutron-lib portbindings.VNIC_TYPES, in that order) ---
VNIC_NORMAL: Final = "normal"
VNIC_DIRECT: Final = "direct"
VNIC_MACVTAP: Final = "macvtap"
VNIC_BAREMETAL: Final = "baremetal"
VNIC_DIRECT_PHYSICAL: Final = "direct-physical"
VNIC_VIRTIO_FORWARDER: Final = "virtio-forwarder"
VNIC_SMARTNIC: Final = "smart-nic"
VNIC_VHOST_VDPA: Final = "vdpa"
VNIC_ACCELERATOR_DIRECT: Final = "accelerator-direct"
VNIC_ACCELERATOR_DIRECT_PHYSICAL: Final = "accelerator-direct-physical"
VNIC_REMOTE_MANAGED: Final = "remote-managed"

VNIC_TYPES: Final = (
    VNIC_NORMAL,
    VNIC_DIRECT,
    VNIC_MACVTAP,
    VNIC_BAREMETAL,
    VNIC_DIRECT_PHYSICAL,
    VNIC_VIRTIO_FORWARDER,
    VNIC_SMARTNIC,
    VNIC_VHOST_VDPA,
    VNIC_ACCELERATOR_DIRECT,
    VNIC_ACCELERATOR_DIRECT_PHYSICAL,
    VNIC_REMOTE_MANAGED,
)

# vnic types for which Nova builds a PCI request (nova.network.model.VNIC_TYPES_SRIOV).
# accelerator-direct(-physical) devices are Cyborg's, not the PCI tracker's.
VNIC_TYPES_NEEDING_PCI: Final = frozenset(
    {
        VNIC_DIRECT,
        VNIC_MACVTAP,
        VNIC_DIRECT_PHYSICAL,
        VNIC_VIRTIO_FORWARDER,
        VNIC_VHOST_VDPA,
        VNIC_REMOTE_MANAGED,
    }
)

# --- binding:vif_type ---
VIF_TYPE_UNBOUND: Final = "unbound"
VIF_TYPE_BINDING_FAILED: Final = "binding_failed"
VIF_TYPE_DISTRIBUTED: Final = "distributed"
VIF_TYPE_OVS: Final = "ovs"
VIF_TYPE_VHOST_USER: Final = "vhostuser"
VIF_TYPE_BRIDGE: Final = "bridge"
VIF_TYPE_OTHER: Final = "other"
VIF_TYPE_TAP: Final = "tap"
VIF_TYPE_MACVTAP: Final = "macvtap"
VIF_TYPE_AGILIO_OVS: Final = "agilio_ovs"
VIF_TYPE_HW_VEB: Final = "hw_veb"
VIF_TYPE_HOSTDEV_PHY: Final = "hostdev_physical"

VIF_UNPLUGGED_TYPES: Final = (VIF_TYPE_BINDING_FAILED, VIF_TYPE_UNBOUND)

# --- binding:vif_details keys ---
CAP_PORT_FILTER: Final = "port_filter"
OVS_HYBRID_PLUG: Final = "ovs_hybrid_plug"
VIF_DETAILS_VLAN: Final = "vlan"
VIF_DETAILS_MACVTAP_SOURCE: Final = "macvtap_source"
VIF_DETAILS_MACVTAP_MODE: Final = "macvtap_mode"
VIF_DETAILS_PHYSICAL_INTERFACE: Final = "physical_interface"
VIF_DETAILS_BRIDGE_NAME: Final = "bridge_name"
VIF_DETAILS_CONNECTIVITY: Final = "connectivity"
VIF_DETAILS_BOUND_DRIVERS: Final = "bound_drivers"
OVS_DATAPATH_TYPE: Final = "datapath_type"
VHOST_USER_MODE: Final = "vhostuser_mode"
VHOST_USER_SOCKET: Final = "vhostuser_socket"
VHOST_USER_OVS_PLUG: Final = "vhostuser_ovs_plug"
OVS_CREATE_TAP: Final = "ovs_create_tap"  # emitted by in-tree drivers, not a neutron-lib constant

VHOST_USER_MODE_SERVER: Final = "server"
VHOST_USER_MODE_CLIENT: Final = "client"
VHOST_USER_DEVICE_PREFIX: Final = "vhu"
MACVTAP_MODE_BRIDGE: Final = "bridge"

CONNECTIVITY_LEGACY: Final = "legacy"
CONNECTIVITY_L2: Final = "l2"
CONNECTIVITY_L3: Final = "l3"

OVS_DATAPATH_SYSTEM: Final = "system"
OVS_DATAPATH_NETDEV: Final = "netdev"
OVS_DPDK_VHOST_USER: Final = "dpdkvhostuser"
OVS_DPDK_VHOST_USER_CLIENT: Final = "dpdkvhostuserclient"
DEFAULT_VHOST_SOCKET_DIR: Final = "/var/run/openvswitch"
DEFAULT_BR_INT: Final = "br-int"

# --- binding:profile keys ---
PROFILE_PCI_VENDOR_INFO: Final = "pci_vendor_info"
PROFILE_PCI_SLOT: Final = "pci_slot"
PROFILE_PHYSICAL_NETWORK: Final = "physical_network"
PROFILE_CAPABILITIES: Final = "capabilities"
PROFILE_TRUSTED: Final = "trusted"
PROFILE_CARD_SERIAL_NUMBER: Final = "card_serial_number"
PROFILE_PF_MAC_ADDRESS: Final = "pf_mac_address"
PROFILE_VF_NUM: Final = "vf_num"
PROFILE_MIGRATING_TO: Final = "migrating_to"
PROFILE_ALLOCATION: Final = "allocation"
CAP_SWITCHDEV: Final = "switchdev"

BINDING_PROFILE_LEN: Final = 4095

# --- network types ---
TYPE_FLAT: Final = "flat"
TYPE_VLAN: Final = "vlan"
TYPE_VXLAN: Final = "vxlan"
TYPE_GRE: Final = "gre"
TYPE_GENEVE: Final = "geneve"
TYPE_LOCAL: Final = "local"
NETWORK_TYPES: Final = (TYPE_FLAT, TYPE_VLAN, TYPE_VXLAN, TYPE_GRE, TYPE_GENEVE, TYPE_LOCAL)
TUNNEL_TYPES: Final = (TYPE_VXLAN, TYPE_GRE, TYPE_GENEVE)
PHYSNET_TYPES: Final = (TYPE_FLAT, TYPE_VLAN)

# --- agent types ---
AGENT_TYPE_OVS: Final = "Open vSwitch agent"
AGENT_TYPE_NIC_SWITCH: Final = "NIC Switch agent"
AGENT_TYPE_MACVTAP: Final = "Macvtap agent"
AGENT_TYPE_OVN_CONTROLLER: Final = "OVN Controller agent"
AGENT_TYPE_OVN_CONTROLLER_GW: Final = "OVN Controller Gateway agent"
OVN_CONTROLLER_TYPES: Final = (AGENT_TYPE_OVN_CONTROLLER, AGENT_TYPE_OVN_CONTROLLER_GW)

# --- port status ---
PORT_STATUS_ACTIVE: Final = "ACTIVE"
PORT_STATUS_DOWN: Final = "DOWN"

# --- binding row status (binding-extended) ---
BINDING_ACTIVE: Final = "ACTIVE"
BINDING_INACTIVE: Final = "INACTIVE"

# --- error classes reported in results (text before the first ':') ---
ERR_INVALID_INPUT: Final = "InvalidInput"
ERR_POLICY: Final = "PolicyNotAuthorized"
ERR_CONFIG: Final = "ConfigError"

# --- PCI (nova.objects.fields) ---
PCI_DEV_TYPE_PCI: Final = "type-PCI"
PCI_DEV_TYPE_PF: Final = "type-PF"
PCI_DEV_TYPE_VF: Final = "type-VF"
PCI_DEV_TYPE_VDPA: Final = "vdpa"
PCI_DEV_TYPES: Final = (PCI_DEV_TYPE_PCI, PCI_DEV_TYPE_PF, PCI_DEV_TYPE_VF, PCI_DEV_TYPE_VDPA)

PCI_AVAILABLE: Final = "available"
PCI_CLAIMED: Final = "claimed"
PCI_ALLOCATED: Final = "allocated"
PCI_UNAVAILABLE: Final = "unavailable"
PCI_UNCLAIMABLE: Final = "unclaimable"
PCI_STATUSES: Final = (PCI_AVAILABLE, PCI_CLAIMED, PCI_ALLOCATED, PCI_UNAVAILABLE, PCI_UNCLAIMABLE)

NUMA_POLICY_REQUIRED: Final = "required"
NUMA_POLICY_PREFERRED: Final = "preferred"
NUMA_POLICY_LEGACY: Final = "legacy"
NUMA_POLICY_SOCKET: Final = "socket"
NUMA_POLICIES: Final = (NUMA_POLICY_REQUIRED, NUMA_POLICY_PREFERRED, NUMA_POLICY_LEGACY, NUMA_POLICY_SOCKET)

# --- PCI accounting outcomes (conformance/pci README: stage / error / reason) ---
PCI_TAG_PHYSICAL_NETWORK: Final = "physical_network"
PCI_TAG_REMOTE_MANAGED: Final = "remote_managed"
PCI_TAG_TRUSTED: Final = "trusted"

PCI_STAGE_API: Final = "api"
PCI_STAGE_NO_REQUEST: Final = "no_pci_request"
PCI_STAGE_CLAIM_TEST: Final = "claim_test"
PCI_STAGE_NUMA_FIT: Final = "numa_fit"
PCI_STAGE_PCI_CLAIM: Final = "pci_claim"

PCI_ERR_RESOURCES_UNAVAILABLE: Final = "ComputeResourcesUnavailable"
PCI_ERR_NOT_FOUND: Final = "PciDeviceNotFound"
PCI_ERR_INVALID_STATUS: Final = "PciDeviceInvalidStatus"
PCI_ERR_REQUEST_FAILED: Final = "PciDeviceRequestFailed"
PCI_ERR_PORT_IN_USE: Final = "PortInUse"
PCI_ERR_VF_INVALID_STATUS: Final = "PciDeviceVFInvalidStatus"
PCI_ERR_PF_INVALID_STATUS: Final = "PciDevicePFInvalidStatus"
PCI_ERR_NOT_FOUND_BY_ID: Final = "PciDeviceNotFoundById"

PCI_REASON_NO_MATCHING_DEVICE: Final = "no_matching_device"
PCI_REASON_NUMA_AFFINITY: Final = "numa_affinity"
PCI_REASON_EXHAUSTED: Final = "exhausted"
PCI_REASON_DEVICE_NOT_FOUND: Final = "device_not_found"
PCI_REASON_DEVICE_NOT_AVAILABLE: Final = "device_not_available"
PCI_REASON_DEVICE_MISMATCH: Final = "device_mismatch"
PCI_REASON_DEVICE_NUMA_AFFINITY: Final = "device_numa_affinity"
PCI_REASON_PORT_IN_USE: Final = "port_in_use"
