"""The `run` daemon: the Daemon (APScheduler jobs on the agent clock: sampling rounds, sealing at
each boundary, the send tick), the sender child it starts, and the operator's hooks."""
