"""Signed commands: one module per command, one transaction for all of them.

The API hands each raw envelope to a command here. A command runs

    admit (shape, signatures, roles, state precheck, replay reservation)
      -> act -> persist replay -> audit

through daemon.commands.gate and daemon.commands.transaction. Commands that
stop (stop, kill, estop, freeze) act first and record after, so nothing slow
stands before the kill, and a disk that refuses the record does not turn a
kill into an error. Commands that start or loosen (run, thaw, renew, reset)
record first, durably, and act only then: a crash cannot let them be
replayed, and a full disk refuses them. Below this layer the supervisor is
the registry and the launcher, and knows nothing of envelopes.
"""
