"""Wiring: CLI, configuration, runners, storage and logging."""
