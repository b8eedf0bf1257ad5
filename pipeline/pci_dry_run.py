"""``bindpipe pci-dry-run FILE|-``: replay allocate/release sequences on a host's PCI devices offline.

Input and output follow ``conformance/pci/README.md``. Each scenario gives its implied
``device_spec``, the ``untracked`` inventory addresses, the ``initial_state`` and ``initial_pools``,
then one result per operation with the state and owners after it; a device_spec Nova would refuse
gives ``config_error`` instead of results, and a malformed scenario gives ``error``.
"""

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pipeline.models import vocabulary as v
from pipeline.models.pci import PciAllocateOp, PciDevice, PciScenario
from pipeline.stages.pci_accounting import AllocationOutcome, PciTracker
from pipeline.stages.pci_devspec import DeviceSpec, PciConfigError

DEVICE_KEYS = ("address", "dev_type", "numa_node", "parent_addr", "physical_network")


def _invalid_input(exc: ValidationError) -> str:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "(scenario)"
    return f"{v.ERR_INVALID_INPUT}: {field}: {first['msg'].removeprefix('Value error, ')}"


def _device(device: PciDevice | None) -> dict[str, Any] | None:
    return device.model_dump(include=set(DEVICE_KEYS)) if device else None


def _allocate_result(outcome: AllocationOutcome) -> dict[str, Any]:
    result = {
        "success": outcome.success, "error": outcome.error, "reason": outcome.reason, "stage": outcome.stage,
        "message": outcome.message, "device": _device(outcome.device), "pci_request": outcome.pci_request,
        "candidates": outcome.candidates, "choice_arbitrary": len(outcome.candidates) > 1,
    }
    if outcome.pci_request is not None:
        result["claim_only"] = outcome.claim_only
    optional = {"pinned": outcome.pinned, "blocked": outcome.blocked, "device_status": outcome.device_status}
    return result | {k: val for k, val in optional.items() if val}


def evaluate_pci_scenario(raw: Any) -> dict[str, Any]:
    """One scenario's output; never raises for bad input."""
    if not isinstance(raw, dict):
        kind = type(raw).__name__
        return {"id": None, "error": f"{v.ERR_INVALID_INPUT}: (scenario): must be a JSON object, got {kind}"}
    try:
        scenario = PciScenario.model_validate(raw)
    except ValidationError as exc:
        return {"id": raw.get("id"), "error": _invalid_input(exc)}
    try:
        tracker = PciTracker.from_inventory(scenario.host)
    except PciConfigError as exc:
        return {"id": scenario.id, "device_spec": DeviceSpec(scenario.host).as_config(),
                "config_error": {"error": exc.error, "message": exc.message}}
    output: dict[str, Any] = {
        "id": scenario.id, "device_spec": tracker.device_spec, "untracked": tracker.untracked,
        "initial_state": tracker.state(), "initial_pools": tracker.pools(), "results": [],
    }
    for index, op in enumerate(scenario.operations):
        if isinstance(op, PciAllocateOp):
            result = _allocate_result(tracker.allocate(op))
        else:
            released = tracker.release(op.port_id)
            result = {"success": True, "error": None, "reason": None, "stage": None, "device": None,
                      "released": released.released, "noop": released.noop, "message": released.message}
        output["results"].append({"index": index, "op": op.op, "port_id": op.port_id, **result,
                                  "state": tracker.state(), "owners": tracker.owners()})
    return output


def evaluate_pci_scenarios(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise ValueError(f"expected a JSON list of PCI scenarios, got {type(raw).__name__}")
    return [evaluate_pci_scenario(item) for item in raw]


def main_pci_dry_run(path_or_dash: str) -> int:
    """Print the results of the scenarios in a file (``-``: standard input); 2 if it can't be read."""
    source = "standard input" if path_or_dash == "-" else path_or_dash
    try:
        text = sys.stdin.read() if path_or_dash == "-" else Path(path_or_dash).read_text(encoding="utf-8")
        results = evaluate_pci_scenarios(json.loads(text))
    except OSError as exc:
        print(f"bindpipe pci-dry-run: cannot read {source}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        print(f"bindpipe pci-dry-run: cannot evaluate {source}: {exc}", file=sys.stderr)
        return 2
    json.dump(results, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0
