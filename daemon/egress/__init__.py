"""Egress allowlist (issue 13): the grammar, the resolver, the flow proxy and its client.

The proxy runs as a separate process (`python -m daemon.egress.service`)
that imports nothing of the daemon's upper layers; the daemon drives it
through daemon.egress.control.
"""
