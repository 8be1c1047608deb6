"""Watching agents from outside: kernel-observed signals, output tripwires, events, metrics."""
