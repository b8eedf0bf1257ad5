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
    port = request.port
    result = BindingResult(
        id=result_id, port_id=port.id, host=port.host, vnic_type=request.vnic_type,
        profile=dict(request.profile), warnings=list(request.warnings),
        driver_errors=list(selection.driver_errors), explanation=list(selection.declines),
    )
    if not selection.bound:
        result.vif_type, result.vif_details = selection.vif_type, {}
        return result
    if allocation.failed:
        result.vif_type, result.vif_details = v.VIF_TYPE_BINDING_FAILED, {}
        result.explanation.append(Decline(driver=selection.levels[-1].driver,
                                          segment_id=selection.bottom_segment_id,
                                          reason=allocation.reason or "PCI allocation failed"))
        return result
    details: dict[str, Any] = dict(selection.vif_details)
    details[v.VIF_DETAILS_BOUND_DRIVERS] = {str(lv.level): lv.driver for lv in selection.levels}
    result.vif_type = selection.vif_type
    result.vif_details = details
    result.binding_levels = list(selection.levels)
    result.bound_driver = selection.levels[-1].driver
    result.bound_segment_id = selection.bottom_segment_id
    result.port_status = selection.status
    result.dynamic_segments = [s.model_dump() for s in selection.dynamic_segments]
    if allocation.device is not None:
        device = allocation.device
        result.pci_device = device
        result.profile = enrich_profile(request.profile, device)
    return result


def enrich_profile(profile: dict[str, Any], device: PciDeviceRef) -> dict[str, Any]:
    """The keys Nova writes after its PCI claim: vendor:product, slot and the spec's physnet."""
    enriched = dict(profile)
    enriched[v.PROFILE_PCI_VENDOR_INFO] = f"{device.vendor_id}:{device.product_id}"
    enriched[v.PROFILE_PCI_SLOT] = device.address
    enriched[v.PROFILE_PHYSICAL_NETWORK] = device.physical_network
    return enriched
