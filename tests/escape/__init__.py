"""The escape suite: agents that try to break out of their sandbox, and must not."""
