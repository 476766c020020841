"""ScratchLLM's GPT library: plain PyTorch and tiktoken, no web or database code."""

from model.config import ConfigError, GPTConfig
from model.gpt import GPT
from model.kv_cache import KVCache

__all__ = ["GPT", "ConfigError", "GPTConfig", "KVCache"]
