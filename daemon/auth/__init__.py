"""The auth layer: trust store, policy, signature verification, replay cache.

verify() is the one place signatures are checked; everything else here feeds
it (the trust store, the role table) or follows it (the replay cache).
"""

from daemon.auth.keys import InvalidKey, check_strong, parse_openssh_public_key
from daemon.auth.policy import ACTION_ROLES, STOP_ACTIONS, allows, roles_for
from daemon.auth.replay import ReplayCache
from daemon.auth.truststore import Role, TrustedKey, TrustStore, TrustStoreFile
from daemon.auth.verify import Limits, VerifiedCommand, verify

__all__ = [
    "ACTION_ROLES",
    "STOP_ACTIONS",
    "InvalidKey",
    "Limits",
    "ReplayCache",
    "Role",
    "TrustStore",
    "TrustStoreFile",
    "TrustedKey",
    "VerifiedCommand",
    "allows",
    "check_strong",
    "parse_openssh_public_key",
    "roles_for",
    "verify",
]
