"""Per-job PKI for mutual TLS: the job CA, server and site certificates, identities and TLS contexts.

`pki` and `identity` import neither grpc nor anything above them, so the operator (which must not import grpc)
can make certificates; `contexts` builds the `ssl` and gRPC credentials the server and the sidecar use.
"""
