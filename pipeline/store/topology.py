"""Networks, agents and ports as the stages read them."""

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import bindparam, delete, literal, select, text
from sqlalchemy.orm import Session

from pipeline.db import among, insert_rows
from pipeline.models.tables import AgentRow, BindingRow, DeletedPort, NetworkRow, PortRow, SegmentRow
from pipeline.models.topology import Agent, Network, Port, Segment, Subnet
from pipeline.models.vocabulary import OVN_CONTROLLER_TYPES, VIF_TYPE_BINDING_FAILED, VIF_UNPLUGGED_TYPES

PORT_INPUT_KEYS = ("host", "vnic_type", "profile")


def agent_key(agent: Agent) -> str:
    """Agents are identified by type, host and binary (an id, if the report carries one)."""
    return agent.id or f"{agent.agent_type}@{agent.host}/{agent.binary or ''}"


def upsert_agent(session: Session, agent: Agent, at: datetime, down_time: int) -> bool:
    """Store a heartbeat; True when the agent is new or comes back alive (a *revival*)."""
    row = session.get(AgentRow, agent_key(agent), with_for_update=True)
    was_alive = row is not None and row.reported_alive and (at - _aware(row.heartbeat_at)) < timedelta(seconds=down_time)
    if row is None:
        position = len(session.scalars(select(AgentRow.id).where(AgentRow.host == agent.host)).all())
        row = AgentRow(id=agent_key(agent), position=position, heartbeat_at=at)
        session.add(row)
    row.agent_type, row.host, row.binary = agent.agent_type, agent.host, agent.binary
    row.reported_alive, row.admin_state_up = agent.alive, agent.admin_state_up
    row.configurations = agent.configurations
    row.heartbeat_at = max(_aware(row.heartbeat_at), at)
    return agent.alive and not was_alive


def _aware(value: datetime) -> datetime:
    """SQLite returns naive datetimes for timezone-aware columns; they were stored as UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def load_agents(session: Session, hosts: set[str], at: datetime, down_time: int) -> list[Agent]:
    """Agents of ``hosts``, alive when they said so and last reported within ``down_time`` of ``at``.

    Liveness is judged at the event's time, not the wall clock, so replaying the log gives the
    same bindings.
    """
    return [agent_model(r, agent_alive(r, at, down_time)) for r in agent_rows(session, hosts)]


def agent_rows(session: Session, hosts: set[str]) -> list[AgentRow]:
    return list(session.scalars(select(AgentRow).where(among(session, AgentRow.host, hosts))
                                .order_by(AgentRow.host, AgentRow.position)))


def agent_alive(row: AgentRow, at: datetime, down_time: int) -> bool:
    return row.reported_alive and (at - _aware(row.heartbeat_at)) < timedelta(seconds=down_time)


def agent_model(row: AgentRow, alive: bool) -> Agent:
    return Agent(id=row.id, agent_type=row.agent_type, host=row.host, binary=row.binary,
                 admin_state_up=row.admin_state_up, configurations=row.configurations,
                 heartbeat_at=_aware(row.heartbeat_at), alive=alive)


def all_ovn_chassis_hosts(session: Session) -> set[str]:
    """Remote-managed ports bind on a DPU chassis that is not the port's host: OVN needs them all."""
    return set(session.scalars(select(AgentRow.host).where(AgentRow.agent_type.in_(OVN_CONTROLLER_TYPES))))


def upsert_network(session: Session, network: Network) -> None:
    row = session.get(NetworkRow, network.id)
    if row is None:
        row = NetworkRow(id=network.id)
        session.add(row)
    row.subnets = [s.model_dump() for s in network.subnets]
    session.execute(delete(SegmentRow).where(SegmentRow.network_id == network.id,
                                             SegmentRow.is_dynamic.is_(False)))
    session.flush()
    for position, segment in enumerate(network.segments):
        session.add(SegmentRow(id=segment.id, network_id=network.id, position=position,
                               network_type=segment.network_type, physical_network=segment.physical_network,
                               segmentation_id=segment.segmentation_id, is_dynamic=False))


def delete_network(session: Session, network_id: str) -> None:
    session.execute(delete(SegmentRow).where(SegmentRow.network_id == network_id))
    session.execute(delete(NetworkRow).where(NetworkRow.id == network_id))


def load_networks(session: Session, network_ids: set[str]) -> dict[str, Network]:
    networks = {r.id: Network(id=r.id, subnets=[Subnet.model_validate(s) for s in r.subnets])
                for r in session.scalars(select(NetworkRow).where(among(session, NetworkRow.id, network_ids)))}
    for seg in session.scalars(select(SegmentRow).where(among(session, SegmentRow.network_id, network_ids),
                                                        SegmentRow.is_dynamic.is_(False))
                               .order_by(SegmentRow.network_id, SegmentRow.position)):
        networks[seg.network_id].segments.append(Segment(
            id=seg.id, network_type=seg.network_type, physical_network=seg.physical_network,
            segmentation_id=seg.segmentation_id))
    return networks


def save_dynamic_segments(session: Session, network_id: str, segments: list[dict[str, Any]]) -> None:
    for seg in segments:
        if session.get(SegmentRow, seg["id"]) is None:
            session.add(SegmentRow(id=seg["id"], network_id=network_id, position=-1, is_dynamic=True,
                                   network_type=seg["network_type"], physical_network=seg["physical_network"],
                                   segmentation_id=seg["segmentation_id"]))


@dataclass
class NewPort:
    """A port created by the batch in hand, read and changed like a ``PortRow`` until
    ``insert_ports`` writes it: a plain record, because building an ORM object and setting its
    instrumented attributes cost validate ~25 µs a port (measured)."""

    id: str
    network_id: str | None
    host: str
    vnic_type: str
    profile: dict[str, Any]
    body: dict[str, Any]
    revision: int = 0
    event_at: datetime | None = None


def port_from_row(row: PortRow | NewPort) -> Port:
    return Port.model_validate({**row.body, "id": row.id, "network_id": row.network_id, "host": row.host,
                                "vnic_type": row.vnic_type, "profile": row.profile})


# A port that is not stored has no row to lock, yet two of its events (its creation and its
# deletion, taken by two workers) must not both decide on its absence: on PostgreSQL an advisory
# lock per port id, taken in id order, stands in for the row. (SQLite writes one at a time.)
_LOCK_PORT_IDS = text("SELECT pg_advisory_xact_lock(k) FROM (SELECT hashtextextended(i, 0) AS k FROM "
                      "json_array_elements_text(CAST(:ids AS json)) AS i ORDER BY i) AS ids")


def lock_ports(session: Session, port_ids: list[str]) -> dict[str, PortRow]:
    """Port rows locked in id order (the same order everywhere, so no deadlock), and on PostgreSQL
    the ids themselves (see ``_LOCK_PORT_IDS``), whether the ports are stored or not."""
    if port_ids and session.get_bind().dialect.name == "postgresql":
        session.execute(_LOCK_PORT_IDS, {"ids": orjson.dumps(sorted(port_ids)).decode()})
    rows = session.scalars(select(PortRow).where(among(session, PortRow.id, port_ids)).order_by(PortRow.id)
                           .with_for_update()).all()
    return {r.id: r for r in rows}


def lock_port_revisions(session: Session, port_ids: list[str]) -> dict[str, int]:
    """``lock_ports`` for a stage that only compares revisions: no row objects built."""
    return dict(session.execute(select(PortRow.id, PortRow.revision).where(among(session, PortRow.id, port_ids))
                                .order_by(PortRow.id).with_for_update()).all())


def store_port(row: PortRow | NewPort | None, port: Port, at: datetime,
               revision: int = 0) -> tuple[PortRow | NewPort, bool]:
    """Create or replace a port's stored object, as the event that occurred ``at`` says; also says
    whether its binding inputs changed. A new port is a ``NewPort`` (its revision counting on from
    ``revision``): ``insert_ports`` writes a batch's new ports at once."""
    body = port.model_dump(mode="json", exclude={"id", "network_id", "host", "vnic_type", "profile"})
    profile = port.profile if isinstance(port.profile, dict) else {}
    vnic_type = port.vnic_type if isinstance(port.vnic_type, str) else "normal"
    if row is None:
        return NewPort(port.id, port.network_id, port.host, vnic_type, profile, body, revision, at), True
    changed = (row.host, row.vnic_type, row.profile) != (port.host, vnic_type, profile)
    row.network_id, row.host, row.vnic_type, row.profile, row.body, row.event_at = (
        port.network_id or row.network_id, port.host, vnic_type, profile, body, at)
    return row, changed


def occurred_before(at: datetime, last: datetime | None) -> bool:
    """Did an event that occurred ``at`` happen before the one that last wrote (``last``)? Then it
    was overtaken on its way and must change nothing. (Events of one instant apply in arrival order.)"""
    return last is not None and at < _aware(last)


def deleted_ports(session: Session, port_ids: list[str]) -> dict[str, tuple[datetime, int]]:
    """The tombstones of ``port_ids``: when each was deleted, and its last revision."""
    if not port_ids:
        return {}
    return {row.id: (_aware(row.event_at), row.revision) for row in session.scalars(
        select(DeletedPort).where(among(session, DeletedPort.id, port_ids)).with_for_update())}


def save_deleted_ports(session: Session, tombstones: dict[str, tuple[datetime, int] | None]) -> None:
    """A batch's tombstones: laid (when, revision), or lifted (None: the port was created again)."""
    lifted = [port_id for port_id, stone in tombstones.items() if stone is None]
    if lifted:
        session.execute(delete(DeletedPort).where(among(session, DeletedPort.id, lifted)))
    insert_rows(session, DeletedPort.__table__, [{"id": port_id, "event_at": at, "revision": revision}
                                                 for port_id, stone in tombstones.items() if stone is not None
                                                 for at, revision in [stone]], on_conflict="update")


def insert_ports(session: Session, rows: list[NewPort]) -> None:
    """New ports: one statement for them all, without the ORM's unit of work (measured: a fifth of
    validate's time went to it)."""
    if rows:
        now = datetime.now(UTC)
        insert_rows(session, PortRow.__table__, [
            {"id": r.id, "network_id": r.network_id, "host": r.host, "vnic_type": r.vnic_type, "profile": r.profile,
             "body": r.body, "revision": r.revision, "updated_at": now, "event_at": r.event_at} for r in rows])


def save_bindings(session: Session, bindings: dict[tuple[str, str], dict[str, Any] | None]) -> None:
    """A batch's final binding per (port, host): a row's columns (inserted or replacing the
    binding there), or None (the binding there is deleted). One statement each."""
    gone = [{"port": port, "host": host} for (port, host), row in bindings.items() if row is None]
    kept = [row for row in bindings.values() if row is not None]
    table = BindingRow.__table__
    if gone:
        session.execute(delete(table).where(table.c.port_id == bindparam("port"), table.c.host == bindparam("host")),
                        gone)
    insert_rows(session, table, kept, on_conflict="update")


def lock_bindings(session: Session, port_ids: list[str]) -> set[tuple[str, str]]:
    """The ``(port, host)`` bindings of ``port_ids``, locked (in key order) until the transaction ends:
    two jobs of a deleted port (no port row left to lock) see each other's changes."""
    if not port_ids:
        return set()
    return set(session.execute(select(BindingRow.port_id, BindingRow.host)
                               .where(among(session, BindingRow.port_id, port_ids))
                               .order_by(BindingRow.port_id, BindingRow.host).with_for_update()).all())


def bindings_of(session: Session, port_ids: list[str]) -> list[BindingRow]:
    """Every binding (any host) of ``port_ids``."""
    if not port_ids:
        return []
    return list(session.scalars(select(BindingRow).where(among(session, BindingRow.port_id, port_ids))))


def failed_ports_on_host(session: Session, host: str) -> list[str]:
    """The ports whose binding failed on ``host``. The vif_type is written into the statement, not
    bound: a prepared statement's generic plan could not use the partial index
    ``ix_bindings_failed_by_host`` for an unknown value."""
    return list(session.scalars(select(BindingRow.port_id).where(
        BindingRow.host == host, BindingRow.status == "ACTIVE",
        BindingRow.vif_type == literal(VIF_TYPE_BINDING_FAILED, literal_execute=True))))


def bound_on(session: Session, port_id: str, host: str) -> bool:
    """Does the port hold a binding on ``host`` that a compute host plugs (not failed, not unbound)?"""
    return session.scalar(select(BindingRow.vif_type).where(BindingRow.port_id == port_id, BindingRow.host == host)
                          ) not in (None, *VIF_UNPLUGGED_TYPES)
