"""Generate text with memory from a converted checkpoint, streaming it to stdout.

    python -m memlong_jax.generate CKPT --prompt "Once upon a time" --max-new-tokens 64
    python -m memlong_jax.generate CKPT --prompt-file book.txt --temperature 0.8 --top-p 0.95
    cat book.txt | python -m memlong_jax.generate CKPT --set retriever=hidden

The prompt may be far longer than the local window: its head goes into MemLong's memory chunk by
chunk, its last part (at most --window tokens) becomes the local KV cache. While decoding, the
oldest half of a full cache moves into memory. Greedy unless --temperature is above 0. The
MemLong settings are the checkpoint's own (or the defaults for its shape), changed by --set.
Only the continuation is printed; errors are one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from memlong_jax.cli.options import add_model_options, load_encoder, load_model
from memlong_jax.errors import ArgumentParser, UserError, entry_point
from memlong_jax.eval.generation import DEFAULT_WINDOW, Sampling, check_window
from memlong_jax.io.documents import decode_utf8


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m memlong_jax.generate", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="converted checkpoint (python -m convert.from_hf)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="prompt text (default: read stdin)")
    source.add_argument("--prompt-file", help="UTF-8 file holding the prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N",
                        help="stop after N new tokens (default: 128)")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="sampling temperature; 0 is greedy (default: 0)")
    parser.add_argument("--top-k", type=int, default=0, metavar="K",
                        help="sample among the K most likely tokens; 0: all (default: 0)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P",
                        help="nucleus sampling mass in (0, 1]; 1: all (default: 1)")
    parser.add_argument("--seed", type=seed, default=0, help="random seed in [0, 2^32) "
                                                             "(default: 0)")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW, metavar="W",
                        help="local KV cache in tokens, a multiple of the chunk size and at "
                             f"least two chunks (default: {DEFAULT_WINDOW})")
    add_model_options(parser)
    return parser


def seed(text: str) -> int:
    """A PRNG seed: jax keys take 32 bits."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"needs an integer in [0, 2^32), got {text!r}")
    return value


def read_prompt(args) -> str:
    if args.prompt is not None:
        text = args.prompt
    elif args.prompt_file is not None:
        try:
            with open(args.prompt_file, "rb") as f:
                text = decode_utf8(f.read(), args.prompt_file)
        except OSError as err:
            raise UserError(f"{args.prompt_file}: {err.strerror}") from None
    elif sys.stdin.isatty():
        raise UserError("no prompt: give --prompt, --prompt-file or pipe text on stdin")
    else:
        text = decode_utf8(sys.stdin.buffer.read(), "stdin")
    if not text:
        raise UserError("the prompt is empty")
    return text


class TextStream:
    """Prints the decoded continuation as it grows. The whole continuation is decoded each time
    rather than token by token, so multi-byte characters and tokenizers' spacing come out right;
    printing waits while the text ends in an incomplete character (U+FFFD)."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out = tokenizer, out or sys.stdout
        self.ids: list[int] = []
        self.shown = 0

    def __call__(self, token: int, final: bool = False) -> None:
        if token is not None:
            self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if final or not text.endswith("\ufffd"):
            self.out.write(text[self.shown:])
            self.out.flush()
            self.shown = len(text)

    def close(self) -> None:
        self(None, final=True)
        self.out.write("\n")


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    Sampling(args.temperature, args.top_k, args.top_p)  # bad numbers fail before the model loads
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    prompt = read_prompt(args)

    model, mcfg = load_model(args)
    check_window(mcfg, args.window)
    ids = model.encode(prompt)
    if not ids.size:
        raise UserError("the prompt encodes to no tokens")
    encoder = load_encoder(mcfg, args.encoder)

    stream = TextStream(model.tokenizer)
    model.generate(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, seed=args.seed,
                   window=args.window, mcfg=mcfg, encoder=encoder, on_token=stream)
    stream.close()


cli = entry_point(main)   # the console script

if __name__ == "__main__":
    sys.exit(cli())
