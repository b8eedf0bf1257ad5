"""What each stage costs in-process: the four stage handlers, no broker, on PostgreSQL or SQLite.

    .venv/bin/python scripts/stage_costs.py [--ports 2000] [--batch 1000] [--sqlite] [--profile STAGE]

The benchmark's topology and port mix (``scripts/benchmark.py``) are fed through validate, select,
allocate and compose in turn, a batch at a time in one transaction each, with the hand-offs
encoded and decoded between the stages as the workers do (``HANDOFF_JOBS`` jobs a message).
Prints µs per job of each stage (wall time, so the database's own time counts), with the GC
tuned as in a worker. ``--profile``
prints a cProfile of one stage. This is the figure ``benchmarks/RESULTS.md`` gives per change:
cheap to run, free of the broker, and steadier than the whole pipeline's rate.

PostgreSQL runs in a fresh database beside ``BINDPIPE_TEST_DATABASE_URL``'s (dropped at the end).
"""

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmark import ports, topology  # noqa: E402

from pipeline.client import BindingClient  # noqa: E402
from pipeline.db import create_schema, make_engine, run_transaction  # noqa: E402
from pipeline.settings import Settings  # noqa: E402
from pipeline.workers.consumer import tune_gc  # noqa: E402
from pipeline.workers.handlers import HANDLERS  # noqa: E402
from pipeline.workers.messages import HANDOFF_JOBS, handoff_messages  # noqa: E402
from pipeline.workers.topology import STAGE_EXCHANGE, STAGES  # noqa: E402
from tests.services import fresh_database  # noqa: E402


def run_stage(engine, handler, bodies: list[bytes], per_batch: int) -> tuple[list[bytes], float, float]:  # noqa: ANN001
    """``bodies`` through one stage, ``per_batch`` messages a transaction: its hand-offs, seconds
    (wall clock, PostgreSQL's work included) and this process's CPU seconds."""
    out: list[bytes] = []
    seconds = 0.0
    cpu_started = time.process_time()
    for first in range(0, len(bodies), per_batch):
        started = time.perf_counter()
        items = [item for body in bodies[first:first + per_batch] for item in handler.decode(body, {}, "application/json")]
        outputs = run_transaction(engine, lambda session, i=items: handler.handle(session, i)).publishes
        out += [body for exchange, _, body in handoff_messages(outputs) if exchange == STAGE_EXCHANGE.name]
        seconds += time.perf_counter() - started
    return out, seconds, time.process_time() - cpu_started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ports", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=Settings.model_fields["batch_size"].default,
                        help="jobs per transaction (default: the workers')")
    parser.add_argument("--sqlite", action="store_true", help="the embedded database instead of PostgreSQL")
    parser.add_argument("--profile", choices=STAGES, help="print a cProfile of this stage")
    args = parser.parse_args()
    drop = None
    if args.sqlite:
        url = f"sqlite:///{tempfile.mkdtemp()}/stage_costs.sqlite"
    else:
        url, drop = fresh_database(f"costs{uuid.uuid4().hex[:8]}")
    try:
        engine = make_engine(url)
        create_schema(engine)
        settings = Settings(database_url=url)
        client = BindingClient(settings=settings)  # only builds envelopes: never connects
        handlers = {stage: HANDLERS[stage](settings) for stage in STAGES}
        encode = [orjson.dumps(e.model_dump(mode="json")) for e in topology(client, 50, 20)]
        run_stage(engine, handlers["validate"], encode, args.batch)
        bodies = [orjson.dumps(e.model_dump(mode="json")) for e in ports(client, 0, args.ports, 50, 20)]
        tune_gc(args.batch)  # as a worker does once started
        total = total_cpu = 0.0
        for stage in STAGES:
            per_batch = args.batch if stage == "validate" else max(1, args.batch // HANDOFF_JOBS)
            profile = cProfile.Profile() if stage == args.profile else None
            if profile:
                profile.enable()
            bodies, seconds, cpu = run_stage(engine, handlers[stage], bodies, per_batch)
            if profile:
                profile.disable()
                stats = pstats.Stats(profile).sort_stats(os.environ.get("SORT", "cumulative"))
                stats.print_stats(int(os.environ.get("TOP", "40")))
                if os.environ.get("CALLERS"):
                    stats.print_callers(os.environ["CALLERS"])
                if os.environ.get("CALLEES"):
                    stats.print_callees(os.environ["CALLEES"])
            total += seconds
            total_cpu += cpu
            per_job = 1e6 / args.ports
            print(f"{stage:<9} {seconds * per_job:6.0f} µs/job ({cpu * per_job:.0f} of them Python's CPU)")
        print(f"{'total':<9} {total / args.ports * 1e6:6.0f} µs/binding ({total_cpu / args.ports * 1e6:.0f} Python's "
              f"CPU; {args.ports / total:.0f}/s in one process, "
              f"{'SQLite' if args.sqlite else 'PostgreSQL'})")
        engine.dispose()
    finally:
        if drop:
            drop()


if __name__ == "__main__":
    main()
