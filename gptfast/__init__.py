"""gptfast: the book chapter's GPT-2 model with drop-in fused Triton kernels.

The public names load on first use (PEP 562 module ``__getattr__``), so that
``import gptfast.kernels`` costs the kernels alone: not the model, training (torch.distributed),
the Hugging Face integration or matplotlib.
"""

import importlib

# Eager, because the function ``tokenizer`` shares its name with its module: once anything imported
# ``gptfast.tokenizer`` the module would sit where the lazy function should be. It costs ~10 ms.
from gptfast.tokenizer import text_to_token_ids, token_ids_to_text, tokenizer  # noqa: F401

_EXPORTS = {
    "gptfast.config": ("CONFIGS", "GPT_CONFIG_124M", "GPT_CONFIG_355M", "GPT_CONFIG_774M",
                       "GPT_CONFIG_1558M", "get_config"),
    "gptfast.generation": ("generate", "generate_batch", "generate_text_simple", "generate_tokens"),
    "gptfast.model": ("GPTModel",),
    "gptfast.training": ("TrainOptions", "train"),
    "gptfast.weights": ("load_gpt2", "load_weights"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted([*_WHERE, "text_to_token_ids", "token_ids_to_text", "tokenizer"])


def __getattr__(name):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'gptfast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
