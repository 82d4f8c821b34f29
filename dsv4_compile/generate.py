"""`python -m dsv4_compile generate BUILD`: new tokens from a build's prefill-cache and decode engines.

    python -m dsv4_compile generate artifacts/tiny-cpu-1234abcd --tokens 1,2,3 --max-new-tokens 16
    python -m dsv4_compile generate BUILD --prompt "Hello" --tokenizer DIR      # DIR/tokenizer.json
    python -m dsv4_compile generate BUILD --batch-file prompts.jsonl --json

Prompts: `--tokens` (comma-separated ids), `--prompt` (text, with `--tokenizer`: a folder holding the
release's tokenizer.json, read by the `tokenizers` library) or `--batch-file` (JSON lines, each
{"tokens": [...]} or {"prompt": "..."}; run in batches of the build's max_batch, in order). Prints the
new tokens (and their text with a tokenizer) and the prefill and decode tokens/s; `--json` prints one
JSON object. Exit 2 with one line for a bad build folder or bad input (token ids, lengths).

A parallel build (`build --parallel tp=T,ep=E`) generates as T * E processes, each rank running its
own engines in step with the others; rank 0 prints:

    torchrun --nproc-per-node 2 -m dsv4_compile generate BUILD --tokens 1,2,3

Run otherwise (no torchrun, another world size) it is refused in one line naming that command.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .arguments import UsageError, positive_int_arg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="BUILD", help="a build folder (artifacts/<build>)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokens", default=None, metavar="IDS", help="prompt token ids, comma-separated (e.g. 1,2,3)")
    source.add_argument("--prompt", default=None, metavar="TEXT", help="prompt text (needs --tokenizer)")
    source.add_argument("--batch-file", default=None, metavar="FILE",
                        help='JSON lines, one prompt each: {"tokens": [1, 2]} or {"prompt": "text"}; batches of the '
                             "build's max_batch, in order")
    parser.add_argument("--tokenizer", default=None, metavar="DIR", help="folder with tokenizer.json (or the file itself)")
    parser.add_argument("--max-new-tokens", type=positive_int_arg, default=32, metavar="N", help="per prompt (default: 32)")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default: 0)")
    parser.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K best tokens (0: all)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass (default: 1)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible tokens)")
    parser.add_argument("--stop", default="", metavar="IDS", help="stop token ids, comma-separated")
    parser.add_argument("--format", default=None, metavar="aoti|onnx", help="engine format (default: the best verified)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _ids(text: str, what: str) -> list[int]:
    items = [t.strip() for t in text.split(",")]
    try:
        return [int(t) for t in items]
    except ValueError:
        raise UsageError(f"bad {what} {text!r}: expected comma-separated integer token ids, e.g. 1,2,3") from None


def _tokenizer(path: str | None):
    if path is None:
        return None
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise UsageError(f"--tokenizer {path!r}: no tokenizer.json there")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UsageError("--tokenizer needs the tokenizers library: pip install tokenizers") from None
    try:
        return Tokenizer.from_file(file)
    except Exception as err:  # noqa: BLE001 (the library's own error types)
        raise UsageError(f"--tokenizer {file!r}: not a readable tokenizer.json ({str(err).splitlines()[0][:120]})") from None


def _prompts(args, tokenizer) -> list[list[int]]:
    def encode(text: str) -> list[int]:
        if tokenizer is None:
            raise UsageError("a text prompt needs --tokenizer DIR (the folder of tokenizer.json)")
        return tokenizer.encode(text).ids

    if args.tokens is not None:
        return [_ids(args.tokens, "--tokens")]
    if args.prompt is not None:
        return [encode(args.prompt)]
    if not os.path.isfile(args.batch_file):
        raise UsageError(f"--batch-file {args.batch_file!r}: no such file")
    prompts = []
    with open(args.batch_file) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                raise UsageError(f"--batch-file {args.batch_file!r} line {n}: not JSON") from None
            if isinstance(item, dict) and isinstance(item.get("tokens"), list):
                prompts.append(item["tokens"])
            elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
                prompts.append(encode(item["prompt"]))
            else:
                raise UsageError(f"--batch-file {args.batch_file!r} line {n}: expected {{\"tokens\": [...]}} or {{\"prompt\": \"...\"}}")
    if not prompts:
        raise UsageError(f"--batch-file {args.batch_file!r}: no prompts")
    return prompts


def _join_build_world(args: argparse.Namespace) -> None:
    """A parallel build: join its torchrun world (UsageError, with the command, in any other), print on
    rank 0 only, and sample with one seed on every rank (each rank samples the same tokens)."""
    from .distributed import from_rank0, join_world, silence_other_ranks
    from .manifest import read_manifest
    from .model.parallel import ParallelLayout

    mesh = read_manifest(args.path).mesh
    if mesh is None:
        return
    join_world(ParallelLayout.parse(mesh["layout"]), mesh["device_kind"] == "cuda",
               getattr(args, "command_line", None) or ["generate", args.path], what=f"{args.path} (built for {mesh['layout']})")
    silence_other_ranks()
    if args.seed is None:
        import random

        args.seed = from_rank0(random.SystemRandom().randrange(1 << 62))


def run(args: argparse.Namespace) -> int:
    from .loader import ArtifactError, load
    from .runtime import plan_batch

    tokenizer = _tokenizer(args.tokenizer)
    prompts = _prompts(args, tokenizer)
    stops = _ids(args.stop, "--stop") if args.stop.strip() else []
    try:
        _join_build_world(args)
        engine = load(args.path, format=args.format)
        steps = engine.generation_steps()
        prompts, _, _ = plan_batch(steps, prompts, args.max_new_tokens)  # bad input: before any engine runs
        sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                        stop_tokens=stops)
        steps.generate(prompts, min(2, args.max_new_tokens), **sampling)  # warm: engine files loaded, graphs captured
        timings: dict = {}
        out = steps.generate(prompts, args.max_new_tokens, timings=timings, **sampling)
    except (ArtifactError, ValueError, TypeError) as err:
        raise UsageError(str(err)) from None
    prompt_tokens = sum(len(p) for p in prompts)
    new_tokens = sum(len(o) for o in out)
    decoded = max(new_tokens - len(prompts), 0)  # the first new token of each comes from the prefill
    report = {"format": engine.format, "prompts": [len(p) for p in prompts], "new_tokens": out,
              "prefill_tokens_per_s": prompt_tokens / timings["prefill_s"],
              "decode_tokens_per_s": decoded / timings["decode_s"] if decoded else None}
    if tokenizer is not None:
        report["text"] = [tokenizer.decode(o) for o in out]
    if args.json:
        print(json.dumps(report, sort_keys=True))
        return 0
    for i, o in enumerate(out):
        line = ",".join(str(t) for t in o)
        print(f"[{i}] {line}" + (f"  {report['text'][i]!r}" if tokenizer is not None else ""))
    rate = report["decode_tokens_per_s"]
    from .distributed import main_rank

    if main_rank():
        print(f"{engine.format}: prefill {prompt_tokens} tokens at {report['prefill_tokens_per_s']:.1f} tokens/s, "
              f"decode {decoded} tokens at " + (f"{rate:.1f} tokens/s" if rate else "- (too few to time)"), file=sys.stderr)
    return 0


