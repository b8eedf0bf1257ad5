"""The deploy/ files and the observability modules they rely on; no broker or database needed.

supervisord.conf is parsed by supervisor's own ServerOptions and started for real with a stand-in
``bindpipe``; systemd units are checked key by key (and by ``systemd-analyze verify`` when present);
Prometheus and Grafana files are checked for the metric names they use (and by ``promtool`` when
present); the metrics module is exercised in multiprocess mode in child processes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.observability import metrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SUPERVISORD_CONF = DEPLOY / "supervisord.conf"
PRESTART = DEPLOY / "bin" / "bindpipe-prestart"
SYSTEMD = DEPLOY / "systemd"
DEFINITIONS = DEPLOY / "rabbitmq" / "definitions.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "bindpipe.json"
DATASOURCE_YAML = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDER_YAML = DEPLOY / "grafana" / "provisioning" / "dashboards" / "bindpipe.yaml"
STAGES = ("validate", "select", "allocate", "compose")
NUMPROCS = {"validate": 2, "select": 2, "allocate": 1, "compose": 2}
# The rabbitmq_prometheus families the dashboard and alerts may use (per-object endpoint).
RABBITMQ_FAMILIES = {"rabbitmq_queue_messages_ready", "rabbitmq_queue_messages_unacked", "rabbitmq_queue_consumers"}
DEV_PASSWORDS = {"bindpipe-publisher": "publisher-dev-password", "bindpipe-worker": "worker-dev-password"}


def metric_names(expr: str) -> tuple[set[str], set[str]]:
    """(bindpipe families, rabbitmq families) named in a PromQL expression."""
    bindpipe = {re.sub(r"_(bucket|count|sum)$", "", name) for name in re.findall(r"\bbindpipe_[a-z_]+", expr)}
    rabbitmq = set(re.findall(r"\brabbitmq_[a-z_]+", expr))
    return bindpipe, rabbitmq


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir", "BINDPIPE_METRICS_DIR")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=child_env(**env), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done


# --- supervisord -------------------------------------------------------------------------------

def supervisor_options(monkeypatch: pytest.MonkeyPatch, run_dir: Path, metrics_dir: Path):
    from supervisor.options import ServerOptions

    monkeypatch.setenv("BINDPIPE_RUN_DIR", str(run_dir))
    monkeypatch.setenv("BINDPIPE_METRICS_DIR", str(metrics_dir))
    options = ServerOptions()  # reads the environment for %(ENV_X)s here
    options.realize(args=["-c", str(SUPERVISORD_CONF)])
    return options


def test_supervisord_conf_parses_with_a_program_per_stage(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    options = supervisor_options(monkeypatch, tmp_path, tmp_path / "metrics")
    assert options.logfile == str(tmp_path / "supervisord.log")
    assert options.serverurl == f"unix://{tmp_path}/supervisor.sock"
    [group] = options.process_group_configs
    assert group.name == "bindpipe"
    processes = {p.name: p for p in group.process_configs}

    for stage in STAGES:
        names = [f"bindpipe-{stage}_{n:02d}" for n in range(NUMPROCS[stage])]
        assert [n for n in processes if n.startswith(f"bindpipe-{stage}_")] == names
        for name in names:
            process = processes[name]
            assert process.command == f"bindpipe worker {stage}"
            assert process.stopsignal == signal.SIGTERM
            assert process.stopwaitsecs > 2
            assert process.stopasgroup and process.killasgroup
            assert process.autorestart is not False and process.startsecs == 2 and process.startretries == 10
            assert process.redirect_stderr and process.stdout_logfile == str(tmp_path / f"{name}.log")
    relay, server = processes["bindpipe-relay_00"], processes["bindpipe-metrics_00"]
    assert relay.command == "bindpipe relay" and relay.stopsignal == signal.SIGTERM and relay.stopwaitsecs > 2
    assert server.command == "bindpipe metrics-server"  # BINDPIPE_METRICS_PORT / _ADDR, not a fixed port
    watchdog = processes["bindpipe-watchdog_00"]
    assert watchdog.command == "bindpipe watchdog" and watchdog.autorestart is not False
    prestart = processes["bindpipe-prestart"]
    assert prestart.command == str(PRESTART) and prestart.autorestart is False and prestart.startsecs == 0
    assert prestart.priority < min(p.priority for n, p in processes.items() if n != "bindpipe-prestart")
    assert options.configroot.supervisord.environment == {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}


def test_supervisord_conf_requires_its_environment(tmp_path: Path) -> None:
    env = child_env(BINDPIPE_METRICS_DIR=str(tmp_path))
    env.pop("BINDPIPE_RUN_DIR", None)
    done = subprocess.run([sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(SUPERVISORD_CONF)],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "ENV_BINDPIPE_RUN_DIR" in done.stderr, done.stderr


FAKE_BINDPIPE = """#!/bin/sh
echo "start $$ $*" >> "$BINDPIPE_RUN_DIR/calls"
trap 'echo "term $$ $*" >> "$BINDPIPE_RUN_DIR/calls"; exit 0' TERM
while :; do sleep 0.1; done
"""


def test_supervisord_runs_every_process_and_stops_them_with_term(tmp_path: Path) -> None:
    """Real supervisord, real config, a stand-in ``bindpipe`` that logs its arguments and SIGTERM."""
    bin_dir, run_dir, metrics_dir = tmp_path / "bin", tmp_path / "run", tmp_path / "metrics"
    for d in (bin_dir, run_dir, metrics_dir):
        d.mkdir()
    (metrics_dir / "counter_999999999.db").write_bytes(b"stale")  # a dead process's file: wiped at start
    fake = bin_dir / "bindpipe"
    fake.write_text(FAKE_BINDPIPE)
    fake.chmod(0o755)
    env = child_env(BINDPIPE_RUN_DIR=str(run_dir), BINDPIPE_METRICS_DIR=str(metrics_dir),
                    PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    ctl = [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(SUPERVISORD_CONF)]
    daemon = subprocess.Popen([sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(SUPERVISORD_CONF)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        expected_running = sum(NUMPROCS.values()) + 3  # the metrics server, the relay and the watchdog
        deadline = time.monotonic() + 30
        while True:
            status = subprocess.run([*ctl, "status"], env=env, capture_output=True, text=True).stdout
            if status.count("RUNNING") == expected_running and "bindpipe-prestart" in status:
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.3)
        assert re.search(r"bindpipe:bindpipe-prestart\s+EXITED", status), status
        assert not (metrics_dir / "counter_999999999.db").exists()
        subprocess.run([*ctl, "shutdown"], env=env, capture_output=True, check=True)
        assert daemon.wait(timeout=40) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
    calls = (run_dir / "calls").read_text().splitlines()
    started = sorted(line.split(" ", 2)[2] for line in calls if line.startswith("start "))
    assert started == sorted(["metrics-server", "relay", "watchdog"]
                             + [f"worker {s}" for s in STAGES for _ in range(NUMPROCS[s])])
    assert len([line for line in calls if line.startswith("term ")]) == len(started)
    log = (run_dir / "supervisord.log").read_text()
    assert len(re.findall(r"stopped: bindpipe-\S+ \(exit status 0\)", log)) == len(started), log
    assert "exited: bindpipe-prestart (exit status 0; expected)" in log
    assert "SIGKILL" not in log


# --- bindpipe-prestart -------------------------------------------------------------------------

def test_prestart_keeps_files_of_live_writers_and_wipes_otherwise(tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_999999999.db").write_bytes(b"stale")
    (metrics_dir / "notes.txt").write_text("not ours")
    writer = subprocess.Popen(
        [sys.executable, "-c", "from pipeline.observability import metrics as m; import sys, time; "
                               "m.touch_loop('validate'); print('ready', flush=True); time.sleep(60)"],
        env=child_env(BINDPIPE_METRICS_DIR=str(metrics_dir)), stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ready"
        kept = subprocess.run([str(PRESTART), str(metrics_dir)], capture_output=True, text=True, check=True)
        assert f"processes {writer.pid} still write" in kept.stdout
        assert (metrics_dir / "counter_999999999.db").exists()
    finally:
        writer.kill()
        writer.wait()
    wiped = subprocess.run([str(PRESTART)], env={**os.environ, "BINDPIPE_METRICS_DIR": str(metrics_dir)},
                           capture_output=True, text=True, check=True)
    assert "wiped" in wiped.stdout
    assert sorted(p.name for p in metrics_dir.iterdir()) == ["notes.txt"]


def test_prestart_refuses_a_relative_directory(tmp_path: Path) -> None:
    done = subprocess.run([str(PRESTART), "relative/dir"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 2 and "absolute" in done.stderr


# --- systemd -----------------------------------------------------------------------------------

def unit(name: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values (systemd allows repeated keys, configparser does not)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in (SYSTEMD / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        assert current is not None, f"{name}: {line!r} outside a section"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_systemd_worker_template() -> None:
    worker = unit("bindpipe-worker@.service")
    service = worker["Service"]
    assert service["ExecStart"] == ["/opt/bindpipe/venv/bin/bindpipe worker %i"]
    assert service["KillSignal"] == ["SIGTERM"]
    assert service["TimeoutStopSec"] == ["30"]
    assert service["Restart"] == ["on-failure"]
    assert service["RestartPreventExitStatus"] == ["2"]  # a configuration refused at start: no restart loop
    assert service["EnvironmentFile"] == ["/etc/bindpipe/env"]
    assert "ExecStartPre" not in service  # the wipe is bindpipe-metrics.service's, once
    assert "bindpipe-metrics.service" in worker["Unit"]["After"][0].split()
    assert worker["Unit"]["PartOf"] == ["bindpipe.target"]
    assert worker["Install"]["WantedBy"] == ["bindpipe.target"]


def test_systemd_metrics_and_relay_units() -> None:
    server = unit("bindpipe-metrics.service")["Service"]
    assert server["ExecStartPre"] == ["/opt/bindpipe/deploy/bin/bindpipe-prestart"]
    assert server["ExecStart"] == ["/opt/bindpipe/venv/bin/bindpipe metrics-server"]
    assert server["EnvironmentFile"] == ["/etc/bindpipe/env"]
    relay = unit("bindpipe-relay.service")
    assert relay["Service"]["ExecStart"] == ["/opt/bindpipe/venv/bin/bindpipe relay"]
    watchdog = unit("bindpipe-watchdog.service")
    assert watchdog["Service"]["ExecStart"] == ["/opt/bindpipe/venv/bin/bindpipe watchdog"]
    assert watchdog["Service"]["User"] == unit("bindpipe-worker@.service")["Service"]["User"]  # may signal them
    for name in ("bindpipe-metrics.service", "bindpipe-relay.service", "bindpipe-watchdog.service"):
        sections = unit(name)
        assert sections["Service"]["KillSignal"] == ["SIGTERM"] and int(sections["Service"]["TimeoutStopSec"][0]) >= 10
        assert sections["Service"]["Restart"] == ["on-failure"]
        assert sections["Unit"]["PartOf"] == ["bindpipe.target"]


def test_rabbitmq_drop_in_raises_its_open_files_limit() -> None:
    """One quorum results queue per compute host: RabbitMQ's default 1024 open files ran out at
    ~300 hosts (it stopped answering handshakes). The drop-in sits where systemd looks for it."""
    drop_in = unit("rabbitmq-server.service.d/limits.conf")
    assert int(drop_in["Service"]["LimitNOFILE"][0]) >= 65536


def test_systemd_target_wants_every_unit() -> None:
    wanted = {w for line in unit("bindpipe.target")["Unit"]["Wants"] for w in line.split()}
    assert wanted == {"bindpipe-metrics.service", "bindpipe-relay.service", "bindpipe-watchdog.service",
                      *(f"bindpipe-worker@{s}.service" for s in STAGES)}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    """The units with /opt/bindpipe moved to stand-in executables, as systemd-analyze checks them."""
    opt = tmp_path / "opt"
    for executable in ("venv/bin/bindpipe", "deploy/bin/bindpipe-prestart"):
        path = opt / executable
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    units = tmp_path / "units"
    units.mkdir()
    for source in (p for p in SYSTEMD.iterdir() if p.is_file()):  # not the drop-in for RabbitMQ's unit
        (units / source.name).write_text(source.read_text().replace("/opt/bindpipe", str(opt)))
    (units / "bindpipe-worker@validate.service").write_text((units / "bindpipe-worker@.service").read_text())
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", "--generators=no", "bindpipe-worker@validate.service",
                           "bindpipe-metrics.service", "bindpipe-relay.service", "bindpipe-watchdog.service",
                           "bindpipe.target"],
                          cwd=units, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), done.stdout + done.stderr


def test_env_example_reads_the_same_in_sh_and_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    done = subprocess.run(["sh", "-c", f'set -a; . "{DEPLOY / "env.example"}"; set +a; env'],
                          capture_output=True, text=True, check=True, env={"PATH": os.environ["PATH"]})
    values = dict(line.split("=", 1) for line in done.stdout.splitlines() if line.startswith("BINDPIPE_"))
    assert json.loads(values["BINDPIPE_MECHANISM_DRIVERS"])[0] == "openvswitch"
    assert values["BINDPIPE_BROKER_URL"].startswith("amqp://bindpipe-worker:") and values["BINDPIPE_BROKER_URL"].endswith("/bindpipe")
    from pipeline.settings import Settings, unknown_variables

    assert unknown_variables(values) == []  # every variable of the file is a setting (or supervisord's run dir)
    for key in list(os.environ):
        if key.startswith("BINDPIPE_"):
            monkeypatch.delenv(key)
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.mechanism_drivers[0] == "openvswitch" and settings.log_format == "json"
    assert settings.metrics_dir == values["BINDPIPE_METRICS_DIR"]
    assert (settings.metrics_port, settings.metrics_addr) == (9464, "0.0.0.0")


# --- RabbitMQ definitions (static; the broker test is test_rabbitmq_definitions.py) ----------------

def test_definitions_topology() -> None:
    definitions = json.loads(DEFINITIONS.read_text())
    assert [v["name"] for v in definitions["vhosts"]] == ["bindpipe"]
    exchanges = {e["name"]: e for e in definitions["exchanges"]}
    assert {name: e["type"] for name, e in exchanges.items()} == {
        "binding.events": "topic", "binding.stages": "direct", "binding.results": "topic", "binding.dlx": "direct"}
    assert all(e["durable"] and not e["auto_delete"] for e in exchanges.values())
    queues = {q["name"]: q for q in definitions["queues"]}
    for stage in STAGES:
        assert queues[f"binding.{stage}"]["arguments"] == {
            "x-queue-type": "quorum", "x-dead-letter-exchange": "binding.dlx", "x-dead-letter-routing-key": stage,
            "x-delivery-limit": 5, "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
        assert queues[f"binding.{stage}.dlq"]["arguments"] == {"x-queue-type": "quorum"}
    assert len(queues) == 8 and all(q["durable"] for q in queues.values())
    bindings = {(b["source"], b["destination"], b["routing_key"]) for b in definitions["bindings"]}
    assert bindings == {("binding.events", "binding.validate", "#"),
                        *(("binding.stages", f"binding.{s}", s) for s in STAGES[1:]),
                        *(("binding.dlx", f"binding.{s}.dlq", s) for s in STAGES)}


def test_definitions_queue_arguments_match_the_topology_module() -> None:
    """The workers' kombu topology and the operator's definitions must declare the same queues."""
    from pipeline.settings import Settings
    from pipeline.workers import topology

    settings = Settings(queue_type="quorum", delivery_limit=5)
    queues = {q["name"]: q["arguments"] for q in json.loads(DEFINITIONS.read_text())["queues"]}
    for stage in STAGES:
        assert topology.stage_queue(stage, settings).queue_arguments == queues[f"binding.{stage}"]
        assert topology.dead_letter_queue(stage, settings).queue_arguments == queues[f"binding.{stage}.dlq"]


def test_definitions_password_hashes_are_the_documented_dev_passwords() -> None:
    for user in json.loads(DEFINITIONS.read_text())["users"]:
        assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
        raw = base64.b64decode(user["password_hash"])
        salt, digest = raw[:4], raw[4:]
        assert hashlib.sha256(salt + DEV_PASSWORDS[user["name"]].encode()).digest() == digest
        assert user["tags"] == []
    assert "publisher-dev-password" in (DEPLOY / "README.md").read_text()


def test_definitions_permission_regexes_match_exactly_what_each_user_needs() -> None:
    """Python's re agrees with RabbitMQ's (PCRE) on these patterns; the broker test proves them live."""
    definitions = json.loads(DEFINITIONS.read_text())
    perms = {p["user"]: p for p in definitions["permissions"]}

    def allows(user: str, kind: str, resource: str) -> bool:
        return re.search(perms[user][kind], resource) is not None

    stage_queues = [f"binding.{s}" for s in STAGES] + [f"binding.{s}.dlq" for s in STAGES]
    everything = ["binding.events", "binding.stages", "binding.results", "binding.dlx", "amq.default",
                  "binding.results.compute-1", *stage_queues, "bindpipe.client.compute-1.0a1b2c", "bindpipe.client"]
    private = "bindpipe.client.compute-1.0a1b2c"  # what BindingClient.results_for declares
    assert [r for r in everything if allows("bindpipe-publisher", "configure", r)] == [private]
    assert [r for r in everything if allows("bindpipe-publisher", "write", r)] == ["binding.events", private]
    assert [r for r in everything if allows("bindpipe-publisher", "read", r)] == ["binding.results", private]
    assert [r for r in everything if allows("bindpipe-worker", "write", r)] == ["binding.stages", "binding.results",
                                                                                "binding.dlx"]
    assert [r for r in everything if allows("bindpipe-worker", "read", r)] == stage_queues
    assert not any(allows("bindpipe-worker", "configure", r) for r in everything)
    topics = {(t["user"], t["exchange"]): t for t in definitions["topic_permissions"]}
    publisher_topics = topics[("bindpipe-publisher", "binding.events")]["write"]
    for key in ("agent.report", "pci.inventory", "network.upsert", "network.delete", "port.create", "port.update",
                "port.delete", "binding.request"):
        assert re.search(publisher_topics, key)
    assert not re.search(publisher_topics, "port.create.extra")
    listens = topics[("bindpipe-publisher", "binding.results")]
    assert re.search(listens["read"], "host.compute-1.example.org") and listens["write"] == "^$"
    assert not any(re.search(listens["read"], key) for key in ("host.#", "host.*", "#", "other.compute-1"))
    assert set(perms) == {"bindpipe-publisher", "bindpipe-worker"}, "compute hosts: bindpipe broker add-compute-host"


def test_a_compute_host_user_may_read_its_own_queue_and_nothing_else() -> None:
    from pipeline.broker_users import BrokerAdminError, compute_permissions

    perms = compute_permissions("compute-1.example.org")
    assert perms["configure"] == perms["write"] == "^$"
    others = ["binding.results.compute-1xexample.org", "binding.results.compute-1.example.org.spy",
              "binding.results.compute-2.example.org", "binding.results", "binding.events", "binding.validate"]
    assert re.search(perms["read"], "binding.results.compute-1.example.org")
    assert not any(re.search(perms["read"], name) for name in others)
    with pytest.raises(BrokerAdminError, match="is not a host name"):
        compute_permissions("compute-1.#")


# --- Prometheus --------------------------------------------------------------------------------

def alert_rules() -> dict[str, str]:
    """alert name -> expr, read without a YAML library (PyYAML is not a dependency)."""
    rules: dict[str, str] = {}
    lines = ALERTS.read_text().splitlines()
    name = None
    for index, line in enumerate(lines):
        if match := re.match(r"\s*- alert: (\S+)", line):
            name = match.group(1)
        elif (match := re.match(r"(\s*)expr: (.*)", line)) and name:
            if match.group(2).strip() == "|":
                indent = len(match.group(1))
                block = []
                for following in lines[index + 1:]:
                    if following.strip() and len(following) - len(following.lstrip()) <= indent:
                        break
                    block.append(following.strip())
                rules[name] = " ".join(block).strip()
            else:
                rules[name] = match.group(2).strip()
    return rules


def test_alerts_cover_the_required_conditions() -> None:
    rules = alert_rules()
    assert "rate(bindpipe_dead_letters_total" in rules["BindpipeDeadLettersGrowing"].replace("increase(", "rate(")
    assert 'rabbitmq_queue_messages_ready{queue=~"binding\\\\.(validate|select|allocate|compose)\\\\.dlq"}' \
        in rules["BindpipeDeadLetterQueueNotEmpty"]
    assert rules["BindpipeDeadLetterQueueNotEmpty"].endswith("> 0")
    assert rules["BindpipeDeadLettersWaiting"] == "max by (stage) (bindpipe_dead_letters_waiting) > 0"
    assert "rabbitmq_queue_messages_ready" in rules["BindpipeStageBacklog"]
    assert rules["BindpipeNoFreeVFs"] == \
        'sum by (host, physical_network) (bindpipe_pci_devices{state="available"}) == 0'
    ratio = rules["BindpipeBindingFailureRatioHigh"]
    assert "[10m]" in ratio and ratio.endswith("> 0.05")
    assert rules["BindpipeWorkerStalled"] == "time() - bindpipe_worker_last_loop_timestamp_seconds > 60"
    text = ALERTS.read_text()
    assert re.search(r"- alert: BindpipeStageBacklog\n\s+expr: .*\n\s+for: 5m", text)


def test_alerts_and_scrape_config_name_only_existing_metrics() -> None:
    for name, expr in alert_rules().items():
        bindpipe, rabbitmq = metric_names(expr)
        assert bindpipe <= set(metrics.METRIC_FAMILIES), (name, bindpipe)
        assert rabbitmq <= RABBITMQ_FAMILIES, (name, rabbitmq)
    scrape = PROMETHEUS_YML.read_text()
    assert '"127.0.0.1:9464"' in scrape and '"127.0.0.1:15692"' in scrape
    assert "metrics_path: /metrics/per-object" in scrape and "- alerts.yml" in scrape


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_config_rules_and_every_dashboard_query(tmp_path: Path) -> None:
    check = subprocess.run(["promtool", "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    queries = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p.get("targets", [])]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": q.replace("$__rate_interval", "5m").replace("$instance", ".*")
         .replace("$vhost", "bindpipe")} for i, q in enumerate(queries)]}]}
    (tmp_path / "dashboard.yml").write_text(json.dumps(rules))  # JSON is YAML
    check = subprocess.run(["promtool", "check", "rules", str(tmp_path / "dashboard.yml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


# --- Grafana -----------------------------------------------------------------------------------

def test_dashboard_is_a_grafana_dashboard_whose_queries_name_existing_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "bindpipe-overview" and dashboard["schemaVersion"] >= 36
    datasource_uid = re.search(r"uid: (\S+)", DATASOURCE_YAML.read_text()).group(1)
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    shown: set[str] = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == datasource_uid
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        for target in panel["targets"]:
            bindpipe, rabbitmq = metric_names(target["expr"])
            assert bindpipe or rabbitmq, (panel["title"], target["expr"])
            assert bindpipe <= set(metrics.METRIC_FAMILIES), (panel["title"], bindpipe - set(metrics.METRIC_FAMILIES))
            assert rabbitmq <= RABBITMQ_FAMILIES, (panel["title"], rabbitmq)
            assert target["datasource"]["uid"] == datasource_uid
            shown |= bindpipe
    for variable in dashboard["templating"]["list"]:
        bindpipe, rabbitmq = metric_names(variable["query"]["query"])
        assert bindpipe <= set(metrics.METRIC_FAMILIES) and rabbitmq <= RABBITMQ_FAMILIES
    assert shown == set(metrics.METRIC_FAMILIES)  # every family is on the dashboard


def test_grafana_provisioning_points_at_the_dashboards_folder() -> None:
    provider = DASHBOARD_PROVIDER_YAML.read_text()
    assert re.search(r"^apiVersion: 1$", provider, re.M) and re.search(r"^\s+type: file$", provider, re.M)
    path = re.search(r"^\s+path: (\S+)$", provider, re.M).group(1)
    assert path.endswith("/deploy/grafana/dashboards")
    datasource = DATASOURCE_YAML.read_text()
    assert re.search(r"^\s+type: prometheus$", datasource, re.M) and "url: http://127.0.0.1:9090" in datasource


# --- the metrics module ------------------------------------------------------------------------

EXERCISE_EVERY_METRIC = """
    from pipeline.observability import metrics as m
    m.STAGE_MESSAGES.labels("validate", "ok").inc()
    m.STAGE_DURATION.labels("validate").observe(0.01)
    m.BATCH_SIZE.labels("validate").observe(20)
    m.END_TO_END_LATENCY.observe(0.3)
    m.BINDINGS.labels("ovs", "bound").inc()
    m.BINDING_FAILURES.labels("no_agent").inc()
    m.DEAD_LETTERS.labels("validate", "bad_json").inc()
    m.PCI_DEVICES.labels("compute-1", "physnet1", "8086:1515", "available").set(4)
    m.EVENT_LOG_LAG.labels("validate").set(7)
    m.DEAD_LETTERS_WAITING.labels("validate").set(1)
    m.touch_loop("validate")
    m.worker_state(["validate"], broker=True, database=True, consuming=True)
    m.batch_done("validate")
    m.sample_process("worker-validate")
    m.BUILD_INFO.labels(**m.build_labels()).set(1)
"""


def exported_families(text: str) -> dict[str, dict[tuple, float]]:
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = re.sub(r"_(bucket|count|sum|created)$", "", sample.name)
            found.setdefault(name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


EXPORT = """
    from prometheus_client import generate_latest
    from pipeline.observability import metrics as m
    print(generate_latest(m.registry_for_export()).decode())
"""


def test_multiprocess_export_sums_processes_and_drops_the_live_gauges_of_dead_ones(tmp_path: Path) -> None:
    code = textwrap.dedent(EXERCISE_EVERY_METRIC) + "print('ready', flush=True)\ninput()\n"
    workers = [subprocess.Popen([sys.executable, "-c", code], env=child_env(BINDPIPE_METRICS_DIR=str(tmp_path)),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        assert [w.stdout.readline().strip() for w in workers] == ["ready", "ready"]
        families = exported_families(run_python(EXPORT, BINDPIPE_METRICS_DIR=str(tmp_path)).stdout)
        assert set(metrics.METRIC_FAMILIES) <= set(families)
        assert families["bindpipe_stage_messages_total"][(("outcome", "ok"), ("stage", "validate"))] == 2
        assert families["bindpipe_bindings_total"][(("outcome", "bound"), ("vif_type", "ovs"))] == 2
        assert families["bindpipe_event_log_lag"][(("stage", "validate"),)] == 7  # livemax: the max, not the sum
        # per process, as ProcessCollector cannot in multiprocess mode: one series per live pid
        pids = {str(w.pid) for w in workers}
        for family in ("bindpipe_process_resident_memory_bytes", "bindpipe_process_cpu_seconds",
                       "bindpipe_process_open_fds"):
            readings = {dict(labels)["pid"]: value for labels, value in families[family].items()}
            assert set(readings) == pids and all(value > 0 for value in readings.values()), (family, readings)
            assert {dict(labels)["process"] for labels in families[family]} == {"worker-validate"}
        assert {dict(labels)["pid"] for labels in families["bindpipe_worker_consuming"]} == pids
        [(build, one)] = families["bindpipe_build_info"].items()
        assert one == 1 and dict(build)["version"] == "0.1.0" and dict(build)["python"] == platform.python_version()
    finally:
        for worker in workers:
            worker.communicate("\n", timeout=30)
    families = exported_families(run_python(EXPORT, BINDPIPE_METRICS_DIR=str(tmp_path)).stdout)
    assert families["bindpipe_stage_messages_total"][(("outcome", "ok"), ("stage", "validate"))] == 2
    for live_gauge in ("bindpipe_event_log_lag", "bindpipe_pci_devices", "bindpipe_worker_last_loop_timestamp_seconds",
                       "bindpipe_process_resident_memory_bytes", "bindpipe_worker_consuming", "bindpipe_build_info"):
        assert not families.get(live_gauge), live_gauge


def test_single_process_mode_uses_the_default_registry() -> None:
    done = run_python(EXERCISE_EVERY_METRIC + """
    from prometheus_client import REGISTRY, generate_latest
    assert m.registry_for_export() is REGISTRY and m.metrics_dir() is None
    print(generate_latest(REGISTRY).decode())
    """)
    families = exported_families(done.stdout)
    assert set(metrics.METRIC_FAMILIES) <= set(families)
    assert families["bindpipe_event_log_lag"][(("stage", "validate"),)] == 7


def test_configure_metrics_dir_after_import_switches_to_multiprocess(tmp_path: Path) -> None:
    run_python(f"""
        import os
        from pipeline.observability import metrics as m
        assert m.metrics_dir() is None
        assert m.configure_metrics_dir(None) is None
        assert m.configure_metrics_dir({str(tmp_path)!r}) == {str(tmp_path)!r}
        assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == {str(tmp_path)!r}
        m.END_TO_END_LATENCY.observe(1.5)
        m.STAGE_MESSAGES.labels("select", "ok").inc(3)
        assert m.configure_metrics_dir({str(tmp_path)!r}) == {str(tmp_path)!r}  # same again: fine
        try:
            m.configure_metrics_dir({str(tmp_path / "other")!r})
        except RuntimeError:
            pass
        else:
            raise AssertionError("switching directories after use must fail")
    """)
    done = run_python(EXPORT, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    families = exported_families(done.stdout)
    assert families["bindpipe_stage_messages_total"][(("outcome", "ok"), ("stage", "select"))] == 3
    assert families["bindpipe_end_to_end_latency_seconds"][(("le", "2.5"),)] == 1


def test_reap_dead_processes_drops_only_dead_live_gauges(tmp_path: Path) -> None:
    run_python(EXERCISE_EVERY_METRIC, BINDPIPE_METRICS_DIR=str(tmp_path))
    live_files = sorted(p.name for p in tmp_path.glob("gauge_livemax_*.db"))
    assert len(live_files) == 1
    dead_pid = int(live_files[0].split("_")[-1].removesuffix(".db"))
    assert metrics.reap_dead_processes(str(tmp_path)) == [dead_pid]
    assert not list(tmp_path.glob("gauge_livemax_*.db"))
    assert list(tmp_path.glob("counter_*.db")) and list(tmp_path.glob("histogram_*.db"))


def test_metrics_server_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    run_python(EXERCISE_EVERY_METRIC, BINDPIPE_METRICS_DIR=str(tmp_path))
    server = subprocess.Popen(
        [sys.executable, "-c", "from pipeline.observability import metrics as m; s = m.make_metrics_server(0, '127.0.0.1');"
                               "print(s.server_port, flush=True); s.server_close();"
                               "import sys; m.serve(int(sys.stdin.readline()), '127.0.0.1')"],
        env=child_env(BINDPIPE_METRICS_DIR=str(tmp_path)), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        server.stdin.write(f"{port}\n")
        server.stdin.flush()
        deadline = time.monotonic() + 20
        while True:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert 'bindpipe_stage_messages_total{outcome="ok",stage="validate"} 1.0' in body
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=10) == 0
    finally:
        if server.poll() is None:
            server.kill()


def test_make_metrics_server_answers_in_process() -> None:
    server = metrics.make_metrics_server(0, "127.0.0.1")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        metrics.STAGE_MESSAGES.labels("compose", "ok").inc()
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/", timeout=5).read().decode()
        assert "bindpipe_stage_messages_total" in body
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("text", "category"), [
    ("no Open vSwitch agent registered on host 'compute-1'", "no_agent"),
    ("no OVN chassis for host 'numa-host'", "no_agent"),
    ("NIC Switch agent on compute-1 is dead", "agent_dead"),
    ("vnic_type direct prohibited by configuration", "vnic_type_prohibited"),
    ("vnic_type baremetal not supported", "vnic_type_unsupported"),
    ("Open vSwitch agent on h does not report baremetal_smartnic", "vnic_type_unsupported"),
    ("physnet1 not in bridge_mappings", "physnet_unmapped"),
    ("physnet2 not in ovn-bridge-mappings of chassis compute-1", "physnet_unmapped"),
    ("network type vxlan not supported by NIC Switch agent", "network_type_unsupported"),
    ("vnic_type direct without the switchdev capability", "switchdev_mismatch"),
    ("vnic_type direct-physical without switchdev is an OVN external port (left to an SR-IOV driver)",
     "switchdev_mismatch"),
    ("raised KeyError: 'device_mappings'", "driver_error"),
    ("InvalidInput: binding:profile: 'x' is not a dictionary", "invalid_input"),
    ("PolicyNotAuthorized: binding:profile: only the service role may set it", "policy"),
    ("ConfigError: ml2.sriov_agent_required", "config_error"),
    ("ComputeResourcesUnavailable: port p on h: pci_claim failed: every suitable device is in use or blocked",
     "pci_exhausted"),
    ("ComputeResourcesUnavailable: numa_fit failed: matching devices exist, but even on an idle host none satisfies "
     "the NUMA policy", "pci_numa_affinity"),
    ("ComputeResourcesUnavailable: claim_test failed: no tracked device matches the request spec []",
     "pci_no_matching_device"),
    ("PciDeviceNotFound: binding:profile.pci_slot 'zz' is not a PCI address", "pci_pinned_device"),
    ("PciDeviceInvalidStatus: port p: pci_slot 0000:81:00.2 is allocated (held by port q)", "pci_pinned_device"),
    ("no_vf_available", "pci_exhausted"),
    ("pci_exhausted", "pci_exhausted"),
    ("network has no segments", "other"),
    ("", "other"),
])
def test_failure_reason_category(text: str, category: str) -> None:
    assert metrics.failure_reason_category(text) == category
    assert category in metrics.FAILURE_REASONS


# --- the logging module ------------------------------------------------------------------------

LOG_SOME_LINES = """
    import logging, structlog
    from pipeline.observability.logging import bind_event_context, configure_logging
    configure_logging({fmt!r}, "INFO")
    bind_event_context(event_id="e-1", port_id="p-1", host="compute-1", stage="validate", redelivered=False)
    log = structlog.get_logger("bindpipe.test")
    log.info("connected", url="amqp://bindpipe-worker:s3cret@127.0.0.1:5672/bindpipe", password="hunter2",
             signing_keys={{"k1": "topsecret"}}, routing_key="port.create", api_token="abc")
    logging.getLogger("kombu.connection").warning("retrying %s", "amqp://guest:guest@127.0.0.1//")
    log.debug("not shown at INFO")
    try:
        raise ConnectionError("cannot reach postgresql+psycopg://bindpipe:dbpass@db/bindpipe")
    except ConnectionError:
        log.exception("database down")
    bind_event_context(stage="select")
    log.info("next message")
"""


def test_json_logs_are_one_redacted_stream_with_context() -> None:
    done = run_python(LOG_SOME_LINES.format(fmt="json"))
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert done.stdout == ""
    assert [line["event"] for line in lines[:2]] == ["connected", "retrying amqp://guest:***@127.0.0.1//"]
    first = lines[0]
    assert first["url"] == "amqp://bindpipe-worker:***@127.0.0.1:5672/bindpipe"
    assert first["password"] == first["signing_keys"] == first["api_token"] == "***"
    assert first["routing_key"] == "port.create"
    assert (first["event_id"], first["port_id"], first["host"], first["stage"]) == ("e-1", "p-1", "compute-1", "validate")
    assert first["level"] == "info" and first["timestamp"].endswith("Z")
    assert lines[1]["logger"] == "kombu.connection" and lines[1]["event_id"] == "e-1"
    assert "dbpass" not in done.stderr and "s3cret" not in done.stderr and "hunter2" not in done.stderr
    assert "bindpipe:***@db" in lines[2]["exception"]
    assert lines[3] == {**lines[3], "event": "next message", "stage": "select"} and "event_id" not in lines[3]
    assert len(lines) == 4  # the debug line is filtered


def test_a_lazily_bound_event_context_is_built_only_for_a_line_written() -> None:
    from pipeline.observability.logging import bind_event_context_lazily, clear_event_context, merge_event_context

    built = []

    def context() -> dict:
        built.append(1)
        return {"event_id": "e-2", "port_id": "p-2", "host": None, "stage": "compose"}

    bind_event_context_lazily(context)
    try:
        assert built == []
        line = merge_event_context(None, "info", {"event": "binding outcome", "port_id": "p-own"})
        assert line == {"event": "binding outcome", "port_id": "p-own", "event_id": "e-2", "stage": "compose"}
        assert built == [1]
    finally:
        clear_event_context()
    assert merge_event_context(None, "info", {"event": "idle"}) == {"event": "idle"}


def test_console_logs_are_plain_and_redacted() -> None:
    done = run_python(LOG_SOME_LINES.format(fmt="console"))
    assert "\x1b[" not in done.stderr  # no colours when stderr is not a terminal
    assert "connected" in done.stderr and "event_id=e-1" in done.stderr
    for secret in ("s3cret", "hunter2", "topsecret", "dbpass"):
        assert secret not in done.stderr
    assert "Traceback (most recent call last)" in done.stderr


def test_configure_logging_rejects_unknown_formats() -> None:
    from pipeline.observability.logging import configure_logging

    with pytest.raises(ValueError):
        configure_logging("xml")


def test_bounded_keeps_label_values_in_their_set() -> None:
    assert metrics.bounded("bad_json", metrics.DEAD_LETTER_REASONS) == "bad_json"
    assert metrics.bounded("port 1234 exploded", metrics.DEAD_LETTER_REASONS) == "other"
    assert metrics.bounded(None, metrics.STAGES, default="unknown") == "unknown"


def test_observe_each_counts_as_that_many_observations(tmp_path: Path) -> None:
    """In multiprocess mode, as the workers run: the batch's share per message, written once."""
    done = run_python("""
        from prometheus_client import Histogram, generate_latest
        from pipeline.observability import metrics as m
        one, many = (Histogram(f"h_{n}", "d", ["stage"], buckets=(0.001, 0.01, 0.1)) for n in ("one", "many"))
        for amount, count in ((0.0005, 3), (0.05, 7), (0.5, 2), (0.01, 1)):
            for _ in range(count):
                one.labels("s").observe(amount)
            m.observe_each(many.labels("s"), amount, count)
        print(generate_latest(m.registry_for_export()).decode())
    """, BINDPIPE_METRICS_DIR=str(tmp_path))
    families = exported_families(done.stdout)
    assert families["h_one"] == families["h_many"]
    assert families["h_many"][(("le", "0.01"), ("stage", "s"))] == 4 and families["h_many"][(("stage", "s"),)] > 1.3
