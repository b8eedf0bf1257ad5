"""A small TCP proxy (the toxiproxy role of nameko's tests) between the workers and RabbitMQ/PostgreSQL.

Run as a process of its own, so its byte pumping never competes with the harness for the GIL::

    python -m tests.faults.proxy amqp=127.0.0.1:5672 pg=127.0.0.1:5432

It prints ``READY amqp=<port> pg=<port>`` (ephemeral listening ports on 127.0.0.1), then reads
commands on standard input, one per line, and answers each with one line:

``cut NAME|all``         abort every open connection of the route(s) at once (both sides see the
                         connection drop, as on a network reset); answers ``OK cut <n>``
``hold NAME|all SECS``   stop forwarding for SECS seconds (a blackhole: bytes wait, nothing is
                         closed), then go on; answers ``OK hold``
``refuse NAME|all SECS`` abort new connections for SECS seconds (the service looks down)
``stats``                ``OK {json}``: connections open and accepted per route
``quit``                 exit

:class:`Proxy` below starts and drives it from the harness.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class Route:
    def __init__(self, name: str, host: str, port: int):
        self.name, self.host, self.port = name, host, port
        self.pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.accepted = 0
        self.cut_total = 0
        self.hold_until = 0.0
        self.refuse_until = 0.0
        self.listen_port = 0

    async def start(self) -> None:
        server = await asyncio.start_server(self.handle, "127.0.0.1", 0, backlog=256)
        self.listen_port = server.sockets[0].getsockname()[1]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if time.monotonic() < self.refuse_until:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self.pairs.add(pair)
        try:
            await asyncio.gather(self.pump(reader, up_writer), self.pump(up_reader, writer))
        finally:
            self.pairs.discard(pair)
            for w in pair:
                w.transport.abort()

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                while time.monotonic() < self.hold_until:
                    await asyncio.sleep(0.02)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()  # one side gone: the other goes too

    def cut(self) -> int:
        pairs = list(self.pairs)
        for client, upstream in pairs:
            client.transport.abort()
            upstream.transport.abort()
        self.cut_total += len(pairs)
        return len(pairs)


async def serve(routes: dict[str, Route]) -> None:
    for route in routes.values():
        await route.start()
    print("READY " + " ".join(f"{n}={r.listen_port}" for n, r in routes.items()), flush=True)
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[str] = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(commands.put_nowait, line.strip())
        loop.call_soon_threadsafe(commands.put_nowait, "quit")

    threading.Thread(target=read_stdin, daemon=True).start()
    while True:
        words = (await commands.get()).split()
        if not words:
            continue
        verb, args = words[0], words[1:]
        chosen = list(routes.values()) if args and args[0] == "all" else [routes[a] for a in args[:1] if a in routes]
        if verb == "quit":
            for route in routes.values():
                route.cut()
            print("OK quit", flush=True)
            return
        if verb == "cut":
            print(f"OK cut {sum(r.cut() for r in chosen)}", flush=True)
        elif verb in ("hold", "refuse"):
            until = time.monotonic() + float(args[1])
            for route in chosen:
                setattr(route, f"{verb}_until", until)
            print(f"OK {verb}", flush=True)
        elif verb == "stats":
            print("OK " + json.dumps({n: {"open": len(r.pairs), "accepted": r.accepted, "cut": r.cut_total}
                                      for n, r in routes.items()}), flush=True)
        else:
            print(f"ERR unknown command {verb!r}", flush=True)


def main(argv: list[str]) -> None:
    routes = {}
    for spec in argv:
        name, target = spec.split("=", 1)
        host, port = target.rsplit(":", 1)
        routes[name] = Route(name, host, int(port))
    asyncio.run(serve(routes))


class Proxy:
    """The proxy process, from the harness: ``port(name)``, ``cut(name)``, ``hold(name, s)``, ``close()``."""

    def __init__(self, upstreams: dict[str, str], log_path: str | None = None):
        self.process = subprocess.Popen([sys.executable, "-m", "tests.faults.proxy",
                                         *(f"{n}={t}" for n, t in upstreams.items())], cwd=ROOT,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=open(log_path, "ab") if log_path else subprocess.DEVNULL,
                                        text=True, bufsize=1, start_new_session=True)
        ready = self.process.stdout.readline().split()
        if not ready or ready[0] != "READY":
            raise RuntimeError(f"the proxy did not start: {ready}")
        self.ports = {n: int(p) for n, p in (w.split("=") for w in ready[1:])}
        self.lock = threading.Lock()

    def port(self, name: str) -> int:
        return self.ports[name]

    def command(self, line: str) -> str:
        with self.lock:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
            return self.process.stdout.readline().strip()

    def cut(self, name: str = "all") -> int:
        return int(self.command(f"cut {name}").split()[-1])

    def hold(self, name: str, seconds: float) -> None:
        self.command(f"hold {name} {seconds}")

    def refuse(self, name: str, seconds: float) -> None:
        self.command(f"refuse {name} {seconds}")

    def stats(self) -> dict:
        return json.loads(self.command("stats")[3:])

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.command("quit")
                self.process.wait(timeout=5)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(timeout=5)


if __name__ == "__main__":
    main(sys.argv[1:])
