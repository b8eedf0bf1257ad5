"""Initial schema: every table of pipeline/models/tables.py, with the PF/VF guard.

Revision ID: 0001
Revises:
Create Date: 2026-11-23

Exactly what ``Base.metadata.create_all`` builds, on PostgreSQL and SQLite alike, including what
the models declare outside the table classes (``_pf_vf_guard`` in tables.py): on PostgreSQL the
``btree_gist`` extension and the ``ex_pci_devices_pf_vf`` exclusion constraint, on SQLite the
``tr_pci_devices_pf_vf`` trigger. The SQL is copied here, not imported: a revision is frozen, a
later change of the models gets its own revision.

The downgrade drops the extension too; if other objects in the database still use it,
PostgreSQL refuses and the whole downgrade rolls back.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite: INTEGER PRIMARY KEY is the rowid
TIMESTAMP = sa.DateTime(timezone=True)

PG_PF_VF_EXCLUSION = (
    "ALTER TABLE pci_devices ADD CONSTRAINT ex_pci_devices_pf_vf EXCLUDE USING gist "
    "(host WITH =, pf_group WITH =, is_pf WITH <>) WHERE (owner_port_id IS NOT NULL)"
)
SQLITE_PF_VF_TRIGGER = """
CREATE TRIGGER IF NOT EXISTS tr_pci_devices_pf_vf BEFORE UPDATE OF owner_port_id ON pci_devices
WHEN NEW.owner_port_id IS NOT NULL AND EXISTS (
    SELECT 1 FROM pci_devices d WHERE d.host = NEW.host AND d.pf_group = NEW.pf_group
    AND d.is_pf <> NEW.is_pf AND d.owner_port_id IS NOT NULL)
BEGIN SELECT RAISE(ABORT, 'a PF and one of its VFs cannot be in use together'); END
"""


def upgrade() -> None:
    op.create_table(
        "event_log",
        sa.Column("seq", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(36), nullable=False),
        sa.Column("event_type", sa.String(32), nullable=False),
        sa.Column("occurred_at", TIMESTAMP, nullable=False),
        sa.Column("received_at", TIMESTAMP, nullable=False),
        sa.Column("envelope", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_event_log")),
        sa.UniqueConstraint("event_id", name=op.f("uq_event_log_event_id")),
    )
    op.create_table(
        "stage_marks",
        sa.Column("job_id", sa.String(110), nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("output", sa.JSON(), nullable=False),
        sa.Column("done_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("job_id", "stage", name=op.f("pk_stage_marks")),
    )
    op.create_table(
        "networks",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("subnets", sa.JSON(), nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_networks")),
    )
    op.create_table(
        "segments",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("network_id", sa.String(64), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("network_type", sa.String(16), nullable=False),
        sa.Column("physical_network", sa.String(64), nullable=True),
        sa.Column("segmentation_id", sa.Integer(), nullable=True),
        sa.Column("is_dynamic", sa.Boolean(), nullable=False),
        sa.ForeignKeyConstraint(["network_id"], ["networks.id"], ondelete="CASCADE",
                                name=op.f("fk_segments_network_id_networks")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_segments")),
    )
    op.create_index(op.f("ix_segments_network_id"), "segments", ["network_id"])
    op.create_table(
        "agents",
        sa.Column("id", sa.String(200), nullable=False),
        sa.Column("agent_type", sa.String(64), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("binary", sa.String(64), nullable=True),
        sa.Column("reported_alive", sa.Boolean(), nullable=False),
        sa.Column("admin_state_up", sa.Boolean(), nullable=False),
        sa.Column("configurations", sa.JSON(), nullable=False),
        sa.Column("heartbeat_at", TIMESTAMP, nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agents")),
    )
    op.create_index(op.f("ix_agents_host"), "agents", ["host"])
    op.create_table(
        "ports",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("network_id", sa.String(64), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("vnic_type", sa.String(32), nullable=False),
        sa.Column("profile", sa.JSON(), nullable=False),
        sa.Column("body", sa.JSON(), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ports")),
    )
    op.create_index(op.f("ix_ports_host"), "ports", ["host"])
    op.create_index(op.f("ix_ports_network_id"), "ports", ["network_id"])
    op.create_table(
        "bindings",
        sa.Column("port_id", sa.String(64), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("vnic_type", sa.String(32), nullable=False),
        sa.Column("profile", sa.JSON(), nullable=False),
        sa.Column("vif_type", sa.String(32), nullable=False),
        sa.Column("vif_details", sa.JSON(), nullable=False),
        sa.Column("levels", sa.JSON(), nullable=False),
        sa.Column("event_id", sa.String(36), nullable=False),
        sa.Column("result_seq", BIG_ID, nullable=True),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("port_id", "host", name=op.f("pk_bindings")),
    )
    op.create_table(
        "pci_devices",
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("address", sa.String(12), nullable=False),
        sa.Column("vendor_id", sa.String(4), nullable=False),
        sa.Column("product_id", sa.String(4), nullable=False),
        sa.Column("dev_type", sa.String(8), nullable=False),
        sa.Column("parent_addr", sa.String(12), nullable=True),
        sa.Column("pf_group", sa.String(12), nullable=False),
        sa.Column("is_pf", sa.Integer(), nullable=False),
        sa.Column("numa_node", sa.Integer(), nullable=True),
        sa.Column("physical_network", sa.String(64), nullable=True),
        sa.Column("inventory", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(12), nullable=False),
        sa.Column("owner_port_id", sa.String(64), nullable=True),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("host", "address", name=op.f("pk_pci_devices")),
    )
    # a port holds at most one device per host
    op.create_index("uq_pci_devices_owner", "pci_devices", ["host", "owner_port_id"], unique=True,
                    postgresql_where=sa.text("owner_port_id IS NOT NULL"),
                    sqlite_where=sa.text("owner_port_id IS NOT NULL"))
    # a PF and any of its VFs are never in use together
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute("CREATE EXTENSION IF NOT EXISTS btree_gist")
        op.execute(PG_PF_VF_EXCLUSION)
    elif dialect == "sqlite":
        op.execute(SQLITE_PF_VF_TRIGGER)
    op.create_table(
        "pci_inventories",
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("inventory", sa.JSON(), nullable=False),
        sa.Column("updated_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("host", name=op.f("pk_pci_inventories")),
    )
    op.create_table(
        "results",
        sa.Column("seq", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(36), nullable=False),
        sa.Column("port_id", sa.String(64), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("body", sa.JSON(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("published_at", TIMESTAMP, nullable=True),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_results")),
    )
    op.create_index(op.f("ix_results_event_id"), "results", ["event_id"])
    op.create_index(op.f("ix_results_host"), "results", ["host"])
    op.create_index(op.f("ix_results_port_id"), "results", ["port_id"])
    op.create_table(
        "dead_letters",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("event_id", sa.String(64), nullable=True),
        sa.Column("port_id", sa.String(64), nullable=True),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("received_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letters")),
    )
    op.create_index(op.f("ix_dead_letters_event_id"), "dead_letters", ["event_id"])


def downgrade() -> None:
    for table in ("dead_letters", "results", "pci_inventories", "pci_devices", "bindings", "ports", "agents",
                  "segments", "networks", "stage_marks", "event_log"):
        op.drop_table(table)  # with its indexes, constraints and (SQLite) triggers
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP EXTENSION IF EXISTS btree_gist")
