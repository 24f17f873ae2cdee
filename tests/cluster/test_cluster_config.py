"""The `cluster` config section: defaults, sources, range checks."""

from __future__ import annotations

import pytest

from kvstore.config import load_config
from kvstore.errors import ConfigError

pytestmark = pytest.mark.unit


def test_cluster_defaults_keep_serve_standalone():
    cfg = load_config(env={})
    assert not cfg.cluster.enabled and cfg.cluster.replication == 1 and cfg.cluster.ray_address == ""


def test_cluster_settings_from_env_and_overrides():
    cfg = load_config(env={"KVSTORE_CLUSTER__REPLICATION": "3"},
                      overrides=["cluster.pull_timeout_s=1.5", "cluster.object_store_bytes=512MiB"])
    assert cfg.cluster.replication == 3 and cfg.cluster.pull_timeout_s == 1.5
    assert cfg.cluster.object_store_bytes == 512 << 20


@pytest.mark.parametrize("setting, key", [("cluster.replication=0", "cluster.replication"),
                                          ("cluster.call_timeout_s=0", "cluster.call_timeout_s"),
                                          ("cluster.heartbeat_s=-1", "cluster.heartbeat_s"),
                                          ("cluster.object_store_bytes=1MiB", "cluster.object_store_bytes"),
                                          ("cluster.namespace=", "cluster.namespace")])
def test_cluster_bad_values_name_the_key(setting, key):
    with pytest.raises(ConfigError, match=key):
        load_config(env={}, overrides=[setting])
