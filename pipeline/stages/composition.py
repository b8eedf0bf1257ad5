"""Stage 4 — vif_details composition: the result a compute host plugs the VIF from.

The bound driver's vif_details are kept exactly (types included); ``bound_drivers`` is added as
ML2 shows it through its API; the profile is enriched as Nova writes it when this pipeline chose
the PCI device.
"""

from typing import Any

from pipeline.models import vocabulary as v
from pipeline.models.binding import AllocationDecision, BindingResult, Decline, PciDeviceRef, SelectionOutcome
from pipeline.stages.validation import ValidatedRequest


def compose_result(result_id: str, request: ValidatedRequest, selection: SelectionOutcome,
                   allocation: AllocationDecision) -> BindingResult:
    """The result, built in one call: a pydantic ``__setattr__`` per field afterwards cost more
    than the rest of this function."""
    port = request.port
    fields: dict[str, Any] = {
        "id": result_id, "port_id": port.id, "host": port.host, "vnic_type": request.vnic_type,
        "profile": dict(request.profile), "warnings": list(request.warnings),
        "driver_errors": list(selection.driver_errors), "explanation": list(selection.declines),
        "vif_type": selection.vif_type, "vif_details": {}}
    if not selection.bound:
        return BindingResult(**fields)
    if allocation.failed:
        fields["vif_type"] = v.VIF_TYPE_BINDING_FAILED
        fields["explanation"].append(Decline(driver=selection.levels[-1].driver,
                                             segment_id=selection.bottom_segment_id,
                                             reason=allocation.reason or "PCI allocation failed"))
        return BindingResult(**fields)
    details: dict[str, Any] = dict(selection.vif_details)
    details[v.VIF_DETAILS_BOUND_DRIVERS] = {str(lv.level): lv.driver for lv in selection.levels}
    fields.update(vif_details=details, binding_levels=list(selection.levels), bound_driver=selection.levels[-1].driver,
                  bound_segment_id=selection.bottom_segment_id, port_status=selection.status,
                  dynamic_segments=[s.model_dump() for s in selection.dynamic_segments])
    if allocation.device is not None:
        fields["pci_device"] = allocation.device
        fields["profile"] = enrich_profile(request.profile, allocation.device)
    return BindingResult(**fields)


def enrich_profile(profile: dict[str, Any], device: PciDeviceRef) -> dict[str, Any]:
    """The keys Nova writes after its PCI claim: vendor:product, slot and the spec's physnet."""
    enriched = dict(profile)
    enriched[v.PROFILE_PCI_VENDOR_INFO] = f"{device.vendor_id}:{device.product_id}"
    enriched[v.PROFILE_PCI_SLOT] = device.address
    enriched[v.PROFILE_PHYSICAL_NETWORK] = device.physical_network
    return enriched
