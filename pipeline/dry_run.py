"""``bindpipe dry-run``: evaluate scenarios offline, with no broker and no database."""

import json
import sys
from typing import Any

from pydantic import ValidationError

from pipeline.drivers.api import OriginalBinding
from pipeline.models.binding import BindingResult, DriverConfig
from pipeline.models.scenario import Scenario
from pipeline.stages.chain import bind_port
from pipeline.stages.errors import ConfigError, InvalidInput
from pipeline.stages.pci_accounting import PciTracker

# an error's result: the reference's keys (binding keys null), and ``warnings`` ([]) as every result has
ERROR_KEYS = {"id", "error", "vif_type", "vif_details", "bound_driver", "bound_segment_id", "warnings"}


def describe_validation_error(exc: ValidationError) -> tuple[str, str]:
    """The first problem of a pydantic error as (dotted field path, reason)."""
    first = exc.errors()[0]
    return ".".join(str(p) for p in first["loc"]) or "(root)", first["msg"]


def evaluate_scenario(raw: Any) -> dict[str, Any]:
    scenario_id = raw.get("id") if isinstance(raw, dict) else None
    try:
        scenario = Scenario.model_validate(raw)
    except ValidationError as exc:
        return error_result(str(scenario_id), InvalidInput(*describe_validation_error(exc)))
    try:
        config = DriverConfig(mechanism_drivers=tuple(scenario.mechanism_drivers), **scenario.config)
    except ValidationError as exc:
        field, reason = describe_validation_error(exc)
        return error_result(scenario.id, ConfigError(f"config.{field}", reason))
    inventory = scenario.pci_devices.get(scenario.port.host)
    original = OriginalBinding(**scenario.original) if scenario.original else None
    result = bind_port(scenario.id, scenario.port, scenario.network, scenario.agents, config,
                       scenario.context, PciTracker.from_inventory(inventory) if inventory else None,
                       original)
    return result_dict(result)


def result_dict(result: BindingResult) -> dict[str, Any]:
    if result.error:
        return result.model_dump(mode="json", include=ERROR_KEYS)
    return result.model_dump(mode="json", exclude_none=False)


def error_result(scenario_id: str, exc: Exception) -> dict[str, Any]:
    return result_dict(BindingResult(id=scenario_id, error=str(exc)))


def evaluate_scenarios(raw: Any) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        raise ValueError(f"expected a JSON list of scenarios, got {type(raw).__name__}")
    return [evaluate_scenario(item) for item in raw]


def read_json_input(path: str) -> Any:
    """Read JSON from a file, or from standard input for ``-``."""
    text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    return json.loads(text)


def main_dry_run(path: str) -> int:
    try:
        results = evaluate_scenarios(read_json_input(path))
    except (OSError, ValueError) as exc:  # JSONDecodeError is a ValueError
        print(f"bindpipe dry-run: cannot evaluate {path}: {exc}", file=sys.stderr)
        return 2
    json.dump(results, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0
