"""ScratchLLM's GPT library: plain PyTorch and tiktoken, no web or database code.

Everything the worker, the API and external checks use is importable from here.
"""

from model.bpe import train_bpe
from model.checkpoint import (
    CheckpointError,
    drop_training_state,
    has_training_state,
    is_adapter,
    load_adapter,
    load_checkpoint,
    load_training_state,
    read_metadata,
    save_checkpoint,
    weights_sha256,
)
from model.classification_data import (
    ClassificationData,
    DataFormatError,
    balance_classes,
    encode_classification,
    iter_classification_file,
    label_order,
    read_classification_file,
    split_dataset,
)
from model.classifier import GPTClassifier, freeze_for_finetune
from model.config import ConfigError, GPTConfig
from model.data import open_tokens, random_batch, split_tokens, tokenize_to_memmap
from model.dpo import DPOObjective, PreferenceScores, pair_logprobs, preference_scores, sequence_logprobs
from model.evaluation import (
    JUDGE_PROMPT,
    EvaluationStopped,
    LMScore,
    classification_report,
    classify,
    exact_match,
    generate_responses,
    judge_prompt,
    parse_judge_score,
    response_loss,
    score_tokens,
    token_byte_lengths,
    token_f1,
)
from model.generate import Decoder, generate, generate_batch, stream_generate
from model.gpt import GPT
from model.hf_gpt2 import export_hf_gpt2, import_hf_gpt2
from model.hf_llama import export_hf_llama, import_hf_llama
from model.instruction_data import (
    NEXT_SECTION,
    PROMPT_FORMAT,
    encode_instruction,
    format_chat,
    format_prompt,
    format_response,
    iter_instruction_file,
    read_instruction_file,
)
from model.kv_cache import KVCache
from model.lora import Adapter, LoRAConfig, apply_lora, lora_state_dict, merge_lora
from model.loss import perplexity
from model.multi_lora import AdapterSet, MultiLoRALinear, adapter_bytes
from model.muon import CombinedOptimizer, Muon
from model.objectives import ClassificationObjective, InstructionObjective, PretrainObjective, steps_for_epochs
from model.preference_data import (
    PreferencePair,
    encode_preference,
    iter_preference_file,
    preference_prompt,
    read_preference_file,
)
from model.sampling import SamplingParams
from model.streaming import StreamEvent, TextStream
from model.tokenizer import Tokenizer, get_tokenizer, gpt2_tokenizer, tokenizer_from_spec
from model.trainer import Callback, TrainConfig, Trainer, TrainProgress, TrainResult

__all__ = [
    "Adapter", "AdapterSet", "MultiLoRALinear", "adapter_bytes", "is_adapter", "load_adapter", "lora_state_dict",
    "weights_sha256",
    "GPT", "JUDGE_PROMPT", "EvaluationStopped", "LMScore", "classification_report", "classify", "exact_match",
    "generate_responses", "judge_prompt", "parse_judge_score", "response_loss", "score_tokens",
    "token_byte_lengths", "token_f1",
    "export_hf_llama", "import_hf_llama",
    "CombinedOptimizer", "Muon",
    "Callback", "CheckpointError", "ClassificationData", "ClassificationObjective", "ConfigError",
    "DataFormatError", "Decoder", "GPTClassifier", "GPTConfig", "InstructionObjective", "KVCache", "LoRAConfig",
    "PretrainObjective", "TrainProgress", "SamplingParams", "StreamEvent", "TextStream", "Tokenizer", "TrainConfig",
    "TrainResult", "Trainer", "apply_lora", "balance_classes", "encode_classification", "encode_instruction",
    "NEXT_SECTION", "PROMPT_FORMAT", "steps_for_epochs", "perplexity", "format_chat", "drop_training_state",
    "has_training_state",
    "export_hf_gpt2", "format_prompt", "format_response", "freeze_for_finetune", "generate", "generate_batch",
    "gpt2_tokenizer", "import_hf_gpt2", "load_checkpoint", "load_training_state", "merge_lora",
    "open_tokens", "random_batch", "read_classification_file", "read_instruction_file", "iter_classification_file",
    "iter_instruction_file", "label_order", "read_metadata",
    "save_checkpoint", "split_dataset", "split_tokens", "stream_generate", "tokenize_to_memmap",
    "tokenizer_from_spec", "get_tokenizer", "train_bpe",
    "DPOObjective", "PreferencePair", "PreferenceScores", "encode_preference", "iter_preference_file", "pair_logprobs",
    "preference_prompt", "preference_scores", "read_preference_file", "sequence_logprobs",
]
