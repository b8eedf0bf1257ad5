"""Each worker answers a readiness check (issue #13, part 6): its facts as metrics, ``/healthz`` on
the metrics server, ``bindpipe health``, and the watchdog that ends stalled workers. The whole of
it under real supervisord is in test_supervisord.py."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

BINDPIPE = str(Path(sys.executable).with_name("bindpipe"))
NOW = 1_000_000.0


def facts(broker=1, database=1, consuming=1, loop_age=1.0, batch_age=None) -> dict[str, float]:
    found = {"broker": broker, "database": database, "consuming": consuming, "loop_at": NOW - loop_age}
    if batch_age is not None:
        found["batch_at"] = NOW - batch_age
    return found


def test_a_worker_is_ready_when_connected_reaching_the_database_consuming_and_turning():
    from pipeline.observability.health import assess

    ready = assess(facts(batch_age=3.5), 11, "select", NOW, stall_seconds=60)
    assert ready.ready and not ready.stalled and (ready.loop_age, ready.batch_age) == (1.0, 3.5)

    waiting = assess(facts(broker=0, consuming=0, loop_age=300), 12, "select", NOW, 60)
    assert waiting.problems == ["not connected to the broker", "not consuming"] and not waiting.stalled

    no_database = assess(facts(database=0), 13, "select", NOW, 60)
    assert no_database.problems == ["database unreachable at its last look"] and not no_database.stalled

    stalled = assess(facts(loop_age=61), 14, "allocate", NOW, 60)
    assert stalled.stalled and stalled.problems == ["consume loop stalled for 61 s"]


def test_the_report_is_ready_only_when_every_process_of_the_stage_is():
    from pipeline.observability.health import assess, report

    processes = [assess(facts(), 1, "validate", NOW, 60), assess(facts(loop_age=90), 2, "validate", NOW, 60),
                 assess(facts(), 3, "compose", NOW, 60)]
    whole = report(processes)
    assert whole["ready"] is False and whole["stages"] == {"validate": False, "compose": True}
    assert report(processes, "compose")["ready"] is True
    assert report(processes, "select") == {"ready": False, "stages": {}, "processes": []}  # none running


def test_the_watchdog_aborts_a_stalled_worker_then_kills_it_if_it_lingers():
    from pipeline.observability.health import Watchdog, assess

    sent: list[tuple[int, int]] = []
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dog = Watchdog(stall_seconds=60, grace_seconds=10, kill=lambda pid, sig: sent.append((pid, sig)),
                   is_worker=lambda pid: pid == sleeper.pid and sleeper.poll() is None)
    try:
        stalled = assess(facts(loop_age=120), sleeper.pid, "allocate", NOW, 60)
        waiting = assess(facts(broker=0, consuming=0, loop_age=300), os.getppid(), "select", NOW, 60)
        assert dog.check([stalled, waiting], now=0.0) == [sleeper.pid]
        assert sent == [(sleeper.pid, signal.SIGABRT)]
        assert dog.check([stalled], now=5.0) == []  # aborted once; it has its grace to die
        assert dog.check([stalled], now=10.0) == [sleeper.pid] and sent[-1] == (sleeper.pid, signal.SIGKILL)
    finally:
        sleeper.kill()
        sleeper.wait()
    dog.aborted[sleeper.pid] = 20.0
    assert dog.check([], now=21.0) == [] and dog.aborted == {}  # gone by itself: forgotten
    assert dog.check([stalled], now=22.0) == []  # facts left by a process that is gone: nothing to signal


WORKER_FACTS = """
    import sys
    from pipeline.observability import metrics as m
    m.touch_loop(sys.argv[1])
    m.worker_state([sys.argv[1]], broker=True, database=sys.argv[2] == "up", consuming=True)
    print("ready", flush=True)
    input()
"""


def test_health_command_and_healthz_read_every_process_of_the_machine(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BINDPIPE_", "PROMETHEUS_"))}
    env["BINDPIPE_METRICS_DIR"] = str(tmp_path)
    code = textwrap.dedent(WORKER_FACTS)
    workers = {name: subprocess.Popen([sys.executable, "-c", code, stage, database], env=env, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
               for name, stage, database in (("a", "validate", "up"), ("b", "select", "up"), ("c", "select", "down"))}
    try:
        assert [w.stdout.readline().strip() for w in workers.values()] == ["ready"] * 3
        done = subprocess.run([BINDPIPE, "health", "--json"], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, done.stderr
        summary = json.loads(done.stdout)
        assert summary["stages"] == {"validate": True, "select": False}
        by_pid = {p["pid"]: p for p in summary["processes"]}
        assert set(by_pid) == {w.pid for w in workers.values()}
        assert by_pid[workers["c"].pid]["problems"] == ["database unreachable at its last look"]
        done = subprocess.run([BINDPIPE, "health", "--stage", "validate"], env=env, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0 and done.stdout.startswith(f"validate  pid {workers['a'].pid}"), done.stdout

        from pipeline.observability.health import healthz_app
        from pipeline.observability.metrics import make_metrics_server

        server = make_metrics_server(0, "127.0.0.1", {"/healthz": healthz_app(60.0, _registry(tmp_path))})
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_port}/healthz"
        try:
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(url, timeout=10)
            assert refused.value.code == 503 and json.loads(refused.value.read())["stages"]["select"] is False
            with urllib.request.urlopen(url + "?stage=validate", timeout=10) as answer:
                assert answer.status == 200 and json.loads(answer.read())["ready"] is True
        finally:
            server.shutdown()
            server.server_close()
    finally:
        for worker in workers.values():
            worker.communicate("\n", timeout=30)
    time.sleep(0.1)
    done = subprocess.run([BINDPIPE, "health"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "no worker process reports on this machine" in done.stdout


def _registry(path: Path):
    """The machine's aggregate of ``path`` (this test process itself stays in single-process mode)."""
    from prometheus_client import CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(path))
    return registry


def test_health_needs_the_metrics_directory(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BINDPIPE_", "PROMETHEUS_"))}
    done = subprocess.run([BINDPIPE, "health"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "set BINDPIPE_METRICS_DIR" in done.stderr, done.stderr
