"""The PCI owner index leads with the port: (owner_port_id, host), was (host, owner_port_id).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24

Allocate asks, for each batch, which devices its ports hold (``pci_store.device_holders``), and a
release asks where one port's devices are: both by port alone, which the old column order could
not serve, so every batch scanned every device. The uniqueness it guarantees (a port holds at most
one device per host) is unchanged.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WHERE = sa.text("owner_port_id IS NOT NULL")


def _owner_index(columns: list[str]) -> None:
    op.drop_index("uq_pci_devices_owner", table_name="pci_devices")
    op.create_index("uq_pci_devices_owner", "pci_devices", columns, unique=True,
                    postgresql_where=WHERE, sqlite_where=WHERE)


def upgrade() -> None:
    _owner_index(["owner_port_id", "host"])


def downgrade() -> None:
    _owner_index(["host", "owner_port_id"])
