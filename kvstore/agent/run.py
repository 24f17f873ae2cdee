"""Running a standalone node agent in the foreground (`kvstore serve`)."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Callable

from ..config import KVStoreConfig
from .ops import AgentOps
from .server import AgentServer
from .store import NodeStore

log = logging.getLogger("kvstore.agent")


def open_agent(cfg: KVStoreConfig) -> AgentServer:
    """A node agent ready to `start()`: its store and the server of its socket (the store is closed
    again if the socket cannot be served)."""
    store = NodeStore(cfg)
    try:
        return AgentServer(AgentOps(store), cfg.socket_path)
    except BaseException:
        store.close()
        raise


def close_agent(server: AgentServer) -> None:
    """Stop serving, then close the store (write-behind finishes what it took)."""
    server.shutdown()
    server.store.close()


def run_agent(cfg: KVStoreConfig, ready: Callable[[AgentServer], None] | None = None) -> None:
    """Run the agent in the foreground until SIGINT or SIGTERM, then stop cleanly."""
    server = open_agent(cfg)
    stop = threading.Event()

    def on_signal(signum, frame) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    server.start()
    store = server.store
    log.info("kvstore agent listening on %s (arena %s, %d bytes; disk %s)", cfg.socket_path,
             store.cpu.arena_path, store.cpu.capacity, store.cfg.disk.path if store.disk is not None else "off")
    if ready is not None:
        ready(server)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        close_agent(server)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.info("kvstore agent stopped")
