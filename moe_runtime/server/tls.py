"""The server's TLS credentials from `server.tls_cert` / `server.tls_key`, checked before grpc sees them.

grpc reports a PEM it cannot use only as a failure to bind the port, which the server used to turn into
"cannot bind ... pick another port". Python's `ssl` loads the same pair first and says what is wrong:
a file that is not PEM, the two files swapped, a key that does not belong to the certificate, an
encrypted key (grpc takes none).
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from moe_runtime.config import ServerConfig
from moe_runtime.errors import ConfigError

CERT_MARK, KEY_MARK = b"-----BEGIN CERTIFICATE-----", b"PRIVATE KEY-----"


def server_credentials(cfg: ServerConfig) -> grpc.ServerCredentials | None:
    """Credentials for `add_secure_port`, or None when TLS is off (neither file given). `ConfigError` naming
    the files and the fix when they cannot serve TLS."""
    if cfg.tls_cert is None or cfg.tls_key is None:  # the config allows both or neither
        return None
    cert, key = _read("tls_cert", cfg.tls_cert), _read("tls_key", cfg.tls_key)
    where = f"server.tls_cert={cfg.tls_cert!r}, server.tls_key={cfg.tls_key!r}"
    if CERT_MARK not in cert and KEY_MARK in cert and CERT_MARK in key:
        raise ConfigError(f"{where}: swapped; tls_cert is the certificate chain (BEGIN CERTIFICATE), tls_key "
                             "its private key (BEGIN ... PRIVATE KEY)")
    if CERT_MARK not in cert:
        raise ConfigError(f"server.tls_cert={cfg.tls_cert!r}: no PEM certificate in it (BEGIN CERTIFICATE); "
                             "give the server's certificate chain")
    if KEY_MARK not in key:
        raise ConfigError(f"server.tls_key={cfg.tls_key!r}: no PEM private key in it (BEGIN ... PRIVATE KEY); "
                             "give the certificate's private key")
    try:
        # An encrypted key would make OpenSSL prompt on the terminal: answer with no password instead.
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cfg.tls_cert, cfg.tls_key, password=lambda: b"")
    except ssl.SSLError as e:
        hint = ("the key does not belong to the certificate; give the pair issued together"
                if "KEY_VALUES_MISMATCH" in str(e) else
                "check that both are unencrypted PEM (grpc takes no key password) and belong together")
        raise ConfigError(f"{where}: not a usable certificate and key ({e.reason or e}); {hint}") from None
    return grpc.ssl_server_credentials([(key, cert)])


def _read(name: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"server.{name}={path!r}: cannot read ({e.strerror}); give a readable PEM file") from None
