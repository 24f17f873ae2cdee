"""Configuration: one frozen dataclass tree.

Sources, later wins: defaults < YAML file (``--config`` or ``KVSTORE_CONFIG``) < ``KVSTORE_*`` environment
variables (``KVSTORE_CPU__ARENA_BYTES=4GiB``: double underscore between levels) < CLI overrides
(``--set cpu.arena_bytes=4GiB``). Sizes accept ``4GiB``, ``512MiB``, ``4G``, ``1e9`` or plain ints
(K/M/G and KiB/MiB/GiB are binary, KB/MB/GB decimal). Unknown keys and bad values raise ConfigError
naming the key. Every option is documented in docs/config.md.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import get_type_hints

import yaml

from kvstore.errors import ConfigError

AUTO = 0  # for sizes: "derive a sane value from the machine"


def default_runtime_dir() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/kvstore-{os.getuid()}"
    return str(Path(base) / "kvstore")


def default_cache_dir() -> str:
    return str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvstore")


@dataclass(frozen=True)
class CpuConfig:
    arena_bytes: int = AUTO  # AUTO: 25% of available memory, capped at 8 GiB, at least 64 MiB
    slab_bytes: int = 64 << 20  # slab size; also the largest chunk the arena holds
    shm_dir: str = "/dev/shm"
    policy: str = "lru"  # lru | s3fifo
    prefault: bool = True  # touch the arena at start so the first put does not page-fault


@dataclass(frozen=True)
class DiskConfig:
    enabled: bool = True
    path: str = field(default_factory=default_cache_dir)
    capacity_bytes: int = AUTO  # AUTO: 50% of the free space at `path`, capped at 64 GiB
    segment_bytes: int = 256 << 20
    batch_bytes: int = 4 << 20  # write-behind gathers at least this much per write + fsync
    queue_bytes: int = 256 << 20  # bound on bytes waiting for write-behind
    admission: str = "always"  # always | second_use
    o_direct: bool = False
    readahead_bytes: int = 64 << 20  # promotions also prefetch this much of a segment past what they read
    fsync: bool = True
    compact_garbage_ratio: float = 0.5  # rewrite a segment when this share of it is dead


@dataclass(frozen=True)
class AgentConfig:
    socket_path: str = ""  # "": <runtime dir>/agent.sock
    lease_ttl_s: float = 30.0  # a pin or reservation not released within this is reclaimed
    max_frame_bytes: int = 16 << 20
    busy_poll_us: int = 200  # poll a connection this long before blocking (0: never); see docs/config.md
    max_batch_chunks: int = 65536
    log_level: str = "info"
    metrics_address: str = ""  # the agent's own Prometheus endpoint ("": off); port 0: any free port
    max_pin_ttl_s: float = 86400.0  # longest TTL of an operator pin (the `pin` op, gRPC Pin)
    max_pinned_fraction: float = 0.5  # share of the arena operator pins may hold


@dataclass(frozen=True)
class ClusterConfig:
    enabled: bool = False  # run the agent as a Ray actor (kvstore serve --cluster / --ray-address)
    ray_address: str = ""  # "": start an embedded single-node Ray on loopback; else join this cluster
    namespace: str = "kvstore"  # Ray namespace the agents are named in
    replication: int = 1  # copies of each committed chunk, on distinct nodes (1: only the writer's)
    call_timeout_s: float = 2.0  # deadline of each control call between agents (directory, pings)
    pull_timeout_s: float = 5.0  # deadline of a request's remote pulls (and of a replication batch)
    heartbeat_s: float = 1.0  # how often an agent checks membership (a dead peer is noticed by then)
    link_host: str = ""  # address the peer link listens on; "": this Ray node's IP address
    object_store_bytes: int = 256 << 20  # the embedded Ray's object store


@dataclass(frozen=True)
class ControlConfig:
    enabled: bool = True  # `kvstore serve` also runs the gRPC controller (docs/control.md)
    address: str = "127.0.0.1:50051"  # host:port the controller listens on (port 0: any free port)
    metrics_address: str = "127.0.0.1:9400"  # Prometheus endpoint (""): off; port 0: any free port
    token: str = ""  # a bearer token valid for every tenant (env KVSTORE_CONTROL__TOKEN)
    tokens_file: str = ""  # lines "TOKEN [tenant,tenant...]"; no tenants: every tenant
    insecure: bool = False  # no auth at all (local play only)
    call_timeout_s: float = 2.0  # deadline of each call into the agent
    max_request_chunks: int = 65536  # a larger Lookup/Evict is INVALID_ARGUMENT
    workers: int = 8  # gRPC thread pool
    # TLS (docs/control.md). The controller: its certificate chain and key (PEM; both or neither), and
    # the CA that must have signed clients' certificates (mTLS). Clients (the CLI): the CA that signed
    # the controller's certificate, and their own certificate and key for mTLS.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    tls_ca: str = ""
    tls_client_cert: str = ""
    tls_client_key: str = ""


@dataclass(frozen=True)
class KVStoreConfig:
    chunk_tokens: int = 256
    cpu: CpuConfig = field(default_factory=CpuConfig)
    disk: DiskConfig = field(default_factory=DiskConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    control: ControlConfig = field(default_factory=ControlConfig)

    @property
    def socket_path(self) -> str:
        return self.agent.socket_path or str(Path(default_runtime_dir()) / "agent.sock")


# --- loading ---------------------------------------------------------------------------------------

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# Unit rule (the one GNU coreutils uses): K/M/G/T and KiB/MiB/GiB/TiB are binary (powers of 1024);
# KB/MB/GB/TB are decimal (powers of 1000). Units are case-insensitive; "B" or no unit means bytes.
_SIZE_UNITS = {"": 1, "b": 1} | {
    prefix + suffix: (1000 if suffix == "b" else 1024) ** exp
    for exp, prefix in enumerate("kmgt", start=1)
    for suffix in ("", "ib", "b")
}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?(?:e[+-]?\d+)?)\s*([a-z]*)\s*", re.IGNORECASE)
_AUTO_SIZE_KEYS = ("cpu.arena_bytes", "disk.capacity_bytes")

_ENUMS = {
    "cpu.policy": ("lru", "s3fifo"),
    "disk.admission": ("always", "second_use"),
    "agent.log_level": ("debug", "info", "warning", "error"),
}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")
_ENV_PREFIX = "KVSTORE_"
_ENV_CONFIG_FILE = "KVSTORE_CONFIG"


def _leaf_types(cls: type, prefix: str = "") -> dict[str, type]:
    """Dotted key -> annotated type for every leaf field of a dataclass tree."""
    hints = get_type_hints(cls)
    out: dict[str, type] = {}
    for f in fields(cls):
        if is_dataclass(hints[f.name]):
            out.update(_leaf_types(hints[f.name], f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = hints[f.name]
    return out


_KEY_TYPES = _leaf_types(KVStoreConfig)  # "chunk_tokens": int, "cpu.arena_bytes": int, ...
_SECTIONS = {key.rsplit(".", 1)[0] for key in _KEY_TYPES if "." in key}  # {"cpu", "disk", ...}


def parse_size(value: object, key: str) -> int:
    """Bytes from an int or a size string ("4GiB", "512M", "4GB", "1e9", "auto"); `key` names errors.

    "auto" (and 0) mean AUTO and are accepted only where AUTO is allowed (cpu.arena_bytes,
    disk.capacity_bytes); 0 elsewhere is left for validate() to reject with its range message.
    """
    if isinstance(value, str) and value.strip().lower() == "auto":
        if key not in _AUTO_SIZE_KEYS:
            raise ConfigError(f"{key}: 'auto' is only allowed for {', '.join(_AUTO_SIZE_KEYS)}")
        return AUTO
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{key}: {value!r} is not a size")
    if isinstance(value, str):
        match = _SIZE_RE.fullmatch(value)
        if not match or match.group(2).lower() not in _SIZE_UNITS:
            raise ConfigError(f"{key}: {value!r} is not a size; examples: 4GiB, 512MiB, 4G, 4GB, 1e9")
        size = Fraction(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    else:
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: {value!r} is not a size")
        size = Fraction(value)
    if size < 0:
        raise ConfigError(f"{key}: {value!r} is negative")
    if size.denominator != 1:
        raise ConfigError(f"{key}: {value!r} is not a whole number of bytes")
    return int(size)


def _coerce(key: str, value: object) -> object:
    """`value` converted to the type of `key`; raises ConfigError naming the key."""
    kind = _KEY_TYPES[key]
    if key.endswith("_bytes"):
        return parse_size(value, key)
    text = value.strip().lower() if isinstance(value, str) else None
    if kind is bool:
        if isinstance(value, bool):
            return value
        if text in _TRUE or text in _FALSE or value in (0, 1):
            return text in _TRUE or value == 1
        raise ConfigError(f"{key}: {value!r} is not a boolean (true/false, 1/0, yes/no, on/off)")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if text is not None and re.fullmatch(r"[+-]?\d+", text):
            return int(text)
        raise ConfigError(f"{key}: {value!r} is not an integer")
    if kind is float:
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise ConfigError(f"{key}: {value!r} is not a finite number")
        return number
    if not isinstance(value, str):
        raise ConfigError(f"{key}: {value!r} is not a string")
    if key in _ENUMS:
        if text not in _ENUMS[key]:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(_ENUMS[key])}")
        return text
    return value


def _check_key(key: str, source: str) -> None:
    if key in _KEY_TYPES:
        return
    if key in _SECTIONS:
        raise ConfigError(f"{key}: is a section, not a key, e.g. {key}.{_first_field(key)} (from {source})")
    close = difflib.get_close_matches(key, _KEY_TYPES, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise ConfigError(f"{key}: unknown key{hint} (from {source})")


def _first_field(section: str) -> str:
    return next(k for k in _KEY_TYPES if k.startswith(section + ".")).split(".", 1)[1]


def _flatten(data: object, prefix: str, source: str, out: dict[str, tuple[object, str]]) -> None:
    """Add the leaves of a nested YAML mapping to `out` as dotted key -> (value, source)."""
    if not isinstance(data, Mapping):
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(f"{source}: {where} must be a mapping, not {type(data).__name__}")
    for name, value in data.items():
        key = f"{prefix}{name}"
        if key in _SECTIONS:
            _flatten({} if value is None else value, key + ".", source, out)
        else:
            _check_key(key, source)
            out[key] = (value, source)


def _read_yaml(path: str) -> dict[str, tuple[object, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    out: dict[str, tuple[object, str]] = {}
    _flatten({} if data is None else data, "", path, out)
    return out


def _from_env(env: Mapping[str, str]) -> dict[str, tuple[object, str]]:
    out: dict[str, tuple[object, str]] = {}
    for name, value in env.items():
        if not name.startswith(_ENV_PREFIX) or name == _ENV_CONFIG_FILE:
            continue
        key = name[len(_ENV_PREFIX):].lower().replace("__", ".")
        _check_key(key, f"env {name}")
        out[key] = (value, f"env {name}")
    return out


def _from_overrides(overrides: Sequence[str] | Mapping[str, object]) -> dict[str, tuple[object, str]]:
    if isinstance(overrides, Mapping):
        pairs = list(overrides.items())
    else:
        pairs = []
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"--set {item!r}: expected key=value")
            pairs.append((key.strip(), value))
    out: dict[str, tuple[object, str]] = {}
    for key, value in pairs:
        _check_key(key, "--set")
        out[key] = (value, "--set")
    return out


def load_config(
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Sequence[str] | Mapping[str, object] = (),
) -> KVStoreConfig:
    """Build and validate the config: defaults < YAML file < KVSTORE_* env vars < overrides.

    `path` defaults to env KVSTORE_CONFIG (no file if neither is set); `env` defaults to os.environ;
    `overrides` are "section.key=value" strings (``--set``) or a {"section.key": value} mapping.
    AUTO sizes stay AUTO; resolve_auto() turns them into numbers for this machine.
    """
    env = os.environ if env is None else env
    path = path or env.get(_ENV_CONFIG_FILE) or None
    raw = _read_yaml(path) if path else {}
    raw.update(_from_env(env))
    raw.update(_from_overrides(overrides))

    values: dict[str, object] = {}
    for key, (value, source) in raw.items():
        try:
            values[key] = _coerce(key, value)
        except ConfigError as e:
            raise ConfigError(f"{e} (from {source})") from None
    defaults = KVStoreConfig()
    sections = {
        name: replace(getattr(defaults, name), **{k.split(".", 1)[1]: v for k, v in values.items()
                                                 if k.startswith(name + ".")})
        for name in _SECTIONS
    }
    top = {k: v for k, v in values.items() if "." not in k}
    return validate(replace(defaults, **top, **sections))


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate(cfg: KVStoreConfig) -> KVStoreConfig:
    """Return `cfg` unchanged if every range rule holds; else raise ConfigError naming the key."""
    cpu, disk, agent, cluster = cfg.cpu, cfg.disk, cfg.agent, cfg.cluster
    _check(cfg.chunk_tokens > 0 and cfg.chunk_tokens % 16 == 0, "chunk_tokens",
           f"{cfg.chunk_tokens} must be a positive multiple of 16")
    _check(cpu.slab_bytes >= MiB, "cpu.slab_bytes", f"{cpu.slab_bytes} is below 1 MiB")
    _check(cpu.arena_bytes == AUTO or cpu.arena_bytes >= cpu.slab_bytes, "cpu.arena_bytes",
           f"{cpu.arena_bytes} must be auto or at least cpu.slab_bytes ({cpu.slab_bytes})")
    _check(bool(cpu.shm_dir), "cpu.shm_dir", "must not be empty")
    _check(bool(disk.path), "disk.path", "must not be empty")
    _check(disk.batch_bytes >= 4 * KiB, "disk.batch_bytes", f"{disk.batch_bytes} is below 4 KiB")
    _check(disk.readahead_bytes >= 0, "disk.readahead_bytes", f"{disk.readahead_bytes} is negative")
    _check(disk.segment_bytes >= disk.batch_bytes, "disk.segment_bytes",
           f"{disk.segment_bytes} must be at least disk.batch_bytes ({disk.batch_bytes})")
    _check(disk.queue_bytes >= disk.batch_bytes, "disk.queue_bytes",
           f"{disk.queue_bytes} must be at least disk.batch_bytes ({disk.batch_bytes})")
    _check(disk.capacity_bytes == AUTO or disk.capacity_bytes >= disk.segment_bytes, "disk.capacity_bytes",
           f"{disk.capacity_bytes} must be auto or at least disk.segment_bytes ({disk.segment_bytes})")
    _check(0 < disk.compact_garbage_ratio <= 1, "disk.compact_garbage_ratio",
           f"{disk.compact_garbage_ratio} must be in (0, 1]")
    _check(agent.lease_ttl_s > 0, "agent.lease_ttl_s", f"{agent.lease_ttl_s} must be positive")
    _check(agent.max_frame_bytes >= 64 * KiB, "agent.max_frame_bytes", f"{agent.max_frame_bytes} is below 64 KiB")
    _check(0 <= agent.busy_poll_us <= 100_000, "agent.busy_poll_us",
           f"{agent.busy_poll_us} is outside [0, 100000] microseconds")
    _check(agent.max_batch_chunks > 0, "agent.max_batch_chunks", f"{agent.max_batch_chunks} must be positive")
    _check(agent.max_pin_ttl_s > 0, "agent.max_pin_ttl_s", f"{agent.max_pin_ttl_s} must be positive")
    _check(0 < agent.max_pinned_fraction <= 1, "agent.max_pinned_fraction",
           f"{agent.max_pinned_fraction} must be in (0, 1]")
    _check(bool(cluster.namespace), "cluster.namespace", "must not be empty")
    _check(cluster.replication >= 1, "cluster.replication", f"{cluster.replication} must be at least 1")
    for key in ("call_timeout_s", "pull_timeout_s", "heartbeat_s"):
        _check(getattr(cluster, key) > 0, f"cluster.{key}", f"{getattr(cluster, key)} must be positive")
    _check(cluster.object_store_bytes >= 64 * MiB, "cluster.object_store_bytes",
           f"{cluster.object_store_bytes} is below 64 MiB")
    control = cfg.control
    for section, key in (("control", "address"), ("control", "metrics_address"), ("agent", "metrics_address")):
        value = getattr(getattr(cfg, section), key)
        host, sep, port = value.rpartition(":")
        _check(value == "" and key == "metrics_address" or bool(sep and host and port.isdigit()
                                                                    and int(port) < 65536),
               f"{section}.{key}", f"{value!r} is not host:port")
    _check(control.call_timeout_s > 0, "control.call_timeout_s", f"{control.call_timeout_s} must be positive")
    _check(control.max_request_chunks > 0, "control.max_request_chunks",
           f"{control.max_request_chunks} must be positive")
    _check(control.workers > 0, "control.workers", f"{control.workers} must be positive")
    _check(bool(control.tls_cert) == bool(control.tls_key),
           "control.tls_key" if control.tls_cert else "control.tls_cert",
           "control.tls_cert and control.tls_key go together: set both or neither")
    _check(not control.tls_client_ca or bool(control.tls_cert), "control.tls_client_ca",
           "needs control.tls_cert and control.tls_key (mTLS is TLS with client certificates)")
    _check(bool(control.tls_client_cert) == bool(control.tls_client_key),
           "control.tls_client_key" if control.tls_client_cert else "control.tls_client_cert",
           "control.tls_client_cert and control.tls_client_key go together: set both or neither")
    for key, allowed in _ENUMS.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _check(value in allowed, key, f"{value!r} is not one of {', '.join(allowed)}")
    return cfg


def config_to_dict(cfg: KVStoreConfig) -> dict:
    """The config as a plain nested dict (for `kvstore config show` and logs); as YAML it loads back."""
    return asdict(cfg)


# --- AUTO sizes ------------------------------------------------------------------------------------


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(value, high))


def _memory_available() -> int:
    """Memory we may budget from: MemAvailable, or the cgroup v2 memory limit if that is lower."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024  # the value is in kB
                break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:  # no /proc (macOS has no SC_AVPHYS_PAGES: use physical memory there)
        pages = "SC_AVPHYS_PAGES" if "SC_AVPHYS_PAGES" in os.sysconf_names else "SC_PHYS_PAGES"
        available = os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE")
    try:  # in a container MemAvailable is the host's; the container's limit is what gets us OOM-killed
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            available = min(available, int(limit))
    except (OSError, ValueError):
        pass
    return available


def _nearest_existing_dir(path: str) -> Path:
    p = Path(path).absolute()
    while not p.is_dir():
        p = p.parent
    return p


def auto_disk_capacity(path: str, segment_bytes: int) -> int:
    """The AUTO disk capacity: half of (the free space at `path`, or its nearest existing parent, plus
    what the tier's segment files there already use, so the figure does not shrink as the tier fills
    and restarts), within [256 MiB, 64 GiB] and never below one segment."""
    directory = _nearest_existing_dir(path)
    ours = sum(f.stat().st_size for f in Path(path).glob("seg-*.kvs")) if os.path.isdir(path) else 0
    free = shutil.disk_usage(directory).free
    return max(_clamp((free + ours) // 2, 256 * MiB, 64 * GiB), segment_bytes)


def resolve_auto(cfg: KVStoreConfig) -> KVStoreConfig:
    """Replace AUTO sizes by numbers for this machine and expand ~ in disk.path.

    cpu.arena_bytes: 25% of available memory, within [64 MiB, 8 GiB] and never below one slab.
    disk.capacity_bytes: auto_disk_capacity().
    """
    cpu, disk = cfg.cpu, cfg.disk
    path = os.path.expanduser(disk.path)
    arena = cpu.arena_bytes
    if arena == AUTO:
        arena = max(_clamp(_memory_available() // 4, 64 * MiB, 8 * GiB), cpu.slab_bytes)
    capacity = disk.capacity_bytes
    if capacity == AUTO:
        capacity = auto_disk_capacity(path, disk.segment_bytes)
    return validate(replace(cfg, cpu=replace(cpu, arena_bytes=arena),
                            disk=replace(disk, path=path, capacity_bytes=capacity)))
