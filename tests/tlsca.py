"""A throw-away certificate authority for TLS tests, made with `cryptography` in the test.

`make_test_pki(dir)` writes a CA certificate and, signed by it, a certificate for the proxy and
one for each test peer (SAN: 127.0.0.1, 127.0.0.2, 127.0.0.3 and localhost), plus a second,
unrelated CA whose certificates the first one must refuse. Keys are EC P-256: quick to make.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_NAMES = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "localhost")


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path


@dataclass(frozen=True)
class LoopbackPki:
    ca: Path  # the CA certificate the proxy and the peers trust
    proxy: CertFiles
    peer: CertFiles  # callers and gateways
    rogue: CertFiles  # issued by another CA: must be refused
    rogue_ca: Path

    def client_context(self, *, cert: CertFiles | None = None, verify: bool = True
                       ) -> ssl.SSLContext:
        """A client context that trusts the test CA (and presents `cert`, if given)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if verify:
            ctx.load_verify_locations(cafile=str(self.ca))
        else:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if cert is not None:
            ctx.load_cert_chain(str(cert.cert), str(cert.key))
        return ctx

    def server_context(self, cert: CertFiles | None = None) -> ssl.SSLContext:
        """A server context presenting `cert` (the peer's by default)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        c = cert or self.peer
        ctx.load_cert_chain(str(c.cert), str(c.key))
        return ctx


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _ca(directory: Path, common: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey,
                                               Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(common)).issuer_name(_name(common))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False,
                                         False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    path = directory / f"{common}.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key, path


def _leaf(directory: Path, name: str, ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey
          ) -> CertFiles:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName("localhost")]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in LOOPBACK_NAMES[:3]]
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = CertFiles(directory / f"{name}.crt", directory / f"{name}.key")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, files.key)
    return files


def make_test_pki(directory: Path) -> LoopbackPki:
    """Write a test CA, certificates for the proxy and its peers, and a rogue pair."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key, ca_path = _ca(directory, "sip700-test-ca")
    rogue_ca, rogue_key, rogue_path = _ca(directory, "rogue-ca")
    return LoopbackPki(
        ca=ca_path,
        proxy=_leaf(directory, "proxy", ca, ca_key),
        peer=_leaf(directory, "peer", ca, ca_key),
        rogue=_leaf(directory, "rogue", rogue_ca, rogue_key),
        rogue_ca=rogue_path,
    )
