"""``bindpipe dlq``: the dead letters, as the database keeps them: list, show, redrive, purge.

Every message a stage refused, and every one the broker gave up on (its delivery limit reached), is
a row of ``dead_letters`` with its bytes, routing key, headers and reason; the stage DLQs on the
broker are only the way in for the latter. A redriven message is published again where it first
went, with the header ``x-bindpipe-redrive-of: <id>``: the stage judges it afresh (it is never
taken for a copy of what was refused), and if it is refused again its new dead letter names the
old one (``redrive_of``).
"""

import json
import sys
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from pipeline.models.tables import DeadLetter
from pipeline.store import dead_letters as store

BODY_SHOWN = 4096  # bytes of a body ``show`` prints (``--raw`` writes it all)


def summary(row: DeadLetter) -> dict[str, Any]:
    return {"id": row.id, "stage": row.stage, "category": row.category, "reason": row.reason,
            "event_id": row.event_id, "port_id": row.port_id, "routing_key": row.routing_key,
            "received_at": row.received_at.isoformat(), "bytes": len(row.body),
            "redriven_at": row.redriven_at.isoformat() if row.redriven_at else None, "redrive_of": row.redrive_of}


def printable(body: bytes, limit: int = BODY_SHOWN) -> str:
    """A body for a terminal: its UTF-8 text, or for other bytes Python's escaped form."""
    shown = body[:limit]
    try:
        text = shown.decode("utf-8")
    except UnicodeDecodeError:
        text = repr(shown)[2:-1]
    text = text.replace("\x00", "\\x00")
    return text + (f"… ({len(body) - limit} more bytes)" if len(body) > limit else "")


def list_rows(engine: Engine, stage: str | None, everything: bool, limit: int, as_json: bool) -> int:
    with Session(engine) as session:
        rows = store.listed(session, stage, pending_only=not everything, limit=limit)
    if as_json:
        sys.stdout.write(json.dumps([summary(r) for r in rows], indent=2) + "\n")
        return 0
    if not rows:
        print("no dead letters" + ("" if everything else " waiting (--all shows the redriven ones too)"))
        return 0
    print(f"{'id':>6}  {'stage':<8}  {'received (UTC)':<19}  {'category':<20}  what")
    for r in rows:
        what = f"event {r.event_id}" if r.event_id else f"{len(r.body)} bytes"
        redriven = f" [redriven {r.redriven_at:%Y-%m-%d %H:%M}]" if r.redriven_at else ""
        print(f"{r.id:>6}  {r.stage:<8}  {r.received_at:%Y-%m-%d %H:%M:%S}  {r.category:<20}  {what}"
              f"{' port ' + r.port_id if r.port_id else ''}{redriven}")
    return 0


def show(engine: Engine, dead_letter_id: int, as_json: bool, raw: bool) -> int:
    with Session(engine) as session:
        row = session.get(DeadLetter, dead_letter_id)
    if row is None:
        print(f"bindpipe dlq show: no dead letter {dead_letter_id}", file=sys.stderr)
        return 1
    if raw:
        sys.stdout.buffer.write(row.body)
        return 0
    details = {**summary(row), "headers": row.headers or {}, "body": printable(row.body, len(row.body))}
    if as_json:
        sys.stdout.write(json.dumps(details, indent=2) + "\n")
        return 0
    for key in ("id", "stage", "category", "reason", "event_id", "port_id", "routing_key", "received_at",
                "redriven_at", "redrive_of", "headers"):
        print(f"{key:<12} {details[key]}")
    print(f"body ({len(row.body)} bytes):\n{printable(row.body)}")
    return 0


def purge(engine: Engine, stage: str | None, ids: list[int] | None) -> int:
    with Session(engine) as session, session.begin():
        count = store.purge(session, stage, ids)
    print(f"purged {count} dead letter(s)")
    return 0
