"""TLS for the router's frontends, from PEM files: the server certificate chain and key, and
optionally the CA whose client certificates are required (mutual TLS). One set of files serves
both frontends: gRPC (`grpc_credentials`) and HTTPS (`http_ssl_context`).
"""
from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class TLSFiles:
    cert_file: str
    """PEM certificate chain of the server."""
    key_file: str
    """PEM private key of the server."""
    client_ca_file: str | None = None
    """PEM CA certificates; when set, clients must present a certificate it signed."""

    def read(self) -> tuple[bytes, bytes, bytes | None]:
        """(cert, key, client CA) bytes; OSError naming the file that cannot be read."""
        return (Path(self.cert_file).read_bytes(), Path(self.key_file).read_bytes(),
                Path(self.client_ca_file).read_bytes() if self.client_ca_file else None)


def grpc_credentials(files: TLSFiles) -> grpc.ServerCredentials:
    cert, key, client_ca = files.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def http_ssl_context(files: TLSFiles) -> ssl.SSLContext:
    """Raises OSError for an unreadable file, ssl.SSLError for a bad certificate or key."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(files.cert_file, files.key_file)
    if files.client_ca_file:
        ctx.load_verify_locations(files.client_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
