"""Operator views of the stored state: ``bindpipe explain PORT_ID`` and ``bindpipe status``.

``explain`` reads a port's history back from what the stages stored: the event log (what came
in), each stage's mark (the job as it was handed on: validated inputs, the drivers' declines, the
PCI decision) and the results outbox (what the host was told), plus the port's current rows.
``status`` summarises agents, PCI pools, dead letters and, given a broker connection, queue depths.

Both only read: one session, no locks; queue depths come from *passive* declares, which need no
configure permission, so a least-privilege broker user can run them.
"""

import json
import sys
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from kombu import Connection, Queue
from sqlalchemy import Engine, and_, func, or_, select
from sqlalchemy.orm import Session

from pipeline.models import vocabulary as v
from pipeline.models.binding import BindingResult, Decline
from pipeline.models.jobs import BindingJob
from pipeline.models.reasons import failure_reason_category, primary_decline
from pipeline.models.tables import (
    AgentRow,
    BindingRow,
    DeadLetter,
    EventLog,
    PciDeviceRow,
    PortRow,
    ResultRow,
    StageMark,
)
from pipeline.settings import Settings
from pipeline.store.topology import load_agents
from pipeline.workers.topology import STAGES, dead_letter_queue, stage_queue

PORT_EVENT_TYPES = ("port.create", "port.update", "port.delete", "binding.request")
DEAD_LETTER_SAMPLE = 5


def _iso(value: datetime | None) -> str | None:
    """ISO 8601 in UTC (SQLite hands timezone-aware columns back naive; they were stored as UTC)."""
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC).isoformat()


def _decline(d: Decline) -> dict[str, Any]:
    return {"driver": d.driver, "segment_id": d.segment_id, "reason": d.reason,
            "category": failure_reason_category(d.reason)}


# --- explain ------------------------------------------------------------------------------------------


def _port_event_ids(session: Session, port_id: str) -> set[str]:
    """Events that name the port, and events that made a job for it without naming it (an agent's
    revival re-binds the ports that failed on its host). Both queries scan their table: neither
    ``event_log`` nor ``stage_marks`` has an indexed port id."""
    envelope = EventLog.envelope
    named = select(EventLog.event_id).where(EventLog.event_type.in_(PORT_EVENT_TYPES), or_(
        envelope[("payload", "id")].as_string() == port_id,
        envelope[("payload", "port_id")].as_string() == port_id))
    jobs = select(StageMark.job_id).where(StageMark.stage != "validate",
                                          StageMark.job_id.endswith(f":{port_id}", autoescape=True))
    ids = set(session.scalars(named))
    # event ids are UUIDs (no colon): the job id "EVENT:PORT" splits at its first colon
    return ids | {job_id.partition(":")[0] for job_id in session.scalars(jobs)
                  if job_id.partition(":")[2] == port_id}


def _job_in(output: list[Any] | None, job_id: str) -> BindingJob | None:
    """The job a stage handed on, in its mark (which keeps results as their seqs, hand-offs whole)."""
    for publish in output or []:
        if isinstance(publish, dict) and publish["body"].get("job_id") == job_id:
            return BindingJob.model_validate(publish["body"])
    return None


def _result(row: ResultRow) -> dict[str, Any]:
    body = BindingResult.model_validate(row.body)
    return {"seq": row.seq, "host": row.host, "vif_type": body.vif_type, "outcome": body.outcome,
            "error": body.error, "bound_driver": body.bound_driver, "bound_segment_id": body.bound_segment_id,
            "pci_slot": body.pci_device.address if body.pci_device else None,
            "created_at": _iso(row.created_at), "published_at": _iso(row.published_at)}


def _verdict(job: BindingJob | None, reached: list[str], outputs: dict[str, Any], event_type: str | None,
             results: list[ResultRow], dead: list[DeadLetter]) -> tuple[str, str]:
    """(outcome, reason) of one attempt."""
    if results:
        target = job.port.host if job is not None and job.port is not None else None
        row = next((r for r in reversed(results) if r.host == target), results[-1])
        result = BindingResult.model_validate(row.body)
        host = row.host or "no host"
        if job is None:  # a result without a job: the event was refused, before anything was stored
            told = [r.host for r in results if r.host]
            where = (f"{told[-1]} was told binding_failed" if told else
                     "no host was told (the port is bound where the event named: that binding stands)")
            return "refused", f"{result.error}; nothing changed, {where}"
        if result.error:
            return "error", result.error
        if result.bound:
            device = f", device {result.pci_device.address}" if result.pci_device else ""
            return "bound", (f"{result.vif_type} on {host} by {result.bound_driver} on segment "
                             f"{result.bound_segment_id}{device}")
        if job is not None and job.allocation is not None and job.allocation.failed:
            return result.outcome, f"PCI allocation on {host}: {job.allocation.reason}"
        if job is not None and job.action == "unbind":
            return "unbound", f"unbound from {host}"
        decline = primary_decline(result.explanation)  # result.reason is "" for a port left unbound
        why = result.reason or (f"{decline.driver}: {decline.reason}" if decline else "no driver bound the port")
        return result.outcome, f"on {host}: {why}"
    if dead:
        return "dead_lettered", f"dead-lettered at {dead[-1].stage}: {dead[-1].reason}"
    if job is None:
        if not reached:
            return "unknown", "no stage mark or result was stored for this event"
        if event_type == "port.delete":
            return "no_change", "the port was not stored: nothing to unbind"
        return "no_change", "binding inputs (host, vnic_type, profile) unchanged and the binding is good: no job"
    last = reached[-1]
    if last == "compose" and job.action == "unbind":
        return "unbound", "the port was deleted; it was bound to no host"
    if last != "validate" and outputs[last] == []:
        return "superseded", (f"dropped at {last}: revision {job.revision} is stale, a newer event changed or "
                              "deleted the port")
    if last == "compose":
        return "unknown", "compose handed on results that the results table does not hold"
    if last == "validate":  # select keeps no marks: the job waits for select, or for allocate after it
        return "in_progress", ("handled up to validate; waiting in queue binding.select or binding.allocate "
                               "(are their workers running?)")
    waiting = STAGES[STAGES.index(last) + 1]
    return "in_progress", f"handled up to {last}; waiting in queue binding.{waiting} (is its worker running?)"


def _attempt(data: dict[str, Any], port_id: str, event_id: str) -> dict[str, Any]:
    marks, events = data["marks"], data["events"]
    job_id = f"{event_id}:{port_id}"
    outputs = {stage: marks.get((event_id if stage == "validate" else job_id, stage)) for stage in STAGES}
    reached = [stage for stage in STAGES if outputs[stage] is not None
               or stage == "select" and outputs["allocate"] is not None]  # select keeps no marks
    validated = _job_in(outputs["validate"], job_id)
    job = _job_in(outputs["allocate"], job_id) or _job_in(outputs["select"], job_id) or validated
    results = [r for r in data["results"] if r.event_id == event_id]
    dead = [d for d in data["dead"] if d.event_id == event_id]
    event = events.get(event_id)
    outcome, reason = _verdict(job, reached, outputs, event.event_type if event else None, results, dead)
    attempt: dict[str, Any] = {
        "event": {"event_id": event_id, "event_type": event.event_type if event else None,
                  "seq": event.seq if event else None, "occurred_at": _iso(event.occurred_at) if event else None},
        "action": job.action if job else None, "stages": reached, "outcome": outcome, "reason": reason,
        "inputs": None, "selection": None, "allocation": None,
        "results": [_result(r) for r in results],
        "dead_letters": [{"stage": d.stage, "reason": d.reason, "received_at": _iso(d.received_at)} for d in dead],
    }
    if job is None and event is not None and results:
        attempt["inputs"] = _refused_inputs(event.envelope, results[-1])
    if job is not None:
        first = validated or job
        attempt["inputs"] = {
            "host": job.port.host if job.port else None, "old_host": job.old_host, "revision": job.revision,
            "vnic_type": first.vnic_type or (first.port.vnic_type if first.port else None),
            "profile": first.profile if first.vnic_type else (first.port.profile if first.port else None),
            "user_id": job.context.user_id, "project_id": job.context.project_id, "roles": list(job.context.roles),
            "warnings": list(first.warnings), "error": first.error}
    if job is not None and job.selection is not None:
        sel = job.selection
        attempt["selection"] = {"vif_type": sel.vif_type, "status": sel.status,
                                "bound": [lv.model_dump() for lv in sel.levels],
                                "declines": [_decline(d) for d in sel.declines],
                                "driver_errors": list(sel.driver_errors)}
    if job is not None and job.allocation is not None:
        attempt["allocation"] = {**job.allocation.model_dump(mode="json"), "category": (
            failure_reason_category(job.allocation.reason or "") if job.allocation.failed else None)}
    return attempt


def _refused_inputs(envelope: dict[str, Any], result: ResultRow) -> dict[str, Any]:
    """What a refused event asked for, as it arrived (nothing of it was stored)."""
    payload, context = envelope.get("payload") or {}, envelope.get("context") or {}
    return {"host": payload.get("host"), "old_host": None, "revision": None, "vnic_type": payload.get("vnic_type"),
            "profile": payload.get("profile"), "user_id": context.get("user_id"),
            "project_id": context.get("project_id"), "roles": list(context.get("roles") or []), "warnings": [],
            "error": BindingResult.model_validate(result.body).error}


def explain_port(session: Session, port_id: str) -> dict[str, Any]:
    """Everything stored about ``port_id``: its current rows, and every binding attempt oldest first.

    ``state`` is ``present``, ``deleted`` (no port row, history kept), ``refused`` (every event
    for it was refused: never stored) or ``unknown``; ``summary`` is
    the latest meaningful attempt's outcome and reason (what an operator asks first).
    """
    row = session.get(PortRow, port_id)
    results = list(session.scalars(select(ResultRow).where(ResultRow.port_id == port_id).order_by(ResultRow.seq)))
    event_ids = _port_event_ids(session, port_id) | {r.event_id for r in results}
    job_ids = [f"{e}:{port_id}" for e in event_ids]
    data = {
        "results": results,
        "events": {e.event_id: e for e in session.scalars(select(EventLog).where(EventLog.event_id.in_(event_ids)))},
        "marks": {(m.job_id, m.stage): m.output for m in session.scalars(select(StageMark).where(or_(
            StageMark.job_id.in_(job_ids), and_(StageMark.stage == "validate", StageMark.job_id.in_(event_ids)))))},
        "dead": list(session.scalars(select(DeadLetter).where(or_(
            DeadLetter.port_id == port_id, DeadLetter.event_id.in_(event_ids))).order_by(DeadLetter.id))),
    }
    first_result = {}
    for r in results:
        first_result.setdefault(r.event_id, r.seq)

    def order(event_id: str) -> tuple[float, float]:
        event = data["events"].get(event_id)
        return (event.seq if event else float("inf"), first_result.get(event_id, float("inf")))

    attempts = [_attempt(data, port_id, e) for e in sorted(event_ids, key=order)]
    bindings = session.scalars(select(BindingRow).where(BindingRow.port_id == port_id).order_by(BindingRow.host))
    devices = session.scalars(select(PciDeviceRow).where(PciDeviceRow.owner_port_id == port_id)
                              .order_by(PciDeviceRow.host, PciDeviceRow.address))
    report: dict[str, Any] = {
        "port_id": port_id,
        "state": ("present" if row is not None else "deleted" if any(a["action"] for a in attempts)
                  else "refused" if attempts else "unknown"),
        "port": None if row is None else {
            "network_id": row.network_id, "host": row.host, "vnic_type": row.vnic_type, "profile": row.profile,
            "revision": row.revision, "device_owner": row.body.get("device_owner"),
            "device_id": row.body.get("device_id"), "updated_at": _iso(row.updated_at)},
        "bindings": [{"host": b.host, "status": b.status, "vif_type": b.vif_type, "vnic_type": b.vnic_type,
                      "profile": b.profile, "levels": b.levels, "event_id": b.event_id,
                      "updated_at": _iso(b.updated_at)} for b in bindings],
        "devices": [{"host": d.host, "address": d.address, "dev_type": d.dev_type,
                     "vendor_product": f"{d.vendor_id}:{d.product_id}", "physical_network": d.physical_network,
                     "numa_node": d.numa_node, "status": d.status} for d in devices],
        "attempts": attempts,
        "dead_letters": [{"stage": d.stage, "reason": d.reason, "event_id": d.event_id,
                          "received_at": _iso(d.received_at)} for d in data["dead"]],
    }
    report["summary"] = _summary(report)
    return report


def _summary(report: dict[str, Any]) -> dict[str, Any]:
    attempts = report["attempts"]
    meaningful = [a for a in attempts if a["outcome"] not in ("no_change", "superseded")]
    latest = (meaningful or attempts or [None])[-1]
    if report["state"] == "unknown":
        reason = "no such port: no port row, event, stage mark or result names it"
        if report["dead_letters"]:
            reason += f" (but {len(report['dead_letters'])} dead-lettered message(s) do: see below)"
        return {"outcome": "unknown", "reason": reason, "event": None}
    if report["state"] == "refused":
        return {"outcome": "refused", "event": latest["event"],
                "reason": f"{latest['reason']} (every event for this port was refused: it was never stored)"}
    if report["state"] == "deleted":
        gone = next((a for a in reversed(attempts) if a["event"]["event_type"] == "port.delete"), latest)
        return {"outcome": "deleted", "event": gone["event"],
                "reason": f"deleted by {gone['event']['event_type']} {gone['event']['event_id']} at "
                          f"{gone['event']['occurred_at']} ({gone['reason']}); its history remains"}
    if latest is None:
        return {"outcome": "unknown", "event": None, "reason": "the port exists but no binding attempt is recorded"}
    return {"outcome": latest["outcome"], "reason": latest["reason"], "event": latest["event"]}


def _short(value: Any) -> str:
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)


def render_explain(report: dict[str, Any]) -> str:
    summary = report["summary"]
    lines = [f"port {report['port_id']}: {summary['outcome'].upper()}: {summary['reason']}"]
    if summary["event"]:
        e = summary["event"]
        lines.append(f"  (from {e['event_type']} {e['event_id']} #{e['seq']} at {e['occurred_at']})")
    if report["state"] == "unknown":
        lines += [f"  dead letter [{d['stage']}] {d['received_at']}: {d['reason']}" for d in report["dead_letters"]]
        return "\n".join(lines) + "\n"
    lines += ["", "current state"]
    port = report["port"]
    if port is None:
        lines.append("  port      deleted (no port row)")
    else:
        lines.append(f"  port      network {port['network_id']}, host {port['host'] or '-'}, vnic_type "
                     f"{port['vnic_type']}, profile {_short(port['profile'])}, revision {port['revision']}")
    for b in report["bindings"]:
        levels = ", ".join(f"{lv['driver']}@{lv['segment_id']}" for lv in b["levels"]) or "-"
        lines.append(f"  binding   {b['host']} {b['status']} {b['vif_type']} (levels {levels}; event {b['event_id']})")
    if not report["bindings"]:
        lines.append("  binding   none")
    for d in report["devices"]:
        lines.append(f"  device    {d['host']} {d['address']} {d['dev_type']} {d['vendor_product']} "
                     f"physnet {d['physical_network']} numa {d['numa_node']} {d['status']}")
    if not report["devices"]:
        lines.append("  device    none")
    lines += ["", f"history (oldest first, {len(report['attempts'])} event(s))"]
    for a in report["attempts"]:
        e = a["event"]
        lines.append(f"  #{e['seq']} {e['occurred_at']} {e['event_type']} {e['event_id']}: "
                     f"{a['action'] or 'no job'} -> {a['outcome']}: {a['reason']}")
        if a["inputs"]:
            i = a["inputs"]
            who = f"revision {i['revision']}, by {i['user_id']} roles {','.join(i['roles']) or '-'}"
            if a["action"] == "unbind":
                lines.append(f"      inputs   unbind from {i['old_host'] or 'no host'}, {who}")
            else:
                move = f" (from {i['old_host'] or 'no host'})" if i["old_host"] is not None else ""
                lines.append(f"      inputs   host {i['host'] or '-'}{move}, vnic_type {i['vnic_type']}, profile "
                             f"{_short(i['profile'])}, {who}")
            lines += [f"      warning  {w}" for w in i["warnings"]]
            if i["error"]:
                lines.append(f"      invalid  {i['error']}")
        if a["selection"]:
            s = a["selection"]
            lines += [f"      bound    {lv['driver']} on segment {lv['segment_id']} (level {lv['level']})"
                      for lv in s["bound"]]
            lines += [f"      declined {d['driver']}{'@' + d['segment_id'] if d['segment_id'] else ''}: "
                      f"{d['reason']} [{d['category']}]" for d in s["declines"]]
            lines += [f"      drv err  {err}" for err in s["driver_errors"]]
        if a["allocation"]:
            al = a["allocation"]
            if al["device"]:
                dev = al["device"]
                lines.append(f"      pci      {dev['address']} {dev['dev_type']} {dev['vendor_id']}:"
                             f"{dev['product_id']} physnet {dev['physical_network']} numa {dev['numa_node']}")
            else:
                lines.append(f"      pci      {'FAILED ' if al['failed'] else ''}{al['reason']}")
        for r in a["results"]:
            state = f"published {r['published_at']}" if r["published_at"] else "NOT YET PUBLISHED"
            lines.append(f"      result   #{r['seq']} {r['host'] or 'no host'} {r['vif_type'] or '-'}"
                         f"{' error ' + r['error'] if r['error'] else ''} ({state})")
        lines += [f"      dead     [{d['stage']}] {d['reason']}" for d in a["dead_letters"]]
    return "\n".join(lines) + "\n"


def _read_session(engine: Engine) -> Session:
    """One consistent read-only snapshot on PostgreSQL (the stages keep writing meanwhile)."""
    if engine.dialect.name == "postgresql":
        engine = engine.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
    return Session(engine)


def main_explain(engine: Engine, port_id: str, as_json: bool) -> int:
    """Print the port's story; 0 if the port is known (present or deleted), 1 if not."""
    try:
        with _read_session(engine) as session:
            report = explain_port(session, port_id)
    finally:
        engine.dispose()
    sys.stdout.write(json.dumps(report, indent=2, sort_keys=True) + "\n" if as_json else render_explain(report))
    return 1 if report["state"] == "unknown" else 0


# --- status -------------------------------------------------------------------------------------------


def queue_depths(connection: Connection, settings: Settings) -> dict[str, dict[str, Any]]:
    """Each stage queue and DLQ: ``{messages, consumers}``, ``{missing: True}`` or ``{error}``."""
    queues: list[Queue] = [q for stage in STAGES for q in (stage_queue(stage, settings),
                                                           dead_letter_queue(stage, settings))]
    return {queue.name: _passive_depth(connection, queue) for queue in queues}


def _passive_depth(connection: Connection, queue: Queue) -> dict[str, Any]:
    channel = connection.channel()  # a channel of its own: the broker closes it on a 404
    try:
        _, messages, consumers = queue(channel).queue_declare(passive=True)
        return {"messages": messages, "consumers": consumers}
    except connection.channel_errors as exc:
        if str(getattr(exc, "reply_code", "")) == "404":
            return {"missing": True}
        return {"error": str(exc)}
    finally:
        try:
            channel.close()
        except (*connection.channel_errors, *connection.connection_errors):
            pass


def collect_status(session: Session, settings: Settings, now: datetime,
                   connection: Connection | None = None) -> dict[str, Any]:
    """Agents (liveness judged at ``now``, timezone-aware), PCI pools and active bindings per host;
    dead letters; unpublished results; queue depths when ``connection`` is given."""
    hosts: dict[str, dict[str, Any]] = {}

    def host(name: str) -> dict[str, Any]:
        return hosts.setdefault(name, {"agents": [], "pci_pools": [], "bindings": {}})

    down = settings.agent_down_time
    for agent in load_agents(session, set(session.scalars(select(AgentRow.host).distinct())), now, down):
        age = (now - agent.heartbeat_at).total_seconds()
        why = None if agent.alive else (f"no heartbeat for {age:.0f}s (agent_down_time {down}s)" if age >= down
                                        else "reported itself not alive")
        host(agent.host)["agents"].append({
            "agent_type": agent.agent_type, "binary": agent.binary, "alive": agent.alive, "why_dead": why,
            "admin_state_up": agent.admin_state_up, "heartbeat_at": _iso(agent.heartbeat_at),
            "heartbeat_age_s": round(age, 1)})

    pool_key = (PciDeviceRow.host, PciDeviceRow.physical_network, PciDeviceRow.vendor_id, PciDeviceRow.product_id,
                PciDeviceRow.dev_type)
    pools: dict[tuple[Any, ...], Counter[str]] = {}
    for *key, status, count in session.execute(select(*pool_key, PciDeviceRow.status, func.count())
                                               .group_by(*pool_key, PciDeviceRow.status)):
        pools.setdefault(tuple(key), Counter())[status] += count
    for (name, physnet, vendor, product, dev_type), counts in sorted(pools.items(), key=lambda kv: tuple(
            "" if k is None else k for k in kv[0])):
        host(name)["pci_pools"].append({"physical_network": physnet, "vendor_product": f"{vendor}:{product}",
                                        "dev_type": dev_type, "total": sum(counts.values()),
                                        "counts": dict(sorted(counts.items()))})

    for name, vif_type, count in session.execute(
            select(BindingRow.host, BindingRow.vif_type, func.count()).where(BindingRow.status == v.BINDING_ACTIVE)
            .group_by(BindingRow.host, BindingRow.vif_type)):
        host(name)["bindings"][vif_type] = count

    latest = session.scalars(select(DeadLetter).order_by(DeadLetter.id.desc()).limit(DEAD_LETTER_SAMPLE))
    by_stage = dict(session.execute(select(DeadLetter.stage, func.count()).group_by(DeadLetter.stage)).all())
    report: dict[str, Any] = {
        "at": _iso(now), "agent_down_time": down,
        "hosts": dict(sorted(hosts.items())),
        "dead_letters": {"total": sum(by_stage.values()), "by_stage": dict(sorted(by_stage.items())),
                         "latest": [{"id": d.id, "stage": d.stage, "reason": d.reason, "event_id": d.event_id,
                                     "port_id": d.port_id, "received_at": _iso(d.received_at)} for d in latest]},
        "results_unpublished": session.scalar(select(func.count()).where(ResultRow.published_at.is_(None))),
        "broker": None,
    }
    if connection is not None:
        try:
            connection.connect()
            report["broker"] = {"reachable": True, "queues": queue_depths(connection, settings)}
        except (*connection.connection_errors, OSError) as exc:
            report["broker"] = {"reachable": False, "error": f"{type(exc).__name__}: {exc}"}
    return report


def render_status(report: dict[str, Any]) -> str:
    lines = [f"status at {report['at']} (agents are dead after {report['agent_down_time']}s without heartbeat)"]
    for name, h in report["hosts"].items():
        lines += ["", f"host {name}"]
        for a in h["agents"]:
            state = "alive" if a["alive"] else f"DEAD: {a['why_dead']}"
            admin = "" if a["admin_state_up"] else " (admin down)"
            lines.append(f"  agent    {a['agent_type']:<24} {state}{admin}; last heartbeat {a['heartbeat_at']}")
        for p in h["pci_pools"]:
            counts = ", ".join(f"{s} {n}" for s, n in p["counts"].items())
            lines.append(f"  pci      {p['physical_network'] or '-'} {p['vendor_product']} {p['dev_type']}: "
                         f"{p['total']} device(s): {counts}")
        if h["bindings"]:
            lines.append("  bindings " + ", ".join(f"{t} {n}" for t, n in sorted(h["bindings"].items())))
    dl = report["dead_letters"]
    by_stage = ", ".join(f"{s} {n}" for s, n in dl["by_stage"].items())
    lines += ["", f"dead letters: {dl['total']}" + (f" ({by_stage})" if by_stage else "")]
    lines += [f"  {d['received_at']} [{d['stage']}] {d['reason']} (event {d['event_id'] or '-'}, "
              f"port {d['port_id'] or '-'})" for d in dl["latest"]]
    lines.append(f"results not yet published: {report['results_unpublished']}")
    broker = report["broker"]
    if broker is None:
        lines.append("queues: not checked")
    elif "note" in broker:
        lines.append(f"queues: {broker['note']}")
    elif not broker["reachable"]:
        lines.append(f"queues: broker unreachable: {broker['error']}")
    else:
        lines.append("queues")
        for name, q in broker["queues"].items():
            depth = ("MISSING" if q.get("missing") else f"error: {q['error']}" if "error" in q
                     else f"{q['messages']} message(s), {q['consumers']} consumer(s)")
            lines.append(f"  {name:<24} {depth}")
    return "\n".join(lines) + "\n"


def main_status(settings: Settings, engine: Engine, as_json: bool) -> int:
    """Print the status of ``engine``'s database; 0. Queue depths are skipped on the embedded
    memory:// broker: its queues live inside the running ``bindpipe run`` process."""
    connection = None if settings.embedded else Connection(
        settings.broker_url, connect_timeout=5, heartbeat=0, ssl=settings.broker_ssl_options())
    try:
        with _read_session(engine) as session:
            report = collect_status(session, settings, datetime.now(UTC), connection)
    finally:
        if connection is not None:
            connection.release()
        engine.dispose()
    if settings.embedded:
        report["broker"] = {"note": "embedded memory:// broker: its queues live inside the `bindpipe run` process"}
    sys.stdout.write(json.dumps(report, indent=2, sort_keys=True) + "\n" if as_json else render_status(report))
    return 0
