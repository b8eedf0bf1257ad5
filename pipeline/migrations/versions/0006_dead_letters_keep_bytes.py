"""Dead letters keep their message whole: ``body`` becomes bytes, with its SHA-256, routing key and
headers; a ``category`` column; ``redriven_at`` and ``redrive_of`` for ``bindpipe dlq redrive``.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04

A text body could not hold what hostile publishers send: PostgreSQL refuses a NUL character in
``text``, so recording such a message failed and the worker died on it. Bytes hold anything. The
hash finds an earlier copy of a message without an event id through an index instead of comparing
every stored body. Rows written before keep their text as UTF-8 bytes; their category is the part
of ``reason`` before the first colon.
"""

import hashlib
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def new_columns() -> tuple[sa.Column, ...]:
    """The added columns (made anew for each use: a Column belongs to one table)."""
    return (sa.Column("category", sa.String(32), nullable=True),
            sa.Column("body_sha256", sa.String(64), nullable=True),
            sa.Column("routing_key", sa.String(255), nullable=True),
            sa.Column("headers", sa.JSON(), nullable=True),
            sa.Column("redriven_at", sa.DateTime(timezone=True), nullable=True),
            sa.Column("redrive_of", BIG_ID, nullable=True))


def upgrade() -> None:
    with op.batch_alter_table("dead_letters") as batch:
        batch.alter_column("body", type_=sa.LargeBinary(), existing_type=sa.Text(), existing_nullable=False,
                           postgresql_using="convert_to(body, 'UTF8')")
        for column in new_columns():
            batch.add_column(column)
    table = sa.table("dead_letters", sa.column("id", BIG_ID), sa.column("reason", sa.Text()),
                     sa.column("body", sa.LargeBinary()), sa.column("category", sa.String()),
                     sa.column("body_sha256", sa.String()))
    connection = op.get_bind()
    for row_id, reason, body in connection.execute(sa.select(table.c.id, table.c.reason, table.c.body)).all():
        # SQLite keeps a copied text value as text in a BLOB column: written back as bytes
        body = body if isinstance(body, bytes) else str(body).encode("utf-8", "surrogatepass")
        connection.execute(table.update().where(table.c.id == row_id).values(
            category=reason.split(":", 1)[0][:32], body=body, body_sha256=hashlib.sha256(body).hexdigest()))
    with op.batch_alter_table("dead_letters") as batch:
        batch.alter_column("category", existing_type=sa.String(32), nullable=False)
        batch.alter_column("body_sha256", existing_type=sa.String(64), nullable=False)
    op.create_index("ix_dead_letters_body_sha256", "dead_letters", ["stage", "body_sha256"])


def downgrade() -> None:
    op.drop_index("ix_dead_letters_body_sha256", table_name="dead_letters")
    # text holds neither NUL nor invalid UTF-8: such bytes are written as backslash escapes first
    table = sa.table("dead_letters", sa.column("id", BIG_ID), sa.column("body", sa.LargeBinary()))
    connection = op.get_bind()
    for row_id, body in connection.execute(sa.select(table.c.id, table.c.body)).all():
        body = body if isinstance(body, bytes) else str(body).encode("utf-8", "surrogatepass")
        text = body.decode("utf-8", "backslashreplace").replace("\x00", "\\x00")
        if text.encode() != body:
            connection.execute(table.update().where(table.c.id == row_id).values(body=text.encode()))
    with op.batch_alter_table("dead_letters") as batch:
        for column in reversed(new_columns()):
            batch.drop_column(column.name)
        batch.alter_column("body", type_=sa.Text(), existing_type=sa.LargeBinary(), existing_nullable=False,
                           postgresql_using="convert_from(body, 'UTF8')")
