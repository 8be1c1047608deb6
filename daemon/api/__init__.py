"""The gRPC API: the daemon's only door."""
