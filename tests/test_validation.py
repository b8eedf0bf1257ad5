"""Stage 1: each way a request is refused, naming the field and the reason."""

import pytest

from pipeline.models.binding import DriverConfig, RequestContext
from pipeline.models.topology import Port
from pipeline.stages.errors import InvalidInput, PolicyNotAuthorized
from pipeline.stages.validation import ovn_profile_params, profile_format_findings, validate_request

SERVICE = RequestContext.service()
OVS = DriverConfig(mechanism_drivers=("openvswitch",))
OVN = DriverConfig(mechanism_drivers=("ovn",))


def port(**kw):
    return Port(id="p1", host="compute-1", **kw)


def test_valid_request_passes_with_profile_as_dict():
    request = validate_request(port(vnic_type="direct", profile={"pci_slot": "0000:81:00.2"}), OVS, SERVICE)
    assert request.vnic_type == "direct" and request.profile == {"pci_slot": "0000:81:00.2"}
    assert request.warnings == []


def test_null_profile_is_empty_dict():
    assert validate_request(port(profile=None), OVS, SERVICE).profile == {}


@pytest.mark.parametrize("vnic", ["bogus", "", None, 3])
def test_unknown_vnic_type_is_invalid_input(vnic):
    with pytest.raises(InvalidInput) as err:
        validate_request(port(vnic_type=vnic), OVS, SERVICE)
    assert err.value.field == "binding:vnic_type" and "is not in" in err.value.reason
    assert str(err.value).startswith("InvalidInput: binding:vnic_type:")


@pytest.mark.parametrize("profile", ["string-profile", ["a"], 5, True])
def test_profile_must_be_a_dict(profile):
    with pytest.raises(InvalidInput, match="is not a dictionary") as err:
        validate_request(port(profile=profile), OVS, SERVICE)
    assert err.value.field == "binding:profile"


def test_profile_of_4095_json_characters_passes_and_4096_fails():
    overhead = len('{"k": ""}')
    ok = {"k": "x" * (4095 - overhead)}
    too_big = {"k": "x" * (4096 - overhead)}
    assert validate_request(port(profile=ok), OVS, SERVICE).profile == ok
    with pytest.raises(InvalidInput, match="value too large"):
        validate_request(port(profile=too_big), OVS, SERVICE)


def test_deeply_nested_profile_is_refused_not_crashing():
    nested: dict = {}
    inner = nested
    for _ in range(5000):
        inner["a"] = {}
        inner = inner["a"]
    with pytest.raises(InvalidInput, match="binding:profile"):
        validate_request(port(profile=nested), OVS, SERVICE)


def test_only_service_role_may_write_profile():
    member = RequestContext(user_id="alice", roles=("member",))
    admin = RequestContext(user_id="root", roles=("admin",))
    with pytest.raises(PolicyNotAuthorized, match="alice") as err:
        validate_request(port(profile={"trusted": True}), OVS, member)
    assert err.value.field == "binding:profile"
    with pytest.raises(PolicyNotAuthorized):
        validate_request(port(profile={"trusted": True}), OVS, admin)
    legacy = DriverConfig(mechanism_drivers=("openvswitch",), legacy_profile_policy=True)
    assert validate_request(port(profile={"trusted": True}), legacy, admin).profile == {"trusted": True}


def test_unprivileged_caller_may_send_empty_or_unchanged_profile():
    member = RequestContext(user_id="alice", roles=("member",))
    assert validate_request(port(profile={}), OVS, member).profile == {}
    stored = {"pci_slot": "0000:81:00.2"}
    assert validate_request(port(profile=dict(stored)), OVS, member, stored_profile=stored).profile == stored


def test_format_findings_are_warnings_by_default_and_errors_when_strict():
    profile = {"pci_vendor_info": "15b3-1018", "pci_slot": "81:00.2", "physical_network": 42,
               "capabilities": "switchdev", "trusted": "yes", "vf_num": "3", "pf_mac_address": "zz"}
    request = validate_request(port(vnic_type="direct", profile=profile), OVS, SERVICE)
    fields = [w.split(": ")[0] for w in request.warnings]
    assert fields == ["binding:profile.pci_vendor_info", "binding:profile.pci_slot",
                      "binding:profile.physical_network", "binding:profile.capabilities",
                      "binding:profile.trusted", "binding:profile.vf_num", "binding:profile.pf_mac_address"]
    strict = DriverConfig(mechanism_drivers=("openvswitch",), strict_profile=True)
    with pytest.raises(InvalidInput) as err:
        validate_request(port(vnic_type="direct", profile=profile), strict, SERVICE)
    assert err.value.field == "binding:profile.pci_vendor_info" and "'vvvv:pppp'" in err.value.reason


def test_well_formed_nova_profile_has_no_findings():
    profile = {"pci_vendor_info": "15b3:1018", "pci_slot": "0000:81:00.2", "physical_network": None,
               "capabilities": ["rx", "tx", "switchdev"], "trusted": False, "vf_num": 3,
               "pf_mac_address": "aa:bb:cc:dd:ee:ff", "card_serial_number": "MT1234"}
    assert profile_format_findings(profile) == []


class TestOvnParameterSets:
    def test_partial_switchdev_set_needs_all_keys(self):
        with pytest.raises(InvalidInput, match="are all required"):
            validate_request(port(vnic_type="direct", profile={"pci_slot": "0000:81:00.2",
                                                                "capabilities": ["switchdev"]}), OVN, SERVICE)

    def test_wrong_type_in_set(self):
        with pytest.raises(InvalidInput, match="value invalid type") as err:
            validate_request(port(vnic_type="direct", profile={
                "pci_slot": "0000:81:00.2", "pci_vendor_info": "15b3:1018", "physical_network": 42}), OVN, SERVICE)
        assert err.value.field == "binding:profile.physical_network"

    def test_capabilities_must_be_list(self):
        with pytest.raises(InvalidInput, match="must be of type list"):
            validate_request(port(profile={"capabilities": "switchdev"}), OVN, SERVICE)

    def test_parent_name_and_tag_for_any_vnic_and_tag_range(self):
        assert ovn_profile_params({"parent_name": "p0", "tag": 7}, "normal") == {"parent_name": "p0", "tag": 7}
        with pytest.raises(InvalidInput, match="between 0 and 4095"):
            ovn_profile_params({"parent_name": "p0", "tag": 4096}, "normal")
        with pytest.raises(InvalidInput, match="are all required"):
            ovn_profile_params({"tag": 1}, "direct-physical")

    def test_switchdev_set_skipped_when_capabilities_lack_switchdev(self):
        assert ovn_profile_params({"pci_slot": "x", "capabilities": ["rx"]}, "direct") == {}

    def test_remote_managed_set(self):
        full = {"pci_vendor_info": "15b3:101e", "pci_slot": "0000:03:00.2", "physical_network": None,
                "card_serial_number": "MT1", "pf_mac_address": "aa:bb:cc:dd:ee:ff", "vf_num": 2}
        assert ovn_profile_params(full, "remote-managed")["card_serial_number"] == "MT1"
        with pytest.raises(InvalidInput, match="are all required"):
            ovn_profile_params({"card_serial_number": "MT1"}, "remote-managed")

    def test_not_checked_without_ovn(self):
        request = validate_request(port(vnic_type="direct", profile={"pci_slot": "0000:81:00.2",
                                                                    "capabilities": ["switchdev"]}), OVS, SERVICE)
        assert request.profile["pci_slot"] == "0000:81:00.2"
