"""The GPT-2 BPE tokenizer, built offline from the rank file shipped inside the package."""

import base64
import functools
import hashlib
import numbers
from importlib import resources

import tiktoken

RANKS_FILE = "gpt2.tiktoken"
# The same file tiktoken verifies for "r50k_base" (GPT-2's 50,000 merges plus 256 byte tokens).
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# GPT-2's pre-tokenisation pattern (tiktoken's r50k pattern).
PAT_STR = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
END_OF_TEXT = "<|endoftext|>"
END_OF_TEXT_ID = 50256


def load_ranks(data: bytes) -> dict[bytes, int]:
    """Parse a .tiktoken rank file after checking its sha256."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != RANKS_SHA256:
        raise ValueError(f"{RANKS_FILE}: sha256 {digest} does not match the expected {RANKS_SHA256}")
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.cache
def tokenizer() -> tiktoken.Encoding:
    """A tiktoken ``Encoding`` equal to ``tiktoken.get_encoding("gpt2")``, with no network access."""
    data = (resources.files("gptfast") / "data" / RANKS_FILE).read_bytes()
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=PAT_STR,
        mergeable_ranks=load_ranks(data),
        special_tokens={END_OF_TEXT: END_OF_TEXT_ID},
        explicit_n_vocab=50257,
    )


def _encoding(enc) -> tiktoken.Encoding:
    """``enc``, or the GPT-2 tokenizer for None; anything else is a TypeError naming it."""
    if enc is None:
        return tokenizer()
    if not isinstance(enc, tiktoken.Encoding):
        raise TypeError(f"enc must be a tiktoken.Encoding (e.g. gptfast.tokenizer()) or None, got "
                        f"{type(enc).__name__}")
    return enc


def text_to_token_ids(text: str, enc: tiktoken.Encoding | None = None):
    """Encode text to a (1, n) int64 tensor, as the book's helper does ("" gives (1, 0))."""
    import torch

    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    enc = _encoding(enc)
    return torch.tensor(enc.encode(text, allowed_special={END_OF_TEXT}), dtype=torch.long).unsqueeze(0)


def token_ids_to_text(token_ids, enc: tiktoken.Encoding | None = None) -> str:
    """Decode a (1, n) or (n,) tensor of ids (or a list of ints) back to text."""
    import torch

    enc = _encoding(enc)
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex or token_ids.dtype == torch.bool:
            raise TypeError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
        if token_ids.dim() > 2 or (token_ids.dim() == 2 and token_ids.shape[0] != 1):
            raise ValueError(
                f"token_ids must have shape (1, n) or (n,), got {tuple(token_ids.shape)}; "
                "decode each row of a batch separately"
            )
        ids = token_ids.reshape(-1).tolist()
    elif isinstance(token_ids, (list, tuple)):
        if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in token_ids):
            raise TypeError("token_ids must be a tensor or a list of ints")
        ids = [int(t) for t in token_ids]  # numpy integers too
    else:
        raise TypeError(f"token_ids must be a tensor or a list of ints, got {type(token_ids).__name__}")
    bad = [t for t in ids if not 0 <= t < enc.n_vocab]
    if bad:
        raise ValueError(f"token id {bad[0]} is out of range for the vocabulary of {enc.n_vocab}")
    return enc.decode(ids)
