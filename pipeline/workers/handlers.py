"""What each stage does with a batch, inside one database transaction.

A handler turns decoded messages into the messages it hands on (``Publish``); the consumer
publishes them after the commit and only then acks. Every effect is written together with the
stage's mark for the job, so a redelivered message re-publishes what was handed on before and
changes nothing.
"""

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

import structlog
from sqlalchemy import insert, select, text
from sqlalchemy.orm import Session

from pipeline.db import among, insert_rows
from pipeline.drivers.api import OriginalBinding
from pipeline.models import vocabulary as v
from pipeline.models.binding import AllocationDecision, BindingResult, DriverConfig
from pipeline.models.events import Envelope
from pipeline.models.jobs import BindingJob
from pipeline.models.refusals import CONFLICTING_EVENT_ID, PoisonMessage
from pipeline.models.tables import AgentRow, EventLog, PortRow, ResultRow, utcnow
from pipeline.models.topology import Agent, Port
from pipeline.observability.logging import bind_event_context_lazily
from pipeline.settings import Settings
from pipeline.stages.composition import compose_result
from pipeline.stages.errors import BindingRequestError, InvalidInput
from pipeline.stages.selection import manager_for
from pipeline.stages.validation import ValidatedRequest, validate_request
from pipeline.store import dead_letters as dead_letter_store
from pipeline.store import pci as pci_store
from pipeline.store import topology as topo
from pipeline.store.marks import add_marks, record_events, stored_outputs
from pipeline.workers.messages import Publish, check_content_type, decode_envelope, decode_jobs, job_json
from pipeline.workers.signing import check_roles, check_signature
from pipeline.workers.topology import RESULTS, STAGE_EXCHANGE, host_routing_key


@dataclass
class HandledBatch:
    """What a handler made of a batch: the messages to publish once it is committed, the items it
    refused before writing anything for them (each with why), and how many items were copies of
    ones handled before."""

    publishes: list[Publish] = field(default_factory=list)
    refused: list[tuple[Any, PoisonMessage]] = field(default_factory=list)
    duplicates: int = 0


log = structlog.get_logger(__name__)


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

    def decode(self, body: bytes | str, headers: dict[str, Any] | None = None,
               content_type: str | None = None) -> list[Any]:
        """The items a message holds (a hand-off holds many jobs)."""
        return decode_jobs(body)

    def handle(self, session: Session, items: list[Any]) -> "HandledBatch":
        """Handle a batch.

        Items that share a key with one handled before (in this batch, or by an earlier one: one
        query finds those) are copies: their stored output is re-published. An item that claims a
        taken key with other content is refused before anything is written (``conflicts``).
        ``prepare`` loads what the new ones need in a few queries, and one statement records their
        marks."""
        batch = HandledBatch()
        fresh: dict[str, Any] = {}
        for item in items:
            key = self.key(item)
            if key not in fresh:
                fresh[key] = item
            elif (why := self.conflict_with_copy(fresh[key], item)) is not None:
                batch.refused.append((item, why))
            else:
                batch.duplicates += 1  # a copy within this batch: the first one's output goes out now
        previous = stored_outputs(session, list(fresh), self.stage)
        for key, why in self.conflicts(session, {key: item for key, item in fresh.items() if key in previous},
                                       [key for key in fresh if key not in previous]).items():
            batch.refused.append((fresh.pop(key), why))
        self.prepare(session, [item for key, item in fresh.items() if key not in previous])
        produced: dict[str, list[Publish]] = {}
        for key, item in fresh.items():
            bind_event_context_lazily(partial(self.event_context, item))
            if key in previous:
                batch.duplicates += 1
                batch.publishes += self.redelivered(session, previous[key])
            else:
                produced[key] = self.handle_one(session, item)
                batch.publishes += produced[key]
        self.finish(session)
        if self.marks_handled:
            add_marks(session, self.stage, {key: self.mark_output(ps) for key, ps in produced.items()})
        return batch

    def mark_output(self, produced: list[Publish]) -> list[Any]:
        """What the mark keeps of a job's output, enough for ``redelivered`` to send it again: a
        result's seq (the results table holds it whole), a hand-off whole."""
        return [p.body["seq"] if p.exchange == RESULTS.name else p.as_json() for p in produced]

    def conflict_with_copy(self, first: Any, copy: Any) -> PoisonMessage | None:
        """Why ``copy``, which shares ``first``'s key, is not the same message (None: it is)."""
        return None

    def conflicts(self, session: Session, handled: dict[str, Any], new: list[str]) -> dict[str, PoisonMessage]:
        """Items to refuse, by key: one handled before (``handled``) that came back as another
        message, or a ``new`` one whose key is taken."""
        return {}

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

    def redelivered(self, session: Session, previous: list[Any]) -> list[Publish]:
        """What a mark says was handed on, again: the results not confirmed as published yet (the
        relay would send them too) first, as the first time, then the hand-offs. (A mark written
        before results were kept as seqs holds the result messages whole.)"""
        seqs = [p if isinstance(p, int) else p["body"]["seq"] for p in previous
                if isinstance(p, int) or p["exchange"] == RESULTS.name]
        unpublished = resent(session.scalars(select(ResultRow).where(among(session, ResultRow.seq, seqs),
                                                                     ResultRow.published_at.is_(None))
                                             .order_by(ResultRow.seq))) if seqs else []
        return unpublished + [Publish.from_json(p) for p in previous
                              if isinstance(p, dict) and p["exchange"] != RESULTS.name]

    def handle_one(self, session: Session, item: Any) -> list[Publish]:
        raise NotImplementedError


class ValidateHandler(StageHandler):
    """Intake: log the event, apply topology changes, and turn port events into binding jobs.

    A binding request is validated against the port as stored *before* anything is stored: a
    request refused by policy or validation (as Neutron's API refuses it with a 403 or 400) changes
    nothing: not the port, its binding, its device, nor any host's view (see ``refusal``). So every
    later (re)bind reads only inputs that passed validation under the context that wrote them."""

    stage = "validate"

    def decode(self, body: bytes | str, headers: dict[str, Any] | None = None,
               content_type: str | None = None) -> list[Envelope]:
        """The envelope, after its signature and content type are checked (before anything is stored)."""
        check_signature(body, headers or {}, self.settings)
        check_content_type(content_type)
        return [check_roles(decode_envelope(body, self.settings.max_body_bytes), headers or {}, self.settings)]

    def key(self, item: Envelope) -> str:
        return item.key

    def log_context(self, item: Envelope) -> dict[str, Any]:
        return {"event_id": item.key, "event_type": item.event_type}

    def conflict_with_copy(self, first: Envelope, copy: Envelope) -> PoisonMessage | None:
        if first.as_json() != copy.as_json():
            return conflict(copy.key, "another event in this batch has it, with another body")
        return None

    def conflicts(self, session: Session, handled: dict[str, Envelope], new: list[str]) -> dict[str, PoisonMessage]:
        """A copy of a logged event must be that event; a new one must not take a refused message's id."""
        found = {event_id: conflict(event_id, "an accepted event has it, with another body")
                 for event_id, logged in logged_envelopes(session, list(handled)).items()
                 if logged != handled[event_id].as_json()}
        found.update({event_id: conflict(event_id, "a refused message has it")
                      for event_id in dead_letter_store.refused_event_ids(session, new)})
        return found

    def prepare(self, session: Session, items: list[Envelope]) -> None:
        record_events(session, items)
        port_ids = sorted({p.get("id") or p.get("port_id") for e in items if e.event_type.startswith(("port.", "binding."))
                           for p in [e.payload]} - {None})
        locked = topo.lock_ports(session, port_ids)
        self.ports: dict[str, PortRow | topo.NewPort | None] = {port_id: locked.get(port_id) for port_id in port_ids}
        self.bindings = {(b.port_id, b.host): b for b in topo.bindings_of(session, port_ids)}
        self.new_ports: dict[str, topo.NewPort] = {}  # ports created by this batch, inserted by ``finish``
        # tombstones of the ports not stored: read, and laid or lifted by this batch (written by ``finish``)
        self.deleted = topo.deleted_ports(session, [port_id for port_id in port_ids if locked.get(port_id) is None])
        self.tombstones: dict[str, tuple[datetime, int] | None] = {}

    def finish(self, session: Session) -> None:
        topo.insert_ports(session, list(self.new_ports.values()))
        topo.save_deleted_ports(session, self.tombstones)

    def overtaken(self, port_id: str, at: datetime) -> bool:
        """Did a newer event already write (or delete) the port? Then this one changes nothing."""
        row = self.ports.get(port_id)
        if row is not None:
            return topo.occurred_before(at, row.event_at)
        deleted = self.deleted.get(port_id)
        return deleted is not None and topo.occurred_before(at, deleted[0])

    def bury(self, port_id: str, at: datetime, revision: int) -> None:
        self.deleted[port_id] = self.tombstones[port_id] = (at, revision)

    def port_row(self, session: Session, port_id: str) -> PortRow | topo.NewPort | None:
        if port_id not in self.ports:
            self.ports[port_id] = topo.lock_ports(session, [port_id]).get(port_id)
        return self.ports[port_id]

    def handle_one(self, session: Session, env: Envelope) -> list[Publish]:
        payload = env.typed_payload()
        kind = env.event_type
        if kind == "agent.report":
            revived = topo.upsert_agent(session, payload, env.occurred_at, self.settings.agent_down_time)
            if revived and payload.admin_state_up:
                return self.rebind_failed(session, env, payload.host)
        elif kind == "network.upsert":
            topo.upsert_network(session, payload)
        elif kind == "network.delete":
            topo.delete_network(session, payload.id)
        elif kind == "pci.inventory":
            pci_store.store_inventory(session, payload)
        elif kind in ("port.create", "port.update"):
            return self.port_changed(session, env, payload, force=False)
        elif kind == "binding.request":
            row = self.port_row(session, payload.port_id)
            if row is None:
                return self.refuse(session, env.key, payload.port_id, payload.host,
                                   str(InvalidInput("port_id", f"port {payload.port_id} is not known")))
            port = topo.port_from_row(row).model_copy(update={"host": payload.host})
            if payload.vnic_type is not None:
                port.vnic_type = payload.vnic_type
            if payload.profile is not None:
                port.profile = payload.profile
            return self.port_changed(session, env, port, force=True)
        elif kind == "port.delete":
            row = self.port_row(session, payload.id)
            if self.overtaken(payload.id, env.occurred_at):
                return []
            if row is None:  # not created yet (the create is still on its way) or gone: it stays gone
                self.bury(payload.id, env.occurred_at, self.deleted.get(payload.id, (None, 0))[1])
                return []
            row.revision += 1
            job = self.job(env, row, "unbind", old_host=row.host or None)
            if self.new_ports.pop(row.id, None) is None:  # else: created in this batch, never stored
                session.delete(row)
                session.flush()  # a port.create of the same id later in this batch inserts anew
            self.ports[payload.id] = None
            self.bury(payload.id, env.occurred_at, row.revision)
            return [hand_on(job, "select")]
        return []

    def job(self, env: Envelope, row: PortRow | topo.NewPort, action: str, **fields: Any) -> BindingJob:
        return BindingJob(job_id=f"{env.key}:{row.id}", event_id=env.key,
                          occurred_at=env.occurred_at, port_id=row.id, revision=row.revision, action=action,
                          context=env.context, **fields)

    def port_changed(self, session: Session, env: Envelope, port: Port, force: bool) -> list[Publish]:
        row = self.port_row(session, port.id)
        if self.overtaken(port.id, env.occurred_at):
            log.info("event overtaken by a newer one of its port: it changes nothing", port_id=port.id,
                     event_id=env.key)
            return []
        try:
            request = validate_request(port, self.driver_config, env.context,
                                       stored_profile=row.profile if row else None)
        except BindingRequestError as exc:
            return self.refuse(session, env.key, port.id, port.host, str(exc))
        old_host = row.host if row else ""
        binding = self.bindings.get((port.id, old_host)) if row else None
        is_new = row is None
        row, changed = topo.store_port(row, port, env.occurred_at, self.deleted.get(port.id, (None, 0))[1])
        if is_new:
            self.new_ports[port.id] = row
            if port.id in self.deleted:  # created again: its revisions go on from the deleted one's
                del self.deleted[port.id]
                self.tombstones[port.id] = None
        self.ports[port.id] = row
        if not (force or changed or binding is None or binding.vif_type in v.VIF_UNPLUGGED_TYPES):
            return []
        row.revision += 1
        original = ({"host": binding.host, "profile": binding.profile, "vif_details": binding.vif_details}
                    if binding else None)
        job = self.job(env, row, "bind", port=port, old_host=old_host if old_host and old_host != port.host else None,
                       original=original, vnic_type=request.vnic_type, profile=request.profile,
                       warnings=request.warnings)
        return [hand_on(job, "select")]

    def refuse(self, session: Session, event_id: str, port_id: str, host: str, error: str) -> list[Publish]:
        binding = self.bindings.get((port_id, host))
        publish = refusal(session, port_id, host, event_id, error,
                          bound_there=binding is not None and binding.vif_type not in v.VIF_UNPLUGGED_TYPES)
        return [publish] if publish is not None else []

    def rebind_failed(self, session: Session, env: Envelope, host: str) -> list[Publish]:
        """Every port that failed to bind on ``host`` gets another try (Neutron: OVS agents only),
        with its stored inputs, validated again (stored inputs passed validation when they were
        written; a configuration since made stricter may refuse them now)."""
        out: list[Publish] = []
        for port_id in topo.failed_ports_on_host(session, host):
            row = self.port_row(session, port_id)
            if row is None:
                continue
            port = topo.port_from_row(row)
            try:
                request = validate_request(port, self.driver_config, env.context, stored_profile=row.profile)
            except BindingRequestError as exc:
                out += self.refuse(session, env.key, port_id, row.host, str(exc))
                continue
            row.revision += 1
            out.append(hand_on(self.job(env, row, "bind", port=port, vnic_type=request.vnic_type,
                                        profile=request.profile, warnings=request.warnings), "select"))
        return out


def conflict(event_id: str, holder: str) -> PoisonMessage:
    return PoisonMessage(CONFLICTING_EVENT_ID, f"event id {event_id} is already taken: {holder}", event_id)


def logged_envelopes(session: Session, event_ids: list[str]) -> dict[str, Any]:
    """The logged envelopes (as JSON values) of ``event_ids``."""
    if not event_ids:
        return {}
    return dict(session.execute(select(EventLog.event_id, EventLog.envelope)
                                .where(among(session, EventLog.event_id, event_ids))).all())


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

    def handle(self, session: Session, items: list[BindingJob]) -> HandledBatch:
        self.revisions = topo.lock_port_revisions(session, sorted({j.port_id for j in items}))
        return super().handle(session, items)

    def is_stale(self, job: BindingJob) -> bool:
        return job.action == "bind" and self.revisions.get(job.port_id) != job.revision


class AllocateHandler(PortLockingHandler):
    """Stage 3 against the database allocator: the port's old devices are released first.

    A device is released and granted again within one host's lock, so its host must hear of the
    release before it hears of the grant: the result that tells the host the port let go of it
    (``unbound``) is numbered here, in the transaction that releases it, before any later
    transaction can grant the device to another port (compose numbers that grant)."""

    stage = "allocate"

    def prepare(self, session: Session, items: list[BindingJob]) -> None:
        self.networks = topo.load_networks(session, {j.port.network_id for j in items if j.port is not None})
        self.holders = pci_store.device_holders(session, [j.port_id for j in items])
        self.hosts = pci_store.HostCache(session)
        self.hosts.lock({j.port.host for j in items if j.port is not None and j.selection is not None
                         and j.selection.bound and validated(j).vnic_type in v.VNIC_TYPES_NEEDING_PCI}
                        | {host for port_id in self.holders for host in self.holders[port_id]})
        self.changes = BindingChanges()

    def handle_one(self, session: Session, job: BindingJob) -> list[Publish]:
        if self.is_stale(job):
            return []  # a newer event for this port is on its way
        held = self.holders.pop(job.port_id, set())
        released = pci_store.release_port(session, job.port_id, self.hosts) if held else []
        if job.action == "bind" and job.selection is not None and job.error is None:
            job.allocation = pci_store.allocate(session, validated(job), job.selection,
                                                self.networks[job.port.network_id], self.hosts)
            if job.allocation.device is not None:  # a later job of the port in this batch releases it
                self.holders[job.port_id] = {job.port.host}
                if released == [job.allocation.device.address]:
                    held.discard(job.port.host)  # it took back the very device it held: nothing changed hands
        return self.changes.unbound(job, sorted(held)) + [hand_on(job, "compose")]

    def finish(self, session: Session) -> None:
        self.hosts.flush()
        self.changes.write(session)


class ComposeHandler(PortLockingHandler):
    """Stage 4, then the binding rows and the results outbox.

    The binding rows are what the hosts were told: a host that holds a binding of the port, other
    than the one this job binds, is told ``unbound`` and its row goes. So whatever order a port's
    events arrive in, or however many of its jobs were dropped as stale on the way, every host that
    was told the port is bound there is told when it no longer is, and a deleted port keeps no row."""

    stage = "compose"

    def prepare(self, session: Session, items: list[BindingJob]) -> None:
        self.changes = BindingChanges(topo.lock_bindings(session, sorted({j.port_id for j in items})))

    def handle_one(self, session: Session, job: BindingJob) -> list[Publish]:
        if self.is_stale(job):
            return []
        target = job.port.host if job.action == "bind" and job.port.host else None
        out = self.changes.unbound(job, sorted(self.changes.hosts_of(job.port_id) - {target}))
        if job.action == "bind":
            result = self.compose(job)
            out += self.changes.bound(session, job, result)
        return out

    def compose(self, job: BindingJob) -> BindingResult:
        if job.error is not None or job.selection is None:  # its host is told it is not bound, and why
            return BindingResult(id=job.port_id, error=job.error, port_id=job.port_id, host=job.port.host,
                                 vnic_type=job.vnic_type, vif_type=v.VIF_TYPE_BINDING_FAILED, vif_details={},
                                 warnings=job.warnings)
        return compose_result(job.port_id, validated(job), job.selection, job.allocation or AllocationDecision())

    def finish(self, session: Session) -> None:
        self.changes.write(session)


class BindingChanges:
    """A batch's results and the binding rows that go with them (the batch's last word per
    ``(port, host)``): the results are inserted together and numbered when the batch is written,
    the rows with the seqs of their results."""

    def __init__(self, held: set[tuple[str, str]] = frozenset()):
        """``held``: the ``(port, host)`` bindings the batch's ports have (locked by the caller)."""
        self.held = set(held)
        self.rows: dict[tuple[str, str], dict[str, Any] | None] = {}
        self.results: list[tuple[dict[str, Any], dict[str, Any] | None, BindingResult, Publish | None]] = []

    def hosts_of(self, port_id: str) -> set[str]:
        return {host for port, host in self.held if port == port_id}

    def unbound(self, job: BindingJob, hosts: list[str]) -> list[Publish]:
        """Tell each of ``hosts`` that the port is bound there no more; their rows go."""
        out = []
        for host in hosts:
            self.held.discard((job.port_id, host))
            self.rows[(job.port_id, host)] = None
            out.append(self.add(job, BindingResult(id=job.port_id, port_id=job.port_id, host=host,
                                                   vif_type=v.VIF_TYPE_UNBOUND, vif_details={})))
        return [p for p in out if p is not None]

    def bound(self, session: Session, job: BindingJob, result: BindingResult) -> list[Publish]:
        """The job's result, and the port's binding row on its host (none for a port without one)."""
        row = None
        if job.port.host:
            self.held.add((job.port_id, job.port.host))
            row = self.rows[(job.port_id, job.port.host)] = {
                "port_id": job.port_id, "host": job.port.host, "status": v.BINDING_ACTIVE,
                "vnic_type": job.vnic_type or v.VNIC_NORMAL, "profile": result.profile or job.profile,
                "vif_type": result.vif_type or v.VIF_TYPE_BINDING_FAILED, "vif_details": result.vif_details or {},
                "levels": [lv.model_dump() for lv in result.binding_levels], "event_id": job.event_id,
                "result_seq": None, "updated_at": utcnow()}
            if result.dynamic_segments:
                topo.save_dynamic_segments(session, job.port.network_id, result.dynamic_segments)
        publish = self.add(job, result, row)
        return [publish] if publish is not None else []

    def add(self, job: BindingJob, result: BindingResult, row: dict[str, Any] | None = None) -> Publish | None:
        result.event_id = job.event_id
        outbox_row, publish = outbox(result, job.occurred_at)
        self.results.append((outbox_row, row, result, publish))
        return publish

    def write(self, session: Session) -> None:
        insert_results(session, [row for row, _, _, _ in self.results])
        for outbox_row, row, result, publish in self.results:
            number(outbox_row, result, publish)
            if row is not None:
                row["result_seq"] = outbox_row["seq"]
        topo.save_bindings(session, self.rows)


def outbox(result: BindingResult, occurred_at: datetime | None,
           tell: bool = True) -> tuple[dict[str, Any], Publish | None]:
    """A result's outbox row (for ``insert_results``), and what to publish: nothing for a port with
    no host, or when its host is not to be told (``tell``): the row is then only kept for ``explain``
    (its ``host`` empty, so that no replay of a host's results sends it)."""
    body = result.model_dump(mode="json")
    now = utcnow()
    host = (result.host or "") if tell else ""
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


def refusal(session: Session, port_id: str, host: str, event_id: str | None, error: str,
            bound_there: bool | None = None) -> Publish | None:
    """The result of a refused event that names a port: ``binding_failed`` with the refusal as
    ``error``, for the host the event names, unless the port is bound there. A refusal changes
    nothing, so a host that holds the port is not told otherwise; the result is then kept for
    ``explain`` alone. (A host where the port is not bound learns that it is not: whoever asked to
    bind it there is waiting for that answer.)"""
    if bound_there is None:
        bound_there = topo.bound_on(session, port_id, host)
    result = BindingResult(id=port_id, port_id=port_id, host=host, event_id=event_id,
                           vif_type=v.VIF_TYPE_BINDING_FAILED, vif_details={}, error=error)
    row, publish = outbox(result, None, tell=bool(host) and not bound_there)
    insert_results(session, [row])
    number(row, result, publish)
    return publish


def poison_refusal(session: Session, poison: PoisonMessage) -> Publish | None:
    """``refusal`` for a message refused before it could be handled, when it names a port: for the
    host it names, else the port's stored one."""
    if poison.port_id is None:
        return None
    port = session.get(PortRow, poison.port_id)
    host = poison.host or (port.host if port is not None else "")
    return refusal(session, poison.port_id, host, poison.event_id, f"Refused: {poison.category}: {poison.reason}")


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
