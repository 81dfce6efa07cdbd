"""Model configurations: the chapter's plain dicts, for the four GPT-2 sizes."""

import numbers

GPT_CONFIG_124M = {
    "vocab_size": 50257,     # BPE vocabulary of the GPT-2 tokenizer
    "context_length": 1024,  # maximum number of input tokens
    "emb_dim": 768,          # embedding size
    "n_heads": 12,           # attention heads
    "n_layers": 12,          # transformer blocks
    "drop_rate": 0.1,        # dropout rate
    "qkv_bias": False,       # bias in the query/key/value projections
}

_SIZES = {  # the chapter's model_configs: emb_dim, n_layers, n_heads
    "gpt2-small (124M)": (768, 12, 12),
    "gpt2-medium (355M)": (1024, 24, 16),
    "gpt2-large (774M)": (1280, 36, 20),
    "gpt2-xl (1558M)": (1600, 48, 25),
}
CONFIGS = {
    name: {**GPT_CONFIG_124M, "emb_dim": d, "n_layers": n_layers, "n_heads": n_heads}
    for name, (d, n_layers, n_heads) in _SIZES.items()
}
GPT_CONFIG_355M = CONFIGS["gpt2-medium (355M)"]
GPT_CONFIG_774M = CONFIGS["gpt2-large (774M)"]
GPT_CONFIG_1558M = CONFIGS["gpt2-xl (1558M)"]

REQUIRED_KEYS = frozenset(GPT_CONFIG_124M)


def get_config(name: str) -> dict:
    """A copy of a named config; accepts the full name or its short form ('124M', 'gpt2-medium')."""
    for full, cfg in CONFIGS.items():
        short, size = full.split(" ")
        if name in (full, short, size.strip("()")):
            return dict(cfg)
    raise ValueError(f"unknown config {name!r}; choose one of {', '.join(CONFIGS)}")


def check_config(cfg: dict) -> dict:
    """Validate a chapter-style config dict: exactly the known keys, sensible values.

    Returns a copy with plain Python values (numpy numbers are accepted and converted).
    """
    if not isinstance(cfg, dict):
        raise TypeError(f"cfg must be a dict like GPT_CONFIG_124M, got {type(cfg).__name__}")
    unknown, missing = set(cfg) - REQUIRED_KEYS, REQUIRED_KEYS - set(cfg)
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(unknown)}; known keys: {sorted(REQUIRED_KEYS)}")
    if missing:
        raise ValueError(f"config is missing key(s) {sorted(missing)}")
    out = dict(cfg)
    for key in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
        value = cfg[key]
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"config[{key!r}] must be a positive int, got {value!r}")
        out[key] = int(value)
    if out["emb_dim"] % out["n_heads"]:
        raise ValueError(
            f"emb_dim ({out['emb_dim']}) must be divisible by n_heads ({out['n_heads']})"
        )
    rate = cfg["drop_rate"]
    if not isinstance(rate, numbers.Real) or isinstance(rate, bool) or not 0.0 <= rate < 1.0:
        raise ValueError(f"config['drop_rate'] must be a number in [0, 1), got {rate!r}")
    out["drop_rate"] = float(rate)
    if not isinstance(cfg["qkv_bias"], bool):
        raise ValueError(f"config['qkv_bias'] must be True or False, got {cfg['qkv_bias']!r}")
    return out
