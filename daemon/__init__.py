"""agentd: a root daemon that owns AI agents' processes and stops them on a signed command."""

__version__ = "0.1.0"
