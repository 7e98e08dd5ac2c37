"""install-hooks' C shims and the choice between the C and the Python client (cbatch.clients.cclient)."""

from __future__ import annotations

import os
import types

import pytest

from cbatch.admin import install
from cbatch.clients import cclient
from cbatch.core.errors import CbatchError


def test_c_shim_text_is_role_and_socket_lines():
    text = install.shim_text("prologue", "/run/x/cbatchd.sock", "/usr/bin/python3", "/usr/libexec/cbatch/cbatch-client")
    assert text.splitlines() == ["#!/usr/libexec/cbatch/cbatch-client shim",
                                 f"{install.MARKER} (prologue); do not edit, re-run it instead.",
                                 "role prologue", "socket /run/x/cbatchd.sock"]


@pytest.mark.parametrize("client", ["relative/cbatch-client", "/opt/my dir/cbatch-client"])
def test_c_shim_refuses_unusable_client_paths(client):
    with pytest.raises(CbatchError, match="absolute path without blanks"):
        install.c_shim_text("job_starter", "/run/cbatch/cbatchd.sock", client)


def test_c_shim_refuses_a_socket_that_would_forge_a_line():
    with pytest.raises(CbatchError, match="socket path unusable"):
        install.c_shim_text("job_starter", "/run/x.sock\nrole prologue", "/usr/libexec/cbatch/cbatch-client")


def test_install_writes_c_shims_and_check_accepts_them(tmp_path):
    client = tmp_path / "libexec" / "cbatch-client"
    client.parent.mkdir()
    client.write_bytes(b"\x7fELF")
    client.chmod(0o755)
    mom_priv = tmp_path / "mom_priv"
    mom_priv.mkdir()
    paths = install.install(str(mom_priv), str(client.parent), "/run/cbatch/cbatchd.sock", "/usr/bin/python3",
                            str(client))
    for kind, path in paths.items():
        assert open(path).read().startswith(f"#!{client} shim\n")
        if os.geteuid() == 0:
            assert install.hook_problems(path, kind, "/usr/bin/python3") == []


def test_choose_tests_env_and_explicit(monkeypatch, tmp_path):
    monkeypatch.setenv(cclient.ENV_HOOKS, "python")
    assert cclient.choose(tests=True) is None
    assert cclient.choose("c", "/x/cbatch-client", tests=True) == "/x/cbatch-client"
    monkeypatch.delenv(cclient.ENV_HOOKS)
    monkeypatch.setenv(cclient.ENV_CLIENT, "/y/cbatch-client")
    assert cclient.choose(tests=True) == "/y/cbatch-client"
    # production (install-hooks): <libexec>/cbatch-client, --client or the installed one, never the environment
    monkeypatch.setattr(cclient, "INSTALLED", str(tmp_path / "none"))
    assert cclient.choose(None, None, str(tmp_path)) is None
    assert cclient.choose("c", None, str(tmp_path)) == ""


def test_install_hooks_command_c_without_client_is_an_error(tmp_path, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("install-hooks needs root")
    (tmp_path / "mom_priv").mkdir()
    # Neither in --libexec nor installed (scripts/setup installs /usr/libexec/cbatch/cbatch-client).
    monkeypatch.setattr(cclient, "INSTALLED", str(tmp_path / "not-installed" / cclient.CLIENT_NAME))
    args = types.SimpleNamespace(mom_priv=str(tmp_path / "mom_priv"), libexec=str(tmp_path / "libexec"),
                                 socket="/run/cbatch/cbatchd.sock", hooks="c", client=None, mom_config=None,
                                 no_mom_config=True)
    with pytest.raises(CbatchError, match="no C client found"):
        install.command(args)


def test_a_user_writable_c_client_is_refused_for_root_hooks(tmp_path):
    """A job user who could write the client would run code as root in the next prologue."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make root-owned files")
    client = tmp_path / "cbatch-client"
    client.write_bytes(b"\x7fELF")
    client.chmod(0o755)
    assert cclient.unsafe(str(client)) is None
    client.chmod(0o757)
    assert "world-writable" in cclient.unsafe(str(client))
    client.chmod(0o755)
    os.chown(client, 65534, 65534)
    assert "not root" in cclient.unsafe(str(client))
    mom_priv = tmp_path / "mom_priv"
    mom_priv.mkdir()
    paths = install.install(str(mom_priv), str(tmp_path), "/run/cbatch/cbatchd.sock", "/usr/bin/python3", str(client))
    assert any("not root" in p for p in install.hook_problems(paths["prologue"], "prologue"))
    args = types.SimpleNamespace(mom_priv=str(mom_priv), libexec=str(tmp_path), socket="/run/cbatch/cbatchd.sock",
                                 hooks="c", client=str(client), mom_config=None, no_mom_config=True)
    with pytest.raises(CbatchError, match="unsafe for root hooks"):
        install.command(args)
