"""Operator mistakes and start-up checks (issue #13, parts 3 and 4): the installed ``bindpipe`` run
as an operator runs it. Each failure is one line on stderr naming the problem and the fix, exit
2 for configuration or usage and 3 for a service that cannot be reached; no traceback unless
``--debug`` (or ``BINDPIPE_DEBUG=1``) asks for it; and nothing is consumed or created first."""

import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from kombu import Connection, Producer
from sqlalchemy.orm import Session

from pipeline import migrate
from pipeline.db import create_schema, make_engine
from pipeline.models.events import Envelope
from pipeline.models.tables import EventLog
from pipeline.settings import Settings
from pipeline.workers.topology import EVENTS, declare_topology

BINDPIPE = str(Path(sys.executable).with_name("bindpipe"))
UNREACHABLE_BROKER = "amqp://guest:guest@127.0.0.1:1//"  # nothing listens on port 1


def start(args: list[str], cwd: Path, **env: str) -> subprocess.Popen[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BINDPIPE_")}
    return subprocess.Popen([BINDPIPE, *args], cwd=cwd, env={**clean, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run(args: list[str], cwd: Path, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    process = start(args, cwd, **env)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()  # a command that should have stopped at once: leave nothing running
        out, err = process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def one_line(done: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """The single stderr line of a command that failed with ``code``, checked to hold ``words``."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code, (done.returncode, done.stderr)
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def migrated(url: str) -> str:
    migrate.upgrade(url)
    return url


# --- settings ----------------------------------------------------------------------------------------


def test_lists_are_read_as_ml2_conf_ini_writes_them_and_as_json(monkeypatch):
    monkeypatch.setenv("BINDPIPE_MECHANISM_DRIVERS", "openvswitch, sriovnicswitch")
    monkeypatch.setenv("BINDPIPE_ML2__OVS_VNIC_TYPE_PROHIBIT_LIST", "direct,macvtap")
    monkeypatch.setenv("BINDPIPE_ML2__OVS_CREATE_TAP", "false")
    settings = Settings()
    assert settings.mechanism_drivers == ("openvswitch", "sriovnicswitch")
    assert settings.ml2.ovs_vnic_type_prohibit_list == ("direct", "macvtap")
    assert settings.ml2.ovs_create_tap is False
    monkeypatch.setenv("BINDPIPE_MECHANISM_DRIVERS", '["ovn", "macvtap"]')
    monkeypatch.setenv("BINDPIPE_ML2__OVS_VNIC_TYPE_PROHIBIT_LIST", '["vdpa"]')
    settings = Settings()
    assert settings.mechanism_drivers == ("ovn", "macvtap") and settings.ml2.ovs_vnic_type_prohibit_list == ("vdpa",)
    monkeypatch.setenv("BINDPIPE_MECHANISM_DRIVERS", "openvswitch")  # one name, no brackets: a traceback before
    assert Settings().driver_config().mechanism_drivers == ("openvswitch",)


def test_unknown_variables_are_named_with_a_suggestion():
    from pipeline.settings import unknown_variables

    environ = {"BINDPIPE_BATCH_SIZ": "5", "BINDPIPE_BATCH_SIZE": "5", "BINDPIPE_ML2__OVS_CREATE_TAP": "false",
               "BINDPIPE_SIGNING_KEYS__nova": "k", "BINDPIPE_RUN_DIR": "/run", "BINDPIPE_CONFIG_FILE": "/etc/x",
               "BINDPIPE_METRICS_PORT": "9", "BINDPIPE_METRICS_ADDR": "::1", "BINDPIPE_TEST_BROKER_URL": "amqp://",
               "BINDPIPE_FAULT_CRASH": "", "BINDPIPE_RABBITMQ_WORKER_PASSWORD": "p", "BINDPIPE_DEBUG": "1",
               "bindpipe_log_format": "json", "PATH": "/bin", "BINDPIPE_BROKERURL": "x"}
    assert unknown_variables(environ) == ["BINDPIPE_BATCH_SIZ (did you mean BINDPIPE_BATCH_SIZE?)",
                                          "BINDPIPE_BROKERURL (did you mean BINDPIPE_BROKER_URL?)"]


def test_a_misspelt_or_bad_setting_is_one_line_and_exit_2(tmp_path):
    done = run(["status"], tmp_path, BINDPIPE_BATCH_SIZ="500")
    one_line(done, 2, "BINDPIPE_BATCH_SIZ", "did you mean BINDPIPE_BATCH_SIZE?")
    done = run(["status"], tmp_path, BINDPIPE_BATCH_SIZE="many")
    one_line(done, 2, "BINDPIPE_BATCH_SIZE='many'", "valid integer")
    done = run(["status"], tmp_path, BINDPIPE_ML2__OVS_CREATE_TAP="maybe")
    one_line(done, 2, "BINDPIPE_ML2__OVS_CREATE_TAP='maybe'", "boolean")
    done = run(["status"], tmp_path, BINDPIPE_CONFIG_FILE=str(tmp_path / "missing.toml"))
    one_line(done, 2, "missing.toml: no such file")
    assert not (tmp_path / "bindpipe.sqlite").exists()


def test_debug_shows_the_traceback(tmp_path):
    done = run(["--debug", "status"], tmp_path, BINDPIPE_BATCH_SIZ="5")
    assert done.returncode == 2 and "Traceback (most recent call last)" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("bindpipe status: unknown variable")
    done = run(["status"], tmp_path, BINDPIPE_BATCH_SIZ="5", BINDPIPE_DEBUG="1")
    assert done.returncode == 2 and "Traceback (most recent call last)" in done.stderr


def test_version_and_short_help(tmp_path):
    from pipeline import __version__
    from pipeline.models.binding import CONTRACT_VERSION

    done = run(["--version"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (f"bindpipe {__version__} (bus contract {CONTRACT_VERSION}, database schema "
                                   f"{migrate.head()})")
    assert __version__ == "0.1.0"  # pyproject.toml's, through the package metadata
    for args in (["-h"], ["worker", "-h"], ["replay", "events", "-h"]):
        done = run(args, tmp_path)
        assert done.returncode == 0 and "Usage: bindpipe" in done.stdout, (args, done.stderr)


# --- start-up checks that need no service ------------------------------------------------------------


def test_an_unknown_mechanism_driver_stops_a_worker_before_it_starts(tmp_path):
    done = run(["worker", "select"], tmp_path, BINDPIPE_MECHANISM_DRIVERS='["nosuch"]',
               BINDPIPE_BROKER_URL=UNREACHABLE_BROKER)
    one_line(done, 2, "BINDPIPE_MECHANISM_DRIVERS", "unknown mechanism driver(s) ['nosuch']", "openvswitch")
    done = run(["run", "--events", "-"], tmp_path, BINDPIPE_MECHANISM_DRIVERS="openvswitch,openvswitch")
    one_line(done, 2, "duplicate names")


def test_status_and_explain_on_no_database_say_so_and_create_nothing(tmp_path):
    for args in (["status"], ["explain", "p1"], ["replay", "results", "--host", "h"]):
        done = run(args, tmp_path)
        one_line(done, 2, f"no database at {tmp_path / 'bindpipe.sqlite'} (the embedded default)",
                 "BINDPIPE_DATABASE_URL")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "empty.sqlite").touch()
    done = run(["explain", "p1"], tmp_path, BINDPIPE_DATABASE_URL="sqlite:///empty.sqlite")
    one_line(done, 2, "no schema", "run `bindpipe migrate`")
    assert [p.name for p in tmp_path.iterdir()] == ["empty.sqlite"]
    assert (tmp_path / "empty.sqlite").stat().st_size == 0


def test_a_file_named_on_the_command_line_that_is_missing(tmp_path):
    done = run(["run", "--events", "nosuch.json"], tmp_path)
    one_line(done, 2, "No such file or directory: nosuch.json")


# --- the real services -------------------------------------------------------------------------------


@pytest.mark.services
def test_commands_with_the_broker_down_exit_3_with_one_line(tmp_path):
    """``declare`` and ``watch`` used to end in a traceback after 6 and 35 s; run side by side."""
    database = f"sqlite:///{tmp_path / 'db.sqlite'}"
    create_schema(make_engine(database))
    commands = {"declare": ["declare"], "watch": ["watch", "--host", "h1", "--timeout", "1"]}
    running = {name: start(args, tmp_path, BINDPIPE_BROKER_URL=UNREACHABLE_BROKER, BINDPIPE_DATABASE_URL=database)
               for name, args in commands.items()}
    for name, process in running.items():
        try:
            out, err = process.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
        if name == "watch":  # the client logs each of its retries (warnings) before it gives up
            err = "\n".join(line for line in err.splitlines() if "broker connection failed, retrying" not in line)
        line = one_line(subprocess.CompletedProcess(process.args, process.returncode, out, err), 3,
                        "cannot reach the broker", "BINDPIPE_BROKER_URL")
        assert line.startswith(f"bindpipe {commands[name][0]}: "), line


@pytest.mark.services
def test_a_worker_on_an_unmigrated_database_exits_2_before_consuming(pg_url, amqp_url, tmp_path):
    settings = Settings(broker_url=amqp_url, database_url=pg_url)
    with Connection(amqp_url) as connection:
        declare_topology(connection, settings)
        channel = connection.channel()
        envelope = Envelope.new("agent.report", {"agent_type": "Open vSwitch agent", "host": "h1"})
        Producer(channel).publish(envelope.model_dump_json().encode(), exchange=EVENTS.name, routing_key="agent.report",
                                  content_type="application/json", content_encoding="utf-8")
        done = run(["worker", "validate"], tmp_path, BINDPIPE_BROKER_URL=amqp_url, BINDPIPE_DATABASE_URL=pg_url)
        one_line(done, 2, "the database has no schema", "run `bindpipe migrate`")
        _, waiting, consumers = channel.queue_declare("binding.validate", passive=True)
        assert (waiting, consumers) == (1, 0)
        assert channel.basic_get("binding.validate").delivery_info["redelivered"] is False  # never delivered

    migrate.upgrade(pg_url, "0002")
    done = run(["worker", "validate"], tmp_path, BINDPIPE_BROKER_URL=amqp_url, BINDPIPE_DATABASE_URL=pg_url)
    one_line(done, 2, "at revision 0002, this release needs", "run `bindpipe migrate`")


@pytest.mark.services
def test_a_worker_whose_queues_are_missing_exits_2_naming_them(pg_url, amqp_url, tmp_path):
    migrated(pg_url)
    done = run(["worker", "allocate"], tmp_path, BINDPIPE_BROKER_URL=amqp_url, BINDPIPE_DATABASE_URL=pg_url,
               BINDPIPE_DECLARE_TOPOLOGY="false")
    line = one_line(done, 2, "binding.allocate, binding.allocate.dlq", "(this worker consumes binding.allocate)",
                    "deploy/rabbitmq/definitions.json", "bindpipe declare")
    assert "guest:guest" not in line  # the broker's password is never printed


@pytest.mark.services
def test_a_refused_login_and_a_refused_publish_are_one_line_and_exit_2(pg_url, amqp_url, tmp_path):
    """``replay events`` run with a user that may not publish events (the worker's): ACCESS_REFUSED
    was a traceback."""
    vhost = amqp_url.rsplit("/", 1)[1]
    user, password = f"bindpipe-test-{uuid.uuid4().hex[:8]}", "secret-test-password"
    ctl = ["rabbitmqctl", "-q"]
    subprocess.run([*ctl, "add_user", user, password], check=True, capture_output=True, timeout=60)
    try:
        subprocess.run([*ctl, "set_permissions", "-p", vhost, user, "^$", "^binding\\.(stages|results|dlx)$", ".*"],
                       check=True, capture_output=True, timeout=60)
        with Connection(amqp_url) as connection:
            declare_topology(connection, Settings(queue_type="quorum"))
        migrated(pg_url)
        envelope = Envelope.new("agent.report", {"agent_type": "Open vSwitch agent", "host": "h1"})
        with Session(make_engine(pg_url)) as session, session.begin():
            session.add(EventLog(event_id=str(envelope.event_id), event_type=envelope.event_type,
                                 occurred_at=datetime.now(UTC), envelope=envelope.model_dump(mode="json")))
        worker_url = amqp_url.replace("guest:guest@", f"{user}:{password}@")
        done = run(["replay", "events", "--from", "1"], tmp_path, BINDPIPE_BROKER_URL=worker_url,
                   BINDPIPE_DATABASE_URL=pg_url)
        line = one_line(done, 2, "ACCESS_REFUSED", "binding.events", "publisher")
        assert password not in line
        done = run(["declare"], tmp_path, BINDPIPE_BROKER_URL=worker_url.replace(password, "wrong"))
        one_line(done, 2, "refused the login", "BINDPIPE_BROKER_URL")
        done = run(["worker", "compose"], tmp_path, BINDPIPE_BROKER_URL=worker_url, BINDPIPE_DATABASE_URL=pg_url)
        one_line(done, 2, "refused to declare the topology", "BINDPIPE_DECLARE_TOPOLOGY=false")
    finally:
        subprocess.run([*ctl, "delete_user", user], capture_output=True, timeout=60)
