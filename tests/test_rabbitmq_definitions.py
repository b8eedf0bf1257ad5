"""deploy/rabbitmq/definitions.json against the real broker: what each user may do, and may not.

A copy of the definitions is imported with ``deploy/rabbitmq/apply-definitions.sh`` into a fresh
vhost ``bindpipe-test-<tag>``, with its users renamed ``t<tag>.bindpipe-<role>`` (the documented
dev passwords, the same permission regexes), so runs never touch the production vhost or users and
never collide. Every refusal below is the broker's own ``ACCESS_REFUSED`` (403) channel error,
checked by reply code and by the resource the broker names. The vhost and users are deleted at the
end. Needs ``rabbitmqctl`` (root or the rabbitmq user) besides the broker itself.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import secrets
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import amqp
import pytest

from tests.services import require_rabbitmq, unavailable

pytestmark = pytest.mark.services

ROOT = Path(__file__).resolve().parents[1]
DEFINITIONS = ROOT / "deploy" / "rabbitmq" / "definitions.json"
APPLY = ROOT / "deploy" / "rabbitmq" / "apply-definitions.sh"
DEV_PASSWORDS = {"publisher": "publisher-dev-password", "worker": "worker-dev-password",
                 "compute": "compute-dev-password"}
STAGES = ("validate", "select", "allocate", "compose")
HOST = "compute-1.example.org"  # dots in a host name must work in routing keys and queue names
RESULTS_QUEUE = f"binding.results.{HOST}"


def rabbitmqctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=120, check=check)


def require_rabbitmqctl() -> None:
    if shutil.which("rabbitmqctl") is None:
        unavailable("rabbitmqctl is not installed; it is needed to create a test vhost")
    probe = rabbitmqctl("list_vhosts", check=False)
    if probe.returncode != 0:
        unavailable(f"rabbitmqctl cannot manage the node (run as root or rabbitmq): {probe.stderr.strip()[:300]}")


@dataclass
class Broker:
    host: str
    port: int
    vhost: str
    users: dict[str, str]
    connections: list[amqp.Connection] = field(default_factory=list)

    def connect(self, role: str, password: str | None = None) -> amqp.Connection:
        connection = amqp.Connection(f"{self.host}:{self.port}", userid=self.users[role],
                                     password=password or DEV_PASSWORDS[role], virtual_host=self.vhost,
                                     confirm_publish=True, connect_timeout=5)
        connection.connect()
        self.connections.append(connection)
        return connection


def rewritten(definitions: dict, vhost: str, tag: str) -> dict:
    """The definitions moved to ``vhost``, each user renamed ``t<tag>.<name>``."""
    copied = copy.deepcopy(definitions)
    assert [v["name"] for v in copied["vhosts"]] == ["bindpipe"]
    renamed = {user["name"]: f"t{tag}.{user['name']}" for user in copied["users"]}
    for user in copied["users"]:
        user["name"] = renamed[user["name"]]
    copied["vhosts"][0]["name"] = vhost
    for section in ("permissions", "topic_permissions", "queues", "exchanges", "bindings", "policies", "parameters"):
        for item in copied.get(section, []):
            assert item["vhost"] == "bindpipe"
            item["vhost"] = vhost
            if "user" in item:
                item["user"] = renamed[item["user"]]
    return copied


@contextlib.contextmanager
def isolated_import(tmp_path: Path, passwords: dict[str, str] | None = None) -> Iterator[Broker]:
    """Apply a rewritten copy of the definitions with apply-definitions.sh; delete it all afterwards."""
    url = urlsplit(require_rabbitmq())
    require_rabbitmqctl()
    tag = uuid.uuid4().hex[:10]
    vhost = f"bindpipe-test-{tag}"
    path = tmp_path / f"definitions-{tag}.json"
    path.write_text(json.dumps(rewritten(json.loads(DEFINITIONS.read_text()), vhost, tag)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BINDPIPE_RABBITMQ_")}
    for role, password in (passwords or {}).items():
        env[f"BINDPIPE_RABBITMQ_{role.upper()}_PASSWORD"] = password
    broker = Broker(url.hostname or "127.0.0.1", url.port or 5672, vhost,
                    {role: f"t{tag}.bindpipe-{role}" for role in DEV_PASSWORDS})
    try:
        applied = subprocess.run([str(APPLY), str(path)], env=env, capture_output=True, text=True, timeout=120)
        assert applied.returncode == 0, applied.stderr
        yield broker
    finally:
        for connection in broker.connections:
            with contextlib.suppress(Exception):
                connection.close()
        rabbitmqctl("delete_vhost", vhost, check=False)
        for user in broker.users.values():
            rabbitmqctl("delete_user", user, check=False)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with isolated_import(tmp_path_factory.mktemp("rabbitmq")) as imported:
        # The compute host's own queue, declared and bound the way a compute host does it.
        channel = imported.connect("compute").channel()
        channel.queue_declare(RESULTS_QUEUE, durable=True, auto_delete=False, arguments={"x-queue-type": "quorum"})
        channel.queue_bind(RESULTS_QUEUE, "binding.results", f"host.{HOST}")
        channel.close()
        yield imported


@pytest.fixture(scope="module")
def publisher(broker: Broker) -> amqp.Connection:
    return broker.connect("publisher")


@pytest.fixture(scope="module")
def worker(broker: Broker) -> amqp.Connection:
    return broker.connect("worker")


@pytest.fixture(scope="module")
def compute(broker: Broker) -> amqp.Connection:
    return broker.connect("compute")


def message(marker: str) -> amqp.Message:
    return amqp.Message(json.dumps({"marker": marker}).encode(), content_type="application/json", delivery_mode=2)


def fetch(connection: amqp.Connection, queue: str, marker: str, limit: int = 50) -> amqp.Message:
    """basic.get (and ack) from ``queue`` until the message carrying ``marker`` comes."""
    channel = connection.channel()
    try:
        for _ in range(limit):
            got = channel.basic_get(queue)
            if got is None:
                break
            channel.basic_ack(got.delivery_tag)
            if json.loads(got.body)["marker"] == marker:
                return got
        raise AssertionError(f"no message {marker!r} in {queue}")
    finally:
        channel.close()


# --- what each user may do ----------------------------------------------------------------------

def test_passive_declares_need_no_permission(worker: amqp.Connection) -> None:
    """Workers configure nothing, so they must check the topology passively (kombu: passive=True)."""
    channel = worker.channel()
    for stage in STAGES:
        assert channel.queue_declare(f"binding.{stage}", passive=True).queue == f"binding.{stage}"
        assert channel.queue_declare(f"binding.{stage}.dlq", passive=True).queue == f"binding.{stage}.dlq"
    for exchange, kind in (("binding.events", "topic"), ("binding.stages", "direct"), ("binding.results", "topic"),
                           ("binding.dlx", "direct")):
        channel.exchange_declare(exchange, kind, passive=True)
    channel.close()


def test_publisher_event_lands_in_binding_validate(publisher: amqp.Connection, worker: amqp.Connection) -> None:
    marker = uuid.uuid4().hex
    channel = publisher.channel()
    for routing_key in ("port.create", "binding.request", "agent.report"):  # confirmed by the broker
        channel.basic_publish(message(f"{marker}-{routing_key}"), "binding.events", routing_key)
    channel.close()
    for routing_key in ("port.create", "binding.request", "agent.report"):
        assert fetch(worker, "binding.validate", f"{marker}-{routing_key}").delivery_info["routing_key"] == routing_key


def test_worker_consumes_validate_and_hands_off_to_select(publisher: amqp.Connection, worker: amqp.Connection) -> None:
    marker = uuid.uuid4().hex
    publisher_channel = publisher.channel()
    publisher_channel.basic_publish(message(marker), "binding.events", "port.update")
    publisher_channel.close()

    channel = worker.channel()
    channel.basic_qos(0, 10, False)
    received: list[amqp.Message] = []
    channel.basic_consume("binding.validate", callback=received.append)
    while not any(json.loads(m.body)["marker"] == marker for m in received):
        worker.drain_events(timeout=5)
    for delivered in received:
        channel.basic_ack(delivered.delivery_tag)
    channel.basic_publish(message(marker), "binding.stages", "select")
    channel.close()
    assert fetch(worker, "binding.select", marker)


def test_rejected_message_is_dead_lettered_to_its_stage_dlq(publisher: amqp.Connection, worker: amqp.Connection) -> None:
    marker = uuid.uuid4().hex
    publisher_channel = publisher.channel()
    publisher_channel.basic_publish(message(marker), "binding.events", "network.upsert")
    publisher_channel.close()
    channel = worker.channel()
    for _ in range(50):
        got = channel.basic_get("binding.validate")
        assert got is not None, "the published event never reached binding.validate"
        if json.loads(got.body)["marker"] == marker:
            channel.basic_reject(got.delivery_tag, requeue=False)
            break
        channel.basic_ack(got.delivery_tag)
    channel.close()
    channel = worker.channel()
    for _ in range(50):  # at-least-once dead-lettering is asynchronous: poll briefly
        if channel.queue_declare("binding.validate.dlq", passive=True).message_count:
            break
        time.sleep(0.1)
    channel.close()
    dead = fetch(worker, "binding.validate.dlq", marker)
    assert dead.headers["x-first-death-reason"] == "rejected"
    assert dead.headers["x-first-death-queue"] == "binding.validate"


def test_worker_publishes_dead_letters_and_results(worker: amqp.Connection, compute: amqp.Connection) -> None:
    marker = uuid.uuid4().hex
    channel = worker.channel()
    channel.basic_publish(message(marker), "binding.dlx", "allocate")
    channel.basic_publish(message(marker), "binding.results", f"host.{HOST}")
    channel.close()
    assert fetch(worker, "binding.allocate.dlq", marker)

    consumer = compute.channel()
    received: list[amqp.Message] = []
    consumer.basic_consume(RESULTS_QUEUE, callback=received.append)
    while not any(json.loads(m.body)["marker"] == marker for m in received):
        compute.drain_events(timeout=5)
    for delivered in received:
        consumer.basic_ack(delivered.delivery_tag)
    consumer.close()


def test_compute_declares_binds_and_deletes_only_its_own_queue(compute: amqp.Connection) -> None:
    channel = compute.channel()
    name = "binding.results.compute-2"
    channel.queue_declare(name, durable=True, auto_delete=False, arguments={"x-queue-type": "quorum"})
    channel.queue_bind(name, "binding.results", "host.compute-2")
    channel.queue_delete(name)
    channel.close()


# --- what each user may not do: the broker's own refusals ----------------------------------------

Operation = Callable[[amqp.Channel], object]

REFUSALS: list[tuple[str, str, Operation, str]] = [
    ("compute", "publish an event", lambda ch: ch.basic_publish(message("x"), "binding.events", "port.create"),
     "exchange 'binding.events'"),
    ("compute", "publish a result", lambda ch: ch.basic_publish(message("x"), "binding.results", f"host.{HOST}"),
     "exchange 'binding.results'"),
    ("compute", "consume a stage queue", lambda ch: ch.basic_consume("binding.validate", callback=print),
     "queue 'binding.validate'"),
    ("compute", "declare a queue outside binding.results.*", lambda ch: ch.queue_declare("binding.validate2", durable=True),
     "queue 'binding.validate2'"),
    ("compute", "bind with a wildcard to read every host's results",
     lambda ch: ch.queue_bind(RESULTS_QUEUE, "binding.results", "host.#"), "topic 'host.#'"),
    ("compute", "bind its queue to binding.events", lambda ch: ch.queue_bind(RESULTS_QUEUE, "binding.events", "#"),
     "exchange 'binding.events'"),
    ("compute", "declare its queue with a dead-letter exchange",
     lambda ch: ch.queue_declare("binding.results.compute-3", durable=True,
                                 arguments={"x-queue-type": "quorum", "x-dead-letter-exchange": "binding.dlx"}),
     "exchange 'binding.dlx'"),
    ("publisher", "consume a compute host's results", lambda ch: ch.basic_consume(RESULTS_QUEUE, callback=print),
     f"queue '{RESULTS_QUEUE}'"),
    ("publisher", "read a stage queue", lambda ch: ch.basic_get("binding.validate"), "queue 'binding.validate'"),
    ("publisher", "declare a queue", lambda ch: ch.queue_declare("bindpipe-publisher-own", durable=True),
     "queue 'bindpipe-publisher-own'"),
    ("publisher", "publish an unknown event type", lambda ch: ch.basic_publish(message("x"), "binding.events", "port.hijack"),
     "topic 'port.hijack'"),
    ("publisher", "publish through the default exchange",
     lambda ch: ch.basic_publish(message("x"), "", "binding.validate"), "exchange 'amq.default'"),
    ("publisher", "publish a stage hand-off", lambda ch: ch.basic_publish(message("x"), "binding.stages", "select"),
     "exchange 'binding.stages'"),
    ("worker", "declare a stage queue, even with its exact arguments",
     lambda ch: ch.queue_declare("binding.validate", durable=True, auto_delete=False, arguments={
         "x-queue-type": "quorum", "x-dead-letter-exchange": "binding.dlx", "x-dead-letter-routing-key": "validate",
         "x-delivery-limit": 5, "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}),
     "queue 'binding.validate'"),
    ("worker", "declare an exchange", lambda ch: ch.exchange_declare("binding.stages", "direct", durable=True,
                                                                      auto_delete=False), "exchange 'binding.stages'"),
    ("worker", "publish an event", lambda ch: ch.basic_publish(message("x"), "binding.events", "port.create"),
     "exchange 'binding.events'"),
    ("worker", "publish a result to a non-host routing key",
     lambda ch: ch.basic_publish(message("x"), "binding.results", "everyone"), "topic 'everyone'"),
    ("worker", "read a compute host's results", lambda ch: ch.basic_get(RESULTS_QUEUE), f"queue '{RESULTS_QUEUE}'"),
]


@pytest.mark.parametrize(("role", "what", "operation", "resource"), REFUSALS,
                         ids=[f"{role}-may-not-{what.replace(' ', '-')}" for role, what, _, _ in REFUSALS])
def test_refused(broker: Broker, publisher: amqp.Connection, worker: amqp.Connection, compute: amqp.Connection,
                 role: str, what: str, operation: Operation, resource: str) -> None:
    connection = {"publisher": publisher, "worker": worker, "compute": compute}[role]
    channel = connection.channel()
    with pytest.raises(amqp.exceptions.AccessRefused) as refused:
        operation(channel)
    assert refused.value.reply_code == 403
    assert "ACCESS_REFUSED" in str(refused.value) and resource in str(refused.value), str(refused.value)
    assert broker.users[role] in str(refused.value)
    # Only the channel was closed: the same connection still works.
    check = connection.channel()
    check.queue_declare("binding.validate", passive=True)
    check.close()


def test_production_passwords_replace_the_dev_ones(tmp_path: Path) -> None:
    password = secrets.token_urlsafe(18)
    with isolated_import(tmp_path, passwords={"worker": password}) as imported:
        imported.connect("worker", password).channel().queue_declare("binding.validate", passive=True)
        with pytest.raises(amqp.exceptions.AccessRefused) as refused:
            imported.connect("worker")  # the dev password
        assert refused.value.reply_code == 403
        imported.connect("compute")  # roles without a new password keep the dev one
