"""``HOST[:PORT]`` addresses of the main node (shared by the worker and the clients).

Python 3.9 syntax, standard library only.
"""

from __future__ import annotations

import ipaddress
from typing import Tuple

__all__ = ["DEFAULT_MAIN_PORT", "parse_main_address"]

DEFAULT_MAIN_PORT = 8080


def parse_main_address(text: str) -> Tuple[str, int]:
    """``HOST[:PORT]`` (or ``[v6]:PORT``) to (host, port).

    Raises:
        ValueError: with a sentence saying what is expected.
    """
    text = text.strip()
    if not text:
        raise ValueError("--main is empty; give the main node as HOST or HOST:PORT.")
    host, port = text, DEFAULT_MAIN_PORT
    if "://" in text:  # the dashboard's address, pasted
        raise ValueError(f"--main {text!r} is a URL; give the main node's TCP address as HOST or HOST:PORT "
                         "(8080 by default, not the dashboard's port).")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"--main {text!r}: missing ']' after the IPv6 address.")
        host = text[1:end]
        rest = text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"--main {text!r}: expected ':PORT' after ']'.")
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        port = _port(port_text, text)
    if not host:
        raise ValueError(f"--main {text!r} has no host; give HOST or HOST:PORT.")
    if not _host_ok(host) or (text.startswith("[") and ":" not in host):
        raise ValueError(f"--main {text!r}: {host!r} is not a host name or IP address; give HOST or HOST:PORT "
                         "(an IPv6 address with a port as [ADDRESS]:PORT).")
    return host, port


def _host_ok(host: str) -> bool:
    """A name (letters, digits, '.', '-', '_'; IDNA letters too) or an IPv6 address (``%zone`` allowed).

    Before, ``--main 'pi 4'`` was looked up as is, and failed as "Name or service not known" at every retry.
    """
    if ":" in host:
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            return False
        return True
    return all(ch.isalnum() or ch in ".-_" for ch in host)


def _port(text: str, whole: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 65536:
        raise ValueError(f"--main {whole!r}: the port must be a number from 1 to 65535.")
    return int(text)
