"""TLS settings and what a handshake negotiated: plain data, no OpenSSL import.

Kept apart from ``tls`` so a plain-TCP server never loads pyOpenSSL and
cryptography (about 15 MB of resident memory), and so a config can be
validated without them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from .errors import ConfigError
from .field_docs import document_fields

__all__ = ["TLSConfig", "TLSInfo", "VERIFY_MODES", "MIN_VERSIONS", "INTERMEDIATE_CIPHERS"]

VERIFY_MODES = ("none", "optional", "required")
MIN_VERSIONS = ("1.2", "1.3")

# The default TLS 1.2 cipher list: Mozilla's "intermediate" profile
# (https://ssl-config.mozilla.org, v5.7) without its DHE suites: ECDHE key
# exchange (forward secrecy) and AEAD ciphers only. No CBC (LUCKY13 and
# friends), no RSA key exchange, nothing a TLS scanner flags; every client
# of the last decade speaks one of these. TLS 1.3 needs no list.
INTERMEDIATE_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
))

@document_fields  # the field docstrings below, into the class docstring help() shows
@dataclass(frozen=True, kw_only=True)
class TLSConfig:
    """TLS options of a listener (``ListenerConfig.ssl``); the same keys work in a dict or TOML.

    ``sni`` maps a server name to extra ``{"certfile": ..., "keyfile": ...}``
    pairs, chosen by the name the client asks for; other names get the
    default certificate.
    """

    certfile: str
    """PEM certificate (chain) served to clients; the key too, unless ``keyfile`` is given."""
    keyfile: Optional[str] = None
    """None when the key is in ``certfile``."""
    password: Optional[str | bytes] = dataclasses.field(default=None, repr=False)
    """Passphrase of an encrypted key; never logged or shown in a repr."""
    cafile: Optional[str] = None
    """CA certificates that sign acceptable client certificates."""
    verify_client: str = "none"
    """"none", "optional" (check a certificate if sent) or "required"."""
    min_version: str = "1.2"
    """Lowest TLS version served: "1.2" or "1.3"."""
    ciphers: Optional[str] = None
    """OpenSSL cipher list for TLS 1.2; None is INTERMEDIATE_CIPHERS (TLS 1.3 suites are OpenSSL's defaults)."""
    alpn: tuple[str, ...] = ()
    """Protocols offered by ALPN, in the server's order of preference."""
    sni: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)
    """Server name -> ``{"certfile": ..., "keyfile": ...}``: other certificates, chosen by the name a client asks for."""
    mode: str = "implicit"
    """"implicit": TLS from the first byte; "starttls": plain until the handler calls conn.start_tls()."""
    reload_interval: Optional[float] = None
    """Seconds between looks at the certificate, key and CA files; once a change has settled, new handshakes
    use the new files and live connections go on untouched (``Listener.reload_tls``). None: only on SIGHUP."""

    def files(self) -> list[str]:
        """Every file the TLS context is built from (what ``reload_interval`` watches)."""
        paths = [self.certfile, self.keyfile, self.cafile]
        for pair in self.sni.values():
            paths += [pair.get("certfile"), pair.get("keyfile")]
        return [path for path in paths if path]

    def __post_init__(self) -> None:
        def check_path(name: str, value: Any, required: bool = False) -> None:
            if value is None and not required:
                return
            if not isinstance(value, str) or not value:
                raise ConfigError(f"ssl.{name}", f"expected a file path, got {value!r}")

        check_path("certfile", self.certfile, required=True)
        check_path("keyfile", self.keyfile)
        check_path("cafile", self.cafile)
        if self.password is not None and not isinstance(self.password, (str, bytes)):
            raise ConfigError("ssl.password", "expected a string")
        if self.verify_client not in VERIFY_MODES:
            raise ConfigError("ssl.verify_client", f"expected one of {', '.join(VERIFY_MODES)}, got {self.verify_client!r}")
        if self.verify_client != "none" and self.cafile is None:
            raise ConfigError("ssl.verify_client", "verifying client certificates needs ssl.cafile (the CA that signs them)")
        if self.mode not in ("implicit", "starttls"):
            raise ConfigError("ssl.mode", f"expected implicit or starttls, got {self.mode!r}")
        if str(self.min_version) not in MIN_VERSIONS:
            raise ConfigError("ssl.min_version", f"expected 1.2 or 1.3, got {self.min_version!r}")
        object.__setattr__(self, "min_version", str(self.min_version))
        if self.ciphers is not None and not isinstance(self.ciphers, str):
            raise ConfigError("ssl.ciphers", f"expected an OpenSSL cipher string, got {self.ciphers!r}")
        alpn = (self.alpn,) if isinstance(self.alpn, str) else tuple(self.alpn)
        if not all(isinstance(p, str) and 0 < len(p) < 256 for p in alpn):
            raise ConfigError("ssl.alpn", f"expected protocol names like 'h2' or 'xmpp-client', got {self.alpn!r}")
        object.__setattr__(self, "alpn", alpn)
        for name, pair in dict(self.sni).items():
            if not isinstance(pair, Mapping) or not isinstance(pair.get("certfile"), str):
                raise ConfigError(f"ssl.sni.{name}", "expected {certfile = ..., keyfile = ...}")
        object.__setattr__(self, "sni", {k.lower(): dict(v) for k, v in dict(self.sni).items()})
        interval = self.reload_interval
        if interval is not None and (isinstance(interval, bool) or not isinstance(interval, (int, float))
                                     or not interval > 0):
            raise ConfigError("ssl.reload_interval", f"expected a number of seconds above 0, got {interval!r}")

    @classmethod
    def coerce(cls, value: Any) -> Optional["TLSConfig"]:
        """None or an empty mapping mean plain TCP; a mapping becomes a TLSConfig."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            if not value:
                return None
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ConfigError(f"ssl.{unknown[0]}", f"unknown TLS option (known: {', '.join(sorted(known))})")
            if "certfile" not in value:
                raise ConfigError("ssl.certfile", "missing: TLS needs a certificate (netpool cert makes one)")
            return cls(**value)
        raise ConfigError("ssl", f"expected TLS options (a mapping or TLSConfig), got {value!r}")

    def describe(self) -> str:
        """A log-friendly summary (no secrets)."""
        parts = [self.mode, f"cert={self.certfile}", f"min=TLSv{self.min_version}"]
        if self.verify_client != "none":
            parts.append(f"client-certs={self.verify_client}")
        if self.alpn:
            parts.append("alpn=" + ",".join(self.alpn))
        if self.sni:
            parts.append("sni=" + ",".join(sorted(self.sni)))
        if self.reload_interval is not None:
            parts.append(f"reload-interval={self.reload_interval:g}s")
        return " ".join(parts)


@dataclass(frozen=True)
class TLSInfo:
    """What a TLS connection negotiated (``conn.tls``)."""

    version: str
    cipher: str
    alpn: Optional[str]
    server_name: Optional[str]
    peer_subject: Optional[str]
    """The client certificate's subject, as ``CN=alice,O=Example``; None without one."""
    session_reused: bool
