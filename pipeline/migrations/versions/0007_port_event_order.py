"""A port remembers when the event that set its binding inputs occurred (``ports.event_at``), and a
deleted port leaves a tombstone (``deleted_ports``: when it was deleted, its last revision).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04

Competing workers may take a port's events out of the order they were published in: the later of
two updates could be stored first and then overwritten by the earlier one, and an update that
overtook its port's deletion could create the port again. An event that occurred before what is
stored (or before the port's deletion) now changes nothing. Rows written before have no
``event_at``: any event is newer.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("ports", recreate="always") as batch:  # SQLite: the same table as create_all makes
        batch.add_column(sa.Column("event_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "deleted_ports",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("event_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deleted_ports")),
    )


def downgrade() -> None:
    op.drop_table("deleted_ports")
    with op.batch_alter_table("ports") as batch:
        batch.drop_column("event_at")
