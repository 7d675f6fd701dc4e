"""The ``vmtask`` command: every operation of the public API, plus ``worker`` and ``demo``.

    vmtask disk create|info|convert|compact|merge|merge-to ...
    vmtask vm create|list|show|start|save|pause|resume|reset|off|shutdown|restart|logoff|
              merge-undo|discard-undo|delete ...
    vmtask task show|wait|cancel|list ...
    vmtask hosts | ping | wait | worker | demo

Output contract, so that scripts can rely on it:

* stdout carries the result only: lines and tables for people, or exactly one JSON
  document with ``--json`` (accepted by every verb, and before the verb).
* stderr carries everything else: the live progress bar, prompts, and errors, each
  error on one line with its HRESULT.  Never a traceback.
* ``--no-wait`` prints only the new task's id (``{"id": ...}`` with ``--json``).

Exit codes: see `EXIT_CODES`.

Modules, lowest first (each imports only those above it):
`exits` (exit codes), `state` (the context's state and the shared flags), `output`
(console, JSON, formatting, tables), `follow` (live progress, Ctrl-C, reporting a
task), the verbs (`disk`, `vm`, `task`, `hosts`, `worker`), and `main` (the root
group, global options, error handling).
"""

from api.cli.exits import EXIT_CODES
from api.cli.main import main

__all__ = ["EXIT_CODES", "main"]
