"""Long work shows progress on a terminal, and nothing elsewhere (issue #13, part 6): ``demo``,
``migrate`` and ``replay events`` run under a pseudo-terminal as stderr."""

import io
import os
import pty
import subprocess
import sys
from pathlib import Path


BINDPIPE = str(Path(sys.executable).with_name("bindpipe"))


def on_a_terminal(args: list[str], cwd: Path, **env: str) -> tuple[int, str, str]:
    """(exit code, stdout, what the terminal on stderr showed)."""
    master, slave = pty.openpty()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BINDPIPE_")}
    process = subprocess.Popen([BINDPIPE, *args], cwd=cwd, env={**clean, **env}, stdout=subprocess.PIPE,
                               stderr=slave, text=True)
    os.close(slave)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the other end closed: the process is gone
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    out = process.stdout.read()
    process.stdout.close()
    return process.wait(timeout=60), out, shown.decode(errors="replace")


def final_lines(shown: str) -> list[str]:
    """What stays on the terminal: each line as last redrawn."""
    return [line.rsplit("\r", 1)[-1].replace("\x1b[2K", "") for line in shown.replace("\r\n", "\n").split("\n")]


def test_demo_migrate_and_replay_show_progress_on_a_terminal(tmp_path: Path):
    code, out, shown = on_a_terminal(["demo", "--ports", "1000"], tmp_path)
    assert code == 0, shown
    lines = final_lines(shown)
    assert any(line.startswith("events published: 1018/1018 (100%) in ") for line in lines), lines
    assert any(line.startswith("ports bound: 1000/1000 (100%) in ") for line in lines), lines
    assert out.startswith("1018 events -> 1000 binding results")

    database = f"sqlite:///{tmp_path / 'bindpipe-demo.sqlite'}"
    code, out, shown = on_a_terminal(["replay", "events", "--from", "1"], tmp_path, BINDPIPE_DATABASE_URL=database)
    assert code == 0, shown
    assert any(line.startswith("events replayed: 1018/1018 (100%) in ") for line in final_lines(shown)), shown

    code, out, shown = on_a_terminal(["migrate"], tmp_path, BINDPIPE_DATABASE_URL=f"sqlite:///{tmp_path / 'new.db'}")
    assert code == 0, shown
    revisions = len(list((Path(__file__).parents[1] / "pipeline" / "migrations" / "versions").glob("0*.py")))
    assert any(line.startswith(f"migrations applied: {revisions}/{revisions} (100%) in ")
               for line in final_lines(shown)), shown


def test_nothing_is_written_where_stderr_is_not_a_terminal(tmp_path: Path):
    from pipeline.progress import progress

    stream = io.StringIO()
    with progress("work", 10, stream) as shown:
        for done in range(11):
            shown.update(done)
    assert stream.getvalue() == ""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BINDPIPE_")}
    done = subprocess.run([BINDPIPE, "migrate"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**clean, "BINDPIPE_DATABASE_URL": f"sqlite:///{tmp_path / 'new.db'}"})
    assert done.returncode == 0 and "migrations applied" not in done.stderr + done.stdout


def test_a_terminal_sees_one_line_redrawn_at_most_five_times_a_second(monkeypatch):
    from pipeline.progress import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    clock = iter([0.0, 0.0, 0.1, 0.3, 0.35, 0.6, 0.6])
    monkeypatch.setattr("pipeline.progress.time.monotonic", lambda: next(clock))
    terminal = Terminal()
    shown = Progress("ports bound", 4, terminal)  # started at 0.0
    for done in (1, 2, 3, 4):  # at 0.0 (drawn), 0.1 (too soon), 0.3 (drawn), 0.35 (too soon)
        shown.update(done)
    shown.finish()  # at 0.6, and 0.6 for the time it took
    assert terminal.getvalue() == ("\r\x1b[2Kports bound: 1/4 (25%)\r\x1b[2Kports bound: 3/4 (75%)"
                                   "\r\x1b[2Kports bound: 4/4 (100%) in 0.6 s\n")
