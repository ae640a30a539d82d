"""Ed25519 signatures over module digests (beyond upstream, which verifies nothing).

The manager signs the `sha256:<hex>` digest of each module it dispatches; a proplet holding the
public keys refuses any start whose digest is unsigned or signed by another key, and then checks
that the bytes it fetched have that digest. Signing the digest (71 bytes) rather than the module
costs one signature per start whatever the module's size.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

# cryptography is imported where a key is used: a proplet without trusted keys never loads it.


class SignatureError(ValueError):
    """A signature is missing, malformed or not from a trusted key; the message says which."""


def generate_keypair(directory: Path, name: str = "propeller-signing") -> tuple[Path, Path]:
    """Write `<name>.pem` (private, mode 600) and `<name>.pub.pem`; return their paths."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    directory.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private = directory / f"{name}.pem"
    public = directory / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def load_private_key(path: Path) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise SignatureError(f"cannot read the signing key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 private key (make one with `propeller keys generate`)")
    return key


def load_public_keys(paths: Iterable[Path]) -> list[Ed25519PublicKey]:
    paths = list(paths)
    if not paths:
        return []
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    keys = []
    for path in paths:
        try:
            key = serialization.load_pem_public_key(Path(path).read_bytes())
        except (OSError, ValueError) as exc:
            raise SignatureError(f"cannot read the trusted key {path}: {exc}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise SignatureError(f"{path} is not an Ed25519 public key")
        keys.append(key)
    return keys


def sign_digest(key: Ed25519PrivateKey, digest: str) -> str:
    return base64.b64encode(key.sign(digest.encode("ascii"))).decode("ascii")


def verify_digest(keys: list[Ed25519PublicKey], digest: str, signature: str) -> None:
    from cryptography.exceptions import InvalidSignature

    if not digest:
        raise SignatureError("the start names no module digest, so its signature cannot be checked; "
                             "create the task with its digest (propeller tasks create --digest sha256:<hex>, "
                             "or wasm_digest in the REST body or a job file), or with the module inline")
    if not signature:
        raise SignatureError(f"the module {digest} is not signed, and this proplet only runs signed modules; "
                             "configure MANAGER_SIGNING_KEY on the manager")
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("the module signature is not valid base64") from None
    for key in keys:
        try:
            key.verify(raw, digest.encode("ascii"))
            return
        except InvalidSignature:
            continue
    raise SignatureError(f"the signature of module {digest} is not from a key this proplet trusts; "
                         "check PROPLET_TRUSTED_KEYS against the manager's MANAGER_SIGNING_KEY")
