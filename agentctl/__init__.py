"""agentctl: the operator's command line for agentd, the AI-agent kill switch."""
