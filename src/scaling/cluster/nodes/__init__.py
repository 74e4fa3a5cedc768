"""``scaling nodes``: check, set up and run commands on the project's hosts over SSH (the OpenSSH client).

Host keys are pinned in the project's own known_hosts file; every call runs with ``BatchMode`` and a
timeout, and secrets (deploy key, munge key) travel over the SSH session's stdin, never on a command line.
"""
