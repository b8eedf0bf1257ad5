"""Why a message is refused: the bounded categories of dead letters, and the exception that carries one.

A refused message has no effect on any port or host: it is recorded (``dead_letters``) with its
category and a specific reason, and, when it names a port, the host it names is told
``binding_failed`` unless the port is bound there (see ``pipeline.workers.handlers.refusal``).
"""

from typing import Final

TOO_LARGE: Final = "too_large"
NOT_UTF8: Final = "not_utf8"
BAD_JSON: Final = "bad_json"
BAD_CONTENT_TYPE: Final = "bad_content_type"
BAD_SCHEMA: Final = "bad_schema"
UNKNOWN_EVENT_TYPE: Final = "unknown_event_type"
MISSING_EVENT_ID: Final = "missing_event_id"
CONFLICTING_EVENT_ID: Final = "conflicting_event_id"
BAD_SIGNATURE: Final = "bad_signature"
DELIVERY_LIMIT: Final = "delivery_limit"
OTHER: Final = "other"

#: Every dead-letter category, the bounded ``reason`` label of ``bindpipe_dead_letters_total``.
DEAD_LETTER_CATEGORIES: Final = (TOO_LARGE, NOT_UTF8, BAD_JSON, BAD_CONTENT_TYPE, BAD_SCHEMA, UNKNOWN_EVENT_TYPE,
                                 MISSING_EVENT_ID, CONFLICTING_EVENT_ID, BAD_SIGNATURE, DELIVERY_LIMIT, OTHER)


class PoisonMessage(Exception):
    """A message no retry can fix: recorded as a dead letter at once, with ``category`` and a
    specific reason (and the event, port and host it names, when they could be read)."""

    def __init__(self, category: str, reason: str, event_id: str | None = None, port_id: str | None = None,
                 host: str | None = None):
        super().__init__(reason)
        self.category, self.reason, self.event_id, self.port_id, self.host = category, reason, event_id, port_id, host

    def conflicting(self, why: str) -> "PoisonMessage":
        """The same refusal as a conflict over its event id: no result names that event twice."""
        return PoisonMessage(CONFLICTING_EVENT_ID, f"{why}; this message was: {self.category}: {self.reason}"[:500],
                             self.event_id)
