"""The 60 reference scenarios (real Neutron 29 drivers, Nova 34), judged by the README's rules."""

import pytest

from pipeline.dry_run import evaluate_scenario
from tests.conformance import SHARED, disagreements, load_pairs

PAIRS = load_pairs(SHARED)


@pytest.mark.parametrize(("scenario", "expected"), PAIRS, ids=[s["id"] for s, _ in PAIRS])
def test_scenario_agrees_with_reference(scenario, expected):
    result = evaluate_scenario(scenario)
    assert disagreements(result, expected) == []
    if result["vif_type"] in ("binding_failed", "unbound"):
        assert result["explanation"], "an unbound port must be explained"


def test_suite_is_complete():
    assert len(PAIRS) == 60
