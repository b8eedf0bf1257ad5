"""``bindpipe broker add-compute-host``: a compute host's own broker user and results queue.

RabbitMQ (3.10) does not expand ``{username}`` in resource permissions, so "each host reads only its
own results" takes a user per host: ``bindpipe-compute.<host>``, whose only permission is *read* on
``binding.results.<host>``. It declares, binds and deletes nothing, so it can neither read another
host's results (no read on its queue, no queue of its own to bind to ``host.<other>``) nor purge or
delete any queue; and as no user but the operator may delete a results queue, the workers'
confirmed publishes for a registered host always land in it. The queue and its binding are created
here, by the operator, so a host's results are kept from the moment it is registered.

Everything goes in with ``rabbitmqctl import_definitions`` (``RABBITMQCTL`` overrides the command, as
for ``deploy/rabbitmq/apply-definitions.sh``), so the password travels as a salted hash on standard
input, never on a command line. Running it again is harmless: permissions are set again, an existing
queue is left alone, and an existing user keeps its password unless a new one is given.
"""

import base64
import hashlib
import json
import os
import re
import secrets
import shlex
import subprocess
from dataclasses import dataclass
from typing import Any

from pipeline.settings import Settings
from pipeline.workers.topology import RESULTS, results_queue, results_queue_name

# Host names as Nova and DNS write them; anything else would be a routing-key pattern (`#`, `*`) or
# would not fit RabbitMQ's 255-byte queue names.
HOST_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")
MAX_HOST_LENGTH = 255 - len("binding.results.")
PASSWORD_ENV = "BINDPIPE_RABBITMQ_COMPUTE_PASSWORD"


class BrokerAdminError(Exception):
    """An operator's mistake or a refusal of rabbitmqctl, said in one line."""


@dataclass(frozen=True)
class ComputeHost:
    user: str
    queue: str
    created: bool  # the user was new
    password: str | None  # generated here (shown once), or None when given or kept


def compute_user(host: str) -> str:
    return f"bindpipe-compute.{host}"


def compute_permissions(host: str) -> dict[str, str]:
    """The host user's permissions: read on its own queue, nothing else. Its dots are escaped (a dot
    in a regex matches any character, so another host's queue too); a host name has no other
    character that means something in a regex."""
    check_host(host)
    return {"configure": "^$", "write": "^$", "read": "^" + results_queue_name(host).replace(".", r"\.") + "$"}


def check_host(host: str) -> None:
    if not HOST_NAME.fullmatch(host) or len(host) > MAX_HOST_LENGTH:
        raise BrokerAdminError(f"host {host[:80]!r} is not a host name (letters, digits, '-', '_', dot-separated "
                               f"labels, at most {MAX_HOST_LENGTH} characters)")


def password_hash(password: str) -> str:
    """``rabbit_password_hashing_sha256``: base64 of a 4-byte salt and SHA-256(salt + password)."""
    salt = os.urandom(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def compute_host_definitions(host: str, vhost: str, settings: Settings, password: str | None) -> dict[str, Any]:
    """What ``rabbitmqctl import_definitions`` takes for the host: its queue bound to ``host.<host>``,
    its permissions, and its user when ``password`` is given."""
    queue = results_queue(host, settings)
    definitions: dict[str, Any] = {
        "permissions": [{"user": compute_user(host), "vhost": vhost, **compute_permissions(host)}],
        "queues": [{"name": queue.name, "vhost": vhost, "durable": True, "auto_delete": False,
                    "arguments": queue.queue_arguments}],
        "bindings": [{"source": RESULTS.name, "vhost": vhost, "destination": queue.name, "destination_type": "queue",
                      "routing_key": queue.routing_key, "arguments": {}}],
    }
    if password is not None:
        definitions["users"] = [{"name": compute_user(host), "password_hash": password_hash(password),
                                 "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": [], "limits": {}}]
    return definitions


def rabbitmqctl(*args: str, stdin: str | None = None) -> str:
    command = [*shlex.split(os.environ.get("RABBITMQCTL", "rabbitmqctl")), "--quiet", *args]
    try:
        done = subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise BrokerAdminError(f"{command[0]} not found (set RABBITMQCTL to a command that reaches the node)") from None
    except subprocess.TimeoutExpired:
        raise BrokerAdminError(f"rabbitmqctl {args[0]} did not finish within 120 s") from None
    if done.returncode != 0:
        why = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
        raise BrokerAdminError(f"rabbitmqctl {args[0]} failed: {why[:500]}")
    return done.stdout


def add_compute_host(host: str, vhost: str, settings: Settings, password: str | None = None) -> ComputeHost:
    """Create (or bring up to date) the host's queue, user and permissions in ``vhost``. A new user
    with no ``password`` given gets a generated one, returned so that it can be shown once."""
    check_host(host)
    exchanges = {e["name"] for e in json.loads(rabbitmqctl("list_exchanges", "-p", vhost, "name",
                                                           "--formatter", "json"))}
    if RESULTS.name not in exchanges:  # the import would create the queue but silently skip its binding
        raise BrokerAdminError(f"vhost {vhost!r} has no exchange {RESULTS.name} (or does not exist): apply the "
                               f"definitions first (deploy/rabbitmq/apply-definitions.sh --vhost {vhost})")
    users = {u["user"] for u in json.loads(rabbitmqctl("list_users", "--formatter", "json"))}
    created = compute_user(host) not in users
    generated = secrets.token_urlsafe(24) if created and password is None else None
    definitions = compute_host_definitions(host, vhost, settings, password or generated)
    rabbitmqctl("import_definitions", "--format", "json", stdin=json.dumps(definitions))
    return ComputeHost(compute_user(host), results_queue_name(host), created, generated)
