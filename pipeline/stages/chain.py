"""The four stages run back to back, in one process (dry-run, tests, the embedded runtime)."""

from pipeline.drivers.api import OriginalBinding
from pipeline.models.binding import BindingResult, DriverConfig, RequestContext
from pipeline.models.topology import Agent, Network, Port
from pipeline.stages.allocation import allocate_device
from pipeline.stages.composition import compose_result
from pipeline.stages.errors import BindingRequestError
from pipeline.stages.pci_accounting import PciTracker
from pipeline.stages.selection import manager_for
from pipeline.stages.validation import validate_request


def bind_port(result_id: str, port: Port, network: Network, agents: list[Agent], config: DriverConfig,
              context: RequestContext, tracker: PciTracker | None = None,
              original: OriginalBinding | None = None) -> BindingResult:
    """Validate, select, allocate, compose. A request error becomes a result with ``error`` set."""
    try:
        manager = manager_for(config)
        request = validate_request(port, config, context,
                                   stored_profile=original.profile if original else None)
    except BindingRequestError as exc:
        return BindingResult(id=result_id, error=str(exc), port_id=port.id, host=port.host)
    selection = manager.bind_port(request, network, agents, original)
    allocation = allocate_device(request, selection, network, tracker)
    return compose_result(result_id, request, selection, allocation)
