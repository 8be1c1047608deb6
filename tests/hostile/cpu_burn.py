"""Hostile agent: burns one CPU and never stops."""
print("ready", flush=True)
while True:
    pass
