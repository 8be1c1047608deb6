"""Hostile agent: opens a TCP connection to HOST PORT and holds it.

argv: HOST PORT. Only ever pointed at a listener the test itself runs on loopback.
"""
import socket
import sys
import time

conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
print("ready", flush=True)
time.sleep(600)
