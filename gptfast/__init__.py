"""gptfast: the book chapter's GPT-2 model with drop-in fused Triton kernels."""

from gptfast.config import (
    CONFIGS,
    GPT_CONFIG_124M,
    GPT_CONFIG_355M,
    GPT_CONFIG_774M,
    GPT_CONFIG_1558M,
    get_config,
)
from gptfast.generation import generate, generate_batch, generate_text_simple, generate_tokens
from gptfast.model import GPTModel
from gptfast.tokenizer import text_to_token_ids, token_ids_to_text, tokenizer
from gptfast.training import TrainOptions, train
from gptfast.weights import load_gpt2, load_weights

__all__ = [
    "CONFIGS", "GPT_CONFIG_124M", "GPT_CONFIG_355M", "GPT_CONFIG_774M", "GPT_CONFIG_1558M",
    "GPTModel", "TrainOptions", "generate", "generate_batch", "generate_text_simple", "generate_tokens", "get_config", "load_gpt2",
    "load_weights", "text_to_token_ids", "token_ids_to_text", "tokenizer", "train",
]
