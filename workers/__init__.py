"""The reference application: a Celery app and governed tasks of a media/ML pipeline."""
