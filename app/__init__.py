"""ScratchLLM's FastAPI service: corpora, jobs, checkpoints, deployments and inference."""
