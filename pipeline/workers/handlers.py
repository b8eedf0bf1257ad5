"""What each stage does with a batch, inside one database transaction.

A handler turns decoded messages into the messages it hands on (``Publish``); the consumer
publishes them after the commit and only then acks. Every effect is written together with the
stage's mark for the job, so a redelivered message re-publishes what was handed on before and
changes nothing.
"""

from collections.abc import Iterable
from datetime import datetime
from functools import partial
from typing import Any

from sqlalchemy import insert, select, text
from sqlalchemy.orm import Session

from pipeline.db import among, insert_rows
from pipeline.drivers.api import OriginalBinding
from pipeline.models import vocabulary as v
from pipeline.models.binding import AllocationDecision, BindingResult, DriverConfig
from pipeline.models.events import Envelope
from pipeline.models.jobs import BindingJob
from pipeline.models.tables import AgentRow, PortRow, ResultRow, utcnow
from pipeline.models.topology import Agent, Port
from pipeline.observability.logging import bind_event_context_lazily
from pipeline.settings import Settings
from pipeline.stages.composition import compose_result
from pipeline.stages.errors import BindingRequestError
from pipeline.stages.selection import manager_for
from pipeline.stages.validation import ValidatedRequest, validate_request
from pipeline.store import pci as pci_store
from pipeline.store import topology as topo
from pipeline.store.marks import add_marks, record_events, stored_outputs
from pipeline.workers.messages import PoisonMessage, Publish, decode_envelope, decode_jobs, job_json
from pipeline.workers.signing import check_roles, check_signature
from pipeline.workers.topology import RESULTS, STAGE_EXCHANGE, host_routing_key


def validated(job: BindingJob) -> ValidatedRequest:
    """The stage-1 outcome a job carries, as the later stages take it."""
    return ValidatedRequest(job.port, job.vnic_type or v.VNIC_NORMAL, job.profile, job.warnings)


def hand_on(job: BindingJob, stage: str) -> Publish:
    return Publish(STAGE_EXCHANGE.name, stage, job_json(job))


class StageHandler:
    stage = ""
    marks_handled = True  # False: a stage that changes nothing keeps no marks (see SelectHandler)

    def __init__(self, settings: Settings):
        self.settings = settings
        self.driver_config: DriverConfig = settings.driver_config()
        self.duplicates = 0

    def decode(self, body: bytes | str, headers: dict[str, Any] | None = None) -> list[Any]:
        """The items a message holds (a hand-off holds many jobs)."""
        return decode_jobs(body)

    def handle(self, session: Session, items: list[Any]) -> list[Publish]:
        """Handle a batch; ``self.duplicates`` counts the items that were handled before.

        One query finds the items handled before (their stored output is re-published), ``prepare``
        loads what the new ones need in a few queries, and one statement records their marks."""
        self.duplicates = 0
        fresh: dict[str, Any] = {}
        for item in items:
            key = self.key(item)
            if key in fresh:
                self.duplicates += 1  # a copy within this batch: the first one's output goes out now
            else:
                fresh[key] = item
        previous = stored_outputs(session, list(fresh), self.stage)
        self.prepare(session, [item for key, item in fresh.items() if key not in previous])
        out: list[Publish] = []
        produced: dict[str, list[Publish]] = {}
        for key, item in fresh.items():
            bind_event_context_lazily(partial(self.event_context, item))
            if key in previous:
                self.duplicates += 1
                out += self.redelivered(session, previous[key])
            else:
                produced[key] = self.handle_one(session, item)
                out += produced[key]
        self.finish(session)
        if self.marks_handled:
            add_marks(session, self.stage, {key: self.mark_output(ps) for key, ps in produced.items()})
        return out

    def mark_output(self, produced: list[Publish]) -> list[Any]:
        """What the mark keeps of a job's output: enough for ``redelivered`` to send it again."""
        return [p.as_json() for p in produced]

    def prepare(self, session: Session, items: list[Any]) -> None:
        """Load in bulk what ``handle_one`` will need for ``items`` (the batch's new items)."""

    def finish(self, session: Session) -> None:
        """Complete the batch's effects before its marks are written."""

    def key(self, item: Any) -> str:
        return item.job_id

    def event_context(self, item: Any) -> dict[str, Any]:
        return {"stage": self.stage, **self.log_context(item)}

    def log_context(self, item: Any) -> dict[str, Any]:
        host = item.port.host if item.port is not None else item.old_host
        return {"event_id": item.event_id, "port_id": item.port_id, "host": host}

    def redelivered(self, session: Session, previous: list[dict[str, Any]]) -> list[Publish]:
        return [Publish.from_json(p) for p in previous]

    def handle_one(self, session: Session, item: Any) -> list[Publish]:
        raise NotImplementedError


class ValidateHandler(StageHandler):
    """Intake: log the event, apply topology changes, and turn port events into binding jobs."""

    stage = "validate"

    def decode(self, body: bytes | str, headers: dict[str, Any] | None = None) -> list[Envelope]:
        """The envelope, after its signature is checked (before anything is stored)."""
        check_signature(body, headers or {}, self.settings)
        return [check_roles(decode_envelope(body, self.settings.max_body_bytes), headers or {}, self.settings)]

    def key(self, item: Envelope) -> str:
        return item.key

    def log_context(self, item: Envelope) -> dict[str, Any]:
        return {"event_id": item.key, "event_type": item.event_type}

    def prepare(self, session: Session, items: list[Envelope]) -> None:
        record_events(session, items)
        port_ids = sorted({p.get("id") or p.get("port_id") for e in items if e.event_type.startswith(("port.", "binding."))
                           for p in [e.payload]} - {None})
        locked = topo.lock_ports(session, port_ids)
        self.ports: dict[str, PortRow | topo.NewPort | None] = {port_id: locked.get(port_id) for port_id in port_ids}
        self.bindings = {(b.port_id, b.host): b for b in topo.bindings_of(session, port_ids)}
        self.new_ports: dict[str, topo.NewPort] = {}  # ports created by this batch, inserted by ``finish``

    def finish(self, session: Session) -> None:
        topo.insert_ports(session, list(self.new_ports.values()))

    def port_row(self, session: Session, port_id: str) -> PortRow | topo.NewPort | None:
        if port_id not in self.ports:
            self.ports[port_id] = topo.lock_ports(session, [port_id]).get(port_id)
        return self.ports[port_id]

    def handle_one(self, session: Session, env: Envelope) -> list[Publish]:
        payload = env.typed_payload()
        kind = env.event_type
        jobs: list[BindingJob] = []
        if kind == "agent.report":
            revived = topo.upsert_agent(session, payload, env.occurred_at, self.settings.agent_down_time)
            if revived and payload.admin_state_up:
                jobs = self.rebind_failed(session, env, payload.host)
        elif kind == "network.upsert":
            topo.upsert_network(session, payload)
        elif kind == "network.delete":
            topo.delete_network(session, payload.id)
        elif kind == "pci.inventory":
            pci_store.store_inventory(session, payload)
        elif kind in ("port.create", "port.update"):
            jobs = self.port_changed(session, env, payload, force=False)
        elif kind == "binding.request":
            row = self.port_row(session, payload.port_id)
            if row is None:
                raise PoisonMessage("bad_schema", f"binding.request for unknown port {payload.port_id}",
                                    env.key, payload.port_id, payload.host)
            port = topo.port_from_row(row).model_copy(update={"host": payload.host})
            if payload.vnic_type is not None:
                port.vnic_type = payload.vnic_type
            if payload.profile is not None:
                port.profile = payload.profile
            jobs = self.port_changed(session, env, port, force=True)
        elif kind == "port.delete":
            row = self.port_row(session, payload.id)
            if row is not None:
                row.revision += 1
                jobs = [self.job(env, row, "unbind", old_host=row.host or None)]
                if self.new_ports.pop(row.id, None) is None:  # else: created in this batch, never stored
                    session.delete(row)
                    session.flush()  # a port.create of the same id later in this batch inserts anew
                self.ports[payload.id] = None
        return [hand_on(job, "select") for job in jobs]

    def job(self, env: Envelope, row: PortRow | topo.NewPort, action: str, **fields: Any) -> BindingJob:
        return BindingJob(job_id=f"{env.key}:{row.id}", event_id=env.key,
                          occurred_at=env.occurred_at, port_id=row.id, revision=row.revision, action=action,
                          context=env.context, **fields)

    def port_changed(self, session: Session, env: Envelope, port: Port, force: bool) -> list[BindingJob]:
        row = self.port_row(session, port.id)
        old_host = row.host if row else ""
        old_profile = dict(row.profile) if row else None
        binding = self.bindings.get((port.id, old_host)) if row else None
        is_new = row is None
        row, changed = topo.store_port(row, port)
        if is_new:
            self.new_ports[port.id] = row
        self.ports[port.id] = row
        needs_bind = force or changed or binding is None or binding.vif_type in v.VIF_UNPLUGGED_TYPES
        if not needs_bind:
            return []
        row.revision += 1
        original = ({"host": binding.host, "profile": binding.profile, "vif_details": binding.vif_details}
                    if binding else None)
        job = self.job(env, row, "bind", port=port, old_host=old_host if old_host and old_host != port.host else None,
                       original=original)
        try:
            request = validate_request(port, self.driver_config, env.context, stored_profile=old_profile)
        except BindingRequestError as exc:
            job.error = str(exc)
        else:
            job.vnic_type, job.profile, job.warnings = request.vnic_type, request.profile, request.warnings
        return [job]

    def rebind_failed(self, session: Session, env: Envelope, host: str) -> list[BindingJob]:
        """Every port that failed to bind on ``host`` gets another try (Neutron: OVS agents only)."""
        jobs = []
        for port_id in topo.failed_ports_on_host(session, host):
            row = self.port_row(session, port_id)
            if row is None:
                continue
            row.revision += 1
            port = topo.port_from_row(row)
            jobs.append(self.job(env, row, "bind", port=port, vnic_type=row.vnic_type, profile=row.profile))
        return jobs


class SelectHandler(StageHandler):
    """Stage 2 over the stored topology, with agent liveness judged at the event's time.

    It changes nothing, so it marks nothing (the mark and its copy of the job were its largest
    cost): a redelivered job is selected again, and the copies meet at allocate, whose mark lets
    one through. Only a job dead-lettered here gets a mark, so a redelivery skips it."""

    stage = "select"
    marks_handled = False

    def prepare(self, session: Session, items: list[BindingJob]) -> None:
        ports = [j.port for j in items if j.port is not None]
        self.networks = topo.load_networks(session, {p.network_id for p in ports})
        # only a remote-managed port binds on another host's chassis (its DPU's): every OVN chassis
        # (in an OVN cloud, every compute host) is read for a batch that has one, and offered to it
        self.chassis_hosts = (topo.all_ovn_chassis_hosts(session) if any(self.on_dpu(j) for j in items)
                              else set())
        self.agent_rows: dict[str, list] = {}
        for row in topo.agent_rows(session, {p.host for p in ports} | self.chassis_hosts):
            self.agent_rows.setdefault(row.host, []).append(row)
        self.agents: dict[tuple[str, bool], Agent] = {}  # (agent id, alive): built once a batch

    @staticmethod
    def on_dpu(job: BindingJob) -> bool:
        return job.port is not None and validated(job).vnic_type == v.VNIC_REMOTE_MANAGED

    def agent(self, row: AgentRow, at: datetime) -> Agent:
        """The agent of ``row`` as it was at ``at``."""
        key = (row.id, topo.agent_alive(row, at, self.settings.agent_down_time))
        if key not in self.agents:
            self.agents[key] = topo.agent_model(row, key[1])
        return self.agents[key]

    def handle_one(self, session: Session, job: BindingJob) -> list[Publish]:
        if job.action == "bind" and job.error is None and job.port is not None:
            network = self.networks.get(job.port.network_id)
            if network is None:
                job.error = f"InvalidInput: network_id: network {job.port.network_id} is not known"
            else:
                hosts = {job.port.host} | self.chassis_hosts if self.on_dpu(job) else {job.port.host}
                agents = [self.agent(r, job.occurred_at) for host in sorted(hosts) for r in self.agent_rows.get(host, [])]
                original = OriginalBinding(**job.original) if job.original else None
                try:
                    job.selection = manager_for(self.driver_config).bind_port(validated(job), network, agents,
                                                                              original)
                except BindingRequestError as exc:  # a configuration the drivers refuse, as the dry-run says
                    job.error = str(exc)
        return [hand_on(job, "allocate")]


class PortLockingHandler(StageHandler):
    """A stage that changes a port's state: its ports are locked (in id order) for the batch, and a
    ``bind`` job whose revision is no longer the port's is dropped as stale."""

    def handle(self, session: Session, items: list[BindingJob]) -> list[Publish]:
        self.revisions = topo.lock_port_revisions(session, sorted({j.port_id for j in items}))
        return super().handle(session, items)

    def is_stale(self, job: BindingJob) -> bool:
        return job.action == "bind" and self.revisions.get(job.port_id) != job.revision


class AllocateHandler(PortLockingHandler):
    """Stage 3 against the database allocator: the port's old devices are released first."""

    stage = "allocate"

    def prepare(self, session: Session, items: list[BindingJob]) -> None:
        self.networks = topo.load_networks(session, {j.port.network_id for j in items if j.port is not None})
        self.holders = pci_store.device_holders(session, [j.port_id for j in items])
        self.hosts = pci_store.HostCache(session)
        self.hosts.lock({j.port.host for j in items if j.port is not None and j.selection is not None
                         and j.selection.bound and validated(j).vnic_type in v.VNIC_TYPES_NEEDING_PCI})

    def handle_one(self, session: Session, job: BindingJob) -> list[Publish]:
        if self.is_stale(job):
            return []  # a newer event for this port is on its way
        if job.port_id in self.holders:
            pci_store.release_port(session, job.port_id, self.hosts)
        if job.action == "bind" and job.selection is not None and job.error is None:
            job.allocation = pci_store.allocate(session, validated(job), job.selection,
                                                self.networks[job.port.network_id], self.hosts)
        return [hand_on(job, "compose")]

    def finish(self, session: Session) -> None:
        self.hosts.flush()


class ComposeHandler(PortLockingHandler):
    """Stage 4, then the binding rows and the results outbox."""

    stage = "compose"

    def mark_output(self, produced: list[Publish]) -> list[Any]:
        """Only the results' seqs: the results table holds them whole."""
        return [p.body["seq"] for p in produced]

    def redelivered(self, session: Session, previous: list[Any]) -> list[Publish]:
        """The job's results that were not confirmed as published yet (the relay would send them too).
        A mark written before marks kept only seqs holds the published messages."""
        seqs = [p if isinstance(p, int) else p["body"]["seq"] for p in previous]
        return resent(session.scalars(select(ResultRow).where(among(session, ResultRow.seq, seqs),
                                                              ResultRow.published_at.is_(None))
                                      .order_by(ResultRow.seq)))

    def prepare(self, session: Session, items: list[BindingJob]) -> None:
        self.bindings: dict[tuple[str, str], dict[str, Any] | None] = {}  # the batch's last word per (port, host)
        self.results: list[tuple[dict[str, Any], dict[str, Any] | None, BindingResult, Publish | None]] = []

    def handle_one(self, session: Session, job: BindingJob) -> list[Publish]:
        if self.is_stale(job):
            return []
        out: list[Publish | None] = []
        if job.old_host is not None:
            self.bindings[(job.port_id, job.old_host)] = None
            out.append(self.add_result(session, job, BindingResult(
                id=job.port_id, port_id=job.port_id, host=job.old_host, vif_type=v.VIF_TYPE_UNBOUND, vif_details={})))
        if job.action == "bind":
            result = self.compose(job)
            binding = self.binding(session, job, result) if job.port.host else None
            out.append(self.add_result(session, job, result, binding))
        return [p for p in out if p is not None]

    def compose(self, job: BindingJob) -> BindingResult:
        if job.error is not None or job.selection is None:
            return BindingResult(id=job.port_id, error=job.error, port_id=job.port_id, host=job.port.host,
                                 vnic_type=job.vnic_type)
        return compose_result(job.port_id, validated(job), job.selection, job.allocation or AllocationDecision())

    def binding(self, session: Session, job: BindingJob, result: BindingResult) -> dict[str, Any]:
        """The port's binding row on its host (written by ``finish``, with its result's seq)."""
        binding = self.bindings[(job.port_id, job.port.host)] = {
            "port_id": job.port_id, "host": job.port.host, "status": v.BINDING_ACTIVE,
            "vnic_type": job.vnic_type or v.VNIC_NORMAL, "profile": result.profile or job.profile,
            "vif_type": result.vif_type or v.VIF_TYPE_BINDING_FAILED, "vif_details": result.vif_details or {},
            "levels": [lv.model_dump() for lv in result.binding_levels], "event_id": job.event_id,
            "result_seq": None, "updated_at": utcnow()}
        if result.dynamic_segments:
            topo.save_dynamic_segments(session, job.port.network_id, result.dynamic_segments)
        return binding

    def add_result(self, session: Session, job: BindingJob, result: BindingResult,
                   binding: dict[str, Any] | None = None) -> Publish | None:
        """Record the result in the outbox; what to publish (see ``outbox``). Its ``seq`` is filled
        in by ``finish``, which inserts the batch's rows."""
        result.event_id = job.event_id
        row, publish = outbox(result, job.occurred_at)
        self.results.append((row, binding, result, publish))
        return publish

    def finish(self, session: Session) -> None:
        insert_results(session, [row for row, _, _, _ in self.results])
        for row, binding, result, publish in self.results:
            number(row, result, publish)
            if binding is not None:
                binding["result_seq"] = row["seq"]
        topo.save_bindings(session, self.bindings)


def outbox(result: BindingResult, occurred_at: datetime | None) -> tuple[dict[str, Any], Publish | None]:
    """A result's outbox row (for ``insert_results``), and what to publish: nothing for a port with
    no host (no one to tell; the row is only kept for ``explain``)."""
    body = result.model_dump(mode="json")
    now = utcnow()
    host = result.host or ""
    row = {"event_id": result.event_id or "", "port_id": result.port_id, "host": host, "body": body,
           "created_at": now, "published_at": None if host else now}
    if not host:
        return row, None
    return row, Publish(RESULTS.name, host_routing_key(host), dict(body), occurred_at, result)


def insert_results(session: Session, rows: list[dict[str, Any]]) -> None:
    """Insert outbox rows and give each its ``seq``. On PostgreSQL the seqs are taken from the
    sequence first (one query) and the rows inserted as one statement without RETURNING (a
    multi-row INSERT … RETURNING is a long statement psycopg parses anew each batch); SQLite numbers
    them as it inserts them, and returns the numbers in order."""
    if not rows:
        return
    table = ResultRow.__table__
    if session.get_bind().dialect.name == "postgresql":
        seqs = sorted(session.scalars(text("SELECT nextval(pg_get_serial_sequence('results', 'seq')) "
                                           "FROM generate_series(1, :n)"), {"n": len(rows)}))
        for row, seq in zip(rows, seqs, strict=True):
            row["seq"] = seq
        insert_rows(session, table, rows)
        return
    seqs = session.scalars(insert(table).returning(table.c.seq, sort_by_parameter_order=True), rows).all()
    for row, seq in zip(rows, seqs, strict=True):
        row["seq"] = seq


def number(row: dict[str, Any], result: BindingResult, publish: Publish | None) -> None:
    """Once the row is inserted: its ``seq`` in the result and in the body to publish (the stored
    body is left as written; ``ResultRow.published`` adds the seq, saving an UPDATE per result)."""
    result.seq = row["seq"]
    if publish is not None:
        publish.body["seq"] = row["seq"]


def refusal(session: Session, poison: PoisonMessage) -> Publish | None:
    """For a refused event that names a port: a ``binding_failed`` result with the reason, for the
    port's host (the one the event names, else the stored one)."""
    if poison.port_id is None:
        return None
    port = session.get(PortRow, poison.port_id)
    host = poison.host or (port.host if port is not None else "")
    result = BindingResult(id=poison.port_id, port_id=poison.port_id, host=host, event_id=poison.event_id,
                           vif_type=v.VIF_TYPE_BINDING_FAILED, vif_details={},
                           error=f"Refused: {poison.category}: {poison.reason}")
    row, publish = outbox(result, None)
    insert_results(session, [row])
    number(row, result, publish)
    return publish


def unpublished_refusals(session: Session, poison: PoisonMessage) -> list[Publish]:
    """The refusal results of ``poison``'s event that a crash left unpublished."""
    if poison.port_id is None:
        return []
    return resent(session.scalars(select(ResultRow).where(ResultRow.port_id == poison.port_id,
                                                          ResultRow.event_id == (poison.event_id or ""),
                                                          ResultRow.published_at.is_(None), ResultRow.host != "")))


def resent(rows: Iterable[ResultRow]) -> list[Publish]:
    """Stored results to publish again, as they were (with their seq)."""
    return [Publish(RESULTS.name, host_routing_key(r.host), r.published()) for r in rows]


HANDLERS: dict[str, type[StageHandler]] = {
    h.stage: h for h in (ValidateHandler, SelectHandler, AllocateHandler, ComposeHandler)}
