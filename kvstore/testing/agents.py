"""Real node agents in subprocesses (`kvstore serve`), as tests and benchmarks start them.

Each one runs with its own config file and socket; the KVSTORE_* variables of the caller's environment
are left out, so nothing but the given settings configures it. Servers listen on loopback only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import yaml


def write_config(path: Path, settings: dict) -> Path:
    """A YAML config file at `path` from dotted settings ({"cpu.arena_bytes": "1GiB", ...})."""
    config: dict = {}
    for dotted, value in settings.items():
        section, _, key = dotted.rpartition(".")
        (config.setdefault(section, {}) if section else config)[key] = value
    path.write_text(yaml.safe_dump(config))
    return path


def clean_env(**extra) -> dict:
    """This process's environment without KVSTORE_* variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    env.update(extra)
    return env


def spawn_agent(config_path: Path, socket_path: str, env: dict | None = None, timeout: float = 60.0,
                stdout=subprocess.PIPE) -> subprocess.Popen:
    """`kvstore serve --config` as a real subprocess; returns once its socket exists (RuntimeError if the
    agent exits or does not get there within `timeout`)."""
    proc = subprocess.Popen([sys.executable, "-m", "kvstore.cli", "serve", "--config", str(config_path)],
                            env=env or clean_env(), stdout=stdout, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not os.path.exists(socket_path):
        if proc.poll() is not None:
            raise RuntimeError(f"agent exited {proc.returncode}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"agent did not start within {timeout} s")
        time.sleep(0.05)
    return proc


def stop_agent(proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGTERM (a clean stop: write-behind finishes what it took), then SIGKILL after `timeout`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


@contextlib.contextmanager
def agent_process(settings: dict, workdir: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """A `kvstore serve` subprocess with `settings` (dotted keys) and its socket in `workdir`, without a
    gRPC controller unless the settings ask for one (it would bind the default ports); yields (socket
    path, process) and stops it afterwards."""
    socket_path = str(Path(workdir) / "agent.sock")
    config = write_config(Path(workdir) / "config.yaml",
                          {"agent.socket_path": socket_path, "control.enabled": False, **settings})
    proc = spawn_agent(config, socket_path, timeout=120, stdout=subprocess.DEVNULL)
    try:
        yield socket_path, proc
    finally:
        stop_agent(proc)
