"""The commands, one module per group; `agent/cli.py` is the parser, the dispatch and the mapping
of errors to exit codes. A command module imports what it needs when it runs, so a short command
(or the daemon) loads nothing of another's."""
