"""The worker's batch semantics on the embedded default: many-job hand-offs, one poison job among
good ones, transient failures; and the hand-off encoding itself."""

import threading
import time
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from kombu import Connection
from kombu.message import Message
from sqlalchemy.exc import OperationalError

from pipeline.db import create_schema, make_engine
from pipeline.models.jobs import BindingJob
from pipeline.settings import Settings
from pipeline.workers import handlers
from pipeline.workers.consumer import Worker
from pipeline.workers.messages import HANDOFF_JOBS, PoisonMessage, Publish, decode_jobs, handoff_messages, job_json
from pipeline.workers.publisher import BatchPublisher
from pipeline.workers.topology import STAGE_EXCHANGE, declare_topology, dead_letter_queue


def job(number: int) -> dict:
    return BindingJob(job_id=f"e{number}:p{number}", event_id=f"e{number}", occurred_at=datetime.now(UTC),
                      port_id=f"p{number}", revision=1, action="unbind").model_dump(mode="json")


def test_hand_offs_group_jobs_and_keep_results_single():
    """Jobs travel encoded once (``job_json``); a job re-published from a stored mark is a dict."""
    jobs = [BindingJob.model_validate(job(n)) for n in range(HANDOFF_JOBS + 2)]
    outputs = [Publish(STAGE_EXCHANGE.name, "select", job_json(j)) for j in jobs]
    outputs.append(Publish(STAGE_EXCHANGE.name, "select", job(HANDOFF_JOBS + 2)))
    outputs.append(Publish("binding.results", "host.h1", {"seq": 1}))
    messages = handoff_messages(outputs)
    assert [(e, k) for e, k, _ in messages] == [
        ("binding.results", "host.h1"), (STAGE_EXCHANGE.name, "select"), (STAGE_EXCHANGE.name, "select")]
    assert messages[0][2] == {"seq": 1}
    assert [[j.job_id for j in decode_jobs(body)] for _, _, body in messages[1:]] == [
        [f"e{n}:p{n}" for n in range(HANDOFF_JOBS)], [f"e{n}:p{n}" for n in range(HANDOFF_JOBS, HANDOFF_JOBS + 3)]]
    assert decode_jobs(messages[1][2])[0].model_dump() == jobs[0].model_dump()


def test_a_job_travels_without_its_empty_fields_and_decodes_whole():
    full = BindingJob.model_validate(job(1))
    assert b"old_host" not in job_json(full) and b"selection" not in job_json(full)
    assert BindingJob.model_validate_json(job_json(full)).model_dump() == full.model_dump()


def test_a_bad_job_is_named_by_position_and_ids():
    bad = dict(job(7), revision="seven")
    with pytest.raises(PoisonMessage) as caught:
        decode_jobs(__import__("orjson").dumps({"jobs": [job(1), bad]}))
    assert caught.value.category == "bad_schema" and caught.value.reason.startswith("job 1 ")
    assert (caught.value.event_id, caught.value.port_id) == ("e7", "p7")


@pytest.fixture
def embedded(tmp_path):
    settings = Settings(database_url=f"sqlite:///{tmp_path}/db.sqlite", queue_type="classic", batch_wait_ms=2)
    engine = make_engine(settings.database_url)
    create_schema(engine)
    connection = Connection("memory://localhost/", transport_options={"polling_interval": 0.001})
    declare_topology(connection, settings)
    return settings, engine, connection


def run_until(worker: Worker, condition, timeout: float = 10) -> None:  # noqa: ANN001
    thread = threading.Thread(target=lambda: worker.run(safety_interval=0.002), daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not condition():
        time.sleep(0.02)
    worker.should_stop = True
    thread.join(5)
    assert condition()


def test_one_poison_job_of_a_hand_off_is_dead_lettered_alone(embedded, monkeypatch):
    settings, engine, connection = embedded
    original = handlers.AllocateHandler.handle_one

    def explode_on_p2(self, session, item):  # noqa: ANN001, ANN202
        if item.port_id == "p2":
            raise KeyError("boom")
        return original(self, session, item)

    monkeypatch.setattr(handlers.AllocateHandler, "handle_one", explode_on_p2)
    BatchPublisher(connection).publish([(STAGE_EXCHANGE.name, "allocate", {"jobs": [job(n) for n in range(4)]})])
    dlq = dead_letter_queue("allocate", settings)(connection.default_channel)
    worker = Worker(settings, engine, ["allocate"], connection=connection)

    def marked() -> int:
        with engine.connect() as db:
            return db.execute(sa.text("select count(*) from stage_marks where stage='allocate'")).scalar()

    run_until(worker, lambda: marked() == 4)  # three handled, and the poison's (empty) mark
    with engine.connect() as db:
        (reason, port_id, body), = db.execute(sa.text("select reason, port_id, body from dead_letters")).all()
        poison_mark = db.execute(sa.text("select output from stage_marks where job_id='e2:p2'")).scalar()
    assert poison_mark == "[]", "a redelivered hand-off skips the dead-lettered job"
    assert reason == "other: KeyError: 'boom'" and port_id == "p2"
    assert BindingJob.model_validate_json(body).job_id == "e2:p2", "the dead letter keeps the job itself"
    assert dlq.get(no_ack=True) is None, "recorded in the database, not parked on the DLQ"
    compose = connection.SimpleQueue("binding.compose", no_ack=True)
    handed_on = [j["job_id"] for _ in range(3) for j in compose.get(timeout=1).decode()["jobs"]]
    assert sorted(handed_on) == ["e0:p0", "e1:p1", "e3:p3"]  # retried one by one, each handed on once


def test_a_transient_failure_holds_the_batch_and_the_retry_succeeds(embedded, monkeypatch):
    """The database away: the batch stays in hand (nothing requeued, nothing dead-lettered) and is
    tried again after a pause."""
    settings, engine, connection = embedded
    settings = settings.model_copy(update={"transaction_retry_seconds": 0, "hold_backoff_min": 0.05})
    original = handlers.AllocateHandler.handle_one
    failures = []

    def flaky(self, session, item):  # noqa: ANN001, ANN202
        if len(failures) < 3:
            failures.append(item.port_id)
            raise OperationalError("select 1", {}, Exception("server closed the connection"))
        return original(self, session, item)

    monkeypatch.setattr(handlers.AllocateHandler, "handle_one", flaky)
    BatchPublisher(connection).publish([(STAGE_EXCHANGE.name, "allocate", {"jobs": [job(1)]})])
    worker = Worker(settings, engine, ["allocate"], connection=connection)
    settled: list[str] = []
    monkeypatch.setattr(Message, "requeue", lambda self: settled.append("requeue"))
    monkeypatch.setattr(Message, "reject", lambda self, requeue=False: settled.append("reject"))

    def marked() -> int:
        with engine.connect() as db:
            return db.execute(sa.text("select count(*) from stage_marks where stage='allocate'")).scalar()

    run_until(worker, lambda: marked() == 1)
    with engine.connect() as db:
        assert db.execute(sa.text("select count(*) from dead_letters")).scalar() == 0
    assert failures == ["p1"] * 3 and settled == []


def test_after_a_transient_failure_the_rest_of_a_batch_is_held_untried(embedded, monkeypatch):
    """One by one after a failed batch: once an item meets a transient error (the database away),
    it and the items after it are held in hand, untried and unsettled; the items before it are
    settled (a message is acked once all its items are)."""
    settings, engine, connection = embedded
    worker = Worker(settings, engine, ["allocate"], connection=connection)
    tried: list[str] = []

    def database_away_from_p2(handler, items):  # noqa: ANN001, ANN202
        tried.append(items[0].port_id)
        if items[0].port_id == "p2":
            raise OperationalError("select 1", {}, Exception("server closed the connection"))
        return []  # nothing refused

    monkeypatch.setattr(worker, "commit_and_publish", database_away_from_p2)
    acks: list = []
    first, second, third = FakeDelivery(1, acks), FakeDelivery(2, acks), FakeDelivery(3, acks)
    worker.open = {1: 2, 2: 2, 3: 1}
    jobs = [BindingJob.model_validate(job(n)) for n in range(5)]
    buffer = worker.buffers["allocate"]
    worker.one_by_one(buffer, [(first, jobs[0]), (first, jobs[1]), (second, jobs[2]), (second, jobs[3]),
                               (third, jobs[4])])
    assert tried == ["p0", "p1", "p2"]
    assert acks == [(1, False)]
    assert [(m.delivery_tag, j.port_id) for m, j in buffer.items] == [(2, "p2"), (2, "p3"), (3, "p4")]
    assert buffer.held_until > time.monotonic() and worker.open == {2: 2, 3: 1}


class FakeDelivery:
    def __init__(self, tag: int, acks: list):
        self.delivery_tag, self.acks = tag, acks

    def ack(self, multiple: bool = False) -> None:
        self.acks.append((self.delivery_tag, multiple))


@pytest.mark.parametrize(("in_hand", "batch", "expected"), [
    ({1, 2, 3}, [1, 2, 3], [(3, True)]),  # all the channel holds: one frame
    ({1, 2, 3, 4}, [1, 2, 3], [(3, True)]),  # a later delivery waits; the multiple ack stops below it
    ({1, 2, 3}, [2, 3], [(2, False), (3, False)]),  # 1 is another stage's, not handled yet: one by one
    ({5}, [5], [(5, False)]),
])
def test_a_batch_is_acked_with_one_frame_only_when_nothing_unhandled_is_below_it(in_hand, batch, expected):
    worker = Worker(Settings(broker_url="amqp://guest:guest@127.0.0.1:5672//"), None, ["validate"])
    acks: list = []
    worker.open = dict.fromkeys(in_hand, 1)
    worker.ack_all([FakeDelivery(tag, acks) for tag in batch])
    assert acks == expected
    assert set(worker.open) == set(in_hand) - set(batch)


def test_the_in_memory_transport_is_acked_one_by_one(embedded):
    settings, engine, connection = embedded
    worker = Worker(settings, engine, ["validate"], connection=connection)
    acks: list = []
    worker.open = {1: 1, 2: 1}
    worker.ack_all([FakeDelivery(1, acks), FakeDelivery(2, acks)])
    assert acks == [(1, False), (2, False)]  # it ignores ``multiple``


def test_compose_resends_unpublished_results_from_old_and_new_marks(embedded):
    """A compose mark keeps the results' seqs; one written before that kept the messages."""
    from sqlalchemy.orm import Session

    from pipeline.models.tables import ResultRow

    settings, engine, _ = embedded
    with Session(engine) as session, session.begin():
        sent = ResultRow(event_id="e1", port_id="p1", host="h1", body={"port_id": "p1"}, published_at=None)
        done = ResultRow(event_id="e1", port_id="p1", host="h2", body={"port_id": "p1"},
                         published_at=datetime.now(UTC))
        session.add_all([sent, done])
        session.flush()
        seqs = {"sent": sent.seq, "done": done.seq}
    handler = handlers.ComposeHandler(settings)
    old_mark = [{"exchange": "binding.results", "routing_key": f"host.{host}", "body": {"seq": seqs[key]}}
                for key, host in (("sent", "h1"), ("done", "h2"))]
    with Session(engine) as session:
        for mark in ([seqs["sent"], seqs["done"]], old_mark):
            out = handler.redelivered(session, mark)
            assert [(p.routing_key, p.body) for p in out] == [("host.h1", {"port_id": "p1", "seq": seqs["sent"]})]


def test_a_worker_told_to_stop_while_the_broker_is_away_stops(tmp_path):
    """No broker listening: the worker retries its connection; told to stop, it leaves within
    seconds (it held nothing), instead of retrying for minutes until a SIGKILL."""
    settings = Settings(broker_url="amqp://guest:guest@127.0.0.1:1//", database_url=f"sqlite:///{tmp_path}/db.sqlite")
    worker = Worker(settings, make_engine(settings.database_url), ["validate"])
    with worker.running_in_thread():
        time.sleep(1.5)  # a few failed attempts
        started = time.monotonic()
    assert worker.stopped and time.monotonic() - started < 10
