"""Gauges derived from the database: PCI devices per pool and state, dead letters waiting, and the
event-log lag.

Refreshed every few seconds by the workers that change them (not per message): each is one
grouped query. Every state is set, 0 included, so a pool that runs dry shows as 0, not as absent.
"""

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from pipeline.models.tables import DeadLetter, EventLog, PciDeviceRow, ResultRow
from pipeline.observability import metrics


def refresh_gauges(engine: Engine, stages: list[str]) -> None:
    """Raises when the database cannot be read (the worker's readiness says so)."""
    with Session(engine) as session:
        session.execute(select(1))  # a look at the database even for a stage with no gauge of its own
        if {"validate", "allocate"} & set(stages):
            refresh_pci_devices(session)
        if "compose" in stages:
            refresh_event_log_lag(session)
        refresh_dead_letters(session, stages)


def refresh_dead_letters(session: Session, stages: list[str]) -> None:
    """Dead letters of ``stages`` not redriven yet: each worker reports its own stages' (0 included)."""
    waiting = dict(session.execute(select(DeadLetter.stage, func.count()).where(
        DeadLetter.redriven_at.is_(None), DeadLetter.stage.in_(stages)).group_by(DeadLetter.stage)).all())
    for stage in stages:
        metrics.DEAD_LETTERS_WAITING.labels(stage=stage).set(waiting.get(stage, 0))


def refresh_pci_devices(session: Session) -> None:
    rows = session.execute(
        select(PciDeviceRow.host, PciDeviceRow.physical_network, PciDeviceRow.vendor_id, PciDeviceRow.product_id,
               PciDeviceRow.status, func.count())
        .group_by(PciDeviceRow.host, PciDeviceRow.physical_network, PciDeviceRow.vendor_id,
                  PciDeviceRow.product_id, PciDeviceRow.status)).all()
    counts: dict[tuple[str, str, str], dict[str, int]] = {}
    for host, physnet, vendor, product, status, count in rows:
        pool = counts.setdefault((host, physnet or "", f"{vendor}:{product}"), dict.fromkeys(metrics.PCI_STATES, 0))
        pool[metrics.bounded(status, metrics.PCI_STATES)] += count
    for (host, physnet, vendor_product), states in counts.items():
        for state, count in states.items():
            metrics.PCI_DEVICES.labels(host=host, physical_network=physnet, vendor_product=vendor_product,
                                       state=state).set(count)


PORT_EVENTS = ("port.create", "port.update", "port.delete", "binding.request")
LAG_CAP = 100_000  # counted no further: the alert only needs to know it is large


def refresh_event_log_lag(session: Session) -> None:
    """Port events logged after the newest one that has produced a result (events that never give
    a result, such as agent reports, do not count)."""
    last_result_event = session.scalar(select(ResultRow.event_id).order_by(ResultRow.seq.desc()).limit(1))
    done = session.scalar(select(EventLog.seq).where(EventLog.event_id == last_result_event)) if last_result_event else 0
    behind = select(EventLog.seq).where(EventLog.seq > (done or 0), EventLog.event_type.in_(PORT_EVENTS)).limit(LAG_CAP)
    metrics.EVENT_LOG_LAG.labels(stage="compose").set(session.scalar(select(func.count()).select_from(behind.subquery())))
