"""Backups: the repository on disk (`repository`) and the QEMU backup job (`job`)."""
