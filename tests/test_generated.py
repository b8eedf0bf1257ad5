"""Properties over thousands of generated scenarios: never a crash, always explained, consistent."""

import json

from hypothesis import HealthCheck, given, settings

from pipeline.dry_run import evaluate_scenario
from pipeline.models import vocabulary as v
from tests.scenario_gen import scenarios

SETTINGS = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(scenarios())
def test_every_scenario_yields_a_consistent_result(raw):
    result = evaluate_scenario(raw)
    json.dumps(result)  # always serialisable
    assert result["id"] == raw["id"]
    if result["error"]:
        assert result["error"].split(":")[0] in (v.ERR_INVALID_INPUT, v.ERR_CONFIG, v.ERR_POLICY)
        assert result["vif_type"] is None and result["vif_details"] is None
        return
    if result["vif_type"] in v.VIF_UNPLUGGED_TYPES:
        assert result["explanation"], "an unbound port must be explained"
        assert result["binding_levels"] == [] and result["vif_details"] == {}
        assert result["bound_driver"] is None and result["port_status"] is None
        return
    levels = result["binding_levels"]
    assert result["vif_details"]["bound_drivers"] == {str(lv["level"]): lv["driver"] for lv in levels}
    assert result["bound_driver"] == levels[-1]["driver"]
    segment_ids = {s["id"] for s in raw["network"]["segments"]}
    assert result["bound_segment_id"] in segment_ids
    bound = next(s for s in raw["network"]["segments"] if s["id"] == result["bound_segment_id"])
    if result["vif_type"] in (v.VIF_TYPE_HW_VEB, v.VIF_TYPE_HOSTDEV_PHY):
        assert result["vif_details"]["vlan"] == str(bound["segmentation_id"] or 0)
    if result["vif_type"] == v.VIF_TYPE_MACVTAP:
        assert result["vif_details"].get("vlan") == (bound["segmentation_id"] if bound["network_type"] == "vlan"
                                                     else None)
    if result["vif_type"] == v.VIF_TYPE_VHOST_USER:
        assert result["vif_details"]["vhostuser_socket"]
    assert evaluate_scenario(raw) == result, "binding must be deterministic"
