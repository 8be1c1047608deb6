"""Detectors: programs that judge agent output out of the daemon's process (docs/detectors.md).

Each is a standalone script with no imports from the daemon, so that it can
run as an unprivileged user with ``python3 -I PATH``.
"""
