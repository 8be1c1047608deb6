"""Egress allowlists: what an agent with network = "allowlist" may reach, and how.

Layering: the supervisor calls this; this calls nothing above it.

- allowlist.py  the allowlist grammar, canonical host names, matching;
- netns.py      the agent's network namespace, made and configured by the daemon,
                its capture checked by probes before the agent runs;
- capture.py    a captured connection's original destination (SO_ORIGINAL_DST),
                for those probes and for the service.
"""
