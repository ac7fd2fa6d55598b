"""Keys are private from the moment they exist; certificates say what they may be used for
(issue 13, problem 11)."""

from __future__ import annotations

import os
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedllm.deployment.pki import PRIVATE_MODE, make_node_keys, make_tls, write_file

ROOT = Path(__file__).resolve().parents[2]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def no_chmod(monkeypatch):
    """Nothing may tighten a file after it was created: only its creation mode counts."""
    for name in ("chmod", "fchmod", "lchmod"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, lambda *args, **kwargs: None)
    old = os.umask(0o022)  # the usual umask: a file created without a mode is world-readable
    yield
    os.umask(old)


def test_private_keys_are_created_0600_with_no_window(tmp_path, no_chmod):
    tls = make_tls(tmp_path / "certs", ["127.0.0.1"])
    private, public = make_node_keys(tmp_path / "keys", "node1")
    for key in (tls.ca_key, tls.server_key, private):
        assert _mode(key) & 0o077 == 0, f"{key.name} is readable by others at creation: {oct(_mode(key))}"
    assert _mode(public) & 0o044 == 0o044  # public parts stay readable
    assert not [p for p in tmp_path.rglob(".*.tmp")]  # no temporary file left behind


def test_keys_are_exactly_0600_whatever_the_umask(tmp_path):
    old = os.umask(0o000)
    try:
        tls = make_tls(tmp_path / "certs", ["localhost"])
        private, _ = make_node_keys(tmp_path / "keys", "n")
    finally:
        os.umask(old)
    assert {_mode(p) for p in (tls.ca_key, tls.server_key, private)} == {PRIVATE_MODE}


def test_existing_keys_are_never_replaced_silently(tmp_path):
    tls = make_tls(tmp_path, ["localhost"])
    before = tls.ca_key.read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        make_tls(tmp_path, ["localhost"])
    assert tls.ca_key.read_bytes() == before
    make_node_keys(tmp_path, "n")
    with pytest.raises(FileExistsError):
        make_node_keys(tmp_path, "n")
    assert make_tls(tmp_path, ["localhost"], overwrite=True).ca_key.read_bytes() != before


def test_a_planted_symlink_is_not_written_through(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("untouched")
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "n").symlink_to(target)
    make_node_keys(tmp_path / "keys", "n", overwrite=True)
    assert target.read_text() == "untouched"
    assert not (tmp_path / "keys" / "n").is_symlink() and _mode(tmp_path / "keys" / "n") == PRIVATE_MODE


def test_node_key_names_are_plain_file_names(tmp_path):
    for bad in ("../n", "a/b", "", ".hidden"):
        with pytest.raises(ValueError, match="plain file name"):
            make_node_keys(tmp_path, bad)


def test_certificates_carry_basic_constraints_and_key_usage(tmp_path):
    tls = make_tls(tmp_path, ["superlink.example.org", "10.0.0.5"])
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature and not usage.value.key_encipherment
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = server.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert not usage.value.key_cert_sign and not usage.value.crl_sign
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    server.verify_directly_issued_by(ca)
    aki = server.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


def test_the_server_certificate_works_for_tls_with_the_ca(tmp_path):
    tls = make_tls(tmp_path, ["127.0.0.1", "localhost"])
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tls.server_cert, tls.server_key)
    client = ssl.create_default_context(cafile=tls.ca_cert)
    client.verify_flags |= ssl.VERIFY_X509_STRICT  # RFC 5280 checks, key usage included
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(incoming, outgoing, server_hostname="localhost")
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):  # drive the handshake through memory buffers
        for side in (c, s):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(outgoing.read())
        incoming.write(s_out.read())
    assert c.getpeercert()["subject"] == ((("commonName", "127.0.0.1"),),)


def test_node_keys_are_openssh_p384(tmp_path):
    private, public = make_node_keys(tmp_path, "hospital-a")
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    assert key.curve.name == "secp384r1"
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ") and public.read_text().endswith(" fedllm-hospital-a\n")


@pytest.mark.slow  # subprocesses: the scripts as an operator runs them (in-process: test_operator_scripts.py)
def test_the_scripts_refuse_to_replace_a_ca(tmp_path):
    script = [sys.executable, str(ROOT / "scripts" / "make_certs.py")]
    first = subprocess.run([*script, str(tmp_path), "localhost"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert first.returncode == 0, first.stderr
    again = subprocess.run([*script, str(tmp_path), "localhost"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert again.returncode != 0 and "--force" in again.stderr and "Traceback" not in again.stderr
    forced = subprocess.run(
        [*script, "--force", str(tmp_path), "localhost"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert forced.returncode == 0, forced.stderr
    keys = [sys.executable, str(ROOT / "scripts" / "make_node_keys.py"), str(tmp_path / "k"), "n1"]
    assert subprocess.run(keys, capture_output=True, cwd=ROOT, timeout=60).returncode == 0
    assert _mode(tmp_path / "k" / "n1") == PRIVATE_MODE
    assert subprocess.run(keys, capture_output=True, cwd=ROOT, timeout=60).returncode != 0


def test_write_file_refuses_an_existing_file(tmp_path):
    write_file(tmp_path / "f", b"a", PRIVATE_MODE)
    with pytest.raises(FileExistsError):
        write_file(tmp_path / "f", b"b", PRIVATE_MODE)
    assert (tmp_path / "f").read_bytes() == b"a"


def test_register_node_refuses_a_file_that_is_not_a_node_key(tmp_path):
    not_a_key = tmp_path / "ca.crt"
    not_a_key.write_text("-----BEGIN CERTIFICATE-----\n")
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "register_node.sh"), str(not_a_key)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2 and "EC P-384" in result.stderr


@pytest.mark.parametrize("script", ["make_certs.py", "make_node_keys.py"])
def test_script_help_creates_nothing(script, tmp_path, monkeypatch, capsys):
    # issue 15: `make_certs.py --help` once made a folder named --help holding a new CA
    import importlib.util

    spec = importlib.util.spec_from_file_location(script[:-3], ROOT / "scripts" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0 and "--force" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_make_node_keys_refuses_to_replace_a_key_without_force(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_node_keys", ROOT / "scripts" / "make_node_keys.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(tmp_path), "n1"]) == 0
    key = (tmp_path / "n1").read_bytes()
    assert module.main([str(tmp_path), "n1"]) == 1 and "--force" in capsys.readouterr().err
    assert (tmp_path / "n1").read_bytes() == key
    assert module.main(["--force", str(tmp_path), "n1"]) == 0 and (tmp_path / "n1").read_bytes() != key
