"""Certificates, keys, a token file and a kubeconfig for the local control plane, made with `openssl`.

Everything lives in one state directory and is valid for loopback only: a self-signed CA, the API server's
serving certificate (127.0.0.1, localhost and the in-cluster names), the service-account signing key pair,
and a static admin token in `system:masters` that both the kubeconfig and the controller manager use.
"""

from __future__ import annotations

import base64
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

ADMIN_USER = "conveyor-admin"
SERVING_SANS = (
    "IP:127.0.0.1",
    "IP:10.0.0.1",  # the `kubernetes` Service's ClusterIP: first address of --service-cluster-ip-range
    "DNS:localhost",
    "DNS:kubernetes",
    "DNS:kubernetes.default",
    "DNS:kubernetes.default.svc",
    "DNS:kubernetes.default.svc.cluster.local",
)


@dataclass(frozen=True)
class Pki:
    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def serving_cert(self) -> Path:
        return self.dir / "apiserver.crt"

    @property
    def serving_key(self) -> Path:
        return self.dir / "apiserver.key"

    @property
    def sa_key(self) -> Path:
        return self.dir / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.dir / "sa.pub"

    @property
    def token_file(self) -> Path:
        return self.dir / "tokens.csv"

    def admin_token(self) -> str:
        return self.token_file.read_text().split(",", 1)[0]


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_pki(directory: Path) -> Pki:
    """Create the CA, serving certificate, service-account keys and admin token in `directory` (once)."""
    pki = Pki(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if pki.token_file.exists():
        return pki
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(pki.ca_key))
    _openssl(
        "req", "-x509", "-new", "-key", str(pki.ca_key), "-sha256", "-days", "3650",
        "-subj", "/CN=conveyor-local-ca", "-out", str(pki.ca_cert),
    )  # fmt: skip
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(pki.serving_key))
    csr = directory / "apiserver.csr"
    _openssl("req", "-new", "-key", str(pki.serving_key), "-subj", "/CN=kube-apiserver", "-out", str(csr))
    ext = directory / "apiserver.ext"
    ext.write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage=serverAuth\nsubjectAltName={','.join(SERVING_SANS)}\n"
    )
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(pki.ca_cert), "-CAkey", str(pki.ca_key),
        "-CAcreateserial", "-days", "3650", "-sha256", "-extfile", str(ext), "-out", str(pki.serving_cert),
    )  # fmt: skip
    # Service-account tokens are signed with RSA (RS256), the algorithm every client accepts.
    _openssl("genrsa", "-out", str(pki.sa_key), "2048")
    _openssl("rsa", "-in", str(pki.sa_key), "-pubout", "-out", str(pki.sa_pub))
    token = secrets.token_hex(24)
    pki.token_file.write_text(f'{token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n')
    for private in (pki.ca_key, pki.serving_key, pki.sa_key, pki.token_file):
        private.chmod(0o600)
    return pki


def write_kubeconfig(pki: Pki, server: str, path: Path) -> Path:
    """A kubeconfig for `server` (https://127.0.0.1:PORT) that authenticates with the admin token."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "conveyor-local",
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(pki.ca_cert.read_bytes()).decode(),
                },
            }
        ],
        "users": [{"name": ADMIN_USER, "user": {"token": pki.admin_token()}}],
        "contexts": [
            {"name": "conveyor-local", "context": {"cluster": "conveyor-local", "user": ADMIN_USER}}
        ],
        "current-context": "conveyor-local",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path
