"""Start a private swarm of real OS processes on this machine (demo, tests, benchmarks).

Each process is `python -m swarmshard.cli …` printing JSON events; we wait for its ``ready`` event,
and stop every process we started by PID (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


class LaunchError(RuntimeError):
    """A swarm process failed to start; carries the tail of its log."""


@dataclass
class NodeProcess:
    name: str
    popen: subprocess.Popen
    log_path: Path
    ready: threading.Event = field(default_factory=threading.Event)
    info: dict = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)  # every JSON event printed, in order (e.g. 'moved')

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def peer_id(self) -> str:
        return self.info.get("peer_id", "")

    @property
    def addrs(self) -> list[str]:
        return self.info.get("addrs", [])

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None


def even_spans(n_blocks: int, n_servers: int) -> list[tuple[int, int]]:
    """Contiguous spans covering ``n_blocks`` as evenly as possible."""
    if not 1 <= n_servers <= n_blocks:
        raise ValueError(f"cannot split {n_blocks} blocks over {n_servers} servers")
    bounds = [round(i * n_blocks / n_servers) for i in range(n_servers + 1)]
    return list(zip(bounds, bounds[1:]))


class LocalSwarm:
    """A DHT bootstrap peer plus one server process per span, all on 127.0.0.1."""

    def __init__(
        self,
        model: str,
        spans: list[tuple[int, int]],
        home: str | None = None,
        cache_tokens: int = 8192,
        server_args: list[str] | None = None,
        log_dir: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.model = model
        self.spans = spans
        self.home = home
        self.cache_tokens = cache_tokens
        self.server_args = server_args or []
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="swarmshard-logs-"))
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        if env and "PYTHONPATH" in env and os.environ.get("PYTHONPATH"):  # extend, never hide, the caller's path
            self.env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], os.environ["PYTHONPATH"]])
        self.bootstrap: NodeProcess | None = None
        self.servers: list[NodeProcess] = []

    @property
    def initial_peers(self) -> list[str]:
        return self.bootstrap.addrs if self.bootstrap else []

    def _spawn(self, name: str, args: list[str]) -> NodeProcess:
        log_path = self.log_dir / f"{name}.log"
        log = open(log_path, "w")
        popen = subprocess.Popen(
            [sys.executable, "-m", "swarmshard.cli", *args],
            stdout=subprocess.PIPE, stderr=log, env=self.env, text=True, start_new_session=True,
        )
        node = NodeProcess(name, popen, log_path)

        def read() -> None:
            assert popen.stdout is not None
            for line in popen.stdout:
                log.write(line)
                log.flush()
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(event, dict):
                    node.events.append(event)
                if isinstance(event, dict) and event.get("event") == "ready":
                    node.info = event
                    node.ready.set()
            log.close()

        threading.Thread(target=read, name=f"{name}-stdout", daemon=True).start()
        return node

    def _wait(self, nodes: list[NodeProcess], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for node in nodes:
            while not node.ready.wait(timeout=0.2):
                if not node.alive():
                    raise LaunchError(f"{node.name} exited with {node.popen.returncode}:\n{node.log_tail()}")
                if time.monotonic() > deadline:
                    raise LaunchError(f"{node.name} not ready after {timeout:.0f}s:\n{node.log_tail()}")

    def start_server(self, start: int, end: int, model: str | None = None, extra: list[str] | None = None,
                     timeout: float = 300.0) -> NodeProcess:
        """Start one more server (e.g. joining a running swarm) and wait until it is ready."""
        return self.start_servers([(model or self.model, start, end)], extra, timeout)[0]

    def start_servers(self, specs: list[tuple[str, int, int]], extra: list[str] | None = None,
                      timeout: float = 300.0) -> list[NodeProcess]:
        """Start servers ``(model, start, end)`` concurrently and wait until all are ready."""
        nodes = [self._spawn_server(model, start, end, extra) for model, start, end in specs]
        self._wait(nodes, timeout)
        return nodes

    def start_auto_server(self, model: str | None = None, extra: list[str] | None = None,
                          timeout: float = 300.0) -> NodeProcess:
        """Start a ``--blocks auto`` server (it picks its own span, see its 'placed' event) and wait
        until it is ready; its ``info`` holds the span it started with."""
        return self.start_auto_servers([extra or []], model, timeout)[0]

    def start_auto_servers(self, extras: list[list[str]], model: str | None = None,
                           timeout: float = 300.0) -> list[NodeProcess]:
        """Start one ``--blocks auto`` server per list of extra arguments, concurrently (so they
        may not see each other when they choose), and wait until all are ready."""
        nodes = [self._spawn_server(model or self.model, 0, 0, extra, blocks="auto") for extra in extras]
        self._wait(nodes, timeout)
        return nodes

    def _spawn_server(self, model: str, start: int, end: int, extra: list[str] | None = None,
                      blocks: str | None = None) -> NodeProcess:
        blocks = blocks or f"{start}:{end}"
        args = ["serve", "--model", model, "--blocks", blocks, "--json-events",
                "--cache-tokens", str(self.cache_tokens)]
        for addr in self.initial_peers:
            args += ["--initial-peers", addr]
        if self.home:
            args += ["--home", self.home]
        args += [*self.server_args, *(extra or [])]  # last: a repeated option's last value wins
        node = self._spawn(f"server{len(self.servers)}-{blocks.replace(':', '-')}", args)
        self.servers.append(node)
        return node

    def start_stage_servers(self, specs: list[tuple[str, str, int]], extra: list[str] | None = None,
                            timeout: float = 300.0) -> list[NodeProcess]:
        """Start graph-stage servers ``(factory, plan_path, stage)`` concurrently and wait until all are ready."""
        nodes = []
        for graph, plan_path, stage in specs:
            args = ["serve", "--graph", graph, "--plan", str(plan_path), "--stage", str(stage), "--json-events"]
            for addr in self.initial_peers:
                args += ["--initial-peers", addr]
            args += [*self.server_args, *(extra or [])]
            nodes.append(self._spawn(f"server{len(self.servers)}-stage{stage}", args))
            self.servers.append(nodes[-1])
        self._wait(nodes, timeout)
        return nodes

    def start(self, timeout: float = 300.0) -> "LocalSwarm":
        """Start the bootstrap peer, then one server per span of ``model``."""
        try:
            self.bootstrap = self._spawn("bootstrap", ["bootstrap", "--json-events"])
            self._wait([self.bootstrap], timeout)
            if self.spans:
                self.start_servers([(self.model, s, e) for s, e in self.spans], timeout=timeout)
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def stop_process(node: NodeProcess, grace: float = 15.0) -> None:
        """SIGTERM by PID, SIGKILL (to the process group) if it does not exit within ``grace`` s."""
        LocalSwarm._stop_all([node], grace)

    @staticmethod
    def _stop_all(nodes: list[NodeProcess], grace: float) -> None:
        """SIGTERM every live process first, then wait for each, killing its group past ``grace``."""
        live = [n for n in nodes if n.alive()]
        for node in live:
            try:
                os.kill(node.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for node in live:
            try:
                node.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(node.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                node.popen.wait(timeout=10)

    def stop(self) -> None:
        self._stop_all([*self.servers, *([self.bootstrap] if self.bootstrap else [])], grace=15.0)

    def __enter__(self) -> "LocalSwarm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
