"""A broken detector: floods garbage and over-long lines, answers with bad verdicts, then crashes.

argv: [MODE] where MODE is "flood" (default: garbage, then exit 3 once it has
read one message) or "stall" (never reads its stdin, never writes).
"""
import json
import os
import sys
import time

mode = sys.argv[1] if len(sys.argv) > 1 else "flood"
if mode == "stall":
    time.sleep(600)
    sys.exit(0)
out = sys.stdout.buffer
for i in range(2000):
    out.write(b"not json at all %d\n" % i)
out.write(b"{" * 100000 + b"\n")  # far over any line limit, and deeply nested
out.write(b"x" * 1_000_000)  # no newline for a long while
out.write(b"\n")
out.write(json.dumps({"agent_id": "nobody-knows", "seq": 1, "verdict": "kill"}).encode() + b"\n")
out.write(json.dumps({"agent_id": 5, "verdict": "kill"}).encode() + b"\n")
out.write(json.dumps({"agent_id": "x", "verdict": "obliterate"}).encode() + b"\n")
out.write(json.dumps({"agent_id": "x", "verdict": "kill", "score": "NaN"}).encode() + b"\n")
out.flush()
line = sys.stdin.buffer.readline()
if line:
    msg = json.loads(line)
    # One well-formed verdict, so the test sees the link still works.
    out.write(json.dumps({"agent_id": msg["agent_id"], "seq": msg["seq"],
                          "verdict": "alert", "score": 0.5, "reason": "garbage"}).encode() + b"\n")
    out.flush()
os._exit(3)
