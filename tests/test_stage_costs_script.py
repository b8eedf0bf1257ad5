"""``scripts/stage_costs.py`` (the per-stage figures of benchmarks/RESULTS.md) keeps working."""

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "stage_costs.py"


def test_stage_costs_measures_every_stage_on_sqlite():
    done = subprocess.run([sys.executable, str(SCRIPT), "--ports", "60", "--batch", "20", "--sqlite"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["validate", "select", "allocate", "compose", "total"]
    figures = [int(re.search(r"(\d+) µs/", line)[1]) for line in lines]
    assert all(f > 0 for f in figures) and abs(figures[-1] - sum(figures[:-1])) <= 4  # each one rounded
