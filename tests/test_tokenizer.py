"""The shipped GPT-2 tokenizer, offline."""

import pytest
import torch

from gptfast import text_to_token_ids, token_ids_to_text, tokenizer
from gptfast.tokenizer import PAT_STR, RANKS_SHA256, load_ranks


def test_chapter_examples():
    enc = tokenizer()
    assert enc.encode("Every effort moves you") == [6109, 3626, 6100, 345]
    assert enc.encode("Every day holds a") == [6109, 1110, 6622, 257]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256


def test_same_definition_as_tiktoken_gpt2():
    from tiktoken_ext.openai_public import r50k_pat_str

    assert PAT_STR == r50k_pat_str
    assert RANKS_SHA256 == "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
    assert tokenizer().name == "gpt2"


@pytest.mark.parametrize("text", [
    "Hello, world!", "  leading spaces and\ttabs\n\nnewlines ", "naïve café 東京 🚀",
    "I'm sure they've said it'll rain", "<|endoftext|> after the end", "",
])
def test_round_trip(text):
    enc = tokenizer()
    ids = enc.encode(text, allowed_special="all")
    assert enc.decode(ids) == text
    assert token_ids_to_text(text_to_token_ids(text)) == text


def test_special_token_and_helpers():
    ids = text_to_token_ids("Hi<|endoftext|>")
    assert ids.shape == (1, 2) and ids.dtype == torch.int64 and ids[0, -1].item() == 50256


def test_a_corrupted_rank_file_is_refused():
    with pytest.raises(ValueError, match="sha256 .* does not match"):
        load_ranks(b"IQ== 0\n")
