"""A real remote-execution cluster on loopback: PostgreSQL, a BuildGrid server, and N treemat bots.

Test and dev tooling, not shipped: used by the tests, benchmarks/bench_bot.py and `tools/cluster.sh`
(`python3 -m tests.support.cluster up`). Every process is started in
its own session and stopped (process group killed) on exit, with bounded waits; PostgreSQL runs as the
`postgres` user when started by root (it refuses to run as root) from a private data directory.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import treemat

from .netns import CLIENT_HOST, SERVER_HOST, NetnsNetwork

CONFIG = Path(__file__).with_name("buildgrid.yml")
PG_BIN_CANDIDATES = ("/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/17/bin")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0


class ClusterError(RuntimeError):
    """A component did not start."""


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pg_bin() -> Path:
    """Directory of Debian's PostgreSQL server binaries (initdb, pg_ctl, postgres)."""
    for candidate in PG_BIN_CANDIDATES:
        if (Path(candidate) / "initdb").exists():
            return Path(candidate)
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    raise ClusterError("PostgreSQL server binaries not found (apt-get install postgresql)")


def _listening(address: str, port: int, network: NetnsNetwork | None) -> bool:
    if network is not None:  # from the client's namespace: across the bridge, as Bazel will connect
        return network.can_connect(CLIENT_HOST, address, port)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((address, port)) == 0


def _wait_port(
    address: str,
    port: int,
    proc: subprocess.Popen[bytes] | None,
    log: Path,
    timeout: float,
    network: NetnsNetwork | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ClusterError(f"process exited with {proc.returncode}; see {log}:\n{_tail(log)}")
        if _listening(address, port, network):
            return
        time.sleep(0.1)
    raise ClusterError(f"nothing listened on {address}:{port} within {timeout:.0f} s; see {log}:\n{_tail(log)}")


def _tail(log: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    return ""


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    """Signal the process group, then SIGKILL it if it lingers past STOP_TIMEOUT."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_TIMEOUT)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(STOP_TIMEOUT)


@dataclass
class BotProcess:
    """One running `treemat bot`."""

    name: str
    root: Path
    log: Path
    proc: subprocess.Popen[bytes]


@dataclass
class Cluster:
    """PostgreSQL + BuildGrid + bots under `workdir`; use as a context manager."""

    workdir: Path
    bots: int = 2
    concurrency: int = 1
    bot_roots: list[Path] | None = None
    instance: str = ""
    port: int = 0
    bot_env: dict[str, str] = field(default_factory=dict)
    config: Path = CONFIG  # BuildGrid's YAML (benchmarks/bench_bot.py measures variants of it)
    bot_python: list[str] | None = None  # argv standing for the bots' python3 (default: this interpreter)
    network: NetnsNetwork | None = None  # set: server + PostgreSQL, each bot and the client in own namespaces
    _pg_dir: Path | None = None
    _pg_port: int = 0
    _pg_user: str | None = None
    _sql: str = ""
    _server: subprocess.Popen[bytes] | None = None
    _bots: list[BotProcess] = field(default_factory=list)

    @property
    def server_address(self) -> str:
        """Where BuildGrid listens: loopback, or the server namespace's bridge address."""
        return self.network.hosts[SERVER_HOST].address if self.network is not None else "127.0.0.1"

    @property
    def endpoint(self) -> str:
        """grpc://ADDRESS:PORT for Bazel's --remote_executor and the bots' --server."""
        return f"grpc://{self.server_address}:{self.port}"

    @property
    def _server_cas(self) -> Path:
        """BuildGrid's disk CAS (with a network: on /var/tmp, which bots hide; a mount below /tmp would give
        their sandboxed commands an empty /tmp)."""
        return (self.network.workdir if self.network is not None else self.workdir) / "server-cas"

    def on(self, label: str, argv: list[str]) -> list[str]:
        """`argv` run on host `label` (its network namespace) when the cluster has a network, else as is."""
        if self.network is None:
            return argv
        return [*self.network.hosts[label].exec_prefix(), *argv]

    @property
    def running_bots(self) -> list[BotProcess]:
        """Bots started so far (dead ones included)."""
        return list(self._bots)

    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --------------------------------------------------------------------------- start

    def start(self) -> None:
        """Start PostgreSQL, migrate, start BuildGrid, then the bots."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        if self.network is not None:
            self.network.add_host(SERVER_HOST)
            self.network.add_host(CLIENT_HOST)
        sql = self._start_postgres()
        self._start_server(sql)
        if self.network is not None and self.bot_roots is None:
            self.bot_roots = [self.network.bot_filesystem(f"bot-{index}") for index in range(self.bots)]
        roots = self.bot_roots or [self.workdir / f"bot-{index}" for index in range(self.bots)]
        for index, root in enumerate(roots):
            self.start_bot(f"bot-{index}", root)

    def _start_postgres(self) -> str:
        binaries = pg_bin()
        # a private directory every user can reach (pytest's tmp dirs are 0700 root): PostgreSQL runs as postgres
        scratch = self.network.workdir if self.network is not None else None  # bots hide it: not below /tmp
        self._pg_dir = Path(tempfile.mkdtemp(prefix="treemat-pg-", dir=scratch))
        os.chmod(self._pg_dir, 0o755)
        user = None
        if os.geteuid() == 0:
            user = "postgres"
            pw = pwd.getpwnam(user)
            os.chown(self._pg_dir, pw.pw_uid, pw.pw_gid)
        self._pg_user = user
        self._pg_port = free_port()
        log = self.workdir / "logs" / "postgres.log"
        data = self._pg_dir / "data"
        self._as_pg([str(binaries / "initdb"), "-A", "trust", "-U", "bgd", "-D", str(data)], log)
        options = f"-p {self._pg_port} -c listen_addresses=127.0.0.1 -k {self._pg_dir} -c fsync=off"
        self._pg_ctl("-l", str(self._pg_dir / "server.log"), "-o", options, "start")
        self._as_pg(
            [
                str(binaries / "psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self._pg_port),
                "-U",
                "bgd",
                "-d",
                "postgres",
                "-q",
                "-c",
                "create database bgd",
            ],
            log,
        )
        sql = f"postgresql+psycopg2://bgd@127.0.0.1:{self._pg_port}/bgd"
        self._run(self.on(SERVER_HOST, [str(Path(sys.executable).with_name("bgd")), "migrate", "apply", sql]), log)
        self._sql = sql
        return sql

    def _pg_ctl(self, *args: str) -> None:
        assert self._pg_dir is not None
        data = str(self._pg_dir / "data")
        log = self.workdir / "logs" / "postgres.log"
        self._as_pg([str(pg_bin() / "pg_ctl"), "-D", data, "-w", "-t", str(int(START_TIMEOUT)), *args], log)

    def restart_postgres(self) -> None:
        """`pg_ctl restart -m fast`: every connection BuildGrid holds (pool, LISTEN) is dropped."""
        self._pg_ctl("-m", "fast", "restart")

    def restart_server(self) -> None:
        """Stop BuildGrid (SIGTERM, then SIGKILL) and start it again on the same port and database."""
        if self._server is not None:
            _stop(self._server)
        self._start_server(self._sql)

    def _as_pg(self, argv: list[str], log: Path) -> None:
        if self._pg_user is not None:
            argv = ["runuser", "-u", self._pg_user, "--", *argv]
        self._run(self.on(SERVER_HOST, argv), log)

    def _run(self, argv: list[str], log: Path) -> None:
        with open(log, "ab") as out:
            done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, timeout=START_TIMEOUT, check=False)
        if done.returncode != 0:
            raise ClusterError(f"{' '.join(argv[:3])}... exited with {done.returncode}; see {log}:\n{_tail(log)}")

    def _start_server(self, sql: str) -> None:
        self.port = self.port or free_port()
        cas = self._server_cas
        cas.mkdir(exist_ok=True)
        env = dict(
            os.environ,
            TREEMAT_BG_ADDRESS=f"{self.server_address}:{self.port}",
            TREEMAT_BG_SQL=sql,
            TREEMAT_BG_CAS=str(cas),
        )
        log = self.workdir / "logs" / "buildgrid.log"
        bgd = str(Path(sys.executable).with_name("bgd"))
        with open(log, "ab") as out:
            self._server = subprocess.Popen(
                self.on(SERVER_HOST, [bgd, "server", "start", str(self.config)]),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        _wait_port(self.server_address, self.port, self._server, log, START_TIMEOUT, self.network)

    def start_bot(self, name: str, root: Path) -> BotProcess:
        """Start one `treemat bot` with its own root."""
        log = self.workdir / "logs" / f"{name}.log"
        tools_dir = str(Path(treemat.__file__).resolve().parents[1])
        env = dict(os.environ, **self.bot_env)
        env["PYTHONPATH"] = os.pathsep.join([tools_dir, *filter(None, [env.get("PYTHONPATH")])])
        argv = [
            *(self.bot_python or [sys.executable]),
            "-m",
            "treemat",
            "bot",
            "--server",
            self.endpoint,
            "--instance",
            self.instance,
            "--root",
            str(root),
            "--concurrency",
            str(self.concurrency),
            "--bot-id",
            f"treemat-{name}",
        ]
        if self.network is not None:
            argv = self._bot_host(name, root, argv)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )
        bot = BotProcess(name, root, log, proc)
        self._bots.append(bot)
        return bot

    def _bot_host(self, name: str, root: Path, argv: list[str]) -> list[str]:
        """In the bot's own network namespace and a private mount namespace that hides the server's disk
        (its CAS, PostgreSQL's data) and the other bots' roots behind empty tmpfs mounts."""
        assert self.network is not None
        host = self.network.hosts.get(name) or self.network.add_host(name)
        hidden = [self._server_cas, *(p for p in [self._pg_dir] if p is not None)]
        hidden += [other for other in self.bot_roots or [] if other != root]
        mounts = "".join(f"mount -t tmpfs -o size=1m,mode=0 treemat-hidden '{path}' && " for path in hidden)
        return [
            *host.exec_prefix(),
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            f'{mounts}exec "$@"',
            "sh",
            *argv,
        ]

    # --------------------------------------------------------------------------- stop

    def kill_bot(self, name: str) -> None:
        """SIGKILL one bot (and its running command): BuildGrid must re-queue its lease."""
        for bot in self._bots:
            if bot.name == name:
                _stop(bot.proc, signal.SIGKILL)

    def stop(self) -> None:
        """Stop bots, server and PostgreSQL; remove PostgreSQL's data directory."""
        for bot in self._bots:
            _stop(bot.proc)
        if self._server is not None:
            _stop(self._server)
        if self._pg_dir is not None:
            if (self._pg_dir / "data" / "postmaster.pid").exists():
                with contextlib.suppress(ClusterError, subprocess.TimeoutExpired, OSError):
                    self._pg_ctl("-m", "immediate", "stop")
            shutil.rmtree(self._pg_dir, ignore_errors=True)
            self._pg_dir = None


def main(argv: list[str] | None = None) -> int:
    """`python3 -m tests.support.cluster up --dir DIR [--bots N] [--concurrency N] [--port P] [--netns]`."""
    parser = argparse.ArgumentParser(prog="treemat-cluster", description=__doc__)
    parser.add_argument("command", choices=["up"])
    parser.add_argument("--dir", type=Path, required=True, help="work dir: logs, server CAS, bot roots")
    parser.add_argument("--bots", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--port", type=int, default=0, help="BuildGrid port (default: a free one)")
    parser.add_argument("--netns", action="store_true", help="server, each bot, the client: own network namespaces")
    options = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: stop.set())
    with contextlib.ExitStack() as cleanup:
        network = cleanup.enter_context(NetnsNetwork.from_env()) if options.netns else None
        cluster = Cluster(
            options.dir.absolute(),
            bots=options.bots,
            concurrency=options.concurrency,
            port=options.port,
            network=network,
        )
        cleanup.enter_context(cluster)
        print(f"BuildGrid: {cluster.endpoint} (instance '{cluster.instance}'), logs in {options.dir}/logs", flush=True)
        for bot in cluster.running_bots:
            print(f"{bot.name}: pid {bot.proc.pid}, root {bot.root}", flush=True)
        bazel = " ".join(cluster.on(CLIENT_HOST, ["bazel"]))
        print(
            f"{bazel} build --remote_executor={cluster.endpoint} --config=remote //examples/...   (Ctrl-C stops)",
            flush=True,
        )
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
