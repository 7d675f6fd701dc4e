"""A saved state on disk: the state file and the fingerprint file beside it.

The fingerprint file is JSON, written only after the state file is complete: it
holds a hash of the parts of the configuration that must be identical on restore,
the exact machine type, the run state to return to, and the size and SHA-256 of the
state file.  A restore checks it (`check_saved_state`) before any QEMU is launched.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from api.protocol.formats import MiB
from workers.engines.context import ProgressSpan
from workers.engines.qemu_vm.config import (
    VMConfig,
    VMPaths,
    config_fingerprint,
    fingerprint_fields,
    fingerprint_path,
)
from workers.engines.storage import fsync_directory
from workers.failures import IncompatibleSavedState, OperationFailed

STATE_FORMAT_VERSION = 1
# The name under which QEMU gets the state file's descriptor (``migrate fd:``).
STATE_FD_NAME = "vmtask-state"


def _sha256(path: Path, on_progress: Callable[[float], None] | None = None) -> tuple[int, str]:
    digest = hashlib.sha256()
    total = max(1, path.stat().st_size)
    done = 0
    with open(path, "rb") as stream:
        while chunk := stream.read(4 * MiB):
            digest.update(chunk)
            done += len(chunk)
            if on_progress is not None:
                on_progress(done / total)
    return done, digest.hexdigest()


def read_saved_state_info(state_file: Path) -> dict[str, Any]:
    """The fingerprint file of a saved state; IncompatibleSavedState if unusable."""
    meta_path = fingerprint_path(state_file)
    if not state_file.is_file():
        raise IncompatibleSavedState(f"There is no saved state at {state_file}")
    try:
        metadata = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise IncompatibleSavedState(
            f"The saved state {state_file} has no fingerprint file"
        ) from None
    except (OSError, ValueError) as exc:
        raise IncompatibleSavedState(
            f"The fingerprint file {meta_path} is unreadable: {exc}"
        ) from None
    required = {
        "version",
        "fingerprint",
        "config",
        "machine",
        "run_state",
        "state_size",
        "state_sha256",
    }
    if not isinstance(metadata, dict) or not required <= set(metadata):
        raise IncompatibleSavedState(f"The fingerprint file {meta_path} is incomplete")
    if metadata["version"] != STATE_FORMAT_VERSION:
        raise IncompatibleSavedState(
            f"The saved state {state_file} has format version {metadata['version']}"
        )
    return metadata


def _describe_mismatch(saved: Mapping[str, Any], config: VMConfig) -> str:
    try:
        before = fingerprint_fields(VMConfig.from_dict(saved))
    except OperationFailed:
        return "the saved configuration is unreadable"
    after = fingerprint_fields(config)
    changes = [
        f"{key} was {before[key]!r}, is now {after[key]!r}"
        for key in sorted(after)
        if before.get(key) != after[key]
    ]
    return "; ".join(changes) or "the configuration changed"


def check_saved_state(config: VMConfig, state: Path, progress: ProgressSpan) -> dict[str, Any]:
    """The fingerprint file of ``state``, once it and the state file fit ``config``."""
    metadata = read_saved_state_info(state)
    if metadata["fingerprint"] != config_fingerprint(config):
        raise IncompatibleSavedState(
            f"The saved state of {config.name} belongs to another configuration: "
            f"{_describe_mismatch(metadata['config'], config)}"
        )
    size = state.stat().st_size
    if size != metadata["state_size"]:
        raise IncompatibleSavedState(
            f"The saved state {state} is {size} bytes, but {metadata['state_size']} "
            "were written: it is damaged"
        )
    _, digest = _sha256(state, lambda fraction: progress.span(2, 18, fraction))
    if digest != metadata["state_sha256"]:
        raise IncompatibleSavedState(f"The saved state {state} is corrupt (checksum mismatch)")
    return metadata


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, path)


def publish_saved_state(
    paths: VMPaths,
    config: VMConfig,
    *,
    machine_type: str,
    qemu_version: Mapping[str, Any],
    run_state: str,
) -> None:
    """Move the complete ``paths.state_tmp`` into place and write its fingerprint file."""
    publish_state_file(paths.state_tmp, paths.state_file, config, machine_type=machine_type,
                       qemu_version=qemu_version, run_state=run_state)


def publish_state_file(
    tmp: Path,
    state: Path,
    config: VMConfig,
    *,
    machine_type: str,
    qemu_version: Mapping[str, Any],
    run_state: str,
) -> None:
    """`publish_saved_state` for any place (a snapshot's state beside its layer)."""
    size, digest = _sha256(tmp)
    os.replace(tmp, state)
    metadata = {
        "version": STATE_FORMAT_VERSION,
        "fingerprint": config_fingerprint(config),
        "config": config.to_dict(),
        "machine": machine_type.removesuffix("-machine"),
        "qemu_version": (
            f"{qemu_version['major']}.{qemu_version['minor']}.{qemu_version['micro']}"
        ),
        "run_state": run_state,
        "state_size": size,
        "state_sha256": digest,
        "saved_at": datetime.now(UTC).isoformat(),
    }
    _write_atomically(fingerprint_path(state), json.dumps(metadata, indent=2).encode())
    fsync_directory(state.parent, strict=True)


def discard_saved_state(paths: VMPaths) -> None:
    """Delete a saved state and its fingerprint file (the VM becomes Turned Off)."""
    for path in (paths.state_file, paths.fingerprint_file, paths.state_tmp):
        path.unlink(missing_ok=True)
