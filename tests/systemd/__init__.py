"""Helpers for tests that run agentd under a real systemd in a container."""
