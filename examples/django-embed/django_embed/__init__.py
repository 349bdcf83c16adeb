"""A plain Django app behind authproxy's identity and access-log middlewares."""
