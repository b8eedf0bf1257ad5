"""A partial index of the failed bindings by host: ``ix_bindings_failed_by_host`` on
``bindings (host) WHERE vif_type = 'binding_failed'``.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24

When an agent comes back alive, validate re-binds the ports whose binding failed on its host. The
bindings' key leads with the port, so PostgreSQL answered by reading every binding, once per
revival: a mass restart of agents would read the whole table once for each of them. The index
holds the failed bindings only, so it costs nothing for the bindings that succeed.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WHERE = sa.text("vif_type = 'binding_failed'")


def upgrade() -> None:
    op.create_index("ix_bindings_failed_by_host", "bindings", ["host"], postgresql_where=WHERE, sqlite_where=WHERE)


def downgrade() -> None:
    op.drop_index("ix_bindings_failed_by_host", table_name="bindings")
