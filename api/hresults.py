"""HRESULT values used by vmtask, as unsigned 32-bit integers.

Both sides use these: the producer raises them in `api.errors`, the worker stores
them in task records.  Win32 errors are wrapped as ``0x8007xxxx`` (HRESULT_FROM_WIN32).
"""

from __future__ import annotations

S_OK = 0x00000000
E_ABORT = 0x80004004
E_POINTER = 0x80004003
E_UNEXPECTED = 0x8000FFFF
E_OUTOFMEMORY = 0x8007000E
E_INVALIDARG = 0x80070057

# Disk-related (HRESULT_FROM_WIN32 of the matching Win32 error).
DISK_FULL = 0x80070070  # ERROR_DISK_FULL
FILE_NOT_FOUND = 0x80070002  # ERROR_FILE_NOT_FOUND
ACCESS_DENIED = 0x80070005  # ERROR_ACCESS_DENIED
FILE_EXISTS = 0x80070050  # ERROR_FILE_EXISTS
WRITE_FAULT = 0x8007001D  # ERROR_WRITE_FAULT
DISK_CORRUPT = 0x80070570  # ERROR_FILE_CORRUPT

INCOMPATIBLE_SAVED_STATE = 0x80040205  # vmtask-defined, FACILITY_ITF
TIMEOUT = 0x800705B4  # ERROR_TIMEOUT
SERVER_FAULT = 0x80010105  # RPC_E_SERVERFAULT: the worker running the task died

NAMES: dict[int, str] = {
    S_OK: "S_OK",
    E_ABORT: "E_ABORT",
    E_POINTER: "E_POINTER",
    E_UNEXPECTED: "E_UNEXPECTED",
    E_OUTOFMEMORY: "E_OUTOFMEMORY",
    E_INVALIDARG: "E_INVALIDARG",
    DISK_FULL: "ERROR_DISK_FULL",
    FILE_NOT_FOUND: "ERROR_FILE_NOT_FOUND",
    ACCESS_DENIED: "ERROR_ACCESS_DENIED",
    FILE_EXISTS: "ERROR_FILE_EXISTS",
    WRITE_FAULT: "ERROR_WRITE_FAULT",
    DISK_CORRUPT: "ERROR_FILE_CORRUPT",
    INCOMPATIBLE_SAVED_STATE: "VMTASK_E_INCOMPATIBLE_SAVED_STATE",
    TIMEOUT: "ERROR_TIMEOUT",
    SERVER_FAULT: "RPC_E_SERVERFAULT",
}


def format_hresult(hresult: int) -> str:
    """``0x80070070 (ERROR_DISK_FULL)``: the form used in messages and the CLI."""
    name = NAMES.get(hresult)
    return f"0x{hresult:08X}" + (f" ({name})" if name else "")
