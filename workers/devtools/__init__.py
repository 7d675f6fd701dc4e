"""Development tools: local processes, the tiny test guest, the demo.

Never imported by production code.
"""
