"""Running under gunicorn: the integration, the worker, log writing."""
