"""A C2PA signing certificate made for a test: a root CA and a leaf it issued, as a real signer's chain is.

C2PA refuses a self-signed leaf, so each chain is a root and a leaf with digitalSignature and emailProtection,
valid from yesterday for `days` (negative: expired).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass
class TestSigner:
    certificate: Path  # the chain, leaf first (PEM)
    key: Path  # the leaf's private key (PEM, PKCS#8, unencrypted)

    @property
    def key_body(self) -> str:
        """A line of the key's base64: what must never appear in a log or OUTPUT."""
        return self.key.read_text().splitlines()[1]


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fluxbatch tests")])


def make_signer(folder: Path, days: float = 30, name: str = "signer") -> TestSigner:
    """A chain and key under `folder` (`<name>.pem`, `<name>.key`), the leaf valid until `days` from now."""
    now = datetime.datetime.now(datetime.timezone.utc)
    start = now - datetime.timedelta(days=1) if days > 0 else now - datetime.timedelta(days=400)
    end = now + datetime.timedelta(days=days)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = (x509.CertificateBuilder().subject_name(_name("test root")).issuer_name(_name("test root"))
            .public_key(root_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
            .sign(root_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(root.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    signer = TestSigner(folder / f"{name}.pem", folder / f"{name}.key")
    signer.certificate.write_bytes(leaf.public_bytes(serialization.Encoding.PEM)
                                   + root.public_bytes(serialization.Encoding.PEM))
    signer.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    return signer
