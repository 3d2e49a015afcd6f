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

A peer whose first connection fails in a way a TLS mismatch would explain
(plain TCP closed before any reply, or a handshake the other side did not
speak) asks once more the other way (:func:`speaks_tls`, :func:`speaks_plain`)
so that it can say which side is wrong instead of retrying forever.

Python 3.9 syntax and the standard library only (workers import this).
"""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path
from typing import Optional, Union

__all__ = [
    "FingerprintMismatch",
    "PROBE_TIMEOUT_S",
    "certificate_fingerprint",
    "check_fingerprint",
    "client_context",
    "format_fingerprint",
    "normalise_fingerprint",
    "server_context",
    "speaks_plain",
    "speaks_tls",
]

#: How long a probe waits for the handshake, or for the one reply line.
PROBE_TIMEOUT_S = 10.0


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


async def _close(writer: "asyncio.StreamWriter") -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except (OSError, ssl.SSLError):
        pass


async def speaks_tls(host: str, port: int, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """True when ``host:port`` completes a TLS handshake and shows a certificate.

    Nothing is sent after the handshake (no token, no frame). False when
    anything goes wrong, a timeout included: only a handshake that worked is
    certain.
    """
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=client_context(), ssl_handshake_timeout=timeout_s),
            timeout_s)
    except (OSError, asyncio.TimeoutError, ssl.SSLError, EOFError):
        return False
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        return bool(ssl_object is not None and ssl_object.getpeercert(binary_form=True))
    finally:
        await _close(writer)


async def speaks_plain(host: str, port: int, sender_id: str = "tls-probe", timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """True when ``host:port`` answers a plain-TCP frame with a protocol reply (a main node without TLS).

    The frame carries no token and asks for nothing: a message type no main
    node acts on, answered ``unauthorized`` (or ``unknown_message_type`` by an
    ``--insecure`` one). False when anything goes wrong, a timeout included.
    """
    frame = {"message_type": "tls_probe", "message_id": "tls-probe", "sender_id": sender_id, "data": {}}
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (OSError, asyncio.TimeoutError):
        return False
    try:
        writer.write(json.dumps(frame).encode("utf-8") + b"\n")
        line = await asyncio.wait_for(reader.readline(), timeout_s)
        reply = json.loads(line.decode("utf-8"))
    except (OSError, asyncio.TimeoutError, ValueError, asyncio.LimitOverrunError):
        return False
    finally:
        await _close(writer)
    return isinstance(reply, dict) and reply.get("message_type") in ("ack", "error")
