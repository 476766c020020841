"""The `scratchllm` command: above the API and the worker, it starts either or both."""
