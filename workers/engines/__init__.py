"""What touches qemu: disk images (qemu-img) and VMs (QEMU over QMP).

Engines import neither Celery nor Redis; they are driven through an
`OperationContext` and can be tested under `NullContext`.
"""
