"""The TM keys (issue #10 item 2, a container job's own pbsdsh): torque.client, torque.tm_max_connections and
the queue key tm: defaults, merging, and the exact refusals."""

import pytest

from cbatch.core.config import ConfigError, TorqueConfig, parse


def bad(text: str) -> str:
    with pytest.raises(ConfigError) as exc:
        parse(text, path="site.yaml", hostname="node1")
    return exc.value.message


def test_defaults_relay_tm_and_mount_the_client():
    cfg = parse("", path="site.yaml", hostname="n")
    assert cfg.torque == TorqueConfig(default_queue=None, client="auto", tm_max_connections=32)
    assert cfg.defaults.tm is True


def test_keys_set_and_tm_merges_per_queue():
    cfg = parse("torque: {client: 'off', tm_max_connections: 4}\n"
                "defaults: {tm: false}\n"
                "queues: {mpi: {tm: true}, plain: {}}\n", path="site.yaml", hostname="n")
    assert cfg.torque.client == "off" and cfg.torque.tm_max_connections == 4
    assert cfg.queue("mpi").tm is True and cfg.queue("plain").tm is False and cfg.defaults.tm is False


@pytest.mark.parametrize("text,message", [
    ("torque: {client: yes}", "cbatch: site.yaml: torque.client: not a TORQUE client mode: True (auto | off)"),
    ("torque: {client: /opt/torque}",
     "cbatch: site.yaml: torque.client: not a TORQUE client mode: /opt/torque (auto | off)"),
    ("torque: {tm_max_connections: 0}", "cbatch: site.yaml: torque.tm_max_connections: "),
    ("torque: {tm_max_connections: 1025}",
     "cbatch: site.yaml: torque.tm_max_connections: too large: 1025 (at most 1024"),
    ("torque: {tm_max_connections: many}", "cbatch: site.yaml: torque.tm_max_connections: "),
    ("torque: {tm_port: 15003}", "cbatch: site.yaml: torque.tm_port: unknown key: tm_port"),
    ("defaults: {tm: 1}", "cbatch: site.yaml: defaults.tm: "),
    ("queues: {q: {tm: 'maybe'}}", "cbatch: site.yaml: queues.q.tm: "),
])
def test_bad_values_are_refused_at_load(text, message):
    assert bad(text).startswith(message)
