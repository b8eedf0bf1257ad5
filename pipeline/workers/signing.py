"""Optional HMAC signing of envelopes, with a key per publisher.

A publisher signs the exact bytes it publishes: header ``x-bindpipe-key-id`` names its key and
``x-bindpipe-signature`` carries ``hex(HMAC-SHA256(key, body))``. The validate stage checks it
before the body is even parsed: a bad signature, an unknown key, or (with
``BINDPIPE_REQUIRE_SIGNATURES=true``) a missing one makes the message poison — dead-lettered,
never stored. Keys come from ``BINDPIPE_SIGNING_KEYS`` (JSON ``{"key-id": "secret", …}``); a
process that publishes (a client, a replay) signs with ``BINDPIPE_SIGNING_KEY_ID``.

A signature says who published the bytes, not that the roles the body claims are theirs: each key
may assert only the roles ``BINDPIPE_SIGNING_KEY_ROLES`` (``{"key-id": ["service"], …}``) gives it,
none when it is not listed. That is checked once the envelope is decoded (``check_roles``).
"""

import hashlib
import hmac
from functools import partial
from typing import Any

from kombu import Connection

from pipeline.models.events import Envelope
from pipeline.settings import Settings
from pipeline.workers.messages import PoisonMessage, envelope_identity
from pipeline.workers.publisher import BatchPublisher

KEY_ID_HEADER = "x-bindpipe-key-id"
SIGNATURE_HEADER = "x-bindpipe-signature"


def _bytes(body: bytes | str) -> bytes:
    return body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass")


def signature(secret: str, body: bytes | str) -> str:
    return hmac.new(secret.encode(), _bytes(body), hashlib.sha256).hexdigest()


def event_publisher(connection: Connection, settings: Settings) -> BatchPublisher:
    """A publisher of events (the client, replays): it signs what it sends with this process's key."""
    return BatchPublisher(connection, sign=partial(signing_headers, settings))


def signing_headers(settings: Settings, body: bytes) -> dict[str, Any] | None:
    """The headers that sign ``body`` with this process's key, or None when it has none."""
    key_id = settings.signing_key_id
    if key_id is None:
        return None
    secret = settings.signing_keys.get(key_id)
    if secret is None:
        raise ValueError(f"BINDPIPE_SIGNING_KEY_ID {key_id!r} is not one of BINDPIPE_SIGNING_KEYS")
    return {KEY_ID_HEADER: key_id, SIGNATURE_HEADER: signature(secret.get_secret_value(), body)}


def check_signature(body: bytes | str, headers: dict[str, Any], settings: Settings) -> None:
    """Raise ``PoisonMessage("bad_signature", …)`` unless the body is acceptably signed."""
    key_id, given = headers.get(KEY_ID_HEADER), headers.get(SIGNATURE_HEADER)
    if key_id is None and given is None:
        if settings.require_signatures:
            raise PoisonMessage("bad_signature", "unsigned event, and signatures are required")
        return
    secret = settings.signing_keys.get(str(key_id))
    if secret is None:
        raise PoisonMessage("bad_signature", f"unknown signing key {str(key_id)[:64]!r}")
    if not isinstance(given, str) or not hmac.compare_digest(given, signature(secret.get_secret_value(), body)):
        raise PoisonMessage("bad_signature", f"signature does not match the body (key {key_id!r})")


def check_roles(envelope: Envelope, headers: dict[str, Any], settings: Settings) -> Envelope:
    """The envelope, unless it is signed and its context asserts a role its key may not:
    ``PoisonMessage("bad_signature", …)`` then, naming the event (and its port, so that the port's
    host hears of the refusal). An unsigned envelope (accepted only when signatures are not
    required) is not checked: nothing authenticates what it claims."""
    key_id = headers.get(KEY_ID_HEADER)
    if key_id is None:
        return envelope
    allowed = settings.signing_key_roles.get(str(key_id), ())
    refused = [role for role in envelope.context.roles if role not in allowed]
    if refused:
        _, port_id, host = envelope_identity(envelope.as_json())
        raise PoisonMessage("bad_signature", f"signing key {key_id!r} may not assert the role(s) {refused}: "
                            f"BINDPIPE_SIGNING_KEY_ROLES gives it {list(allowed) or 'none'}"[:500], envelope.key,
                            port_id, host)
    return envelope
