"""``python -m agentctl``: the same as the ``agentctl`` command."""

from agentctl.cli import main

main()
