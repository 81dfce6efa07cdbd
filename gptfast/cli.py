"""Command line: ``python -m gptfast generate "prompt" ...``, ``info``, ``prepare``, ``train``,
``profile``."""

import argparse
import codecs
import os
import sys
import time

import torch

from gptfast.config import CONFIGS, get_config
from gptfast.dataset import prepare
from gptfast.generation import generate_tokens
from gptfast.model import KERNEL_CHOICES, GPTModel
from gptfast.profile import add_profile_parser
from gptfast.tokenizer import END_OF_TEXT_ID, tokenizer
from gptfast.train_options import add_train_arguments, resolve_device
from gptfast.training import train
from gptfast.weights import ESCAPE_CODES, load_gpt2


def parameter_counts(model: GPTModel) -> dict:
    """Total parameters, the chapter's count 'considering weight tying', and fp32 size in MB."""
    total = sum(p.numel() for p in model.parameters())
    return {
        "total": total,
        "tied": total - model.out_head.weight.numel(),
        "fp32_mb": total * 4 / 1024**2,
    }


def cmd_info(args) -> None:
    print(f"{'config':<22}{'parameters':>16}{'with weight tying':>20}{'fp32 size (MB)':>17}")
    for name, cfg in CONFIGS.items():
        with torch.device("meta"):  # shapes only, no memory
            counts = parameter_counts(GPTModel(cfg, kernels="torch"))
        print(f"{name:<22}{counts['total']:>16,}{counts['tied']:>20,}{counts['fp32_mb']:>17,.2f}")


def cmd_generate(args) -> None:
    device = resolve_device(args.device, "--device")
    if not 0 <= args.seed < 2**64:
        raise ValueError(f"--seed must be in [0, 2**64), got {args.seed}")
    if device.type == "cpu" and args.kernels == "triton":
        from gptfast.kernels._common import INTERPRETING

        if not INTERPRETING:
            raise ValueError("--kernels triton on CPU needs Triton's interpreter (TRITON_INTERPRET=1 "
                             "before starting Python); use --kernels torch or auto")
    torch.manual_seed(args.seed)
    if args.weights:
        model = load_gpt2(args.weights, kernels=args.kernels)
    else:
        model = GPTModel({**get_config(args.config), "drop_rate": 0.0}, kernels=args.kernels)
    model.to(device).eval()
    enc, vocab = tokenizer(), model.cfg["vocab_size"]
    ids = enc.encode(args.prompt, allowed_special="all")
    if not ids:
        raise ValueError("the prompt is empty: give some text to continue")
    if max(ids) >= vocab:
        raise ValueError(f"the prompt holds GPT-2 token id {max(ids)}, outside the model's "
                         f"vocabulary of {vocab} tokens")
    idx = torch.tensor([ids], device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    eos_id = END_OF_TEXT_ID if END_OF_TEXT_ID < vocab else None  # a smaller vocab has no eos
    tokens = generate_tokens(model, idx, args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, eos_id=eos_id, generator=generator,
                             use_cache=not args.no_cache)  # checks the arguments: nothing printed yet
    if not args.weights:
        print(f"note: no --weights given, generating from random {args.config} weights",
              file=sys.stderr)
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    print(args.prompt, end="", flush=True)
    start, n = time.perf_counter(), 0
    unknown = "\N{REPLACEMENT CHARACTER}".encode()  # ids past GPT-2's (a padded vocabulary)
    for token in tokens:
        n += 1
        t = token.item()
        print(utf8.decode(enc.decode_single_token_bytes(t) if t < enc.n_vocab else unknown), end="",
              flush=True)
    seconds = time.perf_counter() - start
    print(utf8.decode(b"", final=True))
    print(f"{n} tokens in {seconds:.2f} s ({n / max(seconds, 1e-9):.1f} tokens/s) on {device}",
          file=sys.stderr)


def cmd_prepare(args) -> None:
    meta = prepare(args.files, args.out, val_fraction=args.val_fraction, seq_len=args.seq_len)
    print(f"{meta['documents']:,} documents: {meta['train_tokens']:,} training and "
          f"{meta['val_tokens']:,} validation tokens in {args.out}", file=sys.stderr)


def cmd_train(args) -> None:
    train(**{k: v for k, v in vars(args).items() if k not in ("command", "run")})


class UsageError(ValueError):
    """A command line argparse refuses (an unknown flag, a bad number, ...)."""


class Parser(argparse.ArgumentParser):
    """argparse, whose usage errors become one ``error:`` line and exit status 2 in ``main``
    (instead of the usage text), like every other bad input. Subcommands' parsers inherit it."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m gptfast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from a prompt, streaming it")
    gen.add_argument("prompt")
    gen.add_argument("--weights", help="model.safetensors (Hugging Face GPT-2) or a chapter .pth")
    gen.add_argument("--config", default="124M", help="config for random weights (124M, 355M, ...)")
    gen.add_argument("--max-new-tokens", type=int, default=50)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--seed", type=int, default=123)
    gen.add_argument("--kernels", choices=KERNEL_CHOICES, default="auto")
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    gen.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step")
    gen.set_defaults(run=cmd_generate)

    info = sub.add_parser("info", help="parameter counts and sizes of the GPT-2 configs")
    info.set_defaults(run=cmd_info)

    prep = sub.add_parser("prepare", help="tokenize text files into train.bin/val.bin for train")
    prep.add_argument("files", nargs="+", metavar="TEXT_FILE", help="UTF-8 text; one document each")
    prep.add_argument("--out", required=True, help="output directory")
    prep.add_argument("--val-fraction", type=float, default=0.1, help="share of tokens for val.bin")
    prep.add_argument("--seq-len", type=int, default=1024,
                      help="each split must hold one window of seq-len + 1 tokens (default: 1024)")
    prep.set_defaults(run=cmd_prepare)

    tr = sub.add_parser("train", help="pretrain on a prepared directory (torchrun: many devices)")
    add_train_arguments(tr)
    tr.set_defaults(run=cmd_train)

    add_profile_parser(sub)
    return parser


def main(argv=None) -> int:
    """Run a subcommand. Any bad input (of any subcommand) prints one line to stderr and exits 2;
    a reader that stops early (``| head``) ends the run quietly; Ctrl-C exits 130."""
    try:
        args = build_parser().parse_args(argv)
        args.run(args)
    except BrokenPipeError:
        _silence_stdout()
        return 0
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (ValueError, TypeError, RuntimeError, OSError) as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    return 0


def one_line(message: str) -> str:
    """A message as one line of plain text: no line breaks, no terminal escape codes."""
    return " ".join(ESCAPE_CODES.sub("", message).split())


def _silence_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the interpreter's exit flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (tests)
        pass
