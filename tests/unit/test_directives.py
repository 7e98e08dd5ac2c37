"""#CBATCH directives: the leading comment block rule, every option form, and hostile scripts."""

import pytest

from cbatch.core.directives import (MAX_DIRECTIVES, MAX_SCAN_BYTES, OPTIONS_HINT, Directives, UserMount,
                               parse_mount, parse_options, parse_script, valid_reference)
from cbatch.core.errors import DirectiveError

H = " (" + OPTIONS_HINT + ")"


def err(data) -> str:
    with pytest.raises(DirectiveError) as exc:
        parse_script(data) if isinstance(data, bytes) else parse_options(data)
    return exc.value.message


def test_no_directives():
    assert parse_script(b"#!/bin/sh\necho hi\n") == Directives()
    assert parse_script(b"") == Directives()


def test_every_option_equals_form():
    d = parse_script(b"#!/bin/bash\n#CBATCH --image=debian:12\n#CBATCH --mount=/a:/b:ro\n#CBATCH --env=A=1\n"
                     b"#CBATCH --workdir=/w\n#CBATCH --network=bridge\n#CBATCH --readonly\n#CBATCH --entrypoint\n")
    assert d == Directives(image="debian:12", mounts=(UserMount("/a", "/b", True, 3),), env=(("A", "1"),),
                           workdir="/w", network="bridge", readonly=True, entrypoint=True)


def test_every_option_space_form_several_per_line():
    d = parse_script(b"#CBATCH --image debian:12 --mount /a:/b --env A=1 --workdir /w --network bridge "
                     b"--readonly --entrypoint\n")
    assert d == Directives(image="debian:12", mounts=(UserMount("/a", "/b", False, 1),), env=(("A", "1"),),
                           workdir="/w", network="bridge", readonly=True, entrypoint=True)


def test_mount_modes_and_default_target():
    d = parse_script(b"#CBATCH --mount /a:/b:rw --mount /c:ro --mount /d\n")
    assert d.mounts == (UserMount("/a", "/b", False, 1), UserMount("/c", "/c", True, 1),
                        UserMount("/d", "/d", False, 1))


def test_repeated_env_and_mounts_keep_order():
    d = parse_script(b"#CBATCH --env A=1 --env B=x=y\n#CBATCH --env A=2 --env EMPTY=\n")
    assert d.env == (("A", "1"), ("B", "x=y"), ("A", "2"), ("EMPTY", ""))


def test_quotes_are_shell_like_and_nothing_is_evaluated():
    d = parse_script(b"#CBATCH --env 'MSG=hello world' --env \"X=$(rm -rf /)\" --env Y=$HOME --env Z=`id`\n")
    assert d.env == (("MSG", "hello world"), ("X", "$(rm -rf /)"), ("Y", "$HOME"), ("Z", "`id`"))


def test_block_rule_like_pbs():
    script = (b"#!/bin/bash\n\n# comment\n   \n#PBS -l nodes=1\n  #CBATCH --image=a:1\n\t#CBATCH --readonly\n"
              b"echo start\n#CBATCH --image=b:2\n#CBATCH --bogus\n")
    d = parse_script(script)
    assert d.image == "a:1" and d.readonly


def test_directive_after_first_command_is_ignored_even_if_malformed():
    assert parse_script(b"true\n#CBATCH --image=x --nonsense '\n") == Directives()


def test_prefix_must_be_followed_by_space():
    assert parse_script(b"#CBATCHX --image=a\n#cbatch --image=b\n# CBATCH --image=c\n") == Directives()
    assert parse_script(b"#CBATCH\n") == Directives()


def test_crlf_script():
    assert parse_script(b"#!/bin/sh\r\n#CBATCH --image=a:1\r\necho\r\n").image == "a:1"


def test_native_image():
    assert parse_script(b"#CBATCH --image=native\n").image == "native"


def test_str_input_accepted():
    assert parse_script("#CBATCH --image=a\n").image == "a"


# --- errors ---------------------------------------------------------------------------------------------

def test_unknown_option():
    assert err(b"#!/bin/sh\n#CBATCH --imgae=x\n") == "cbatch: directive line 2: unknown option: --imgae" + H


def test_unexpected_argument_and_trailing_comment():
    assert err(b"#CBATCH debian\n") == "cbatch: directive line 1: unexpected argument: debian" + H
    assert err(b"#CBATCH --readonly # comment\n") == (
        "cbatch: directive line 1: unexpected argument: # (" + OPTIONS_HINT
        + "; trailing comments are not supported)")


def test_missing_and_empty_values():
    assert err(b"#CBATCH --image\n") == "cbatch: directive line 1: --image needs a value: --image" + H
    assert err(b"#CBATCH --image --readonly\n") == "cbatch: directive line 1: --image needs a value: --image" + H
    assert err(b"#CBATCH --image=\n") == "cbatch: directive line 1: --image has an empty value: --image=" + H
    assert err(b"#CBATCH --readonly=yes\n") == (
        "cbatch: directive line 1: --readonly takes no value: --readonly=yes" + H)


def test_duplicate_single_valued_names_both_lines():
    assert err(b"#!/bin/sh\n#CBATCH --image=a\n#CBATCH --readonly\n#CBATCH --image b\n") == (
        "cbatch: directive line 4: --image given twice: --image b (first given on line 2; give it once)")
    assert err(b"#CBATCH --workdir=/a --workdir=/b\n") == (
        "cbatch: directive line 1: --workdir given twice: --workdir=/b (first given on line 1; give it once)")
    assert err(b"#CBATCH --network=a\n#CBATCH --network=a\n").startswith(
        "cbatch: directive line 2: --network given twice")


def test_duplicate_flags_are_harmless():
    assert parse_script(b"#CBATCH --readonly --readonly\n").readonly


def test_malformed_quotes_name_the_line():
    assert err(b"#!/bin/sh\n\n#CBATCH --env 'A=1\n") == (
        "cbatch: directive line 3: malformed directive: --env 'A=1 (No closing quotation; quote like a shell)")


@pytest.mark.parametrize("value", ["relative:/b", "/a:relative", "/a:/b:rx", "/a:/b:ro:rw", ":/b", "/a::ro"])
def test_malformed_mounts(value):
    assert err(f"#CBATCH --mount {value}\n".encode()) == (
        f"cbatch: directive line 1: malformed --mount: {value} (SRC:DST[:ro|rw] with absolute paths)")


@pytest.mark.parametrize("value", ["A", "1A=x", "A-B=1", "=x", "A B=1"])
def test_malformed_env(value):
    assert err(["--env", value]) == (
        f"cbatch: cbatch run: malformed --env: {value} (KEY=VALUE with KEY made of A-Z, a-z, 0-9, _)")


def test_relative_workdir_and_bad_network():
    assert err(b"#CBATCH --workdir=data\n") == (
        "cbatch: directive line 1: --workdir is not an absolute path: data (give an absolute directory)")
    assert err(b"#CBATCH --network=-x\n") == (
        "cbatch: directive line 1: malformed --network: -x (a Docker network name)")


def test_invalid_image_reference():
    assert err(b"#CBATCH --image=Debian:12\n") == (
        "cbatch: directive line 1: not a valid image reference: Debian:12 "
        "([registry[:port]/]name[:tag][@sha256:<64 hex>], lowercase name, or native)")


# --- hostile input ----------------------------------------------------------------------------------------

def test_nul_byte_in_comment_block():
    assert err(b"#!/bin/sh\n#CBATCH --image=a\0b\n") == (
        "cbatch: directive line 2: NUL byte in the script's comment block (job scripts must be text)")
    assert err(b"# harmless\0comment\n") == (
        "cbatch: directive line 1: NUL byte in the script's comment block (job scripts must be text)")


def test_nul_after_the_block_is_not_ours():
    assert parse_script(b"#CBATCH --image=a\nexit 0\n\0\0binary payload").image == "a"


def test_line_too_long():
    line = b"#CBATCH --env A=" + b"x" * 5000 + b"\n"
    assert err(b"#!/bin/sh\n" + line) == "cbatch: directive line 2: directive line too long: 5016 bytes (at most 4096)"


def test_long_plain_comment_is_fine():
    assert parse_script(b"# " + b"x" * 100000 + b"\n#CBATCH --image=a\n").image == "a"


def test_exactly_4096_bytes_is_allowed():
    line = b"#CBATCH --env A=" + b"x" * (4096 - 16)
    assert len(line) == 4096
    assert parse_script(line + b"\n").env[0][1] == "x" * 4080


def test_too_many_directives():
    script = b"".join(b"#CBATCH --env A%d=1\n" % i for i in range(MAX_DIRECTIVES + 1))
    assert err(script) == f"cbatch: directive line {MAX_DIRECTIVES + 1}: too many directives: 257 (at most 256)"
    ok = b"".join(b"#CBATCH --env A%d=1\n" % i for i in range(MAX_DIRECTIVES))
    assert len(parse_script(ok).env) == MAX_DIRECTIVES


def test_non_utf8_comments_are_fine_but_directives_must_be_utf8():
    assert parse_script(b"#!/bin/sh\n# caf\xe9 latin-1 comment\n#CBATCH --image=a\necho \xff\n").image == "a"
    assert err(b"#CBATCH --env A=caf\xe9\n") == (
        "cbatch: directive line 1: directive is not valid UTF-8: #CBATCH --env A=caf\\xe9 (write directives in UTF-8)")
    assert parse_script("#CBATCH --env A=café\n".encode()).env == (("A", "café"),)


def test_only_first_mib_is_read():
    pad = (b"#" + b"x" * 1000 + b"\n") * (MAX_SCAN_BYTES // 1002 + 1)
    assert parse_script(pad + b"#CBATCH --image=late\n") == Directives()
    # A directive cut in half by the limit is not read at all.
    head = b"#" * (MAX_SCAN_BYTES - 20) + b"\n"
    assert parse_script(head + b"#CBATCH --image=abcdefghijklmnopqrstuvwxyz\n") == Directives()


def test_newline_injection_in_value_is_escaped_in_message():
    message = err(["--imgae\ncbatch: forged"])
    assert "\n" not in message and "\\n" in message


# --- parse_options (cbatch run) ---------------------------------------------------------------------------

def test_parse_options_all_forms():
    d = parse_options(["--image", "debian:12", "--mount=/a:/b:ro", "--env", "A=1", "--readonly", "--entrypoint",
                       "--workdir=/w", "--network", "bridge"])
    assert d == Directives(image="debian:12", mounts=(UserMount("/a", "/b", True, 0),), env=(("A", "1"),),
                           workdir="/w", network="bridge", readonly=True, entrypoint=True)


def test_parse_options_errors_use_source():
    assert err(["--foo"]) == "cbatch: cbatch run: unknown option: --foo" + H
    assert err(["--image=a", "--image=b"]) == "cbatch: cbatch run: --image given twice: --image=b (give it once)"
    with pytest.raises(DirectiveError) as exc:
        parse_options(["--nope"], source="submit filter")
    assert exc.value.message.startswith("cbatch: submit filter: unknown option")
    assert err(["--env=A=\0"]).startswith("cbatch: cbatch run: invalid argument: --env=A=\\x00")


def test_parse_mount_helper():
    assert parse_mount("/a") == ("/a", "/a", None)
    assert parse_mount("/a:ro") == ("/a", "/a", True)
    assert parse_mount("/a:/b:rw") == ("/a", "/b", False)
    with pytest.raises(ValueError):
        parse_mount("/a:/b:/c")


@pytest.mark.parametrize("ref", [
    "busybox", "debian:12", "cbatch-test/busybox:1", "library/debian:bookworm-slim", "docker.io/library/debian:12",
    "registry:5000/a/b:tag", "registry.example.org:5000/hpc/app_x:1.0-rc1", "localhost/x", "a__b/c--d/e.f",
    "[::1]:5000/x:y", "debian@sha256:" + "a" * 64, "registry:5000/path/img:tag@sha256:" + "0123456789abcdef" * 4,
])
def test_valid_references(ref):
    assert valid_reference(ref)


@pytest.mark.parametrize("ref", [
    "", "Debian", "debian:", "debian:-x", ":tag", "a//b", "a/", "/a", "a:1:2", "debian@sha256:abc",
    "debian@sha256:" + "A" * 64, "debian@md5:" + "a" * 64, "a b", "a;rm", "-a", "a.", "a..b", "a_-b",
    "debian:12\n", "debian:" + "t" * 129, "debian:1٢", "x" * 256, "host:port/x",
])
def test_invalid_references(ref):
    assert not valid_reference(ref)
