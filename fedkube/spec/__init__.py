"""The FLJob spec model: validation, defaults, and the CRD schema."""
