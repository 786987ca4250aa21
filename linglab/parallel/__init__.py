"""Parallelism applied from outside the single-device model (SPEC §7): FSDP2, expert parallel, the pipeline planner and runner."""
