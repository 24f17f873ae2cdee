import os
import re
import shutil

import pytest
import yaml

from kvstore.config import (
    AUTO,
    CpuConfig,
    KVStoreConfig,
    config_to_dict,
    load_config,
    parse_size,
    resolve_auto,
)
from kvstore.errors import ConfigError

pytestmark = pytest.mark.unit

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


def write_yaml(tmp_path, text, name="kvstore.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def raises_naming(key):
    return pytest.raises(ConfigError, match=re.escape(key))


# --- sources -----------------------------------------------------------------------------------------


def test_defaults():
    cfg = load_config(env={})
    assert cfg == KVStoreConfig()
    assert cfg.chunk_tokens == 256
    assert cfg.cpu.arena_bytes == AUTO
    assert cfg.cpu.slab_bytes == 64 * MiB
    assert cfg.cpu.policy == "lru"
    assert cfg.disk.enabled is True
    assert cfg.disk.capacity_bytes == AUTO
    assert cfg.disk.compact_garbage_ratio == 0.5
    assert cfg.agent.lease_ttl_s == 30.0
    assert cfg.agent.log_level == "info"


def test_yaml_then_env_then_overrides(tmp_path):
    path = write_yaml(tmp_path, """
chunk_tokens: 512
cpu:
  arena_bytes: 1GiB
  policy: s3fifo
disk:
  enabled: false
  compact_garbage_ratio: 0.25
agent:
  lease_ttl_s: 10
""")
    env = {"KVSTORE_CPU__ARENA_BYTES": "2GiB", "KVSTORE_CHUNK_TOKENS": "128", "KVSTORE_DISK__ENABLED": "yes"}
    cfg = load_config(path, env=env, overrides=["cpu.arena_bytes=3GiB", "agent.log_level=debug"])
    assert cfg.cpu.arena_bytes == 3 * GiB  # override beats env beats YAML
    assert cfg.chunk_tokens == 128  # env beats YAML
    assert cfg.disk.enabled is True  # env beats YAML
    assert cfg.cpu.policy == "s3fifo"  # YAML beats default
    assert cfg.disk.compact_garbage_ratio == 0.25
    assert cfg.agent.lease_ttl_s == 10.0 and isinstance(cfg.agent.lease_ttl_s, float)
    assert cfg.agent.log_level == "debug"
    assert cfg.cpu.slab_bytes == 64 * MiB  # untouched keys keep their defaults


def test_config_file_from_env_var_and_path_argument_wins(tmp_path):
    from_env = write_yaml(tmp_path, "chunk_tokens: 32\n", "env.yaml")
    from_arg = write_yaml(tmp_path, "chunk_tokens: 48\n", "arg.yaml")
    assert load_config(env={"KVSTORE_CONFIG": from_env}).chunk_tokens == 32
    assert load_config(from_arg, env={"KVSTORE_CONFIG": from_env}).chunk_tokens == 48
    assert load_config(env={"KVSTORE_CONFIG": ""}) == KVStoreConfig()


def test_env_ignores_other_variables():
    env = {"HOME": "/nowhere", "KVSTORE": "x", "MY_KVSTORE_CPU__POLICY": "nope",
           "KVSTORE_CPU__POLICY": "s3fifo"}
    assert load_config(env=env).cpu.policy == "s3fifo"


def test_overrides_as_mapping_take_typed_values():
    cfg = load_config(env={}, overrides={"cpu.arena_bytes": 512 * MiB, "disk.o_direct": True, "cpu.shm_dir": "/dev/x"})
    assert cfg.cpu.arena_bytes == 512 * MiB
    assert cfg.disk.o_direct is True
    assert cfg.cpu.shm_dir == "/dev/x"


def test_override_value_may_contain_equals():
    cfg = load_config(env={}, overrides=["disk.path=/data/a=b"])
    assert cfg.disk.path == "/data/a=b"


def test_empty_yaml_and_empty_section_mean_defaults(tmp_path):
    assert load_config(write_yaml(tmp_path, ""), env={}) == KVStoreConfig()
    assert load_config(write_yaml(tmp_path, "cpu:\n"), env={}) == KVStoreConfig()


def test_enum_values_are_case_insensitive():
    cfg = load_config(env={"KVSTORE_AGENT__LOG_LEVEL": "WARNING"}, overrides=["cpu.policy=LRU"])
    assert cfg.agent.log_level == "warning"
    assert cfg.cpu.policy == "lru"


# --- sizes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("4GiB", 4 * GiB),
    ("512MiB", 512 * MiB),
    ("64KiB", 64 * KiB),
    ("2TiB", 2 << 40),
    ("4G", 4 * GiB),
    ("512M", 512 * MiB),
    ("64K", 64 * KiB),
    ("4GB", 4_000_000_000),
    ("512MB", 512_000_000),
    ("64KB", 64_000),
    ("4gib", 4 * GiB),
    ("4 GiB", 4 * GiB),
    ("1.5GiB", 3 * GiB // 2),
    ("0.5KiB", 512),
    ("1e9", 1_000_000_000),
    ("2.5e3", 2500),
    ("100B", 100),
    ("4096", 4096),
    (1024, 1024),
    (1e9, 1_000_000_000),
])
def test_parse_size(text, expected):
    assert parse_size(text, "cpu.slab_bytes") == expected


@pytest.mark.parametrize("text", ["auto", "AUTO", "0", 0])
def test_parse_size_auto(text):
    assert parse_size(text, "cpu.arena_bytes") == AUTO
    assert parse_size(text, "disk.capacity_bytes") == AUTO


def test_auto_only_where_allowed():
    with raises_naming("cpu.slab_bytes"):
        parse_size("auto", "cpu.slab_bytes")


@pytest.mark.parametrize("bad", ["4XB", "GiB", "", "-1GiB", "1.0001K", "1.5", "four", "1/2", True, -5, 1.5,
                                 float("inf"), [1], None])
def test_parse_size_rejects(bad):
    with raises_naming("cpu.arena_bytes"):
        parse_size(bad, "cpu.arena_bytes")


def test_size_error_message_names_key_and_source():
    with pytest.raises(ConfigError) as info:
        load_config(env={"KVSTORE_CPU__ARENA_BYTES": "4XB"})
    assert "cpu.arena_bytes: '4XB' is not a size" in str(info.value)
    assert "KVSTORE_CPU__ARENA_BYTES" in str(info.value)


def test_every_bytes_field_accepts_size_strings():
    cfg = load_config(env={}, overrides=[
        "cpu.arena_bytes=1GiB", "cpu.slab_bytes=2MiB", "disk.capacity_bytes=10GB", "disk.segment_bytes=128M",
        "disk.batch_bytes=1MiB", "disk.queue_bytes=64MiB", "cluster.object_store_bytes=2G", "agent.max_frame_bytes=1MiB",
    ])
    assert (cfg.cpu.arena_bytes, cfg.cpu.slab_bytes) == (GiB, 2 * MiB)
    assert cfg.disk.capacity_bytes == 10_000_000_000
    assert (cfg.disk.segment_bytes, cfg.disk.batch_bytes, cfg.disk.queue_bytes) == (128 * MiB, MiB, 64 * MiB)
    assert cfg.cluster.object_store_bytes == 2 * GiB
    assert cfg.agent.max_frame_bytes == MiB


# --- booleans and other types ------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("true", True), ("True", True), ("1", True), ("yes", True), ("on", True), ("ON", True),
    ("false", False), ("FALSE", False), ("0", False), ("no", False), ("off", False), (" Off ", False),
])
def test_booleans(text, expected):
    cfg = load_config(env={"KVSTORE_DISK__FSYNC": text}, overrides=[f"cpu.prefault={text}"])
    assert cfg.disk.fsync is expected
    assert cfg.cpu.prefault is expected


def test_yaml_booleans(tmp_path):
    cfg = load_config(write_yaml(tmp_path, "disk:\n  o_direct: yes\n  fsync: off\n"), env={})
    assert cfg.disk.o_direct is True
    assert cfg.disk.fsync is False


@pytest.mark.parametrize("override, key", [
    ("disk.enabled=maybe", "disk.enabled"),
    ("disk.enabled=2", "disk.enabled"),
    ("chunk_tokens=abc", "chunk_tokens"),
    ("chunk_tokens=256.0", "chunk_tokens"),
    ("agent.max_batch_chunks=1e3", "agent.max_batch_chunks"),
    ("agent.lease_ttl_s=soon", "agent.lease_ttl_s"),
    ("agent.lease_ttl_s=nan", "agent.lease_ttl_s"),
    ("agent.lease_ttl_s=inf", "agent.lease_ttl_s"),
])
def test_wrong_types(override, key):
    with raises_naming(key):
        load_config(env={}, overrides=[override])


def test_wrong_yaml_types_name_key_and_file(tmp_path):
    path = write_yaml(tmp_path, "cpu:\n  shm_dir: 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert "cpu.shm_dir" in str(info.value) and path in str(info.value)
    with raises_naming("cpu.prefault"):
        load_config(write_yaml(tmp_path, "cpu:\n  prefault: [1]\n"), env={})
    with raises_naming("disk.compact_garbage_ratio"):
        load_config(write_yaml(tmp_path, "disk:\n  compact_garbage_ratio: true\n"), env={})


# --- validation --------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, key", [
    (["chunk_tokens=0"], "chunk_tokens"),
    (["chunk_tokens=-16"], "chunk_tokens"),
    (["chunk_tokens=100"], "chunk_tokens"),
    (["cpu.slab_bytes=512KiB"], "cpu.slab_bytes"),
    (["cpu.slab_bytes=0"], "cpu.slab_bytes"),
    (["cpu.arena_bytes=32MiB"], "cpu.arena_bytes"),
    (["cpu.policy=fifo"], "cpu.policy"),
    (["cpu.shm_dir="], "cpu.shm_dir"),
    (["disk.path="], "disk.path"),
    (["disk.admission=never"], "disk.admission"),
    (["disk.batch_bytes=1KiB"], "disk.batch_bytes"),
    (["disk.segment_bytes=1MiB", "disk.batch_bytes=2MiB"], "disk.segment_bytes"),
    (["disk.queue_bytes=1MiB"], "disk.queue_bytes"),
    (["disk.capacity_bytes=100MiB"], "disk.capacity_bytes"),
    (["disk.compact_garbage_ratio=0"], "disk.compact_garbage_ratio"),
    (["disk.compact_garbage_ratio=1.5"], "disk.compact_garbage_ratio"),
    (["cluster.namespace="], "cluster.namespace"),
    (["cluster.object_store_bytes=0"], "cluster.object_store_bytes"),
    (["agent.lease_ttl_s=0"], "agent.lease_ttl_s"),
    (["agent.lease_ttl_s=-1"], "agent.lease_ttl_s"),
    (["agent.max_frame_bytes=32KiB"], "agent.max_frame_bytes"),
    (["agent.max_batch_chunks=0"], "agent.max_batch_chunks"),
    (["agent.log_level=verbose"], "agent.log_level"),
])
def test_validation_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides=overrides)
    assert str(info.value).startswith(key + ":")


def test_boundary_values_are_accepted():
    cfg = load_config(env={}, overrides=[
        "chunk_tokens=16", "cpu.slab_bytes=1MiB", "cpu.arena_bytes=1MiB", "disk.compact_garbage_ratio=1",
        "disk.batch_bytes=4KiB", "disk.segment_bytes=4KiB", "disk.queue_bytes=4KiB", "disk.capacity_bytes=4KiB",
        "agent.max_frame_bytes=64KiB",
    ])
    assert cfg.chunk_tokens == 16
    assert cfg.cpu.arena_bytes == cfg.cpu.slab_bytes == MiB
    assert cfg.disk.capacity_bytes == 4 * KiB
    assert cfg.agent.max_frame_bytes == 64 * KiB


# --- unknown keys and bad files ----------------------------------------------------------------------


def test_unknown_key_in_override_suggests_closest():
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides=["cpu.arena_byte=1GiB"])
    assert "cpu.arena_byte: unknown key; did you mean cpu.arena_bytes?" in str(info.value)


def test_unknown_key_in_env_names_dotted_key_and_variable():
    with pytest.raises(ConfigError) as info:
        load_config(env={"KVSTORE_CPU_ARENA_BYTES": "1GiB"})  # single underscore between levels
    message = str(info.value)
    assert message.startswith("cpu_arena_bytes: unknown key; did you mean cpu.arena_bytes?")
    assert "KVSTORE_CPU_ARENA_BYTES" in message


def test_unknown_key_in_yaml(tmp_path):
    path = write_yaml(tmp_path, "disk:\n  capacity: 10GiB\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert "disk.capacity: unknown key; did you mean disk.capacity_bytes?" in str(info.value)
    assert path in str(info.value)
    with raises_naming("network: unknown key"):
        load_config(write_yaml(tmp_path, "network:\n  port: 1\n"), env={})


def test_key_in_wrong_place_suggests_right_one(tmp_path):
    with raises_naming("did you mean cpu.arena_bytes?"):
        load_config(write_yaml(tmp_path, "arena_bytes: 1GiB\n"), env={})


def test_section_is_not_a_key():
    with raises_naming("cpu: is a section"):
        load_config(env={}, overrides=["cpu=1"])


def test_override_without_equals():
    with raises_naming("cpu.arena_bytes"):
        load_config(env={}, overrides=["cpu.arena_bytes"])


def test_top_level_not_a_mapping(tmp_path):
    path = write_yaml(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping") as info:
        load_config(path, env={})
    assert path in str(info.value)


def test_section_not_a_mapping(tmp_path):
    with raises_naming("cpu must be a mapping"):
        load_config(write_yaml(tmp_path, "cpu: 4GiB\n"), env={})


def test_bad_yaml_names_the_file(tmp_path):
    path = write_yaml(tmp_path, "cpu:\n  arena_bytes: [1GiB\n")
    with pytest.raises(ConfigError, match="invalid YAML") as info:
        load_config(path, env={})
    assert path in str(info.value)


def test_unreadable_file_names_the_file(tmp_path):
    missing = str(tmp_path / "missing.yaml")
    with raises_naming(missing):
        load_config(missing, env={})
    with raises_naming(str(tmp_path)):
        load_config(str(tmp_path), env={})  # a directory
    with raises_naming(missing):
        load_config(env={"KVSTORE_CONFIG": missing})


# --- config_to_dict ----------------------------------------------------------------------------------


def test_config_to_dict_is_plain_and_loads_back(tmp_path):
    cfg = load_config(env={}, overrides=["cpu.arena_bytes=1GiB", "disk.enabled=false", "chunk_tokens=64"])
    data = config_to_dict(cfg)
    assert data["chunk_tokens"] == 64
    assert data["cpu"] == {"arena_bytes": GiB, "slab_bytes": 64 * MiB, "shm_dir": "/dev/shm", "policy": "lru",
                           "prefault": True}
    assert data["disk"]["enabled"] is False
    assert set(data) == {"chunk_tokens", "cpu", "disk", "agent", "cluster", "control"}
    path = write_yaml(tmp_path, yaml.safe_dump(data))
    assert load_config(path, env={}) == cfg


# --- resolve_auto ------------------------------------------------------------------------------------


def test_resolve_auto_gives_sane_numbers(tmp_path):
    cfg = resolve_auto(load_config(env={}, overrides={"disk.path": str(tmp_path / "cache")}))
    assert 64 * MiB <= cfg.cpu.arena_bytes <= 8 * GiB
    free = shutil.disk_usage(tmp_path).free
    assert 256 * MiB <= cfg.disk.capacity_bytes <= 64 * GiB
    assert cfg.disk.capacity_bytes == max(256 * MiB, min(free // 2, 64 * GiB))
    assert cfg.disk.path == str(tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # resolving does not create the directory


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="needs /proc/meminfo")
def test_resolve_auto_arena_follows_meminfo():
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    limit = None
    if os.path.exists("/sys/fs/cgroup/memory.max"):
        with open("/sys/fs/cgroup/memory.max") as f:
            text = f.read().strip()
        limit = None if text == "max" else int(text)
    if limit is not None:
        available = min(available, limit)
    arena = resolve_auto(KVStoreConfig()).cpu.arena_bytes
    expected = max(64 * MiB, min(available // 4, 8 * GiB))
    assert abs(arena - expected) <= 64 * MiB  # MemAvailable moves a little between the two reads


def test_resolve_auto_keeps_explicit_sizes_and_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(env={}, overrides=["cpu.arena_bytes=1GiB", "disk.capacity_bytes=2GiB",
                                         "disk.path=~/deep/missing/dir"])
    resolved = resolve_auto(cfg)
    assert resolved.cpu.arena_bytes == GiB
    assert resolved.disk.capacity_bytes == 2 * GiB
    assert resolved.disk.path == os.path.join(str(tmp_path), "deep", "missing", "dir")
    assert resolve_auto(resolved) == resolved


def test_resolve_auto_never_goes_below_one_slab():
    cfg = KVStoreConfig(cpu=CpuConfig(slab_bytes=16 * GiB))
    assert resolve_auto(cfg).cpu.arena_bytes == 16 * GiB


def test_busy_poll_range():
    from kvstore.config import load_config
    from kvstore.errors import ConfigError

    assert load_config(env={}, overrides=["agent.busy_poll_us=0"]).agent.busy_poll_us == 0
    with pytest.raises(ConfigError, match="agent.busy_poll_us"):
        load_config(env={}, overrides=["agent.busy_poll_us=-1"])
