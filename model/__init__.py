"""ScratchLLM's GPT library: plain PyTorch and tiktoken, no web or database code."""

from model.config import ConfigError, GPTConfig
from model.gpt import GPT
from model.hf_gpt2 import export_hf_gpt2, import_hf_gpt2
from model.kv_cache import KVCache

__all__ = ["GPT", "ConfigError", "GPTConfig", "KVCache", "export_hf_gpt2", "import_hf_gpt2"]
