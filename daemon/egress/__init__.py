"""Egress allowlists: what an agent with network = "allowlist" may reach, and how.

- netns.py   the agent's network namespace, made and configured by the daemon,
             and the capture checked by probes before the agent runs.
"""
