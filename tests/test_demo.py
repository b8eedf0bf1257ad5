"""``bindpipe demo`` as a newcomer runs it: the installed command, no servers, in an empty folder;
then the ``explain`` command it suggests, typed as printed (issue #13, part 5)."""

import os
import re
import subprocess
import sys
from pathlib import Path

VENV = Path(sys.executable).parent.parent  # the virtualenv running the tests, scripts/demo's .venv
BINDPIPE = str(VENV / "bin" / "bindpipe")


def newcomer_environment() -> dict[str, str]:
    """No BINDPIPE_* (the embedded default), and the virtualenv not activated: scripts/demo does not."""
    bin_dir = str(VENV / "bin")
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != bin_dir)
    return {**{k: v for k, v in os.environ.items() if not k.startswith("BINDPIPE_") and k != "VIRTUAL_ENV"},
            "PATH": path}


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BINDPIPE, *args], cwd=cwd, env={**newcomer_environment(), **env}, capture_output=True,
                          text=True, timeout=120)


def table(output: str, heading: str) -> dict[str, int]:
    """The rows of one of the summary's tables: name -> ports."""
    block = output.split(heading, 1)[1].split("\n\n", 1)[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^  (\S+) +(\d+)", block, re.MULTILINE)}


def test_the_demo_binds_the_sample_cloud_and_says_why_ports_failed(tmp_path: Path):
    done = run(["demo"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no progress lines when stderr is not a terminal
    out = done.stdout
    assert out.startswith("318 events -> 300 binding results in ")
    bound, failed = table(out, "bound, by vif_type"), table(out, "not bound, by reason")
    assert bound.pop("total") == sum(bound.values()) and failed.pop("total") == sum(failed.values())
    assert sum(bound.values()) + sum(failed.values()) == 300
    # The sample cloud: OVS and SR-IOV ports bind; its SR-IOV hosts run out of VFs, one NIC agent
    # is down and one host has no agent (see pipeline/data/demo_topology.json).
    assert bound["ovs"] > 0 and bound["hw_veb"] > 0
    assert set(failed) == {"pci_exhausted", "agent_dead", "no_agent"}
    assert (tmp_path / "bindpipe-demo.sqlite").exists()


def test_the_command_the_demo_prints_works_as_printed_from_the_readmes_directory(tmp_path: Path):
    """As after `bash scripts/demo`: run as .venv/bin/bindpipe from the checkout, venv not activated."""
    (tmp_path / ".venv").symlink_to(VENV)
    env = newcomer_environment()
    done = subprocess.run([".venv/bin/bindpipe", "demo", "--ports", "100"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    suggested = done.stdout.rstrip().rsplit("\n", 1)[-1].strip()
    assert re.fullmatch(r"BINDPIPE_DATABASE_URL=sqlite:///\S+/bindpipe-demo\.sqlite \.venv/bin/bindpipe explain \S+",
                        suggested), suggested
    explained = subprocess.run(["bash", "-c", suggested], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=120)
    assert explained.returncode == 0, explained.stderr
    port = suggested.rsplit(" ", 1)[1]
    assert explained.stdout.startswith(f"port {port}: FAILED: ") and "history (oldest first" in explained.stdout

    # the same line from elsewhere: the database is named by its absolute path
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    line = suggested.replace(".venv/bin/bindpipe", "../.venv/bin/bindpipe")
    again = subprocess.run(["bash", "-c", line], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout == explained.stdout, again.stderr
    assert list(elsewhere.iterdir()) == []
