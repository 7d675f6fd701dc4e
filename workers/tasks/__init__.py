"""What Celery sees: the registered operations, each a thin shell over an engine."""
