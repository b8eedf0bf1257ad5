"""A Jepsen-style checker for the binding pipeline (the accounting of RabbitMQ's ``total-queue``).

Inputs, all plain data (so the checker is tested without any service, ``test_checker.py``):

* the events the workload published (``PublishedEvent``: event id, port, the hosts that must get
  exactly one result for it);
* the results consumed from the hosts' durable queues (``ReceivedResult``, every copy);
* a snapshot of the database (``DbState``: the ``results`` outbox, ``pci_devices``, the PCI
  invariant violations of every host's tracker, ``ports``, ``dead_letters``);
* the final state of every port the workload knows (deleted, or on which host);
* optionally the hostile messages injected, what the instrumented workers saw of them, the copies
  found on the dead-letter queues, and the race rounds.

Every published event is classified as exactly one of

``ok``          every expected host got a result, one ``(seq, body)`` each (re-deliveries of the
                same seq and body are allowed: compute hosts drop a seq they have seen);
``lost``        the broker confirmed the event, but an expected host never got a result
                (``lost_committed`` says which of those are at least in the database's outbox);
``duplicated``  a host got two *different* results for the event (another seq, or another body
                under one seq), or the outbox holds two rows for one event and host;
``unknown``     never confirmed by the broker and no result either (not counted as lost: Jepsen's
                indeterminate case; the workload re-publishes until confirmed, so normally 0).

``unexpected`` counts results for events that were never published or that reached a host the
event had nothing to do with. The PCI checks: ``double_allocated`` (a device or a PF/VF pair in
use twice, a port holding several devices, two live ports whose results name one device),
``leaked`` (a device still owned by a deleted port, or by a port on another host), and
``pci_mismatch`` (a live port's last result and the device table disagree).
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

HOSTILE_MARKER = re.compile(rb"HOSTILE-[0-9]{5}-[0-9a-f]{8}")
MAX_LISTED = 20  # ids listed per category in the summary


@dataclass(frozen=True)
class PublishedEvent:
    event_id: str
    event_type: str
    port_id: str
    hosts: frozenset[str]  # hosts that must each get exactly one result for the event
    group: str = "workload"  # "workload", or the race round's name
    confirmed: bool = True  # at least one copy was confirmed by the broker
    copies: int = 1  # times it was published (duplicates are injected on purpose)
    # the port's next event went out before this one's results came: it may give none (superseded)
    overtaken: bool = False
    optional_hosts: frozenset[str] = frozenset()  # hosts that may get a result for it, or not (see harness)
    outcome_known: bool = False  # the harness says what it should give (the two fields below)
    target: str | None = None  # the host the event binds the port on (None: it leaves every host)
    bound_as: tuple[str, ...] = ()  # the vif_types a binding on ``target`` may have (binding_failed aside)


@dataclass(frozen=True)
class ReceivedResult:
    queue_host: str  # the host whose durable queue it was read from
    body: dict[str, Any]
    redelivered: bool = False


@dataclass(frozen=True)
class ResultRowData:
    seq: int
    event_id: str
    port_id: str
    host: str
    body: dict[str, Any]
    published: bool


@dataclass(frozen=True)
class DeviceData:
    host: str
    address: str
    dev_type: str
    parent_addr: str | None
    status: str
    owner_port_id: str | None


@dataclass(frozen=True)
class DeadLetterData:
    id: int
    stage: str
    reason: str
    event_id: str | None
    body: bytes | str
    category: str = ""  # "" for the old rows of a hand-made history: the reason's first word then


@dataclass
class DbState:
    results: list[ResultRowData] = field(default_factory=list)
    devices: list[DeviceData] = field(default_factory=list)
    violations: dict[str, list[str]] = field(default_factory=dict)  # host -> invariant_violations(tracker)
    ports: dict[str, str] = field(default_factory=dict)  # port id -> host ("" when none)
    dead_letters: list[DeadLetterData] = field(default_factory=list)


@dataclass(frozen=True)
class HostileMessage:
    marker: str  # also the id of the port it names, if it names one
    kind: str
    stage: str  # the stage whose queue it was published to (and which must dead-letter it)
    category: str  # the expected reason category, the dead letter's reason starts with it
    refusal_host: str | None = None  # a refused port event: this host gets one binding_failed result
    dead_lettered: bool = True  # False: well formed, refused as a request (a result, no dead letter)
    refusal_error: str | None = None  # how the refusal's error starts (default "Refused: <category>")
    # publishes the harness made of it: one whose confirm a fault swallowed was sent again, and both
    # may have arrived. The pipeline drops a copy of an event it can read the id of; any other
    # message is each time a message of its own, so up to ``copies`` of everything are accepted.
    copies: int = 1


@dataclass(frozen=True)
class Delivery:
    """One delivery of a hostile message to an instrumented worker (``tests/faults/worker.py``)."""

    marker: str
    stage: str
    pid: int
    delivery_count: int  # the quorum queue's x-delivery-count header (0 on the first delivery)
    at: float  # time.time() in the worker


@dataclass(frozen=True)
class DlqMessage:
    queue: str
    body: bytes
    headers: dict[str, Any]


@dataclass
class RaceRound:
    name: str
    host: str
    create_ids: list[str]
    delete_ids: list[str]
    devices: int  # the host's devices a port of the round can take (its VFs)
    owned_after_delete: int | None = None  # devices of the host owned once the round's deletes were done


def _canonical(body: dict[str, Any]) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def _listed(ids: Iterable[Any]) -> list[Any]:
    return sorted(ids, key=str)[:MAX_LISTED]


def classify_events(published: dict[str, PublishedEvent], received: list[ReceivedResult],
                    db: DbState, hostile_ports: set[str] = frozenset()) -> dict[str, Any]:
    """The Jepsen accounting; results for the ports of hostile messages (refusals) are left to
    :func:`check_hostile`."""
    wire: dict[str, dict[str, set[tuple[Any, str]]]] = defaultdict(lambda: defaultdict(set))
    copies = Counter()
    unexpected: list[str] = []
    for result in received:
        body = result.body
        if body.get("port_id") in hostile_ports:
            continue
        event_id, host = str(body.get("event_id")), body.get("host")
        event = published.get(event_id)
        if event is None:
            unexpected.append(f"{event_id}@{host}: never published")
        elif host != result.queue_host:
            unexpected.append(f"{event_id}@{host}: read from the queue of {result.queue_host}")
        elif host not in event.hosts | event.optional_hosts:
            unexpected.append(f"{event_id}@{host}: not a host of this {event.event_type} "
                              f"(expected {sorted(event.hosts)})")
        else:
            key = (body.get("seq"), _canonical(body))
            copies[(event_id, host, key)] += 1
            wire[event_id][host].add(key)

    rows: dict[str, dict[str, list[ResultRowData]]] = defaultdict(lambda: defaultdict(list))
    by_seq = {}
    for row in db.results:
        by_seq[row.seq] = row
        if row.port_id in hostile_ports:
            continue
        if row.event_id not in published:
            unexpected.append(f"{row.event_id}@{row.host}: outbox row {row.seq} of an event never published")
        else:
            rows[row.event_id][row.host].append(row)

    diverged = []  # a result on the wire whose body is not the outbox row of its seq
    for event_id, hosts in wire.items():
        for host, keys in hosts.items():
            for seq, text in keys:
                row = by_seq.get(seq)
                if row is None or _canonical(row.body) != text:
                    diverged.append(f"{event_id}@{host} seq {seq}")

    status: dict[str, str] = {}
    lost_committed, duplicated_detail, lost_detail = [], [], []
    for event_id, event in published.items():
        duplicate_hosts = sorted(h for h in event.hosts | event.optional_hosts | set(rows[event_id])
                                 if not _one_answer(wire[event_id].get(h, ()))
                                 or not _one_answer({(r.seq, _canonical(r.body)) for r in rows[event_id].get(h, ())}))
        missing = sorted(h for h in event.hosts if not wire[event_id].get(h))
        if duplicate_hosts:
            status[event_id] = "duplicated"
            duplicated_detail.append(f"{event_id} ({event.event_type} {event.port_id}) on {duplicate_hosts}: seqs "
                                     + ", ".join(str(sorted(s for s, _ in wire[event_id].get(h, ()))) +
                                                 f"/outbox {[r.seq for r in rows[event_id].get(h, [])]}"
                                                 for h in duplicate_hosts))
        elif missing:
            if not event.confirmed:
                status[event_id] = "unknown"
                continue
            if event.overtaken:
                status[event_id] = "superseded"
                continue
            status[event_id] = "lost"
            in_outbox = [h for h in missing if rows[event_id].get(h)]
            if in_outbox:
                lost_committed.append(event_id)
            lost_detail.append(f"{event_id} ({event.event_type} {event.port_id}) never reached {missing}"
                               + (f"; in the outbox for {in_outbox}" if in_outbox else ""))
        else:
            status[event_id] = "ok"

    counts = Counter(status.values())
    outcomes = Counter()
    wrong = []
    for event_id, hosts in wire.items():
        event = published[event_id]
        for host, keys in hosts.items():
            for seq, text in keys:
                body = json.loads(text)
                outcomes[(event.event_type, body.get("vif_type") or "none")] += 1
                problem = wrong_outcome(event, host, body, rebound=any((other or 0) > (seq or 0) for other, _ in keys))
                if problem:
                    wrong.append(f"{event_id} ({event.event_type} {event.port_id}) on {host}: {problem}")
    return {
        "events": len(published),
        "ok": counts["ok"], "lost": counts["lost"], "duplicated": counts["duplicated"],
        "unknown": counts["unknown"], "superseded": counts["superseded"],
        "unexpected": len(unexpected), "diverged": len(diverged),
        "wrong_outcome": len(wrong), "wrong_outcome_ids": _listed(wrong),
        "lost_committed": len(lost_committed),
        "results_received": len(received),
        "redundant_copies": sum(n - 1 for n in copies.values()),  # same seq and body again: allowed
        "published_copies": sum(e.copies for e in published.values()),
        "outcomes": {f"{kind} -> {vif}": n for (kind, vif), n in sorted(outcomes.items())},
        "lost_ids": _listed(lost_detail), "duplicated_ids": _listed(duplicated_detail),
        "unexpected_ids": _listed(unexpected), "diverged_ids": _listed(diverged),
        "status": status,
    }


def _one_answer(keys: Iterable[tuple[Any, str]]) -> bool:
    """One result (seq and body) for an event on a host, or two where the first (by seq) is
    ``unbound``: the port let go of its device there, and bound again (to another device)."""
    ordered = sorted(keys, key=lambda key: key[0] or 0)
    if len(ordered) <= 1:
        return True
    return len(ordered) == 2 and json.loads(ordered[0][1]).get("vif_type") == "unbound" \
        and json.loads(ordered[1][1]).get("vif_type") != "unbound"


def wrong_outcome(event: PublishedEvent, host: str, body: dict[str, Any], rebound: bool = False) -> str | None:
    """Why a result is not what the event should give its host (None: it is). On the host the
    event binds the port on: a binding of one of the vif_types the port's kind may have, or
    ``binding_failed`` with its reason (and, if it is ``rebound`` there, an ``unbound`` before);
    on any other host: ``unbound``. Always the event's port."""
    if body.get("port_id") != event.port_id:
        return f"names port {body.get('port_id')}"
    if not event.outcome_known:
        return None
    vif_type = body.get("vif_type")
    # on its target host an event may end with ``unbound`` if it let go of a device there and
    # then was overtaken (a newer event of its port took over from there)
    overtaken = event.overtaken or bool(event.optional_hosts)
    if host != event.target or vif_type == "unbound" and (rebound or overtaken):
        return None if vif_type == "unbound" else f"{vif_type}, where the port is bound no more"
    if not event.bound_as:
        return None
    if vif_type == "binding_failed":
        return None if (body.get("error") or body.get("explanation")) else "binding_failed without a reason"
    return None if vif_type in event.bound_as else f"{vif_type}, expected one of {list(event.bound_as)}"


def stale_bindings(final_hosts: dict[str, str | None], received: list[ReceivedResult]) -> list[str]:
    """A port's last word on each host, by seq: on every host but its final one not bound (a host
    left believing a port is plugged there), and on its final host (if it has one) a binding, or
    ``binding_failed`` with why (a host never told of a port placed on it)."""
    latest = latest_results(received)
    stale = []
    for (port, host), body in sorted(latest.items(), key=lambda kv: tuple(map(str, kv[0]))):
        if port not in final_hosts or body.get("vif_type") in ("unbound", "binding_failed", None):
            continue
        if host != final_hosts[port]:
            stale.append(f"port {port} left {body.get('vif_type')} on {host} (seq {body.get('seq')}); "
                         f"it is {'deleted' if final_hosts[port] is None else 'on ' + final_hosts[port]}")
    for port, host in sorted(final_hosts.items()):
        body = latest.get((port, host)) if host is not None else None
        if host is not None and (body is None or body.get("vif_type") == "unbound"):
            stale.append(f"port {port} is on {host}, which was never told so (last word: "
                         f"{body.get('vif_type') if body else 'none'})")
    return stale


def latest_results(received: list[ReceivedResult]) -> dict[tuple[str, str], dict[str, Any]]:
    """(port, host) -> the result with the highest seq the host received for that port."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for result in received:
        body = result.body
        key = (body.get("port_id"), body.get("host"))
        if key not in latest or (body.get("seq") or 0) > (latest[key].get("seq") or 0):
            latest[key] = body
    return latest


def device_conflicts(received: list[ReceivedResult]) -> list[str]:
    """Each host's results applied in ``seq`` order, as a compute host applies them: a device granted
    to a port while another port still holds it (its release not yet told) is a conflict. A result
    for a port replaces what the host knew of it (``unbound`` and ``binding_failed`` hold nothing)."""
    streams: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for result in received:
        if result.body.get("seq") is not None:
            streams[result.queue_host][result.body["seq"]] = result.body
    conflicts = []
    for host, stream in sorted(streams.items()):
        holder: dict[str, str] = {}  # device -> port
        held: dict[str, str] = {}  # port -> device
        for seq in sorted(stream):
            body = stream[seq]
            port = body.get("port_id")
            released = held.pop(port, None)
            if released is not None:
                holder.pop(released, None)
            device = (body.get("pci_device") or {}).get("address")
            if device is None or body.get("vif_type") in ("unbound", "binding_failed", None):
                continue
            if device in holder:
                conflicts.append(f"{host}: seq {seq} gives {device} to {port} while {holder[device]} holds it")
            holder[device], held[port] = port, device
    return conflicts


def check_pci(db: DbState, final_hosts: dict[str, str | None], received: list[ReceivedResult]) -> dict[str, Any]:
    double, leaked, mismatch = [], [], []
    owned_by: dict[str, list[DeviceData]] = defaultdict(list)
    for device in db.devices:
        if device.owner_port_id is not None:
            owned_by[device.owner_port_id].append(device)
    for port, devices in owned_by.items():
        if len(devices) > 1:
            double.append(f"port {port} holds {len(devices)} devices: "
                          + ", ".join(f"{d.host}/{d.address}" for d in devices))
    for host, problems in db.violations.items():
        double += [f"{host}: {problem}" for problem in problems]

    devices = {(d.host, d.address): d for d in db.devices}
    for port, held in owned_by.items():
        for device in held:
            if port in final_hosts:
                final = final_hosts[port]
                if final is None:
                    leaked.append(f"{device.host}/{device.address} owned by deleted port {port}")
                elif final != device.host:
                    leaked.append(f"{device.host}/{device.address} owned by port {port}, which is on {final}")
            elif port not in db.ports:
                leaked.append(f"{device.host}/{device.address} owned by port {port}, not in the ports table")

    latest = latest_results(received)
    claimed: dict[tuple[str, str], list[str]] = defaultdict(list)
    for port, host in final_hosts.items():
        if host is None:
            continue
        body = latest.get((port, host))
        if body is None:
            continue  # no result at all: reported as lost
        device = (body.get("pci_device") or {}).get("address")
        held = sorted(d.address for d in owned_by.get(port, []) if d.host == host)
        if device is not None:
            claimed[(host, device)].append(port)
            row = devices.get((host, device))
            if row is None or row.owner_port_id != port:
                mismatch.append(f"port {port}: its last result on {host} (seq {body.get('seq')}) names {device}, "
                                f"owned by {row.owner_port_id if row else 'no such device'}")
        elif held:
            mismatch.append(f"port {port}: its last result on {host} names no device, yet it holds {held}")
    double += [f"{host}/{address} named by the last results of {ports}"
               for (host, address), ports in claimed.items() if len(ports) > 1]
    double += device_conflicts(received)
    stale = stale_bindings(final_hosts, received)
    states = Counter(d.status for d in db.devices)
    return {"double_allocated": len(double), "leaked": len(leaked), "pci_mismatch": len(mismatch),
            "stale_bindings": len(stale), "stale_binding_ids": _listed(stale),
            "devices": len(db.devices), "devices_in_use": sum(1 for d in db.devices if d.owner_port_id),
            "device_states": dict(sorted(states.items())),
            "double_allocated_ids": _listed(double), "leaked_ids": _listed(leaked),
            "pci_mismatch_ids": _listed(mismatch)}


def marker_of(body: bytes | str) -> str | None:
    data = body.encode("utf-8", "surrogateescape") if isinstance(body, str) else body
    found = HOSTILE_MARKER.search(data[:4096])
    return found.group().decode() if found else None


def check_hostile(hostile: list[HostileMessage], db: DbState, deliveries: list[Delivery], dlq: list[DlqMessage],
                  fault_windows: list[tuple[float, float]] = (), dead_pids: dict[int, float] | None = None,
                  received: list[ReceivedResult] = ()) -> dict[str, Any]:
    """Every hostile message: one dead-letter row (its stage, a reason of the expected category) and
    no copy left on a DLQ (a refused message is recorded, then acked), for a refused port event
    exactly one ``binding_failed`` result (one seq) on the host it names and none elsewhere, and one
    delivery — an extra delivery counts as *explained* when the worker that had it died (killed)
    between the two deliveries (``dead_pids``: pid -> time of death), or a connection-level fault
    (cut, broker restart) fell between them. Besides: any message the
    broker dead-lettered for its delivery limit (recorded as ``delivery_limit``) is a failure."""
    wanted = {h.marker: h for h in hostile}
    refusals: dict[str, dict[str, set[tuple[Any, str]]]] = defaultdict(lambda: defaultdict(set))
    for result in received:
        if result.body.get("port_id") in wanted:
            refusals[result.body["port_id"]][result.queue_host].add((result.body.get("seq"), _canonical(result.body)))
    refusal_rows: dict[str, list[ResultRowData]] = defaultdict(list)
    for row in db.results:
        if row.port_id in wanted:
            refusal_rows[row.port_id].append(row)
    rows: dict[str, list[DeadLetterData]] = defaultdict(list)
    spurious, delivery_limited = [], []
    for row in db.dead_letters:
        marker = marker_of(row.body)
        if (row.category or row.reason.split(":", 1)[0]) == "delivery_limit":
            delivery_limited.append(f"{row.stage}: {marker or 'a good message'}: {row.reason[:160]} "
                                    f"(event {row.event_id})")
        elif marker in wanted:
            rows[marker].append(row)
        else:
            spurious.append(f"{row.stage}: {row.reason[:160]} (event {row.event_id})")
    copies: dict[str, list[DlqMessage]] = defaultdict(list)
    broker_dead_lettered = []
    for message in dlq:
        marker = marker_of(message.body)
        if marker in wanted:
            copies[marker].append(message)
        else:
            reason = message.headers.get("x-first-death-reason")
            broker_dead_lettered.append(f"{message.queue}: {reason}: {message.body[:120]!r}")
    seen: dict[str, list[Delivery]] = defaultdict(list)
    for delivery in deliveries:
        seen[delivery.marker].append(delivery)

    problems, unexplained, explained, bad = [], [], 0, set()
    kinds = Counter()
    for marker, message in wanted.items():
        kinds[message.kind] += 1
        before = len(problems)
        once = range(1, message.copies + 1)  # exactly once, unless the harness sent copies
        found = rows.get(marker, [])
        if len(found) not in (once if message.dead_lettered else (0,)):
            problems.append(f"{marker} ({message.kind}): {len(found)} dead-letter rows")
        elif any(f.stage != message.stage or not f.reason.startswith(message.category) for f in found):
            problems.append(f"{marker} ({message.kind}): dead-lettered by {found[0].stage} as {found[0].reason[:120]!r},"
                            f" expected {message.stage} / {message.category}")
        on_dlq = copies.get(marker, [])
        if on_dlq:
            problems.append(f"{marker} ({message.kind}): {len(on_dlq)} copies left on {on_dlq[0].queue} "
                            f"({on_dlq[0].headers.get('x-first-death-reason')}), not recorded")
        got = refusals.get(marker, {})
        expected_hosts = {message.refusal_host} if message.refusal_host else set()
        if set(got) != expected_hosts or any(len(keys) not in once for keys in got.values()):
            problems.append(f"{marker} ({message.kind}): refusal results "
                            f"{ {h: sorted(s for s, _ in keys) for h, keys in got.items()} }, expected one on "
                            f"{message.refusal_host or 'no host'}")
        elif expected_hosts:
            body = json.loads(next(iter(got[message.refusal_host]))[1])
            if body.get("vif_type") != "binding_failed" or not str(body.get("error")).startswith(
                    message.refusal_error or f"Refused: {message.category}"):
                problems.append(f"{marker} ({message.kind}): refusal {body.get('vif_type')} {body.get('error')!r}")
        if len(refusal_rows.get(marker, [])) > message.copies:
            problems.append(f"{marker} ({message.kind}): {len(refusal_rows[marker])} refusal rows in the outbox")
        times = sorted(seen.get(marker, []), key=lambda d: d.at)
        if deliveries and not times:
            problems.append(f"{marker} ({message.kind}): never delivered to a worker")
        for previous, current in zip(times, times[1:]):
            died = (dead_pids or {}).get(previous.pid)
            if ((died is not None and previous.at - 0.5 <= died <= current.at + 0.5)
                    or (message.copies > 1 and current.delivery_count == 0)
                    or any(previous.at - 0.5 <= end and start <= current.at + 0.5 for start, end in fault_windows)):
                explained += 1
            else:
                unexplained.append(f"{marker} ({message.kind}): delivered again to pid {current.pid} "
                                   f"(x-delivery-count {current.delivery_count}) after pid {previous.pid}")
        if len(problems) > before:
            bad.add(marker)
    return {"hostile": len(hostile), "hostile_kinds": dict(sorted(kinds.items())),
            "hostile_dead_lettered_once": len(hostile) - len(bad),
            "hostile_problems": len(problems), "hostile_problem_ids": _listed(problems),
            "hostile_deliveries": sum(len(v) for m, v in seen.items() if m in wanted),
            "hostile_redeliveries_explained": explained,
            "hostile_redeliveries_unexplained": len(unexplained),
            "hostile_redelivery_ids": _listed(unexplained),
            "spurious_dead_letters": len(spurious), "spurious_dead_letter_ids": _listed(spurious),
            "delivery_limited": len(delivery_limited), "delivery_limited_ids": _listed(delivery_limited),
            "broker_dead_lettered": len(broker_dead_lettered),
            "broker_dead_lettered_ids": _listed(broker_dead_lettered)}


def check_races(rounds: list[RaceRound], received: list[ReceivedResult]) -> dict[str, Any]:
    """Per round: the create results on the race host; a winner is a bound one (it names a device)."""
    on_host: dict[tuple[str, str], dict[str, Any]] = {}
    for result in received:
        body = result.body
        on_host[(str(body.get("event_id")), body.get("host"))] = body  # copies share seq and body
    report = []
    for race in rounds:
        bodies = [on_host[(e, race.host)] for e in race.create_ids if (e, race.host) in on_host]
        winners = [b for b in bodies if b.get("vif_type") not in (None, "binding_failed", "unbound")]
        devices = Counter((b.get("pci_device") or {}).get("address") for b in winners)
        report.append({"round": race.name, "ports": len(race.create_ids), "devices": race.devices,
                       "winners": len(winners), "losers": len(bodies) - len(winners),
                       "distinct_devices": len(devices),
                       "device_given_twice": sorted(str(a) for a, n in devices.items() if n > 1 or a is None),
                       "owned_after_delete": race.owned_after_delete})
    return {"race_rounds": report,
            "race_rounds_exact": sum(1 for r in report if r["winners"] == r["devices"] == r["distinct_devices"]
                                     and r["losers"] == r["ports"] - r["devices"] and not r["device_given_twice"]
                                     and r["owned_after_delete"] in (0, None))}


def check(published: dict[str, PublishedEvent], received: list[ReceivedResult], db: DbState,
          final_hosts: dict[str, str | None], *, hostile: list[HostileMessage] = (),
          deliveries: list[Delivery] = (), dlq: list[DlqMessage] = (), races: list[RaceRound] = (),
          fault_windows: list[tuple[float, float]] = (), dead_pids: dict[int, float] | None = None) -> dict[str, Any]:
    """The whole summary: event classification, PCI invariants, hostile messages, race rounds."""
    summary = classify_events(published, received, db, {h.marker for h in hostile})
    summary.update(check_pci(db, final_hosts, received))
    summary.update(check_hostile(list(hostile), db, list(deliveries), list(dlq), list(fault_windows), dead_pids,
                                 received))
    summary.update(check_races(list(races), received))
    summary["valid"] = is_valid(summary)
    return summary


FAILURE_KEYS = ("lost", "duplicated", "unexpected", "diverged", "wrong_outcome", "double_allocated", "leaked",
                "pci_mismatch", "stale_bindings",
                "hostile_problems", "hostile_redeliveries_unexplained", "spurious_dead_letters",
                "broker_dead_lettered", "delivery_limited")


def is_valid(summary: dict[str, Any]) -> bool:
    return (all(summary.get(key, 0) == 0 for key in FAILURE_KEYS)
            and summary.get("race_rounds_exact", 0) == len(summary.get("race_rounds", [])))


def format_summary(summary: dict[str, Any], extra: dict[str, Any] | None = None) -> str:
    """A printable table: the Jepsen-style counts first, then PCI, hostile, races, then ``extra``."""
    events = summary["events"] or 1

    def pct(n: int) -> str:
        return f"{100 * n / events:6.2f} %"

    lines = ["event accounting                     count   fraction"]
    for key in ("ok", "lost", "duplicated", "unknown", "superseded"):
        lines.append(f"  {key:<32} {summary[key]:>7}   {pct(summary[key])}")
    lines.append(f"  {'events published':<32} {summary['events']:>7}   ({summary['published_copies']} copies sent)")
    for key, label in (("unexpected", "unexpected results"), ("diverged", "wire body != outbox row"),
                       ("wrong_outcome", "results that say the wrong thing"),
                       ("lost_committed", "lost but in the outbox"), ("results_received", "results received"),
                       ("redundant_copies", "same seq+body again (allowed)")):
        lines.append(f"  {label:<32} {summary[key]:>7}")
    lines.append("PCI")
    for key in ("double_allocated", "leaked", "pci_mismatch", "stale_bindings", "devices_in_use", "devices"):
        lines.append(f"  {key:<32} {summary[key]:>7}")
    lines.append("hostile messages")
    for key in ("hostile", "hostile_dead_lettered_once", "hostile_problems", "hostile_deliveries",
                "hostile_redeliveries_explained", "hostile_redeliveries_unexplained", "spurious_dead_letters",
                "broker_dead_lettered", "delivery_limited"):
        lines.append(f"  {key:<32} {summary[key]:>7}")
    if summary.get("race_rounds"):
        lines.append(f"VF race rounds (exact: {summary['race_rounds_exact']} of {len(summary['race_rounds'])})")
        for r in summary["race_rounds"]:
            lines.append(f"  {r['round']:<12} {r['ports']} ports for {r['devices']} VFs: {r['winners']} winners, "
                         f"{r['losers']} refused, {r['distinct_devices']} distinct devices, "
                         f"{r['owned_after_delete']} owned after the deletes")
    if summary.get("outcomes"):
        lines.append("results by event type and vif_type")
        lines += [f"  {key:<40} {n:>7}" for key, n in summary["outcomes"].items()]
    for key, value in (extra or {}).items():
        lines.append(f"{key:<34} {value}")
    for key in ("lost_ids", "duplicated_ids", "unexpected_ids", "diverged_ids", "wrong_outcome_ids",
                "double_allocated_ids", "leaked_ids", "pci_mismatch_ids", "stale_binding_ids", "hostile_problem_ids", "hostile_redelivery_ids",
                "spurious_dead_letter_ids", "broker_dead_lettered_ids", "delivery_limited_ids"):
        if summary.get(key):
            lines.append(f"{key}:")
            lines += [f"  {item}" for item in summary[key]]
    lines.append(f"VALID: {summary['valid']}")
    return "\n".join(lines)
