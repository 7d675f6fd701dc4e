"""Flower's configuration in the compose deployment: basic auth from a secret file.

``celery -A workers flower --conf=/etc/vmtask/flowerconfig.py`` runs this file
(Flower hands ``--conf`` to tornado, which executes it and takes every top-level
name that is a Flower option).  The credentials come from a file, because
``--basic-auth`` shows in ``ps`` and ``FLOWER_BASIC_AUTH`` in ``docker inspect``.
The Redis password reaches Flower the same way as the workers: the worker app reads
``VMTASK_REDIS_PASSWORD_FILE``.

The file (``FLOWER_BASIC_AUTH_FILE``, by default the compose secret) holds one
``user:password`` per line, as scripts/make-secrets.sh writes it.  A missing,
empty or placeholder file stops Flower with a message that says so: Flower
without credentials would serve the dashboard, and revoke buttons, to anyone.

Percent and description need nothing here: the workers' app, which Flower loads
with ``-A workers``, extends Flower's task API and tasks page with both
(`workers.flower_ext`), with or without this file.  A ``tasks_columns`` set here
would choose the columns instead (it would also override FLOWER_TASKS_COLUMNS).
"""

import os as _os

_PLACEHOLDER = "change-me"
_path = _os.environ.get("FLOWER_BASIC_AUTH_FILE") or "/run/secrets/flower_basic_auth"


def _credentials(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as secret:
            lines = [line.strip() for line in secret.read().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(f"flower: cannot read the basic-auth secret {path!r} "
                         f"({type(exc).__name__}): run scripts/make-secrets.sh") from None
    if not lines:
        raise SystemExit(f"flower: the basic-auth secret {path!r} is empty")
    for number, line in enumerate(lines, 1):
        user, _, password = line.partition(":")
        # The line itself is a secret: the messages name the line, never show it.
        if not user or not password:
            raise SystemExit(f"flower: {path!r} line {number} is not user:password")
        if _PLACEHOLDER in line.lower():
            raise SystemExit(f"flower: {path!r} line {number} is still a placeholder "
                             f"({_PLACEHOLDER}...): set a real password")
    return lines


basic_auth = _credentials(_path)
