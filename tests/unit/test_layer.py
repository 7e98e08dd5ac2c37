"""cbatch.engines.layer.layer_dir: only a direct child of the engine's overlay2 directory is ever mounted on."""

from cbatch.engines.layer import layer_dir

OK = "/var/lib/docker/overlay2/" + "a" * 64


def _inspect(upper, name="overlay2"):
    return {"GraphDriver": {"Name": name, "Data": {"UpperDir": upper}}}


def test_overlay2_layer_dir():
    assert layer_dir(_inspect(OK + "/diff")) == OK


def test_anything_else_is_none():
    assert layer_dir({}) is None
    assert layer_dir(_inspect(OK + "/diff", name="btrfs")) is None
    assert layer_dir(_inspect(OK + "/merged")) is None
    assert layer_dir(_inspect("/var/lib/docker/overlay2/../../../etc/x/diff")) is None
    assert layer_dir(_inspect("/etc/diff")) is None
    assert layer_dir(_inspect("/var/lib/docker/overlay2/a/b/diff")) is None
    assert layer_dir(_inspect("relative/overlay2/x/diff")) is None
