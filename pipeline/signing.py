"""A job's C2PA signing credentials: read by the driver from their URLs and checked before Ray starts.

The driver reads the certificate chain and the key once (any fsspec URL, with the manifest's storage options and
the environment's credentials), checks them and hands them to the renderers in their arguments, as storage
credentials travel (pipeline/render_stage.py): a renderer on another node needs no access to where the key is kept.
A mistake (an unreadable URL, not PEM, an expired certificate, a key of another certificate, a certificate C2PA
refuses) is one line naming the flag and the URL, before anything is written. Neither PEM is ever logged, put in
an error or written to OUTPUT; `_job.json` records the URLs only.
"""

from __future__ import annotations

import io
from datetime import datetime, timezone
from typing import Any

from flux_worker.storage import credential_options, filesystem, probe_options
from schemas import JobSpec
from schemas.errors import FluxbatchError, first_line
from schemas.provenance import needs_package


class SigningCredentialsError(FluxbatchError):
    """The C2PA certificate or key cannot sign: the message names the flag, the URL and what to fix."""


CERTIFICATE_FLAG, KEY_FLAG = "--c2pa-certificate", "--c2pa-key"


def signing_credentials(job: JobSpec) -> dict[str, str] | None:
    """The job's C2PA certificate chain, key and algorithm, checked; None when the job signs nothing."""
    spec = job.provenance
    if not (spec.enabled and spec.signs):
        return None
    assert spec.c2pa_certificate is not None and spec.c2pa_key is not None
    needs_package("c2pa", "C2PA signing")
    certificate = _read(spec.c2pa_certificate, CERTIFICATE_FLAG, job)
    key = _read(spec.c2pa_key, KEY_FLAG, job)
    return check_credentials(certificate, key, spec.c2pa_certificate, spec.c2pa_key)


def _read(url: str, flag: str, job: JobSpec) -> bytes:
    options = probe_options(url, {**credential_options(url), **job.storage_options})
    try:
        fs, path = filesystem(url, options)
        return fs.read_bytes(path)
    except FileNotFoundError:
        raise SigningCredentialsError(f"{flag} {url}: no such file") from None
    except FluxbatchError as error:
        raise SigningCredentialsError(f"{flag} {url}: {error}") from None
    except Exception as error:  # noqa: BLE001 - any storage failure is one line naming the flag
        raise SigningCredentialsError(f"{flag} {url}: cannot read it ({first_line(error, typed=True)})") from None


def check_credentials(certificate: bytes, key: bytes, certificate_url: str, key_url: str,
                      now: datetime | None = None) -> dict[str, str]:
    """The credentials as renderers take them, once the chain parses, its leaf is valid `now` and holds the key's
    public half, and c2pa-python signs a test image with them."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert_flag, key_flag = f"{CERTIFICATE_FLAG} {certificate_url}", f"{KEY_FLAG} {key_url}"
    try:
        chain = x509.load_pem_x509_certificates(certificate)
    except ValueError:
        raise SigningCredentialsError(f"{cert_flag}: not a PEM certificate chain (-----BEGIN CERTIFICATE----- ..., "
                                      "the signing certificate first)") from None
    leaf = chain[0]
    now = now or datetime.now(timezone.utc)
    if now > leaf.not_valid_after_utc:
        raise SigningCredentialsError(f"{cert_flag}: the certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d}; "
                                      "renew it")
    if now < leaf.not_valid_before_utc:
        raise SigningCredentialsError(f"{cert_flag}: the certificate is not valid before "
                                      f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    try:
        private = serialization.load_pem_private_key(key, password=None)
    except TypeError:  # a password-protected key
        raise SigningCredentialsError(f"{key_flag}: the key is encrypted; give it unencrypted (kept where only the "
                                      "driver reads it, as a storage secret)") from None
    except (ValueError, Exception):  # noqa: BLE001 - cryptography's messages never hold the key, but say it plainly
        raise SigningCredentialsError(f"{key_flag}: not a PEM private key (-----BEGIN PRIVATE KEY----- ...)") from None
    public = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(*public) != leaf.public_key().public_bytes(*public):
        raise SigningCredentialsError(f"{key_flag}: this key is not the key of {certificate_url}'s certificate "
                                      f"({leaf.subject.rfc4514_string()})")
    credentials = {"certificate": certificate.decode(), "key": key.decode(), "algorithm": algorithm(private)}
    _test_sign(credentials, cert_flag)
    return credentials


def algorithm(private: Any) -> str:
    """The C2PA signing algorithm of a key: ES256/384/512 for EC P-256/384/521 keys, Ed25519, PS256 for RSA."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if isinstance(private, ec.EllipticCurvePrivateKey):
        by_curve = {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}
        if private.curve.name in by_curve:
            return by_curve[private.curve.name]
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return "ed25519"
    if isinstance(private, rsa.RSAPrivateKey):
        return "ps256"
    raise SigningCredentialsError(f"a {type(private).__name__.lstrip('_')} key cannot sign C2PA manifests: use an "
                                  "EC P-256/P-384/P-521, Ed25519 or RSA key")


def _test_sign(credentials: dict[str, str], cert_flag: str) -> None:
    """Sign an 8x8 PNG as a renderer would, so what C2PA itself refuses (a CA certificate as signer, a missing
    extended key usage) is found here, not in every renderer."""
    from PIL import Image

    from flux_worker.provenance import Signer, c2pa_manifest
    from schemas import OutputFormat

    probe = io.BytesIO()
    Image.new("RGB", (8, 8)).save(probe, format="PNG")
    try:
        manifest = c2pa_manifest({"model_id": "fluxbatch signing check"}, "check.png")
        Signer(credentials).sign(probe.getvalue(), OutputFormat.png, manifest)
    except Exception as error:  # noqa: BLE001 - c2pa's own reason, in one line
        raise SigningCredentialsError(f"{cert_flag}: C2PA refuses to sign with this certificate "
                                      f"({first_line(error)}); it takes an X.509 v3 signer issued by a CA, with "
                                      "keyUsage digitalSignature and extendedKeyUsage emailProtection or "
                                      "documentSigning (docs/provenance.md shows one made with openssl)") from None
