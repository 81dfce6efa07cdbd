"""Training data: ``prepare`` tokenizes text files into uint16 token files; ``TokenData`` reads them.

``prepare`` streams each file through an incremental UTF-8 decoder in chunks that end at a line
break (so memory stays bounded), encodes with the shipped GPT-2 tokenizer and appends
``<|endoftext|>`` after every document (a literal ``<|endoftext|>`` in the text is a document
break too). The last ``val_fraction`` of the tokens becomes ``val.bin``. ``meta.json`` records the
counts and the tokenizer's sha256, which ``TokenData`` checks against the shipped tokenizer.

Token ids are validated here, on the host, where the data is made and read: ``prepare`` writes
GPT-2 ids (``<|endoftext|>`` = 50256 the largest, in every file), ``TokenData.batch`` refuses a
batch holding any other id (a corrupt file), and ``check_vocab(vocab_size)`` refuses, before any
step, a model whose vocabulary cannot hold them. Batches of ``TokenData`` are therefore valid
targets for a model that passed ``check_vocab``: the training loss may skip its own range check,
which reads a flag back from the GPU every step (``linear_cross_entropy(...,
check_targets=False)``).
"""

import codecs
import json
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gptfast.tokenizer import END_OF_TEXT, END_OF_TEXT_ID, RANKS_SHA256, tokenizer

CHUNK_BYTES = 1 << 20
SPLITS = ("train", "val")


def _chunks(path: Path, bar):
    """Decoded text of ``path`` in pieces of ~CHUNK_BYTES, each ending before a line start."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    offset, carry = 0, ""
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            try:
                text = carry + decoder.decode(block)
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}: not UTF-8 text (undecodable byte at offset "
                                 f"{offset + exc.start})") from None
            offset += len(block)
            bar.update(len(block))
            cut = text.rfind("\n") + 1
            carry = text[cut:]
            if cut:
                yield text[:cut]
        try:
            carry += decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not UTF-8 text (truncated character at the end)") from None
    if carry:
        yield carry


def prepare(files, out, val_fraction: float = 0.1, seq_len: int = 1024) -> dict:
    """Tokenize ``files`` into ``out/train.bin``, ``out/val.bin`` and ``out/meta.json``; returns meta.

    Each split must hold at least one training window of ``seq_len + 1`` tokens.
    """
    files = [Path(f) for f in files]
    if not files:
        raise ValueError("prepare needs at least one text file")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"no text file at {f}")
        if f.stat().st_size == 0:
            raise ValueError(f"{f}: the file is empty")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {out} is a file; give a directory for train.bin, val.bin and meta.json")
    out.mkdir(parents=True, exist_ok=True)
    tmp = {s: out / f"{s}.bin.tmp" for s in SPLITS}
    enc, total, docs = tokenizer(), 0, 0
    try:
        size = sum(f.stat().st_size for f in files)
        with open(tmp["train"], "wb") as sink, tqdm(total=size, unit="B", unit_scale=True,
                                                     desc="prepare", leave=False) as bar:
            for f in files:
                before = total
                for text in _chunks(f, bar):
                    ids = enc.encode(text, allowed_special={END_OF_TEXT}, disallowed_special=())
                    np.asarray(ids, dtype=np.uint16).tofile(sink)
                    total += len(ids)
                    docs += ids.count(END_OF_TEXT_ID)
                if total == before:
                    raise ValueError(f"{f}: no tokens (the file holds no text)")
                np.asarray([END_OF_TEXT_ID], dtype=np.uint16).tofile(sink)
                total, docs = total + 1, docs + 1
        n_val = int(round(total * val_fraction))
        counts = {"train": total - n_val, "val": n_val}
        for split, n in counts.items():
            if n < seq_len + 1:
                raise ValueError(
                    f"the {split} split of {', '.join(map(str, files))} would hold {n} tokens, "
                    f"fewer than one training window of seq_len + 1 = {seq_len + 1}"
                )
        tokens = np.memmap(tmp["train"], dtype=np.uint16, mode="r")
        tokens[counts["train"]:].tofile(tmp["val"])
        del tokens
        os.truncate(tmp["train"], 2 * counts["train"])
        meta = {
            "tokenizer": "gpt2", "tokenizer_sha256": RANKS_SHA256, "dtype": "uint16",
            "eot_id": END_OF_TEXT_ID, "documents": docs, "val_fraction": val_fraction,
            "train_tokens": counts["train"], "val_tokens": counts["val"],
            "sources": [str(f) for f in files],
        }
        for split in SPLITS:
            os.replace(tmp[split], out / f"{split}.bin")
        (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        return meta
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)


class TokenData:
    """The memory-mapped ``train.bin``/``val.bin`` of a ``prepare``d directory, checked against its
    meta.json."""

    def __init__(self, directory):
        self.dir = Path(directory)
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"no {meta_path}: run `python -m gptfast prepare TEXT --out "
                                    f"{self.dir}` first")
        try:
            self.meta = json.loads(meta_path.read_text())
            counts = {s: int(self.meta[f"{s}_tokens"]) for s in SPLITS}
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{meta_path}: not a gptfast meta file ({exc})") from None
        if self.meta.get("tokenizer_sha256") != RANKS_SHA256:
            raise ValueError(f"{meta_path}: made with another tokenizer (sha256 "
                             f"{self.meta.get('tokenizer_sha256')}, expected {RANKS_SHA256})")
        self.splits = {}
        for split, n in counts.items():
            path = self.dir / f"{split}.bin"
            if not path.is_file():
                raise FileNotFoundError(f"no {path}")
            if path.stat().st_size != 2 * n:
                raise ValueError(f"{path}: {path.stat().st_size} bytes, but meta.json says {n} "
                                 f"uint16 tokens ({2 * n} bytes): the file is corrupt or truncated")
            empty = np.zeros(0, np.uint16)  # np.memmap refuses empty files
            self.splits[split] = np.memmap(path, dtype=np.uint16, mode="r") if n else empty

    def check_vocab(self, vocab_size: int) -> None:
        """The files' token ids (GPT-2's, up to ``<|endoftext|>`` = 50256, which every prepared file
        holds) fit a model vocabulary of ``vocab_size``: else a ValueError now, not a bad target
        in the loss later."""
        if vocab_size <= END_OF_TEXT_ID:
            raise ValueError(f"{self.dir}: GPT-2 token ids up to {END_OF_TEXT_ID} (<|endoftext|>) do "
                             f"not fit a model vocabulary of {vocab_size}: vocab_size must be at "
                             f"least {END_OF_TEXT_ID + 1}")

    def check_window(self, seq_len: int) -> None:
        for split, tokens in self.splits.items():
            if len(tokens) < seq_len + 1:
                raise ValueError(f"{self.dir / (split + '.bin')}: {len(tokens)} tokens, fewer than one "
                                 f"training window of seq_len + 1 = {seq_len + 1}")

    def windows(self, split: str, seq_len: int) -> int:
        return (len(self.splits[split]) - 1) // seq_len

    def batch(self, split: str, starts, seq_len: int):
        """Inputs and targets, int64 arrays of (len(starts), seq_len), of the windows at ``starts``."""
        tokens = self.splits[split]
        rows = np.stack([np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts])
        if rows.max() > END_OF_TEXT_ID:  # no GPT-2 token id: the file is not what prepare wrote
            raise ValueError(f"{self.dir / (split + '.bin')}: token id {rows.max()} is outside the "
                             "GPT-2 vocabulary: the file is corrupt")
        return rows[:, :-1], rows[:, 1:]
