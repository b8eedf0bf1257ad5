"""``bindpipe demo`` as a newcomer runs it: the installed command, no servers, in an empty folder;
then the ``explain`` command it suggests."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

BINDPIPE = str(Path(sys.executable).with_name("bindpipe"))


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BINDPIPE_")}  # the embedded default
    return subprocess.run([BINDPIPE, *args], cwd=cwd, env={**clean, **env}, capture_output=True, text=True,
                          timeout=120)


def table(output: str, heading: str) -> dict[str, int]:
    """The rows of one of the summary's tables: name -> ports."""
    block = output.split(heading, 1)[1].split("\n\n", 1)[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^  (\S+) +(\d+)", block, re.MULTILINE)}


def test_the_demo_binds_the_sample_cloud_and_says_why_ports_failed(tmp_path: Path):
    done = run(["demo"], tmp_path)
    assert done.returncode == 0, done.stderr
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

    suggested = out.rsplit("\n", 2)[-2].strip()  # BINDPIPE_DATABASE_URL=... bindpipe explain PORT
    env_part, command = suggested.split(" bindpipe ", 1)
    name, url = env_part.split("=", 1)
    explained = run(shlex.split(command), tmp_path, **{name: url})
    assert explained.returncode == 0, explained.stderr
    assert "FAILED: PCI allocation on sriov-" in explained.stdout and "ComputeResourcesUnavailable" in explained.stdout
