"""The contract both sides share: Redis keys, task records and their Lua scripts,
VM states, HRESULTs, disk formats and task names.  Imports nothing above it."""
