"""``bindpipe worker STAGE --concurrency N``: N worker processes of one stage under one parent.

The parent only starts, watches and stops its children: SIGTERM/SIGINT are passed on (each child
finishes its batch and acks it), and a child that dies is started again after a short pause, so
one crash does not take the other N-1 down. Under supervisord, ``numprocs`` does the same job
one level up; use one or the other.
"""

import multiprocessing
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess

import structlog

log = structlog.get_logger(__name__)
RESTART_PAUSE = 1.0


def run_processes(child: Callable[[str], None], stage: str, count: int) -> int:
    """``count`` processes running ``child(stage)`` (a module-level function: they are spawned)."""
    context = multiprocessing.get_context("spawn")
    stopping: list[int] = []

    def start() -> BaseProcess:
        process = context.Process(target=child, args=(stage,), name=f"bindpipe-{stage}", daemon=False)
        process.start()
        return process

    def stop(signum: int, _frame: object) -> None:
        stopping.append(signum)
        for process in children:
            if process.is_alive():
                process.terminate()  # SIGTERM: the child's own graceful stop

    children = [start() for _ in range(count)]
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping:
        wait([p.sentinel for p in children], timeout=1.0)
        for i, process in enumerate(children):
            if not process.is_alive() and not stopping:
                log.warning("worker process died, starting another", stage=stage, pid=process.pid,
                            exitcode=process.exitcode)
                time.sleep(RESTART_PAUSE)
                children[i] = start()
    for process in children:
        process.join()
    return 0
