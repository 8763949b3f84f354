"""The site operator: FLSite handlers (``fedkube operator --mode site``), kept apart from the FLJob handlers."""
