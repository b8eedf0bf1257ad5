"""``pipeline.db.insert_rows``: one statement for a batch of rows, on PostgreSQL (rows as one JSON
text) and SQLite (an executemany), with the same results on both."""

from datetime import UTC, datetime, timedelta

import orjson
import pytest
from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from pipeline.db import insert_rows, is_transient
from pipeline.models.tables import AgentRow, BindingRow, EventLog, StageMark

AT = datetime(2026, 11, 24, 3, 4, 5, 678901, tzinfo=UTC)


@pytest.fixture
def engine(any_engine: Engine) -> Engine:
    return any_engine


def aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)  # SQLite hands back naive UTC


def test_rows_arrive_whole_json_columns_and_times_included(engine: Engine):
    job = orjson.dumps({"job_id": "e1:p1", "port": {"profile": {"trusted": True}}})
    with Session(engine) as session, session.begin():
        insert_rows(session, StageMark.__table__, [
            {"job_id": "e1:p1", "stage": "allocate", "output": [{"body": orjson.Fragment(job)}], "done_at": AT},
            {"job_id": "e2:p2", "stage": "allocate", "output": [], "done_at": AT + timedelta(seconds=1)}])
        insert_rows(session, AgentRow.__table__, [  # "binary" is a reserved word: quoted
            {"id": "a1", "agent_type": "Open vSwitch agent", "host": "h1", "binary": "neutron-openvswitch-agent",
             "reported_alive": True, "admin_state_up": True, "configurations": {"bridge_mappings": {"p": "br"}},
             "heartbeat_at": AT, "position": 0}])
    with Session(engine) as session:
        marks = {m.job_id: m for m in session.scalars(select(StageMark))}
        agent = session.scalars(select(AgentRow)).one()
    assert marks["e1:p1"].output == [{"body": {"job_id": "e1:p1", "port": {"profile": {"trusted": True}}}}]
    assert marks["e2:p2"].output == []
    assert [aware(marks[k].done_at) for k in ("e1:p1", "e2:p2")] == [AT, AT + timedelta(seconds=1)]
    assert (agent.binary, agent.configurations, agent.reported_alive) == (
        "neutron-openvswitch-agent", {"bridge_mappings": {"p": "br"}}, True)


def test_on_conflict_nothing_skips_and_update_replaces(engine: Engine):
    def event(event_id: str, event_type: str) -> dict:
        return {"event_id": event_id, "event_type": event_type, "occurred_at": AT, "received_at": AT,
                "envelope": {"type": event_type}}

    def binding(vif_type: str, result_seq: int | None) -> dict:
        return {"port_id": "p1", "host": "h1", "status": "ACTIVE", "vnic_type": "normal", "profile": {},
                "vif_type": vif_type, "vif_details": {"port_filter": True}, "levels": [], "event_id": "e1",
                "result_seq": result_seq, "updated_at": AT}

    with Session(engine) as session, session.begin():
        insert_rows(session, EventLog.__table__, [event("e1", "port.create")])
        insert_rows(session, EventLog.__table__, [event("e1", "port.delete"), event("e2", "port.update")],
                    on_conflict="nothing")
        insert_rows(session, BindingRow.__table__, [binding("binding_failed", None)], on_conflict="update")
        insert_rows(session, BindingRow.__table__, [binding("ovs", 7)], on_conflict="update")
    with Session(engine) as session:
        assert dict(session.execute(select(EventLog.event_id, EventLog.event_type)).all()) == {
            "e1": "port.create", "e2": "port.update"}
        assert session.execute(select(BindingRow.vif_type, BindingRow.result_seq, BindingRow.vif_details)).one() == (
            "ovs", 7, {"port_filter": True})


def test_a_key_conflict_raises_and_a_mark_conflict_is_transient(engine: Engine):
    mark = {"job_id": "e1:p1", "stage": "compose", "output": [1], "done_at": AT}
    with Session(engine) as session, session.begin():
        insert_rows(session, StageMark.__table__, [mark])
    with pytest.raises(IntegrityError) as caught, Session(engine) as session, session.begin():
        insert_rows(session, StageMark.__table__, [mark])
    assert is_transient(caught.value)  # two copies of one job handled at once: the retry finds the winner's mark
    with pytest.raises(ValueError), Session(engine) as session:
        insert_rows(session, StageMark.__table__, [mark], on_conflict="replace")
