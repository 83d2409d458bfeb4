"""The bot session: CreateBotSession once, then UpdateBotSession in a loop, running leases on a thread pool.

Protocol as BuildGrid 0.4.4 implements it (buildgrid/server/scheduler/impl.py, bots/service.py):
- the bot states its capacity in `worker.configs` (key "capacity"); leases arrive ACTIVE with the Action (or
  its Digest) packed in `payload`;
- the bot echoes running leases as ACTIVE (that is the keepalive) and reports a finished one as COMPLETED with
  `status` and `result` = an `Any` packing the REAPI ActionResult, which BuildGrid stores in its action cache;
  INTERNAL/UNAVAILABLE statuses make BuildGrid re-queue the job;
- a lease the server drops from the session was cancelled: its command is killed;
- UpdateBotSession long-polls while the bot has spare capacity; the bot cancels that call as soon as a lease
  finishes, so results go back without waiting for the poll to time out;
- a bot that stays silent past the keepalive timeout is reaped and its leases re-queued; the bot kills its own
  running commands once its session's expire_time has passed, and starts a new session.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from treemat.bot.remote_cas import RemoteCas
from treemat.bot.rpc import bots_pb2, bots_pb2_grpc, code_pb2
from treemat.bot.runner import ActionRunner, Outcome
from treemat.bot.stager import LocalStager

POLL_SECONDS = 10.0  # gRPC deadline of one UpdateBotSession long-poll (BuildGrid waits 80% of min(this, keepalive))
IDLE_KEEPALIVE_SECONDS = 4.0  # at full capacity: report in at least this often
RETRY_SECONDS = 1.0
TRANSIENT = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
)


@dataclass(slots=True)
class _Lease:
    lease: Any  # bots_pb2.Lease as received
    cancel: threading.Event = field(default_factory=threading.Event)
    future: concurrent.futures.Future[Outcome] | None = None
    outcome: Outcome | None = None


class Bot:
    """One bot process: a session on `channel` and up to `concurrency` actions at a time."""

    def __init__(
        self,
        channel: grpc.Channel,
        instance: str,
        root: Path,
        *,
        concurrency: int = 1,
        bot_id: str | None = None,
        log: Any = None,
    ) -> None:
        self.instance = instance
        self.concurrency = max(1, concurrency)
        self.bot_id = bot_id or f"treemat-{socket.gethostname()}-{os.getpid()}"
        self.stager = LocalStager(root)
        self.runner = ActionRunner(self.stager, RemoteCas(channel, instance, self.stager), worker_name=self.bot_id)
        self._stub = bots_pb2_grpc.BotsStub(channel)
        self._pool = concurrent.futures.ThreadPoolExecutor(self.concurrency, thread_name_prefix="treemat-lease")
        self._leases: dict[str, _Lease] = {}
        self._changed = threading.Event()
        self._recent: list[dict[str, object]] = []
        self._log = log if log is not None else sys.stderr

    # --------------------------------------------------------------------------- main loop

    def serve(self, stop: threading.Event) -> None:
        """Run until `stop` is set; running commands are killed on the way out."""
        try:
            while not stop.is_set():
                session = self._create_session(stop)
                if session is None:
                    break
                self._session_loop(session, stop)
        finally:
            self._abandon_all("bot stopping")
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._publish()
            self.stager.close()

    def _create_session(self, stop: threading.Event) -> Any:
        template = bots_pb2.BotSession(bot_id=self.bot_id, status=bots_pb2.OK)
        template.worker.configs.add(key="capacity", value=str(self.concurrency))
        template.worker.devices.add(handle=self.bot_id)
        while not stop.is_set():
            request = bots_pb2.CreateBotSessionRequest(parent=self.instance, bot_session=template)
            try:
                session = self._stub.CreateBotSession(request, timeout=POLL_SECONDS)
            except grpc.RpcError as exc:
                self._say(f"CreateBotSession failed ({exc.code().name}); retrying")
                stop.wait(RETRY_SECONDS)
                continue
            self._say(f"session {session.name} (capacity {self.concurrency})")
            return session
        return None

    def _session_loop(self, session: Any, stop: threading.Event) -> None:
        self._absorb(session)
        while not stop.is_set():
            if self._expired(session):
                self._abandon_all("bot session expired")
                return
            at_capacity = sum(1 for lease in self._leases.values() if lease.outcome is None) >= self.concurrency
            if at_capacity and not self._has_completed():
                # the server would answer at once: wait for a lease to finish or the keepalive to come due
                self._changed.wait(IDLE_KEEPALIVE_SECONDS)
            self._changed.clear()
            request = bots_pb2.UpdateBotSessionRequest(name=session.name, bot_session=self._outgoing(session))
            call = self._stub.UpdateBotSession.future(request, timeout=POLL_SECONDS)
            while not call.done() and not stop.is_set() and not self._changed.wait(0.05):
                pass
            if not call.done():
                call.cancel()  # a lease finished (or we stop): report now instead of waiting out the poll
            try:
                response = call.result()
            except grpc.FutureCancelledError:
                continue
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                    continue
                if exc.code() in TRANSIENT:
                    stop.wait(RETRY_SECONDS)  # keep the session (and running leases) until it expires
                    continue
                self._say(f"UpdateBotSession failed ({exc.code().name}: {exc.details()}); new session")
                self._abandon_all("bot session lost")
                return
            self._forget_reported(request)
            session = response
            self._absorb(session)

    # --------------------------------------------------------------------------- leases

    def _absorb(self, session: Any) -> None:
        """Start new leases, cancel the ones the server dropped."""
        offered = {lease.id: lease for lease in session.leases}
        for lease_id, mine in list(self._leases.items()):
            if lease_id not in offered and mine.outcome is None:
                mine.cancel.set()
                self._say(f"lease {lease_id} cancelled by the server")
                self._leases.pop(lease_id)
        for lease_id, lease in offered.items():
            if lease_id in self._leases or lease.state not in (bots_pb2.PENDING, bots_pb2.ACTIVE):
                continue
            entry = _Lease(lease=lease)
            self._leases[lease_id] = entry
            entry.future = self._pool.submit(self.runner.run, lease.payload, entry.cancel)
            entry.future.add_done_callback(functools.partial(self._finished, entry))

    def _finished(self, entry: _Lease, future: concurrent.futures.Future[Outcome]) -> None:
        try:
            entry.outcome = future.result()
        except Exception as exc:  # a bug must not wedge the lease: report it, BuildGrid re-queues INTERNAL
            entry.outcome = Outcome(code=code_pb2.INTERNAL, message=f"treemat bot: {type(exc).__name__}: {exc}")
        if not entry.outcome.cancelled:
            self._recent = [*self._recent[-19:], {"lease": entry.lease.id, **entry.outcome.record}]
        self._publish()
        self._changed.set()

    def _outgoing(self, session: Any) -> Any:
        out = bots_pb2.BotSession()
        out.CopyFrom(session)
        del out.leases[:]
        for lease_id, entry in self._leases.items():
            lease = out.leases.add(id=lease_id, payload=entry.lease.payload)
            outcome = entry.outcome
            if outcome is None or outcome.cancelled:
                lease.state = bots_pb2.ACTIVE
                continue
            lease.state = bots_pb2.COMPLETED
            lease.status.code = outcome.code
            lease.status.message = outcome.message
            if outcome.result is not None:
                lease.result.Pack(outcome.result)
        return out

    def _forget_reported(self, request: Any) -> None:
        """Completed leases in a request the server answered are done with."""
        for lease in request.bot_session.leases:
            if lease.state == bots_pb2.COMPLETED:
                self._leases.pop(lease.id, None)

    def _has_completed(self) -> bool:
        return any(lease.outcome is not None for lease in self._leases.values())

    def _expired(self, session: Any) -> bool:
        if not session.HasField("expire_time"):
            return False
        expires = int(session.expire_time.seconds)  # epoch seconds, UTC
        return time.time() > expires + POLL_SECONDS

    def _abandon_all(self, why: str) -> None:
        for lease_id, entry in list(self._leases.items()):
            if entry.outcome is None:
                self._say(f"lease {lease_id}: {why}: killing its command")
            entry.cancel.set()
        self._leases.clear()

    # --------------------------------------------------------------------------- telemetry

    def _publish(self) -> None:
        self.stager.publish_stats(role="bot", extra={"bot_id": self.bot_id, "recent_actions": list(self._recent)})

    def _say(self, text: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            print(f"treemat bot {self.bot_id}: {text}", file=self._log, flush=True)


def run_bot(server: str, instance: str, root: Path, *, concurrency: int, bot_id: str | None = None) -> int:
    """`treemat bot`: serve leases until SIGTERM/SIGINT."""
    import signal

    target = server.removeprefix("grpc://")
    options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    stop = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with grpc.insecure_channel(target, options=options) as channel:
        Bot(channel, instance, root, concurrency=concurrency, bot_id=bot_id).serve(stop)
    return 0
