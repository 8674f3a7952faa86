"""Who is calling: the caller derived from the verified client certificate alone.

Invariants:

* A caller exists only when TLS verified its certificate against the Centinela CA
  (``require_client_auth``); the identity is read from that certificate's subject and
  subject-alternative-name URIs, never from request metadata.
* Organisation = subject ``O``; name = subject ``CN``; kind, roles and region = SAN URIs
  ``urn:centinela:kind:<kind>``, ``urn:centinela:role:<role>``, ``urn:centinela:region:<r>``.
  A certificate without exactly one known kind gives no caller.
* The operator id (a person behind a municipal system) may come from the request context or
  ``x-operator-id`` metadata; it is an attribute of the call, not an identity.
"""

from __future__ import annotations

import dataclasses
import functools

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from centinela.errors import Unauthenticated

KINDS = frozenset({"municipality", "pnp", "reniec", "compliance"})
URN_PREFIX = "urn:centinela:"


@dataclasses.dataclass(frozen=True)
class Caller:
    """A verified caller."""

    name: str
    org: str
    kind: str
    roles: tuple[str, ...]
    region: str = ""
    #: SHA-256 fingerprint of the certificate, hex; for logs and revocation.
    fingerprint: str = ""

    def to_policy(self, operator_id: str = "") -> dict[str, object]:
        """The caller as the policy input's ``caller`` document."""
        return {
            "id": self.name,
            "org": self.org,
            "kind": self.kind,
            "roles": list(self.roles),
            "region": self.region,
            "operator_id": operator_id,
        }


def identity_uris(kind: str, roles: list[str] | tuple[str, ...], region: str = "") -> list[str]:
    """The SAN URIs that encode kind, roles and region in a client certificate."""
    uris = [f"{URN_PREFIX}kind:{kind}"] + [f"{URN_PREFIX}role:{r}" for r in roles]
    if region:
        uris.append(f"{URN_PREFIX}region:{region}")
    return uris


@functools.lru_cache(maxsize=1024)
def caller_from_pem(pem: bytes) -> Caller:
    """Parse a caller from a PEM client certificate (already verified by TLS).

    Raises:
        Unauthenticated: the certificate does not name a Centinela caller.
    """
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise Unauthenticated("client certificate could not be parsed") from exc
    return caller_from_cert(cert)


def caller_from_cert(cert: x509.Certificate) -> Caller:
    """Parse a caller from a certificate object.

    Raises:
        Unauthenticated: the certificate does not name a Centinela caller.
    """
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    if len(cns) != 1 or len(orgs) != 1:
        raise Unauthenticated("client certificate must have exactly one CN and one O")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    kinds = [u[len(URN_PREFIX) + 5 :] for u in uris if u.startswith(URN_PREFIX + "kind:")]
    roles = tuple(
        sorted(u[len(URN_PREFIX) + 5 :] for u in uris if u.startswith(URN_PREFIX + "role:"))
    )
    regions = [u[len(URN_PREFIX) + 7 :] for u in uris if u.startswith(URN_PREFIX + "region:")]
    if len(kinds) != 1 or kinds[0] not in KINDS:
        raise Unauthenticated("client certificate does not carry exactly one known caller kind")
    fingerprint = cert.fingerprint(hashes.SHA256()).hex()
    return Caller(
        name=str(cns[0].value),
        org=str(orgs[0].value),
        kind=kinds[0],
        roles=roles,
        region=regions[0] if regions else "",
        fingerprint=fingerprint,
    )
