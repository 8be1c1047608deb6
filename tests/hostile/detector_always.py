"""A detector (protocol of docs/detectors.md) that answers every message with one verdict.

argv: VERDICT [SCORE]. For tests of the daemon's cap on what a detector may order.
"""
import json
import sys

verdict = sys.argv[1]
score = float(sys.argv[2]) if len(sys.argv) > 2 else 0.99
for line in sys.stdin.buffer:
    msg = json.loads(line)
    reply = {"agent_id": msg["agent_id"], "seq": msg["seq"], "verdict": verdict,
             "score": score, "reason": f"always {verdict}"}
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
