"""The job-cell sidecar: site identity, upstream connection, relay for the trainer."""
