"""What travels on the bus between the stages, and what makes a message poison.

A message is decoded once, as it arrives: an envelope on ``binding.validate`` (checked for size,
encoding, JSON and schema, in that order, each failure with its own category), or a hand-off of
many jobs on the later stages. ``handoff_messages`` is the reverse: a batch's outputs as messages.
"""

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from pydantic import ValidationError

from pipeline.models.binding import BindingResult
from pipeline.models.events import PAYLOAD_MODELS, Envelope
from pipeline.models.jobs import BindingJob, Handoff
from pipeline.models.refusals import (
    BAD_CONTENT_TYPE,
    BAD_JSON,
    BAD_SCHEMA,
    MISSING_EVENT_ID,
    NOT_UTF8,
    TOO_LARGE,
    UNKNOWN_EVENT_TYPE,
    PoisonMessage,
)
from pipeline.workers.topology import STAGE_EXCHANGE


@dataclass(frozen=True)
class Publish:
    """A message to send. ``body`` is a dict, or a job already serialized (``job_json``), so that
    the bytes written to the stage mark and sent to the next stage are encoded once."""

    exchange: str
    routing_key: str
    body: dict[str, Any] | bytes
    occurred_at: datetime | None = field(default=None, compare=False)  # of the event, for the latency metric
    result: BindingResult | None = field(default=None, compare=False)  # what ``body`` holds, for logs and metrics

    def as_json(self) -> dict[str, Any]:
        body = orjson.Fragment(self.body) if isinstance(self.body, bytes) else self.body
        return {"exchange": self.exchange, "routing_key": self.routing_key, "body": body}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Publish":
        return cls(data["exchange"], data["routing_key"], data["body"])


def decode_json(body: bytes | str, max_bytes: int) -> Any:
    """JSON from a body (py-amqp hands over text when the publisher declared an encoding)."""
    size = len(body) if isinstance(body, bytes) else len(body.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise PoisonMessage(TOO_LARGE, f"body of {size} bytes exceeds the limit of {max_bytes}")
    try:
        text = body.decode("utf-8") if isinstance(body, bytes) else body
    except UnicodeDecodeError as exc:
        raise PoisonMessage(NOT_UTF8, f"body is not UTF-8: {exc}") from None
    try:
        return orjson.loads(text)
    except (orjson.JSONDecodeError, RecursionError) as exc:
        raise PoisonMessage(BAD_JSON, f"body is not JSON: {exc}") from None


def _named(value: Any, limit: int = 64) -> str | None:
    """An id read from a message that failed validation, if it is a plausible one (printable: no
    NUL or control character reaches a record or a log line through it)."""
    return value if isinstance(value, str) and 0 < len(value) <= limit and value.isprintable() else None


def envelope_identity(data: dict[str, Any]) -> tuple[str | None, str | None, str | None]:
    """``(event_id, port_id, host)`` as far as an envelope that may be invalid names them."""
    event_id = _named(str(data.get("event_id") or "")) if data.get("event_id") else None
    payload = data.get("payload") if isinstance(data.get("payload"), dict) else {}
    is_port_event = str(data.get("event_type", "")).startswith(("port.", "binding."))
    port_id = _named(payload.get("id") or payload.get("port_id")) if is_port_event else None
    host = _named(payload.get("host"), 255) if is_port_event else None
    return event_id, port_id, host


def _peek(body: bytes | str) -> dict[str, Any]:
    """A body as a JSON object, as far as it is one ({} otherwise): for records of messages not decoded."""
    try:
        data = orjson.loads(body)
    except (orjson.JSONDecodeError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def peek_event_type(body: bytes | str) -> str | None:
    return _named(_peek(body).get("event_type"))


def peek_identity(body: bytes | str) -> tuple[str | None, str | None, str | None]:
    """``envelope_identity`` of any body."""
    return envelope_identity(_peek(body))


CONTENT_TYPE = "application/json"
REDRIVE_HEADER = "x-bindpipe-redrive-of"  # set by `bindpipe dlq redrive`: the dead letter a message came from


def check_content_type(content_type: str | None) -> None:
    """Envelopes are JSON, and say so: a body declared as anything else is refused unread."""
    if (content_type or "").split(";", 1)[0].strip().lower() != CONTENT_TYPE:
        raise PoisonMessage(BAD_CONTENT_TYPE, f"content_type {content_type!r} is not {CONTENT_TYPE!r}"[:300])


def decode_envelope(body: bytes | str, max_bytes: int) -> Envelope:
    data = decode_json(body, max_bytes)
    if not isinstance(data, dict):
        raise PoisonMessage(BAD_SCHEMA, f"envelope must be a JSON object, not {type(data).__name__}")
    event_id, port_id, host = envelope_identity(data)
    if not event_id:
        raise PoisonMessage(MISSING_EVENT_ID, "envelope has no event_id", port_id=port_id, host=host)
    if data.get("event_type") not in PAYLOAD_MODELS:
        raise PoisonMessage(UNKNOWN_EVENT_TYPE, f"unknown event_type {data.get('event_type')!r}"[:300],
                            event_id, port_id, host)
    if (b"\\u0000" if isinstance(body, bytes) else "\\u0000") in body and (where := _nul_at(data)) is not None:
        raise PoisonMessage(BAD_SCHEMA, f"{where}: a string holds a NUL character, which no record can keep",
                            event_id, port_id, host)
    try:
        envelope = Envelope.model_validate(data)
    except (ValidationError, RecursionError) as exc:
        detail = exc.errors()[0] if isinstance(exc, ValidationError) else {"loc": (), "msg": str(exc)}
        where = ".".join(str(p) for p in detail["loc"])
        raise PoisonMessage(BAD_SCHEMA, f"{where}: {detail['msg']}"[:500], event_id, port_id, host) from None
    envelope._raw = body  # the event log keeps the envelope as it arrived
    return envelope


def _nul_at(value: Any, path: str = "") -> str | None:
    """Where in ``value`` a string (or a key) holds a NUL character, if one does."""
    if isinstance(value, str):
        return path or "(root)" if "\x00" in value else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        name = str(key).replace("\x00", "\\x00")
        where = f"{path}.{name}" if path else name
        if isinstance(key, str) and "\x00" in key:
            return where
        found = _nul_at(item, where)
        if found is not None:
            return found
    return None


HANDOFF_JOBS = 50  # jobs per hand-off message between stages
HANDOFF_MAX_BYTES = 16 * 1024 * 1024  # hand-offs come from our own workers: bounded, but generously


def decode_jobs(body: bytes | str) -> list[BindingJob]:
    """A hand-off message: ``{"jobs": [job, ...]}`` (or one bare job). Parsed and validated in one
    pass (pydantic's JSON parser); only a message that fails is taken apart job by job, to name
    the culprit."""
    if len(body) <= HANDOFF_MAX_BYTES:
        try:
            return Handoff.model_validate_json(body).jobs
        except ValidationError:
            pass
    data = decode_json(body, HANDOFF_MAX_BYTES)
    jobs = data.get("jobs") if isinstance(data, dict) and "jobs" in data else [data]
    if not isinstance(jobs, list) or not jobs:
        raise PoisonMessage(BAD_SCHEMA, "a hand-off holds a non-empty list of jobs under 'jobs'")
    decoded = []
    for number, job in enumerate(jobs):
        try:
            decoded.append(BindingJob.model_validate(job))
        except ValidationError as exc:
            ids = job.get("job_id", "") if isinstance(job, dict) else ""
            event_id, _, port_id = str(ids).partition(":")
            raise PoisonMessage(BAD_SCHEMA, f"job {number} is not a binding job: {exc.errors()[0]['msg']}",
                                event_id or None, port_id or None) from None
    return decoded


def job_json(job: BindingJob) -> bytes:
    """A job as it travels: fields that are None are left out (decoding restores them). Not
    ``exclude_defaults``: it compares every field with its default, ~25 % dearer for a few bytes less."""
    return job.model_dump_json(exclude_none=True).encode()


def handoff_messages(outputs: list["Publish"]) -> list[tuple[str, str, dict[str, Any] | bytes]]:
    """What to send for a batch's outputs: results one by one (each host reads its own), hand-offs
    to the next stage grouped ``HANDOFF_JOBS`` to a message — one publish for many jobs."""
    messages: list[tuple[str, str, dict[str, Any] | bytes]] = []
    grouped: dict[tuple[str, str], list[bytes]] = {}
    for out in outputs:
        if out.exchange == STAGE_EXCHANGE.name:
            body = out.body if isinstance(out.body, bytes) else orjson.dumps(out.body)
            grouped.setdefault((out.exchange, out.routing_key), []).append(body)
        else:
            messages.append((out.exchange, out.routing_key, out.body))
    for (exchange, routing_key), jobs in grouped.items():
        messages += [(exchange, routing_key, b'{"jobs":[' + b",".join(jobs[i:i + HANDOFF_JOBS]) + b"]}")
                     for i in range(0, len(jobs), HANDOFF_JOBS)]
    return messages
