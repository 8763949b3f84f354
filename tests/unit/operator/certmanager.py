"""The shape of a cert-manager ``Certificate`` (cert-manager.io/v1), as far as fedkube renders one.

cert-manager cannot run here and kubernetes-validate bundles no CRDs, so the fields we use are stated from
cert-manager's v1 CRD (``certificates.cert-manager.io``, cert-manager 1.14+): their types, the enums, what is
required. ``additionalProperties: false`` where cert-manager's schema is closed too, so a misspelt field
(``dnsName``, ``issuer``) fails here as the API server would refuse it.
"""

from __future__ import annotations

from typing import Any

import jsonschema

USAGES = [
    "signing", "digital signature", "content commitment", "key encipherment", "key agreement", "data encipherment",
    "cert sign", "crl sign", "encipher only", "decipher only", "any", "server auth", "client auth", "code signing",
    "email protection", "s/mime", "ipsec end system", "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing",
    "microsoft sgc", "netscape sgc",
]  # fmt: skip
_STRINGS = {"type": "array", "items": {"type": "string"}}
# Go's time.ParseDuration as cert-manager writes it (h, m, s; at least one component).
_DURATION = {"type": "string", "pattern": r"^([0-9]+h)?([0-9]+m)?([0-9]+s)?$", "minLength": 2}

CERTIFICATE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"},
        "kind": {"const": "Certificate"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "required": ["secretName", "issuerRef"],
            "additionalProperties": False,
            "properties": {
                "secretName": {"type": "string", "minLength": 1},
                "secretTemplate": {
                    "type": "object", "additionalProperties": False,
                    "properties": {"labels": {"type": "object", "additionalProperties": {"type": "string"}},
                                   "annotations": {"type": "object", "additionalProperties": {"type": "string"}}},
                },
                "commonName": {"type": "string"},
                "subject": {
                    "type": "object", "additionalProperties": False,
                    "properties": dict.fromkeys((
                        "organizations", "organizationalUnits", "countries", "localities", "provinces",
                        "streetAddresses", "postalCodes"), _STRINGS) | {"serialNumber": {"type": "string"}},
                },
                "dnsNames": _STRINGS,
                "uris": _STRINGS,
                "ipAddresses": _STRINGS,
                "emailAddresses": _STRINGS,
                "usages": {"type": "array", "items": {"enum": USAGES}},
                "duration": _DURATION,
                "renewBefore": _DURATION,
                "isCA": {"type": "boolean"},
                "privateKey": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                        "encoding": {"enum": ["PKCS1", "PKCS8"]},
                        "rotationPolicy": {"enum": ["Never", "Always"]},
                        "size": {"type": "integer"},
                    },
                },
                "issuerRef": {
                    "type": "object", "required": ["name"], "additionalProperties": False,
                    "properties": {"name": {"type": "string", "minLength": 1}, "kind": {"type": "string"},
                                   "group": {"type": "string"}},
                },
            },
        },
    },
}  # fmt: skip


def assert_valid_certificate(obj: dict[str, Any]) -> None:
    """Fail naming the field when ``obj`` is not a Certificate cert-manager's v1 schema accepts."""
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(CERTIFICATE_SCHEMA).iter_errors(obj))
    if error is not None:
        where = ".".join(str(p) for p in error.path)
        raise AssertionError(f"Certificate/{obj['metadata']['name']} invalid at {where}: {error.message}")
