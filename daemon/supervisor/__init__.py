"""The supervisor: launches agents, stops and kills them, keeps their records."""
