"""The persisted state (SQLAlchemy 2 typed ORM): PostgreSQL in production, SQLite embedded.

Invariants are the database's, not only the code's:
* an event has its effects once per stage: ``stage_marks`` has (job_id, stage) as primary key;
* a device has at most one owner (one ``owner_port_id`` column) and a port holds at most one
  device per host (partial unique index);
* a PF and any of its VFs are never in use together: ``pf_group`` is the PF's address for the PF
  and its VFs, and an exclusion constraint (PostgreSQL) or trigger (SQLite) refuses two in-use
  rows of one group with different ``is_pf``.
"""

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    event,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: DateTime(timezone=True)}


class EventLog(Base):
    """Append-only log of every accepted event, in arrival order (``seq``)."""

    __tablename__ = "event_log"

    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                     autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(36), unique=True)
    event_type: Mapped[str] = mapped_column(String(32))
    occurred_at: Mapped[datetime]
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    envelope: Mapped[dict[str, Any]]


class StageMark(Base):
    """Proof that ``stage`` handled a job (or an event), written in the same transaction as its
    effect, with what it handed on: a redelivery re-publishes ``output`` instead of redoing it.
    Compose keeps only its results' seqs (the results table holds them); select, which has no
    effect, keeps a mark only for a job it dead-lettered."""

    __tablename__ = "stage_marks"

    job_id: Mapped[str] = mapped_column(String(110), primary_key=True)
    stage: Mapped[str] = mapped_column(String(16), primary_key=True)
    output: Mapped[list[Any]] = mapped_column(default=list)
    done_at: Mapped[datetime] = mapped_column(default=utcnow)


class NetworkRow(Base):
    __tablename__ = "networks"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    subnets: Mapped[list[Any]] = mapped_column(default=list)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class SegmentRow(Base):
    __tablename__ = "segments"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    network_id: Mapped[str] = mapped_column(ForeignKey("networks.id", ondelete="CASCADE"), index=True)
    position: Mapped[int]
    network_type: Mapped[str] = mapped_column(String(16))
    physical_network: Mapped[str | None] = mapped_column(String(64))
    segmentation_id: Mapped[int | None]
    is_dynamic: Mapped[bool] = mapped_column(default=False)


class AgentRow(Base):
    """An agent's last report. ``alive`` is derived from ``heartbeat_at`` at read time."""

    __tablename__ = "agents"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    agent_type: Mapped[str] = mapped_column(String(64))
    host: Mapped[str] = mapped_column(String(255), index=True)
    binary: Mapped[str | None] = mapped_column(String(64))
    reported_alive: Mapped[bool] = mapped_column(default=True)
    admin_state_up: Mapped[bool] = mapped_column(default=True)
    configurations: Mapped[dict[str, Any]] = mapped_column(default=dict)
    heartbeat_at: Mapped[datetime]
    position: Mapped[int] = mapped_column(default=0)


class PortRow(Base):
    __tablename__ = "ports"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    network_id: Mapped[str] = mapped_column(String(64))
    host: Mapped[str] = mapped_column(String(255), default="")
    vnic_type: Mapped[str] = mapped_column(String(32), default="normal")
    profile: Mapped[dict[str, Any]] = mapped_column(default=dict)
    body: Mapped[dict[str, Any]] = mapped_column(default=dict)
    revision: Mapped[int] = mapped_column(default=1)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    event_at: Mapped[datetime | None]  # the occurred_at of the event that set its binding inputs


class DeletedPort(Base):
    """A deleted port's last word: an event about it that occurred before its deletion arrives late
    (events of one port may overtake each other between competing workers) and changes nothing; a
    port created again with the same id goes on from its revision, so no job of the old one passes
    for a job of the new one."""

    __tablename__ = "deleted_ports"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    event_at: Mapped[datetime]
    revision: Mapped[int]


class BindingRow(Base):
    """A port's binding on one host (ACTIVE, or INACTIVE during a move)."""

    __tablename__ = "bindings"
    __table_args__ = (
        # an agent's revival re-binds the ports that failed on its host: found among the failed
        # bindings alone, not by a pass over every binding (the key leads with the port)
        Index("ix_bindings_failed_by_host", "host", postgresql_where=text("vif_type = 'binding_failed'"),
              sqlite_where=text("vif_type = 'binding_failed'")),
    )

    port_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(255), primary_key=True)
    status: Mapped[str] = mapped_column(String(8), default="ACTIVE")
    vnic_type: Mapped[str] = mapped_column(String(32))
    profile: Mapped[dict[str, Any]] = mapped_column(default=dict)
    vif_type: Mapped[str] = mapped_column(String(32))
    vif_details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    levels: Mapped[list[Any]] = mapped_column(default=list)
    event_id: Mapped[str] = mapped_column(String(36))
    result_seq: Mapped[int | None] = mapped_column(BigInteger().with_variant(Integer, "sqlite"))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class PciDeviceRow(Base):
    __tablename__ = "pci_devices"
    __table_args__ = (
        # owner first: allocate asks which devices a batch's ports hold, by port (without it, a scan
        # of every device for each batch); unique per (owner, host) all the same
        Index("uq_pci_devices_owner", "owner_port_id", "host", unique=True,
              postgresql_where=text("owner_port_id IS NOT NULL"), sqlite_where=text("owner_port_id IS NOT NULL")),
    )

    host: Mapped[str] = mapped_column(String(255), primary_key=True)
    address: Mapped[str] = mapped_column(String(12), primary_key=True)
    vendor_id: Mapped[str] = mapped_column(String(4))
    product_id: Mapped[str] = mapped_column(String(4))
    dev_type: Mapped[str] = mapped_column(String(8))
    parent_addr: Mapped[str | None] = mapped_column(String(12))
    pf_group: Mapped[str] = mapped_column(String(12))
    is_pf: Mapped[int] = mapped_column(Integer, default=0)
    numa_node: Mapped[int | None]
    physical_network: Mapped[str | None] = mapped_column(String(64))
    inventory: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(12), default="available")
    owner_port_id: Mapped[str | None] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class HostInventoryRow(Base):
    """The last ``pci.inventory`` of a host (its NUMA nodes and raw device list)."""

    __tablename__ = "pci_inventories"

    host: Mapped[str] = mapped_column(String(255), primary_key=True)
    inventory: Mapped[dict[str, Any]]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ResultRow(Base):
    """Every published result, in order: the outbox (``published_at`` null until confirmed) and
    the replay log at once."""

    __tablename__ = "results"
    __table_args__ = (
        # the relay's question every few seconds, "which results are not published yet?", answered
        # from the few unpublished rows instead of a pass over every result ever written
        Index("ix_results_unpublished", "seq", postgresql_where=text("published_at IS NULL"),
              sqlite_where=text("published_at IS NULL")),
    )

    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                     autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(36))  # not indexed: no query looks results up by it
    port_id: Mapped[str] = mapped_column(String(64), index=True)
    host: Mapped[str] = mapped_column(String(255), index=True)
    body: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    published_at: Mapped[datetime | None]

    def published(self) -> dict[str, Any]:
        """The message body as published: the stored body (written before ``seq`` existed) with it."""
        return {**self.body, "seq": self.seq}


class DeadLetter(Base):
    """A message no stage could take, kept whole with why: refused by a worker (``category`` is the
    refusal's), or given up on by the broker after its delivery limit (``delivery_limit``). The body
    is kept as bytes (any bytes: NUL, invalid UTF-8) with its routing key and headers, so that
    ``bindpipe dlq redrive`` can publish it again exactly as it came; ``redriven_at`` says when that
    was done, and a copy refused again names the dead letter it was redriven from (``redrive_of``)."""

    __tablename__ = "dead_letters"
    __table_args__ = (Index("ix_dead_letters_body_sha256", "stage", "body_sha256"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    stage: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    event_id: Mapped[str | None] = mapped_column(String(64), index=True)
    port_id: Mapped[str | None] = mapped_column(String(64))
    body: Mapped[bytes] = mapped_column(LargeBinary)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    category: Mapped[str] = mapped_column(String(32))
    body_sha256: Mapped[str] = mapped_column(String(64))
    routing_key: Mapped[str | None] = mapped_column(String(255))
    headers: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    redriven_at: Mapped[datetime | None]
    redrive_of: Mapped[int | None] = mapped_column(BigInteger().with_variant(Integer, "sqlite"))


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


@event.listens_for(PciDeviceRow.__table__, "after_create")
def _pf_vf_guard(target, connection, **kw) -> None:  # noqa: ANN001
    if connection.dialect.name == "postgresql":
        connection.execute(text("CREATE EXTENSION IF NOT EXISTS btree_gist"))
        connection.execute(text(PG_PF_VF_EXCLUSION))
    elif connection.dialect.name == "sqlite":
        connection.execute(text(SQLITE_PF_VF_TRIGGER))
