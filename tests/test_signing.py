"""Signing keys bound to roles, without a broker: a signed envelope may assert only its key's roles."""

import json
import uuid

import pytest
from pydantic import ValidationError

from pipeline.settings import Settings
from pipeline.workers.handlers import ValidateHandler
from pipeline.workers.messages import PoisonMessage
from pipeline.workers.signing import KEY_ID_HEADER, SIGNATURE_HEADER, signature

KEYS = {"nova": "nova-secret-value", "agent": "agent-secret-value", "unlisted": "unlisted-secret-value"}
SETTINGS = Settings(signing_keys=KEYS, signing_key_roles={"nova": ["service", "admin"], "agent": []})


def signed(key: str, roles: list[str], event_type: str = "port.create") -> tuple[bytes, dict[str, str]]:
    body = json.dumps({"event_id": str(uuid.uuid4()), "event_type": event_type, "occurred_at": "2026-11-23T10:00:00Z",
                       "context": {"user_id": "u", "roles": roles},
                       "payload": {"id": "p1", "network_id": "n", "host": "compute-7", "vnic_type": "normal"}}).encode()
    return body, {KEY_ID_HEADER: key, SIGNATURE_HEADER: signature(KEYS[key], body)}


def decode(body: bytes, headers: dict[str, str]) -> list:
    return ValidateHandler(SETTINGS).decode(body, headers, "application/json")


@pytest.mark.parametrize(("key", "roles"), [("nova", ["service"]), ("nova", ["admin", "service"]), ("agent", []),
                                            ("unlisted", [])])
def test_a_key_may_assert_the_roles_it_is_given(key: str, roles: list[str]) -> None:
    [envelope] = decode(*signed(key, roles))
    assert list(envelope.context.roles) == roles


@pytest.mark.parametrize(("key", "roles", "reason"), [
    ("agent", ["service"], "signing key 'agent' may not assert the role(s) ['service']: "
                           "BINDPIPE_SIGNING_KEY_ROLES gives it none"),
    ("nova", ["service", "member"], "signing key 'nova' may not assert the role(s) ['member']: "
                                    "BINDPIPE_SIGNING_KEY_ROLES gives it ['service', 'admin']"),
    ("unlisted", ["service"], "signing key 'unlisted' may not assert the role(s) ['service']: "
                              "BINDPIPE_SIGNING_KEY_ROLES gives it none"),
])
def test_a_key_asserting_another_role_is_refused(key: str, roles: list[str], reason: str) -> None:
    body, headers = signed(key, roles)
    with pytest.raises(PoisonMessage) as refused:
        decode(body, headers)
    poison = refused.value
    assert (poison.category, poison.reason) == ("bad_signature", reason)
    assert poison.event_id == json.loads(body)["event_id"]
    assert (poison.port_id, poison.host) == ("p1", "compute-7"), "the port's host is told of the refusal"


def test_an_unsigned_envelope_is_not_role_checked_when_signatures_are_optional() -> None:
    body, _ = signed("agent", ["service"])
    [envelope] = decode(body, {})
    assert envelope.context.roles == ("service",)


def test_roles_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BINDPIPE_SIGNING_KEY_ROLES", '{"nova": ["service"], "agent": []}')
    assert Settings().signing_key_roles == {"nova": ("service",), "agent": ()}


def test_required_signatures_need_every_keys_roles() -> None:
    """An upgraded worker whose keys have no roles yet would refuse every event that asserts one:
    it refuses to start instead, naming the keys."""
    with pytest.raises(ValidationError, match=r"signing_key_roles: no entry for signing key\(s\) \['unlisted'\]"):
        Settings(signing_keys=KEYS, signing_key_roles={"nova": ["service"], "agent": []}, require_signatures=True)
    Settings(signing_keys=KEYS, signing_key_roles=dict.fromkeys(KEYS, ()), require_signatures=True)  # accepted
