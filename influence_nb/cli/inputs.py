"""The options most verbs share (model, corpus, output; queries) and what reads them: the model
and tokenizer, the corpus, the queries, an :class:`~influence_nb.session.Influence` session; and
the printed top-k table."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..checks import first_line
from .core import CLIError, Group, Option, positive

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model",
                   "vocab.txt", "spiece.model")
DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")


def io_options(out_help: str) -> Group:
    """--config, the model, the corpus, --out (``out_help`` says what it receives)."""
    return Group("inputs and outputs", (
        Option("config", "read options from a TOML file", metavar="FILE.toml"),
        Option("model", "Hugging Face causal-LM directory (required)", metavar="DIR"),
        Option("tokenizer", "tokenizer directory (default: --model)", metavar="DIR"),
        Option("dtype", "model dtype (default: float32; statistics stay float32 or better)",
               default="float32", choices=DTYPES),
        Option("device", "torch device (default: this rank's GPU if any, else cpu)"),
        Option("corpus", "training corpus: .txt, .jsonl, .parquet or a saved Dataset "
               "(required)", metavar="PATH"),
        Option("text_field", "the text column (default: text)", default="text"),
        Option("max_len", "tokens per sequence (default: model context)", type=positive(int)),
        Option("out", out_help + " (required)", metavar="DIR"),
        Option("progress", "progress bars on rank 0 (default: on)", default=True, switch=True),
    ))


FACTORS = Option("factors", "fitted factors (from `fit`; required)", metavar="DIR")
LIMIT = Option("limit", "only the first N sequences (ids 0 … N-1)", type=positive(int))


def query_options() -> Group:
    """--factors and the queries: --query pairs, a --queries file; --top to print."""
    return Group("queries", (
        FACTORS,
        Option("query", "a query; repeat for several", nargs=2, repeat=True,
               metavar=("PROMPT", "COMPLETION")),
        Option("queries", 'queries, one {"prompt": ..., "completion": ...} per line',
               metavar="FILE.jsonl"),
        Option("top", "print the top-k per query (default: 5)", type=positive(int), default=5),
    ))


def device(name: str | None):
    """The torch device ``name`` (checked), or this rank's GPU if any, else the CPU."""
    import torch
    if name:
        try:
            where = torch.device(name)
        except RuntimeError:
            raise CLIError(f"--device {name!r} is not a torch device; use cpu, cuda, cuda:1, "
                           "mps, ...") from None
        if where.type == "cuda" and not torch.cuda.is_available():
            raise CLIError(f"--device {name}: this torch has no CUDA device available; use "
                           "--device cpu or install a CUDA build of torch")
        return where
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def load_model(ns: argparse.Namespace):
    """(model, tokenizer) from a Hugging Face directory, in eval mode on the device."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = Path(ns.model)
    if not (path / "config.json").is_file():
        raise CLIError(f"--model {path} is not a Hugging Face model directory (no config.json); "
                       "pass a directory written by save_pretrained")
    dtype = "auto" if ns.dtype == "auto" else getattr(torch, ns.dtype)
    on = device(ns.device)
    if not ns.progress:
        transformers.utils.logging.disable_progress_bar()
    where = Path(ns.tokenizer or path)
    flag = "--tokenizer" if ns.tokenizer else "--model"
    if where.is_dir() and not any((where / f).is_file() for f in TOKENIZER_FILES):
        raise CLIError(f"{flag} {where} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                       "save the tokenizer there or pass --tokenizer DIR")
    try:
        tokenizer = AutoTokenizer.from_pretrained(where)
    except Exception as e:  # transformers raises many kinds; the first line says which
        raise CLIError(f"{flag} {where}: the tokenizer does not load ({first_line(e)})") \
            from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as e:
        raise CLIError(f"--model {path}: the model does not load ({first_line(e)}); check "
                       "that save_pretrained wrote it completely") from None
    return model.to(on).eval(), tokenizer


def load_corpus(ns: argparse.Namespace, model, tokenizer):
    """The corpus of --corpus, cut at --max-len tokens (default: the model's context)."""
    from ..data import Corpus
    from ..layers import context_length
    path = Path(ns.corpus)
    max_len = ns.max_len or context_length(model) or 2048
    if path.is_dir():
        import datasets
        try:
            dataset = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise CLIError(f"--corpus {path} is a directory but not a saved datasets.Dataset; "
                           "pass a .txt / .jsonl / .parquet file or a save_to_disk directory"
                           ) from None
        return Corpus.from_dataset(dataset, tokenizer, max_len, ns.text_field, ns.progress)
    return Corpus.from_file(path, tokenizer, max_len, ns.text_field, ns.progress)


def session(ns: argparse.Namespace, score_args=None):
    """An Influence session with the model, corpus and --factors."""
    from ..session import Influence
    model, tokenizer = load_model(ns)
    inf = Influence(model, tokenizer, load_corpus(ns, model, tokenizer), score_args=score_args)
    inf.load_factors(ns.factors)
    return inf


def queries(ns: argparse.Namespace) -> list[tuple[str, str]]:
    """(prompt, completion) pairs from --query and --queries (.jsonl: prompt, completion)."""
    pairs = [tuple(q) for q in ns.query or []]
    if ns.queries:
        pairs += _read_queries(Path(ns.queries))
    if not pairs:
        raise CLIError("no queries: pass --query PROMPT COMPLETION (repeatable) or "
                       "--queries FILE.jsonl")
    return pairs


def _read_queries(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise CLIError(f"--queries {path} not found; pass a .jsonl file of "
                       '{"prompt": ..., "completion": ...} lines')
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CLIError(f"{path}:{n} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not {"prompt", "completion"} <= set(row) or \
                not all(isinstance(row[k], str) for k in ("prompt", "completion")):
            raise CLIError(f"{path}:{n} must be an object with the text fields prompt and "
                           "completion")
        pairs.append((row["prompt"], row["completion"]))
    return pairs


def ids(ns: argparse.Namespace, corpus):
    """Corpus ids 0 … --limit - 1, or None for all."""
    import numpy as np
    return None if ns.limit is None else np.arange(min(ns.limit, len(corpus)))


def print_top(result, k: int) -> None:
    """Each query's ``k`` most influential sequences, one line each: the score and, where N is
    known, Δ log p per copy (nats); the unit stated once above them."""
    from ..results import unit_note
    from ..style import per_copy
    n = result.n_train or 0
    print(unit_note(n))
    for q, query in enumerate(result.queries):
        print(f"\nquery {q}: {query['prompt']!r} → {query['completion']!r} "
              f"(log p = {query['logprob']:.3f} nats)")
        for rank, row in result.top(q, k).iterrows():
            copy = f"  {per_copy(row['score'], n):>9} per copy" if n else ""
            print(f"  {rank:3d}. id {row['id']:>8d}  score {row['score']:+11.4g}{copy}  "
                  f"{row['text'][:80]!r}")
