"""Stage 1 — profile validation: is this binding request acceptable at all?

Neutron's API layer checks only that ``binding:profile`` is a dict (or null) of at most 4095 JSON
characters, that ``binding:vnic_type`` is known and that the caller may write the profile; with
the ``ovn`` driver loaded, OVN's parameter sets are checked too. Those are hard errors here as
there. Value formats (``pci_slot``, ``pci_vendor_info``, ...) the reference never checks: a bad one
is reported as a warning, or as ``InvalidInput`` when ``strict_profile`` is on.
"""

import json
import re
from dataclasses import dataclass, field
from typing import Any

from pipeline.models import vocabulary as v
from pipeline.models.binding import DriverConfig, RequestContext
from pipeline.models.topology import Port
from pipeline.stages.errors import InvalidInput, PolicyNotAuthorized

PCI_VENDOR_INFO_RE = re.compile(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{4}$")
PCI_SLOT_RE = re.compile(r"^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[01][0-9a-fA-F]\.[0-7]$")
MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


@dataclass(frozen=True)
class OvnParamSet:
    """One of OVN's binding-profile parameter sets: if any key is present, all are required."""

    params: dict[str, tuple[type, ...]]
    vnic_type: str | None = None
    capability: str | None = None


_PCI_PARAMS = {
    v.PROFILE_PCI_VENDOR_INFO: (str,),
    v.PROFILE_PCI_SLOT: (str,),
    v.PROFILE_PHYSICAL_NETWORK: (str, type(None)),
}
OVN_PARAM_SETS = (
    OvnParamSet({"parent_name": (str,), "tag": (int,)}),
    OvnParamSet({"vtep-physical-switch": (str,), "vtep-logical-switch": (str,)}),
    OvnParamSet(_PCI_PARAMS, v.VNIC_DIRECT, v.CAP_SWITCHDEV),
    OvnParamSet({**_PCI_PARAMS, v.PROFILE_CARD_SERIAL_NUMBER: (str,), v.PROFILE_PF_MAC_ADDRESS: (str,),
                 v.PROFILE_VF_NUM: (int,)}, v.VNIC_REMOTE_MANAGED),
)


@dataclass(frozen=True)
class ValidatedRequest:
    """A binding request that passed stage 1: a known vnic type and a dict profile."""

    port: Port
    vnic_type: str
    profile: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


def validate_request(port: Port, config: DriverConfig, context: RequestContext,
                     stored_profile: dict[str, Any] | None = None) -> ValidatedRequest:
    """Check one request; raise ``InvalidInput`` or ``PolicyNotAuthorized`` naming the field.

    ``stored_profile`` is the profile the port already has: re-sending it unchanged needs no
    privilege, as in Neutron where only a *change* of the attribute is policy-checked.
    """
    vnic_type = port.vnic_type
    if not isinstance(vnic_type, str) or vnic_type not in v.VNIC_TYPES:
        raise InvalidInput("binding:vnic_type", f"{vnic_type!r} is not in {list(v.VNIC_TYPES)}")
    profile = _profile_dict(port.profile)
    if profile != (stored_profile or {}):
        check_profile_policy(context, config)
    if "ovn" in config.mechanism_drivers:
        ovn_profile_params(profile, vnic_type)
    findings = profile_format_findings(profile)
    if findings and config.strict_profile:
        field_name, reason = findings[0]
        raise InvalidInput(f"binding:profile.{field_name}", reason)
    return ValidatedRequest(port=port, vnic_type=vnic_type, profile=profile,
                            warnings=[f"binding:profile.{f}: {r}" for f, r in findings])


def _profile_dict(profile: Any) -> dict[str, Any]:
    if profile is None:
        return {}
    if not isinstance(profile, dict):
        raise InvalidInput("binding:profile", f"'{profile}' is not a dictionary")
    if not profile:
        return profile
    try:
        size = len(json.dumps(profile))
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidInput("binding:profile", f"not serialisable as JSON ({exc})") from None
    if size > v.BINDING_PROFILE_LEN:
        raise InvalidInput("binding:profile",
                           f"value too large ({size} characters of JSON, at most {v.BINDING_PROFILE_LEN})")
    return profile


def check_profile_policy(context: RequestContext, config: DriverConfig) -> None:
    """``binding:profile`` is the service role's to write (admin too under the legacy policy)."""
    allowed = {"service", "admin"} if config.legacy_profile_policy else {"service"}
    if not allowed.intersection(context.roles):
        who = context.user_id or "anonymous"
        raise PolicyNotAuthorized(
            "binding:profile",
            f"rule update_port:binding:profile is disallowed by policy for {who} with roles "
            f"{sorted(context.roles)} (needs one of {sorted(allowed)})")


def ovn_profile_params(profile: dict[str, Any], vnic_type: str) -> dict[str, Any]:
    """OVN's profile validation: the first matching parameter set must be complete and well typed.

    Returns the accepted parameters (the OVN driver reads ``card_serial_number`` from them).
    """
    capabilities = profile.get(v.PROFILE_CAPABILITIES, [])
    if not isinstance(capabilities, list):
        raise InvalidInput("binding:profile.capabilities", "must be of type list")
    rest = {k: val for k, val in profile.items() if k != v.PROFILE_CAPABILITIES}
    for param_set in OVN_PARAM_SETS:
        if param_set.vnic_type is not None:
            if param_set.vnic_type != vnic_type:
                continue
            if capabilities and param_set.capability not in capabilities:
                continue
        present = {k: rest[k] for k in param_set.params if k in rest}
        if not present:
            continue
        missing = sorted(set(param_set.params) - set(rest))
        if missing:
            raise InvalidInput("binding:profile",
                               f"{sorted(param_set.params)} are all required (missing {missing})")
        for key, types in param_set.params.items():
            if not isinstance(present[key], types):
                raise InvalidInput(f"binding:profile.{key}", f"{present[key]!r} value invalid type")
        if "tag" in present and not 0 <= present["tag"] <= 4095:
            raise InvalidInput("binding:profile.tag", f"{present['tag']} must be an integer between 0 and 4095")
        return present
    return {}


def profile_format_findings(profile: dict[str, Any]) -> list[tuple[str, str]]:
    """Values that are not what Nova would write, as (key, reason) pairs."""
    findings: list[tuple[str, str]] = []

    def check(key: str, ok: bool, expected: str) -> None:
        if key in profile and not ok:
            findings.append((key, f"{profile[key]!r} is not {expected}"))

    value = profile.get
    check(v.PROFILE_PCI_VENDOR_INFO, isinstance(value(v.PROFILE_PCI_VENDOR_INFO), str)
          and bool(PCI_VENDOR_INFO_RE.match(value(v.PROFILE_PCI_VENDOR_INFO))), "'vvvv:pppp' in hex")
    check(v.PROFILE_PCI_SLOT, isinstance(value(v.PROFILE_PCI_SLOT), str)
          and bool(PCI_SLOT_RE.match(value(v.PROFILE_PCI_SLOT))), "a PCI address 'dddd:bb:ss.f'")
    physnet = value(v.PROFILE_PHYSICAL_NETWORK)
    check(v.PROFILE_PHYSICAL_NETWORK, physnet is None or (isinstance(physnet, str) and physnet != ""),
          "a physical network name or null")
    caps = value(v.PROFILE_CAPABILITIES)
    check(v.PROFILE_CAPABILITIES, isinstance(caps, list) and all(isinstance(c, str) for c in caps),
          "a list of strings")
    check(v.PROFILE_TRUSTED, isinstance(value(v.PROFILE_TRUSTED), bool), "a boolean")
    check(v.PROFILE_VF_NUM, isinstance(value(v.PROFILE_VF_NUM), int)
          and not isinstance(value(v.PROFILE_VF_NUM), bool), "an integer")
    check(v.PROFILE_PF_MAC_ADDRESS, isinstance(value(v.PROFILE_PF_MAC_ADDRESS), str)
          and bool(MAC_RE.match(value(v.PROFILE_PF_MAC_ADDRESS))), "a MAC address")
    check(v.PROFILE_CARD_SERIAL_NUMBER, isinstance(value(v.PROFILE_CARD_SERIAL_NUMBER), str),
          "a string")
    return findings
