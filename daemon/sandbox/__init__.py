"""Agent sandboxes: policy profiles, the seccomp filter, bwrap's command line, outside checks.

Layering: the supervisor calls this; this calls nothing above it. Each agent
starts from nothing and is granted what its profile says (docs/sandbox.md):

- policy.py   named profiles (TOML files plus the built-in ``default``), per-run
              overrides, and which dimensions of a run are looser than the default;
- seccomp.py  the syscall filter, compiled by libseccomp in the daemon and handed
              to bwrap as BPF;
- bwrap.py    the agent's filesystem view (the system files, /etc's secrets masked,
              the profile's binds) and the bubblewrap command line that builds it;
- mountinfo.py an agent's /proc/PID/mountinfo, held against its view;
- pin.py      argv[0] resolved and hashed by the daemon before launch;
- verify.py   the restrictions read back from /proc and cgroupfs after launch.
"""
