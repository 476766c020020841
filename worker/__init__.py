"""ScratchLLM's Celery worker: runs training jobs with the model library."""
