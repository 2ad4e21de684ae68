"""A real Flower deployment on one machine: a SuperLink and N SuperNodes, with TLS and SuperNode auth.

It starts the same processes a multi-machine deployment runs (``flower-superlink``,
``flower-supernode``, ``flwr``), on 127.0.0.1 with free ports, so that a user can try the whole
path on a laptop and the test suite can check it (certificates and keys:
:mod:`~fedexperts.federation.flower.certificates`). Every process it starts is stopped by PID:
SuperNodes first, then the SuperLink.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedexperts.errors import FedExpertsError
from fedexperts.federation.flower.certificates import write_certificates, write_node_key

CONNECTION = "fedexperts-local"
"""The SuperLink connection name written into ``$FLWR_HOME/config.toml``."""
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
"""Offline and quiet: without the last one the SuperLink ``uv sync``s every app from the network."""


class DeploymentError(FedExpertsError):
    """A local deployment that could not start, run or stop as asked."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tool(name: str) -> str:
    """A Flower executable from this Python's environment (the one fedexperts is installed in)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise DeploymentError(f"{name} not found next to {sys.executable}; install fedexperts[flower]")
    return str(path)


@dataclass
class _Node:
    partition: int
    node_id: int
    port: int
    key: Path
    state_dir: Path
    process: subprocess.Popen[bytes] | None = None


@dataclass
class LocalDeployment:
    """SuperLink + SuperNodes on 127.0.0.1 under ``work`` (certificates, keys, logs, ``FLWR_HOME``, node states).

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    work: Path
    nodes: int
    port: int = field(default_factory=free_port)
    node_cache: bool = True
    """Whether the SuperNodes share a node cache (``work/node-cache``, one per machine); off: each message builds."""
    startup_timeout: float = 120.0
    ca: Path = field(init=False)
    _certificates: tuple[Path, Path] = field(init=False)
    _link: subprocess.Popen[bytes] | None = None
    _nodes: list[_Node] = field(default_factory=list)
    _logs: list[Any] = field(default_factory=list)

    # -- environment -------------------------------------------------------------------------------------
    @property
    def flwr_home(self) -> Path:
        return self.work / "flwr-home"

    @property
    def env(self) -> dict[str, str]:
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        return {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(self.flwr_home), "PATH": path}

    def state_dir(self, partition: int) -> Path:
        """Node ``partition``'s own disk (its ``state-dir``)."""
        return self.work / f"node-{partition}"

    def _log(self, name: str) -> Any:
        handle = (self.work / "logs" / f"{name}.log").open("ab")
        self._logs.append(handle)
        return handle

    def flwr(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        """Run ``flwr ARGS --format json`` and return its JSON (``flwr`` exits 0 even on failure: check it)."""
        done = subprocess.run(
            [_tool("flwr"), *args, "--format", "json"],
            env=self.env,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        text = done.stdout.decode(errors="replace")
        try:
            start = text.index("{")
            reply: dict[str, Any] = json.loads(text[start:])
        except ValueError:
            raise DeploymentError(
                f"flwr {' '.join(args)}: no JSON answer (rc {done.returncode}): {text[-500:]}"
            ) from None
        return reply

    # -- lifecycle ---------------------------------------------------------------------------------------
    def __enter__(self) -> LocalDeployment:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Certificates and keys, the SuperLink (TLS, SuperNode auth), registration, then the SuperNodes online."""
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        ca, certificate, key = write_certificates(self.work / "certs")
        self.ca = ca
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{ca}"\n'
        )
        self._certificates = (certificate, key)
        self.start_superlink()
        for partition in range(self.nodes):
            private, public = write_node_key(self.work / "keys", f"supernode-{partition}")
            node_id = self.register(public)
            self._nodes.append(_Node(partition, node_id, free_port(), private, self.state_dir(partition)))
            self.start_node(partition)
        self._wait(lambda: self.online() >= self.nodes, f"{self.nodes} SuperNodes to come online")

    def start_superlink(self) -> None:
        """Start the SuperLink (TLS, SuperNode auth) on its port, its state in ``work/superlink.db``.

        The state is a database file, not Flower's in-memory default, so a SuperLink that is killed and
        started again still knows the registered SuperNodes (which reconnect on their own) and its runs.
        """
        certificate, key = self._certificates
        self._link = subprocess.Popen(
            [
                _tool("flower-superlink"),
                *("--ssl-ca-certfile", str(self.ca), "--ssl-certfile", str(certificate), "--ssl-keyfile", str(key)),
                "--enable-supernode-auth",
                *("--database", str(self.work / "superlink.db")),
                *("--host", "127.0.0.1", "--port", str(self.port)),
            ],
            env=self.env,
            stdout=self._log("superlink"),
            stderr=subprocess.STDOUT,
        )
        self._wait(lambda: self.flwr("ls", CONNECTION, timeout=30).get("success") is True, "the SuperLink to answer")

    def kill_superlink(self) -> None:
        """SIGKILL the SuperLink and everything it started (its SuperExec, the ServerApp of a running run)."""
        if self._link is not None:
            _kill_tree(self._link.pid)
            self._link.wait(timeout=30)
            self._link = None

    def kill_serverapp(self) -> int:
        """SIGKILL every running ServerApp process (the SuperLink stays up); returns how many there were."""
        link = self._link
        if link is None:
            return 0
        import psutil

        apps = []
        for pid in _children(link.pid):
            with contextlib.suppress(psutil.NoSuchProcess):
                if any("flwr-serverapp" in part for part in psutil.Process(pid).cmdline()):
                    apps.append(pid)
        for pid in apps:
            _kill_tree(pid)
        return len(apps)

    def register(self, public_key: Path) -> int:
        """Register a SuperNode's public key with the SuperLink; returns the node id it will have."""
        reply = self.flwr("supernode", "register", str(public_key), CONNECTION)
        if not reply.get("success"):
            raise DeploymentError(f"registering {public_key} failed: {reply.get('error-message', reply)}")
        return int(reply["node-id"])

    def node_command(self, key: Path, port: int, partition: int, state_dir: Path) -> list[str]:
        """The SuperNode's command line: its partition, state, the shared node cache and its share of the cores."""
        cache = self.work / "node-cache" if self.node_cache else ""
        threads = max(1, (os.cpu_count() or 1) // self.nodes)  # N processes x all cores each thrash a shared machine
        return [
            _tool("flower-supernode"),
            *("--superlink", f"127.0.0.1:{self.port}", "--root-certificates", str(self.ca)),
            *("--auth-supernode-private-key", str(key), "--port", str(port)),
            "--node-config",
            f'partition-id={partition} num-partitions={self.nodes} state-dir="{state_dir}" cache-dir="{cache}" '
            f"threads={threads}",
        ]

    def start_node(self, partition: int) -> None:
        node = self._nodes[partition]
        node.process = subprocess.Popen(
            self.node_command(node.key, node.port, partition, node.state_dir),
            env=self.env,
            stdout=self._log(f"supernode-{partition}"),
            stderr=subprocess.STDOUT,
        )

    def kill_node(self, partition: int) -> None:
        """SIGKILL one SuperNode (a machine that dies mid-round) and its ClientApp children."""
        node = self._nodes[partition]
        if node.process is not None:
            _kill_tree(node.process.pid)
            node.process.wait(timeout=30)
            node.process = None

    def restart_node(self, partition: int) -> None:
        """Start a killed SuperNode again with its key, once the SuperLink has marked it offline.

        Flower refuses to activate a node id it still believes online, and notices a dead node only
        when two heartbeats (30 s each, not configurable in flwr 1.41) are missed: about a minute.
        """
        node_id = self._nodes[partition].node_id
        self._wait(lambda: self.restart_offline([partition]) == [partition], f"node {node_id} to be marked offline")

    def restart_offline(self, partitions: list[int]) -> list[int]:
        """Start each of these killed SuperNodes that the SuperLink has marked offline; return those started.

        One status query for all of them, so a caller can poll without blocking (:meth:`restart_node` waits).
        """
        statuses = self.statuses()
        started = []
        for partition in partitions:
            node = self._nodes[partition]
            if node.process is None and statuses.get(node.node_id) not in (None, "online"):
                self.start_node(partition)
                started.append(partition)
        return started

    def running(self, partition: int) -> bool:
        """Whether this deployment has SuperNode ``partition``'s process up (not whether it is online yet)."""
        return self._nodes[partition].process is not None

    def node_id(self, partition: int) -> int:
        return self._nodes[partition].node_id

    def statuses(self) -> dict[int, str]:
        """Each registered SuperNode's status on the SuperLink (registered, online, offline, ...)."""
        reply = self.flwr("supernode", "list", CONNECTION, timeout=30)
        return {int(node["node-id"]): str(node.get("status")) for node in reply.get("nodes", [])}

    def online(self) -> int:
        return sum(status == "online" for status in self.statuses().values())

    def run(self, app: Path, *run_config: str) -> int:
        """Submit ``app`` (``flwr run``) with ``key=value`` run-config overrides; returns the run id."""
        args = ["run", str(app), CONNECTION]
        if run_config:
            args += ["--run-config", " ".join(run_config)]
        reply = self.flwr(*args)
        if not reply.get("success"):
            raise DeploymentError(f"flwr run failed: {reply.get('error-message', reply)}")
        return int(reply["run-id"])

    def status(self, run_id: int) -> tuple[str, str]:
        reply = self.flwr("ls", CONNECTION, "--run-id", str(run_id))
        run = (reply.get("runs") or [{}])[0]
        return str(run.get("status", "unknown")), str(run.get("status-details", ""))

    def wait(self, run_id: int, timeout: float = 900.0) -> tuple[str, str]:
        """Poll until the run is finished; ``("finished:completed", ...)`` is the only success."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, details = self.status(run_id)
            if status.startswith("finished:"):
                return status, details
            time.sleep(2.0)
        raise DeploymentError(f"run {run_id} did not finish within {timeout:g} s (last status {status})")

    def stop(self) -> None:
        """SIGTERM the SuperNodes, then the SuperLink; SIGKILL what has not exited after 15 s."""
        for node in self._nodes:
            if node.process is not None:
                _stop(node.process)
                node.process = None
        if self._link is not None:
            _stop(self._link)
            self._link = None
        for handle in self._logs:
            handle.close()
        self._logs.clear()

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            try:
                if ready():
                    return
            except (DeploymentError, subprocess.TimeoutExpired):
                pass
            if self._link is not None and self._link.poll() is not None:
                raise DeploymentError(f"the SuperLink exited (rc {self._link.returncode}); see {self.work / 'logs'}")
            time.sleep(0.5)
        raise DeploymentError(
            f"timed out after {self.startup_timeout:g} s waiting for {what}; see {self.work / 'logs'}"
        )


def _children(pid: int) -> list[int]:
    """Direct and indirect child PIDs (SuperExec, ClientApp processes), from /proc via psutil."""
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _kill_tree(pid: int) -> None:
    for child in [pid, *_children(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def _stop(process: subprocess.Popen[bytes]) -> None:
    children = _children(process.pid)
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        _kill_tree(process.pid)
        process.wait(timeout=15)
    for child in children:  # SuperExec children exit on their own when the parent goes; make sure
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGTERM)
