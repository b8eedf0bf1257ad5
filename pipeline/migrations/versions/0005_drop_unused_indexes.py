"""Three indexes no query reads are dropped: ``ix_results_event_id``, ``ix_ports_network_id`` and
``ix_ports_host``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24

Every binding inserts a port and a result, and marks the result published (an UPDATE that moves
the row, so each of its indexes takes a new entry too): each index was written once or twice a
binding and read by nothing (results are looked up by seq, port or host; ports by id).
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DROPPED = (("ix_results_event_id", "results", "event_id"), ("ix_ports_network_id", "ports", "network_id"),
           ("ix_ports_host", "ports", "host"))


def upgrade() -> None:
    for name, table, _ in DROPPED:
        op.drop_index(name, table_name=table)


def downgrade() -> None:
    for name, table, column in DROPPED:
        op.create_index(name, table, [column])
