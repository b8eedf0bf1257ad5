"""Stage 3 — PCI allocation: give a bound SR-IOV-type port its device, by Nova's rules.

Only ports whose vnic type makes Nova build a PCI request take a device, and only on hosts whose
PCI inventory this pipeline knows; a host with no inventory keeps the reference behaviour (the
profile's ``pci_slot`` is trusted as Nova wrote it). The request is built from the *bound*
segment: its physnet, or none for a tunnelled segment (hardware-offloaded switchdev ports).
"""

from pipeline.models import vocabulary as v
from pipeline.models.binding import AllocationDecision, PciDeviceRef, SelectionOutcome
from pipeline.models.pci import PciRequest
from pipeline.models.topology import Network, Segment
from pipeline.stages.pci_accounting import PciTracker
from pipeline.stages.validation import PCI_SLOT_RE, ValidatedRequest


def bound_segment(selection: SelectionOutcome, network: Network) -> Segment | None:
    segment_id = selection.bottom_segment_id
    return network.segment(segment_id) or next(
        (s for s in selection.dynamic_segments if s.id == segment_id), None)


def pci_request_for(request: ValidatedRequest, selection: SelectionOutcome, network: Network) -> PciRequest | None:
    """The PCI request Nova would build for this port, or None when it needs no device."""
    if not selection.bound or request.vnic_type not in v.VNIC_TYPES_NEEDING_PCI:
        return None
    segment = bound_segment(selection, network)
    physnet = segment.physical_network if segment and segment.network_type in v.PHYSNET_TYPES else None
    slot = request.profile.get(v.PROFILE_PCI_SLOT)
    trusted = request.profile.get(v.PROFILE_TRUSTED)
    port = request.port
    return PciRequest(
        port_id=port.id, vnic_type=request.vnic_type, physical_network=physnet,
        numa_policy=port.numa_affinity_policy, instance_numa_cells=port.instance_numa_cells,
        pci_slot=slot.lower() if isinstance(slot, str) and PCI_SLOT_RE.match(slot) else None,
        trusted=trusted if isinstance(trusted, bool) else None,
    )


def allocate_device(request: ValidatedRequest, selection: SelectionOutcome, network: Network,
                    tracker: PciTracker | None) -> AllocationDecision:
    """Claim and allocate the port's device on ``tracker`` (mutated only on success)."""
    pci_request = pci_request_for(request, selection, network)
    if pci_request is None:
        return AllocationDecision(reason="no PCI request for this binding")
    slot = request.profile.get(v.PROFILE_PCI_SLOT)
    if tracker is None:
        return AllocationDecision(reason=f"host {request.port.host!r} reports no PCI inventory; "
                                         "profile trusted as given")
    if slot is not None and pci_request.pci_slot is None:
        return AllocationDecision(failed=True, error="PciDeviceNotFound",
                                  reason=f"binding:profile.pci_slot {slot!r} is not a PCI address")
    outcome = tracker.allocate(pci_request)
    if not outcome.success:
        return AllocationDecision(failed=True, error=outcome.error, reason=f"{outcome.error}: {outcome.message}")
    device = outcome.device
    if device is None:
        return AllocationDecision(reason=outcome.message)
    return AllocationDecision(device=PciDeviceRef(**device.model_dump(include=set(PciDeviceRef.model_fields))))
