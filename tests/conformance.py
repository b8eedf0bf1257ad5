"""Locating the shared conformance suites and the comparison rules of its README."""

import json
from pathlib import Path
from typing import Any

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "conformance"
COMPARED_KEYS = ("vif_type", "vif_details", "bound_driver", "bound_segment_id", "binding_levels", "port_status")


def load_pairs(folder: Path = SHARED) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    examples = json.loads((folder / "examples.json").read_text())
    expected = json.loads((folder / "expected.json").read_text())
    assert len(examples) == len(expected)
    return list(zip(examples, expected))


def error_class(error: str | None) -> str | None:
    return error.split(":", 1)[0] if error else None


def disagreements(result: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Differences between a dry-run result and the reference, by the README's rules."""
    problems = []
    if error_class(result.get("error")) != error_class(expected.get("error")):
        problems.append(f"error: {result.get('error')!r} != {expected.get('error')!r}")
    for key in COMPARED_KEYS:
        if key not in expected:
            continue
        ours, theirs = result.get(key), expected[key]
        if key == "vif_details" and isinstance(ours, dict):
            ours = dict(ours)
            bound_drivers = ours.pop("bound_drivers", None)
            levels = {str(lv["level"]): lv["driver"] for lv in result.get("binding_levels") or []}
            if bound_drivers is not None and bound_drivers != levels:
                problems.append(f"bound_drivers {bound_drivers} != levels {levels}")
        if ours != theirs or json.dumps(ours, sort_keys=True) != json.dumps(theirs, sort_keys=True):
            problems.append(f"{key}: {ours!r} != {theirs!r}")
    return problems
