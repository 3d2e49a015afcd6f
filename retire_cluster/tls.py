"""TLS with a pinned certificate: the main node's context, and the peers' check.

Theory of operation: a home cluster has no certificate authority and often no
DNS name for the main node, so peers do not verify a chain or a host name.
Instead they *pin* the SHA-256 fingerprint of the main node's certificate
(printed by ``retire-cluster main`` and by ``openssl x509 -noout -fingerprint
-sha256``): the TLS layer accepts any certificate (``CERT_NONE``), and right
after the handshake, before a single byte of ours is sent (the cluster token
least of all), the peer compares the certificate it got with the pin and hangs
up on a mismatch. That is what SSH does with host keys, minus trust on first
use: the pin is given, never learnt.

Python 3.9 syntax and the standard library only (workers import this).
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Optional, Union

__all__ = [
    "FingerprintMismatch",
    "certificate_fingerprint",
    "check_fingerprint",
    "client_context",
    "format_fingerprint",
    "normalise_fingerprint",
    "server_context",
]


class FingerprintMismatch(ssl.SSLError):
    """The main node showed a certificate other than the pinned one."""

    def __str__(self) -> str:  # ssl.SSLError would show the args tuple: ("...",)
        return str(self.args[0]) if self.args else "the main node's certificate is not the pinned one"


def normalise_fingerprint(text: str) -> str:
    """A SHA-256 fingerprint as 64 lowercase hex digits.

    Accepts ``AB:CD:...``, ``abcd...`` and openssl's ``sha256 Fingerprint=AB:CD:...``.

    Raises:
        ValueError: not a SHA-256 fingerprint, with a sentence saying what is expected.
    """
    value = text.strip()
    if "=" in value:
        value = value.rsplit("=", 1)[1]
    value = value.replace(":", "").replace(" ", "").lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError(
            f"{text!r} is not a SHA-256 fingerprint; give the 64 hex digits (colons allowed) "
            "that `retire-cluster main` prints for its certificate."
        )
    return value


def format_fingerprint(hex_digits: str) -> str:
    """``AB:CD:...``, the way openssl prints it."""
    value = hex_digits.upper()
    return ":".join(value[i : i + 2] for i in range(0, len(value), 2))


def certificate_fingerprint(cert: Union[bytes, str, Path]) -> str:
    """SHA-256 of a certificate: DER bytes, or a PEM file path."""
    if isinstance(cert, (str, Path)):
        pem = Path(cert).read_text(encoding="ascii")
        der = ssl.PEM_cert_to_DER_cert(pem)
    else:
        der = cert
    import hashlib  # here: a worker without TLS never loads it (its OpenSSL bindings cost RSS)

    return hashlib.sha256(der).hexdigest()


def server_context(cert_file: Union[str, Path], key_file: Union[str, Path]) -> ssl.SSLContext:
    """The main node's context: TLS 1.2 or later, no client certificates."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert_file), str(key_file))
    return context


def client_context() -> ssl.SSLContext:
    """A peer's context for a pinned certificate: no chain or host name check.

    Call :func:`check_fingerprint` on the connection right after the handshake;
    without it this context authenticates nothing.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def check_fingerprint(ssl_object: Optional[Union[ssl.SSLObject, ssl.SSLSocket]], pinned: str) -> None:
    """Compare the peer's certificate with the pinned fingerprint.

    Args:
        ssl_object: the connection (``writer.get_extra_info("ssl_object")``,
            or an ``ssl.SSLSocket``) after the handshake.
        pinned: the expected fingerprint (any form :func:`normalise_fingerprint` takes).

    Raises:
        FingerprintMismatch: no TLS, no certificate, or another certificate.
    """
    expected = normalise_fingerprint(pinned)
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise FingerprintMismatch("the main node sent no TLS certificate")
    got = certificate_fingerprint(der)
    import hmac

    if not hmac.compare_digest(got, expected):
        raise FingerprintMismatch(
            f"the main node's certificate has fingerprint {format_fingerprint(got)}, not the pinned "
            f"{format_fingerprint(expected)}; someone may be in between, or the certificate changed "
            "(check `retire-cluster main`'s output and update --tls-fingerprint)"
        )
