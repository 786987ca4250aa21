"""Parallelism applied to the model from outside (SPEC §7): pipeline planning, and later FSDP2 / expert / pipeline wrappers."""
