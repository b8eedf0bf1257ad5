"""The large fault run: ≥ 5,000 events through the real pipeline under every fault, then the
Jepsen-style accounting (see docs/faults.md)::

    .venv/bin/python scripts/faults.py                  # the large plan (about 4 minutes)
    .venv/bin/python scripts/faults.py --plan reduced   # what tests/faults/test_faults.py runs
    .venv/bin/python scripts/faults.py --events 8000 --rate 40 --seed 11 --json summary.json
    .venv/bin/python scripts/faults.py --plan fast      # 20,000 events at 400/s
    .venv/bin/python scripts/faults.py --plan duplicates   # or reject-crash, pg-outage: bug reproductions

It needs RabbitMQ (``rabbitmqctl`` usable) and PostgreSQL as the tests do (``BINDPIPE_TEST_BROKER_URL``,
``BINDPIPE_TEST_DATABASE_URL``), creates a vhost and a database of its own and removes them at the end
(``--keep`` keeps them); the run directory with every worker's log is kept and printed (``run_dir``). **It restarts the shared
RabbitMQ node and PostgreSQL cluster** (twice each in the large plan): do not run it beside anything
that needs them. Exits 0 when the checker finds nothing wrong.
"""

import argparse
import json
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.faults.harness import PLANS, print_report, run  # noqa: E402
from tests.services import fresh_database, fresh_vhost  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", choices=sorted(PLANS), default="large",
                        help="large (default), fast (the large plan at 400 events/s), reduced (the CI run), or "
                             "one of the bug reproductions of docs/faults.md: duplicates, reject-crash, pg-outage")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--events", type=int, help="workload events (large plan; default 5200)")
    parser.add_argument("--rate", type=float, help="workload events per second (large plan; default 30)")
    parser.add_argument("--crash-spec", help="BINDPIPE_FAULT_CRASH for every worker start without a planned crash, "
                                             "e.g. 'after_dead_letter=0.05' (see tests/faults/worker.py)")
    parser.add_argument("--json", type=Path, help="write the summary and figures to this file")
    parser.add_argument("--keep", action="store_true", help="keep the vhost, the database and the run directory")
    args = parser.parse_args()

    if args.plan in ("large", "fast"):
        options = {k: v for k, v in (("seed", args.seed), ("events", args.events), ("rate", args.rate)) if v is not None}
        plan = PLANS[args.plan](**options)
    else:
        plan = PLANS[args.plan](**({"seed": args.seed} if args.seed is not None else {}))
    if args.crash_spec is not None:
        plan.crash_spec = args.crash_spec
    tag = f"faults{uuid.uuid4().hex[:8]}"
    broker_url, delete_vhost = fresh_vhost(tag)
    database_url, drop_database = fresh_database(tag)
    try:
        summary, figures = run(plan, broker_url, database_url, keep_run_dir=True)
    finally:
        if not args.keep:
            drop_database()
            delete_vhost()
    print_report(summary, figures)
    if args.json:
        args.json.write_text(json.dumps({"summary": {k: v for k, v in summary.items() if k != "status"},
                                         "figures": figures}, indent=2, default=str))
    sound = not (figures["unexpected_exits"] or figures["missing_hooks"] or figures["nemesis_errors"])
    return 0 if summary["valid"] and sound else 1


if __name__ == "__main__":
    sys.exit(main())
