"""A partial index of the results not yet published: ``ix_results_unpublished`` on ``results (seq)
WHERE published_at IS NULL``.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24

The relay asks every few seconds for the results left unpublished, oldest first; without this
index PostgreSQL answered by walking every result ever written (measured: 24.5 ms a pass with
300,000 results, against 1.1 ms with it), a cost that grows with the history forever.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WHERE = sa.text("published_at IS NULL")


def upgrade() -> None:
    op.create_index("ix_results_unpublished", "results", ["seq"], postgresql_where=WHERE, sqlite_where=WHERE)


def downgrade() -> None:
    op.drop_index("ix_results_unpublished", table_name="results")
