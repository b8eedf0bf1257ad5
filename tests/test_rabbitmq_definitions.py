"""deploy/rabbitmq/definitions.json against the real broker: what each user may do, and may not.

The definitions are imported with ``deploy/rabbitmq/apply-definitions.sh --vhost bindpipe-test-<tag>``
into a fresh vhost, with their users renamed ``t<tag>.bindpipe-<role>`` (the documented dev
passwords, the same permission regexes), and two compute hosts are registered with ``bindpipe
broker add-compute-host``, so runs never touch the production vhost or users and never collide.
Every refusal below is the broker's own ``ACCESS_REFUSED`` (403) channel error, checked by reply
code and by the resource the broker names. Each role's documented commands are run as that role:
the real CLI in a subprocess, and the Python client. The vhost and users are deleted at the end.
Needs ``rabbitmqctl`` (root or the rabbitmq user) besides the broker itself.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

import amqp
import pytest

from pipeline.broker_users import PASSWORD_ENV, compute_user
from pipeline.client import BindingClient
from pipeline.settings import Settings
from tests.bus import running_worker
from tests.factories import OVS_AGENT, VLAN_SEGMENT, agent
from tests.services import require_rabbitmq, unavailable

pytestmark = pytest.mark.services

ROOT = Path(__file__).resolve().parents[1]
DEFINITIONS = ROOT / "deploy" / "rabbitmq" / "definitions.json"
APPLY = ROOT / "deploy" / "rabbitmq" / "apply-definitions.sh"
BINDPIPE = str(Path(sys.executable).with_name("bindpipe"))
DEV_PASSWORDS = {"publisher": "publisher-dev-password", "worker": "worker-dev-password"}
STAGES = ("validate", "select", "allocate", "compose")


def rabbitmqctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=120, check=check)


def require_rabbitmqctl() -> None:
    if shutil.which("rabbitmqctl") is None:
        unavailable("rabbitmqctl is not installed; it is needed to create a test vhost")
    probe = rabbitmqctl("list_vhosts", check=False)
    if probe.returncode != 0:
        unavailable(f"rabbitmqctl cannot manage the node (run as root or rabbitmq): {probe.stderr.strip()[:300]}")


def bindpipe(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The real CLI with only the given BINDPIPE_* settings (and none of this process's)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("BINDPIPE_") or k.startswith("BINDPIPE_TEST_")}
    return subprocess.run([BINDPIPE, *args], env={**base, **env}, capture_output=True, text=True, timeout=120)


@dataclass
class Broker:
    host: str
    port: int
    vhost: str
    tag: str
    users: dict[str, str]  # role -> broker user: publisher, worker, admin, compute-<name> per host
    passwords: dict[str, str]
    hosts: dict[str, str] = field(default_factory=dict)  # name -> compute host
    created: list[str] = field(default_factory=list)  # users to delete afterwards
    connections: list[amqp.Connection] = field(default_factory=list)

    def connect(self, role: str, password: str | None = None) -> amqp.Connection:
        connection = amqp.Connection(f"{self.host}:{self.port}", userid=self.users[role],
                                     password=password or self.passwords[role], virtual_host=self.vhost,
                                     confirm_publish=True, connect_timeout=5)
        connection.connect()
        self.connections.append(connection)
        return connection

    def url(self, role: str) -> str:
        return (f"amqp://{quote(self.users[role], safe='')}:{quote(self.passwords[role], safe='')}@{self.host}:"
                f"{self.port}/{quote(self.vhost, safe='')}")

    def queue(self, name: str) -> str:
        return f"binding.results.{self.hosts[name]}"

    def add_host(self, name: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
        """``bindpipe broker add-compute-host`` for host ``name`` (its user then deleted at the end)."""
        host = self.hosts.setdefault(name, f"compute-{name}.t{self.tag}.example.org")
        self.created.append(compute_user(host))
        done = bindpipe("broker", "add-compute-host", host, "--vhost", self.vhost,
                        **({PASSWORD_ENV: password} if password else {}))
        self.users[f"compute-{name}"] = compute_user(host)
        if password:
            self.passwords[f"compute-{name}"] = password
        return done


def renamed_users(definitions: dict, tag: str) -> dict:
    """The definitions with each user renamed ``t<tag>.<name>`` (users are not per vhost)."""
    copied = copy.deepcopy(definitions)
    renamed = {user["name"]: f"t{tag}.{user['name']}" for user in copied["users"]}
    for user in copied["users"]:
        user["name"] = renamed[user["name"]]
    for section in ("permissions", "topic_permissions"):
        for item in copied[section]:
            item["user"] = renamed[item["user"]]
    return copied


@contextlib.contextmanager
def isolated_import(tmp_path: Path, passwords: dict[str, str] | None = None, hosts: tuple[str, ...] = (),
                    options: tuple[str, ...] = ()) -> Iterator[Broker]:
    """Apply a copy of the definitions to a fresh vhost with apply-definitions.sh (and ``options``),
    register ``hosts``; delete it all afterwards."""
    url = urlsplit(require_rabbitmq())
    require_rabbitmqctl()
    tag = uuid.uuid4().hex[:10]
    vhost = f"bindpipe-test-{tag}"
    path = tmp_path / f"definitions-{tag}.json"
    path.write_text(json.dumps(renamed_users(json.loads(DEFINITIONS.read_text()), tag)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BINDPIPE_RABBITMQ_")}
    for role, password in (passwords or {}).items():
        env[f"BINDPIPE_RABBITMQ_{role.upper()}_PASSWORD"] = password
    users = {role: f"t{tag}.bindpipe-{role}" for role in DEV_PASSWORDS}
    broker = Broker(url.hostname or "127.0.0.1", url.port or 5672, vhost, tag,
                    {**users, "admin": url.username or "guest"},
                    {**DEV_PASSWORDS, "admin": url.password or "guest"}, created=list(users.values()))
    try:
        applied = subprocess.run([str(APPLY), "--vhost", vhost, *options, str(path)], env=env, capture_output=True,
                                 text=True, timeout=120)
        assert applied.returncode == 0, applied.stderr
        for name in hosts:
            added = broker.add_host(name, secrets.token_urlsafe(12))
            assert added.returncode == 0, added.stderr
        yield broker
    finally:
        for connection in broker.connections:
            with contextlib.suppress(Exception):
                connection.close()
        rabbitmqctl("delete_vhost", vhost, check=False)
        for user in broker.created:
            rabbitmqctl("delete_user", user, check=False)


def impostor(host: str) -> str:
    """A host name that a permission regex with its first dot unescaped would also match."""
    return host.replace(".", "x", 1)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with isolated_import(tmp_path_factory.mktemp("rabbitmq"), hosts=("a", "b")) as imported:
        channel = imported.connect("admin").channel()  # a queue host a's user must not read
        channel.queue_declare(f"binding.results.{impostor(imported.hosts['a'])}", durable=True, auto_delete=False)
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
    """Compute host a, with its own user."""
    return broker.connect("compute-a")


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


def test_worker_publishes_dead_letters_and_results(broker: Broker, worker: amqp.Connection,
                                                   compute: amqp.Connection) -> None:
    marker = uuid.uuid4().hex
    channel = worker.channel()
    channel.basic_publish(message(marker), "binding.dlx", "allocate")
    channel.basic_publish(message(marker), "binding.results", f"host.{broker.hosts['a']}")
    channel.close()
    assert fetch(worker, "binding.allocate.dlq", marker)

    consumer = compute.channel()
    received: list[amqp.Message] = []
    consumer.basic_consume(broker.queue("a"), callback=received.append)
    while not any(json.loads(m.body)["marker"] == marker for m in received):
        compute.drain_events(timeout=5)
    for delivered in received:
        consumer.basic_ack(delivered.delivery_tag)
    consumer.close()


def test_compute_host_checks_gets_and_acks_its_own_results(broker: Broker, worker: amqp.Connection,
                                                           compute: amqp.Connection) -> None:
    """All a compute host's user may do: check its queue passively, and read (get, ack) from it."""
    marker = uuid.uuid4().hex
    channel = worker.channel()
    channel.basic_publish(message(marker), "binding.results", f"host.{broker.hosts['a']}")
    channel.close()
    own = compute.channel()
    assert own.queue_declare(broker.queue("a"), passive=True).queue == broker.queue("a")
    own.exchange_declare("binding.results", "topic", passive=True)
    own.close()
    assert fetch(compute, broker.queue("a"), marker)


def test_registered_host_keeps_its_results_before_it_first_connects(broker: Broker, worker: amqp.Connection) -> None:
    """`bindpipe broker add-compute-host` creates the queue and its binding: what the workers
    publish from then on waits for the host. A new user's password is generated and printed once;
    registering again keeps it, or sets the one given."""
    added = broker.add_host("c")
    assert added.returncode == 0, added.stderr
    lines = dict(line.split(": ", 1) for line in added.stdout.splitlines() if line.startswith("password: "))
    broker.passwords["compute-c"] = lines["password"]
    assert "(new)" in added.stdout and len(lines["password"]) >= 24

    marker = uuid.uuid4().hex
    channel = worker.channel()
    channel.basic_publish(message(marker), "binding.results", f"host.{broker.hosts['c']}")
    channel.close()
    again = broker.add_host("c")
    assert again.returncode == 0 and "(existing)" in again.stdout and "password: unchanged" in again.stdout, again
    assert fetch(broker.connect("compute-c"), broker.queue("c"), marker)

    new_password = secrets.token_urlsafe(12)
    assert broker.add_host("c", new_password).returncode == 0
    broker.connect("compute-c").channel().queue_declare(broker.queue("c"), passive=True)
    with pytest.raises(amqp.exceptions.AccessRefused):
        broker.connect("compute-c", lines["password"])


@pytest.mark.parametrize(("host", "vhost", "why"), [
    ("compute-1.#", None, "is not a host name"),
    ("compute-*", None, "is not a host name"),
    ("x" * 240, None, "is not a host name"),
    ("compute-9", "no-such-vhost-for-bindpipe", "has no exchange binding.results"),
])
def test_add_compute_host_refuses_clearly(broker: Broker, host: str, vhost: str | None, why: str) -> None:
    done = bindpipe("broker", "add-compute-host", host, "--vhost", vhost or broker.vhost)
    assert done.returncode == 2 and why in done.stderr and "Traceback" not in done.stderr, done
    assert len(done.stderr.strip().splitlines()) == 1
    assert compute_user(host) not in rabbitmqctl("list_users").stdout


def test_another_host_cannot_make_the_workers_results_vanish(broker: Broker, worker: amqp.Connection) -> None:
    """Host b tries to delete and purge host a's queue and to steal its results; the broker refuses
    each, so a result the broker confirms to the worker is one that host a gets."""
    other = broker.connect("compute-b")
    attacks: list[Callable[[amqp.Channel], object]] = [
        lambda ch: ch.queue_delete(broker.queue("a")),
        lambda ch: ch.queue_purge(broker.queue("a")),
        lambda ch: ch.basic_get(broker.queue("a")),
        lambda ch: ch.queue_bind(broker.queue("b"), "binding.results", f"host.{broker.hosts['a']}"),
    ]
    for attack in attacks:
        with pytest.raises(amqp.exceptions.AccessRefused):
            attack(other.channel())
    marker = uuid.uuid4().hex
    channel = worker.channel()  # in confirm mode: returns once the broker confirmed it
    channel.basic_publish(message(marker), "binding.results", f"host.{broker.hosts['a']}")
    channel.close()
    assert fetch(broker.connect("compute-a"), broker.queue("a"), marker)
    assert other.channel().basic_get(broker.queue("b")) is None, "host b got none of it"


def test_the_operators_admin_still_manages_the_vhost(broker: Broker) -> None:
    """apply-definitions.sh gives the node's administrators every permission on the vhost it made."""
    permissions = rabbitmqctl("list_permissions", "-p", broker.vhost).stdout.splitlines()
    assert f"{broker.users['admin']}\t.*\t.*\t.*" in permissions
    done = bindpipe("declare", BINDPIPE_BROKER_URL=broker.url("admin"))
    assert done.returncode == 0, done.stderr
    channel = broker.connect("admin").channel()
    channel.basic_publish(message("dead"), "binding.dlx", "compose")
    assert channel.queue_declare("binding.compose.dlq", passive=True).message_count >= 0
    channel.queue_purge("binding.compose.dlq")
    channel.close()


def test_a_named_admin_instead_of_the_nodes_administrators(tmp_path: Path) -> None:
    admin, password = f"t{uuid.uuid4().hex[:10]}.operator", secrets.token_urlsafe(12)
    rabbitmqctl("add_user", admin, password)
    try:
        with isolated_import(tmp_path, options=("--admin", admin)) as imported:
            permissions = rabbitmqctl("list_permissions", "-p", imported.vhost).stdout.splitlines()
            assert f"{admin}\t.*\t.*\t.*" in permissions
            assert not any(line.startswith(f"{imported.users['admin']}\t") for line in permissions)
            imported.users["operator"], imported.passwords["operator"] = admin, password
            done = bindpipe("declare", BINDPIPE_BROKER_URL=imported.url("operator"))
            assert done.returncode == 0, done.stderr
    finally:
        rabbitmqctl("delete_user", admin, check=False)


def test_the_definitions_go_into_the_vhost_given(broker: Broker) -> None:
    """The file names vhost bindpipe (the test does not change it); apply-definitions.sh --vhost put
    its queues and permissions into the test's vhost."""
    assert [v["name"] for v in json.loads(DEFINITIONS.read_text())["vhosts"]] == ["bindpipe"]
    queues = set(rabbitmqctl("list_queues", "-p", broker.vhost, "name").stdout.split())
    assert {f"binding.{s}{dlq}" for s in STAGES for dlq in ("", ".dlq")} <= queues
    users = {line.split("\t")[0] for line in rabbitmqctl("list_permissions", "-p", broker.vhost).stdout.splitlines()}
    assert {broker.users["publisher"], broker.users["worker"]} <= users


# --- what each user may not do: the broker's own refusals ----------------------------------------

def private_queue(channel: amqp.Channel) -> str:
    """A queue as ``BindingClient.results_for`` declares it (the only kind the publisher may)."""
    return channel.queue_declare(f"bindpipe.client.probe.{uuid.uuid4().hex[:8]}", exclusive=True,
                                 auto_delete=True).queue


# (role, what, operation given the channel and the broker's names, resource the refusal names).
# In resources, {a} and {b} are hosts a's and b's queues, {impostor} a queue only a's dot matches.
REFUSALS: list[tuple[str, str, Callable[[amqp.Channel, Broker], object], str]] = [
    ("compute-b", "get and ack host a's results", lambda ch, b: ch.basic_get(b.queue("a")), "queue '{a}'"),
    ("compute-b", "consume host a's results", lambda ch, b: ch.basic_consume(b.queue("a"), callback=print),
     "queue '{a}'"),
    ("compute-b", "purge host a's queue", lambda ch, b: ch.queue_purge(b.queue("a")), "queue '{a}'"),
    ("compute-b", "delete host a's queue", lambda ch, b: ch.queue_delete(b.queue("a")), "queue '{a}'"),
    ("compute-b", "bind its own queue to host a's key",
     lambda ch, b: ch.queue_bind(b.queue("b"), "binding.results", f"host.{b.hosts['a']}"), "queue '{b}'"),
    ("compute-b", "bind host a's queue to its own key",
     lambda ch, b: ch.queue_bind(b.queue("a"), "binding.results", f"host.{b.hosts['b']}"), "queue '{a}'"),
    ("compute-b", "declare a spy queue", lambda ch, b: ch.queue_declare(b.queue("b") + ".spy", durable=True),
     "queue '{b}.spy'"),
    ("compute-a", "delete its own queue (the workers' results would vanish)",
     lambda ch, b: ch.queue_delete(b.queue("a")), "queue '{a}'"),
    ("compute-a", "declare its own queue, even with its exact arguments",
     lambda ch, b: ch.queue_declare(b.queue("a"), durable=True, auto_delete=False,
                                    arguments={"x-queue-type": "quorum"}), "queue '{a}'"),
    ("compute-a", "read a queue its host name would match with a dot unescaped",
     lambda ch, b: ch.basic_get(f"binding.results.{impostor(b.hosts['a'])}"), "queue '{impostor}'"),
    ("compute-a", "publish an event", lambda ch, b: ch.basic_publish(message("x"), "binding.events", "port.create"),
     "exchange 'binding.events'"),
    ("compute-a", "publish a result",
     lambda ch, b: ch.basic_publish(message("x"), "binding.results", f"host.{b.hosts['a']}"),
     "exchange 'binding.results'"),
    ("compute-a", "consume a stage queue", lambda ch, b: ch.basic_consume("binding.validate", callback=print),
     "queue 'binding.validate'"),
    ("publisher", "consume a compute host's results", lambda ch, b: ch.basic_consume(b.queue("a"), callback=print),
     "queue '{a}'"),
    ("publisher", "delete a compute host's queue", lambda ch, b: ch.queue_delete(b.queue("a")), "queue '{a}'"),
    ("publisher", "bind its private queue with a wildcard to read every host's results",
     lambda ch, b: ch.queue_bind(private_queue(ch), "binding.results", "host.#"), "topic 'host.#'"),
    ("publisher", "bind its private queue to binding.events",
     lambda ch, b: ch.queue_bind(private_queue(ch), "binding.events", "#"), "exchange 'binding.events'"),
    ("publisher", "read a stage queue", lambda ch, b: ch.basic_get("binding.validate"), "queue 'binding.validate'"),
    ("publisher", "declare a queue outside bindpipe.client.*",
     lambda ch, b: ch.queue_declare("bindpipe-publisher-own", durable=True), "queue 'bindpipe-publisher-own'"),
    ("publisher", "publish an unknown event type",
     lambda ch, b: ch.basic_publish(message("x"), "binding.events", "port.hijack"), "topic 'port.hijack'"),
    ("publisher", "publish through the default exchange",
     lambda ch, b: ch.basic_publish(message("x"), "", "binding.validate"), "exchange 'amq.default'"),
    ("publisher", "publish a stage hand-off", lambda ch, b: ch.basic_publish(message("x"), "binding.stages", "select"),
     "exchange 'binding.stages'"),
    ("publisher", "publish a result",
     lambda ch, b: ch.basic_publish(message("x"), "binding.results", f"host.{b.hosts['a']}"),
     "exchange 'binding.results'"),
    ("worker", "declare a stage queue, even with its exact arguments",
     lambda ch, b: ch.queue_declare("binding.validate", durable=True, auto_delete=False, arguments={
         "x-queue-type": "quorum", "x-dead-letter-exchange": "binding.dlx", "x-dead-letter-routing-key": "validate",
         "x-delivery-limit": 5, "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}),
     "queue 'binding.validate'"),
    ("worker", "declare an exchange", lambda ch, b: ch.exchange_declare("binding.stages", "direct", durable=True,
                                                                         auto_delete=False),
     "exchange 'binding.stages'"),
    ("worker", "publish an event", lambda ch, b: ch.basic_publish(message("x"), "binding.events", "port.create"),
     "exchange 'binding.events'"),
    ("worker", "publish a result to a non-host routing key",
     lambda ch, b: ch.basic_publish(message("x"), "binding.results", "everyone"), "topic 'everyone'"),
    ("worker", "read a compute host's results", lambda ch, b: ch.basic_get(b.queue("a")), "queue '{a}'"),
    ("worker", "delete a compute host's queue", lambda ch, b: ch.queue_delete(b.queue("a")), "queue '{a}'"),
]


@pytest.mark.parametrize(("role", "what", "operation", "resource"), REFUSALS,
                         ids=[f"{role}-may-not-{what.replace(' ', '-')}" for role, what, _, _ in REFUSALS])
def test_refused(broker: Broker, role: str, what: str, operation: Callable[[amqp.Channel, Broker], object],
                 resource: str) -> None:
    connection = broker.connect(role)
    channel = connection.channel()
    with pytest.raises(amqp.exceptions.AccessRefused) as refused:
        operation(channel, broker)
    named = resource.format(a=broker.queue("a"), b=broker.queue("b"),
                            impostor=f"binding.results.{impostor(broker.hosts['a'])}")
    assert refused.value.reply_code == 403
    assert "ACCESS_REFUSED" in str(refused.value) and named in str(refused.value), str(refused.value)
    assert broker.users[role] in str(refused.value)
    # Only the channel was closed: the same connection still works, and every results queue is there.
    check = connection.channel()
    check.queue_declare("binding.validate", passive=True)
    for host in ("a", "b"):
        check.queue_declare(broker.queue(host), passive=True)
    check.close()


def test_production_passwords_replace_the_dev_ones(tmp_path: Path) -> None:
    password = secrets.token_urlsafe(18)
    with isolated_import(tmp_path, passwords={"worker": password}) as imported:
        imported.connect("worker", password).channel().queue_declare("binding.validate", passive=True)
        with pytest.raises(amqp.exceptions.AccessRefused) as refused:
            imported.connect("worker")  # the dev password
        assert refused.value.reply_code == 403
        imported.connect("publisher")  # roles without a new password keep the dev one


def test_there_is_no_shared_compute_password_to_set() -> None:
    env = {**os.environ, "BINDPIPE_RABBITMQ_COMPUTE_PASSWORD": "x"}
    done = subprocess.run([str(APPLY), "--vhost", "never-made"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "bindpipe broker add-compute-host" in done.stderr, done.stderr
    assert "never-made" not in rabbitmqctl("list_vhosts").stdout.split()


# --- each role's documented commands, as that role ------------------------------------------------

NETWORK = {"id": "net-1", "segments": [VLAN_SEGMENT]}


def test_each_role_runs_its_documented_commands(tmp_path: Path, pg_url: str, pg_engine) -> None:  # noqa: ANN001
    """A worker as the worker user (BINDPIPE_DECLARE_TOPOLOGY=false), the README's client example
    ("listen first, then publish") as the publisher, `bindpipe watch` and `BindingClient.watch` as the
    compute host's own user, relay, replays and status as the users the docs give them."""
    with isolated_import(tmp_path, hosts=("a",)) as broker:
        host = broker.hosts["a"]
        as_worker = {"BINDPIPE_BROKER_URL": broker.url("worker"), "BINDPIPE_DATABASE_URL": pg_url}
        as_publisher = {"BINDPIPE_BROKER_URL": broker.url("publisher"), "BINDPIPE_DATABASE_URL": pg_url}
        as_compute = {"BINDPIPE_BROKER_URL": broker.url("compute-a")}
        worker_settings = Settings(broker_url=broker.url("worker"), database_url=pg_url, declare_topology=False,
                                   batch_wait_ms=2)
        with running_worker(worker_settings, pg_engine), \
                BindingClient(broker.url("publisher"), settings=Settings()) as client:
            with client.results_for(host) as results:
                client.publish_envelopes([client.envelope("network.upsert", NETWORK),
                                          client.envelope("agent.report", agent(OVS_AGENT, host=host))])
                sent = client.publish("port.create", {"id": "p1", "network_id": "net-1", "host": host,
                                                      "vnic_type": "normal"})
                result = results.wait(port_id="p1", event_id=sent.event_id, timeout=30)
            assert result["vif_type"] == "ovs"

            watched = bindpipe("watch", "--host", host, "--json", "--timeout", "2", **as_compute)
            assert watched.returncode == 0, watched.stderr
            assert [json.loads(line)["seq"] for line in watched.stdout.splitlines()] == [result["seq"]]

            replayed = bindpipe("replay", "results", "--host", host, **as_worker)
            assert replayed.returncode == 0 and f"re-published 1 results to host.{host}" in replayed.stdout, replayed
            with BindingClient(broker.url("compute-a"), settings=Settings()) as compute:
                assert [r["seq"] for r in compute.watch(host, timeout=2)] == [result["seq"]]

            relayed = bindpipe("relay", "--once", **as_worker)
            assert relayed.returncode == 0, relayed.stderr
            events = bindpipe("replay", "events", "--from", "1", **as_publisher)
            assert events.returncode == 0 and "re-published 3 events" in events.stdout, events
            status = bindpipe("status", "--json", **as_worker)
            assert status.returncode == 0, status.stderr
            queues = json.loads(status.stdout)["broker"]["queues"]
            assert set(queues) == {f"binding.{s}{dlq}" for s in STAGES for dlq in ("", ".dlq")}
            assert all("messages" in depth for depth in queues.values()), queues

        # A command run as the wrong user says so in one line.
        for args, env, refused in [(("declare",), as_worker, "binding.events"),
                                   (("replay", "events"), as_worker, "binding.events"),
                                   (("replay", "results", "--host", host), as_publisher, "binding.results"),
                                   (("watch", "--host", host, "--timeout", "1"), as_publisher, broker.queue("a"))]:
            done = bindpipe(*args, **env)
            assert done.returncode == 2 and "ACCESS_REFUSED" in done.stderr and refused in done.stderr, done
            assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr

        # The host's user cannot make a queue the operator deleted; an administrator (a development
        # broker) gets one made by `bindpipe watch`.
        channel = broker.connect("admin").channel()
        channel.queue_delete(broker.queue("a"))
        done = bindpipe("watch", "--host", host, "--timeout", "1", **as_compute)
        refusal = f"Queue.declare: (403) ACCESS_REFUSED - access to queue '{broker.queue('a')}'"
        assert done.returncode == 2 and refusal in done.stderr, done
        assert f"bindpipe broker add-compute-host {host}" in done.stderr and "Traceback" not in done.stderr
        done = bindpipe("watch", "--host", "dev-host", "--timeout", "1", BINDPIPE_BROKER_URL=broker.url("admin"))
        assert done.returncode == 0 and done.stdout == "", done
        assert channel.queue_declare("binding.results.dev-host", passive=True).queue == "binding.results.dev-host"
