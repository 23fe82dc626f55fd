"""The ``influence-nb`` command line: batch jobs that write what the notebook API reads.

    influence-nb fit     --model DIR --corpus FILE --out runs/factors          Factors.load(...)
    influence-nb sketch  --model DIR --corpus FILE --factors runs/factors --out runs/search
                                                               Retriever.open(inf, "runs/search")
    influence-nb score   ... --factors runs/factors --query PROMPT COMPLETION --out runs/scan
                                                                      InfluenceResult.load(...)
    influence-nb search  ... --index runs/search --query PROMPT COMPLETION --out runs/found
    influence-nb validate tail-patch ... --factors runs/factors --query PROMPT COMPLETION --out D
    influence-nb validate lds --world validation --out runs/lds      retrains from scratch
    influence-nb demo      the main job on the embedded demo world

--model is any Hugging Face causal-LM directory (the demo's: influence_nb/demo/assets); --corpus
a .txt / .jsonl / .parquet file or a saved datasets.Dataset directory. Every option can also come
from --config FILE.toml: top-level keys apply to every subcommand that has them, a table
[fit] / [sketch] / [score] / [search] to that one; flags override the file. Spell keys like the
flags (max_examples or max-examples).

On several processes or machines, launch with torchrun (gloo on CPU, NCCL on GPU); the corpus is
sharded over the ranks and the artifacts are the same as one process writes:

    torchrun --nproc_per_node 8 -m influence_nb.cli fit --model DIR --corpus FILE --out F
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .checks import first_line

COMMANDS = ("fit", "sketch", "score", "search")


class CLIError(ValueError):
    """A bad option or input; the message names the fix."""


class _Parser(argparse.ArgumentParser):
    """argparse with errors in one line (no usage block): exit 2, the problem and where to
    look."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- options from dataclasses ----------------------------------------------------------------------

def _field_docs(cls: type) -> dict[str, str]:
    """{field: help} from the ``name: text`` lines of a dataclass docstring."""
    docs: dict[str, str] = {}
    name = None
    for line in (cls.__doc__ or "").splitlines():
        m = re.match(r"^\s{4}(\w+):\s+(.*)$", line)
        if m:
            name, docs[m[1]] = m[1], m[2].strip()
        elif name and line.startswith(" " * 8) and line.strip():
            docs[name] += " " + line.strip()
        else:
            name = None
    return docs


def _positive(kind: type):
    """An argparse type: a number of ``kind`` above zero (a finite one)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{text} must be a finite number above 0")
        return value
    return parse


def _fraction(text: str) -> float:
    """An argparse type: a number from 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} must be a number from 0 to 1")
    return value


def _count_or_all(text: str) -> int | None:
    """An argparse type: a count above zero, or ``all`` (None)."""
    return None if text.lower() == "all" else _positive(int)(text)


def _optional(kind: type):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)
    parse.__name__ = kind.__name__
    return parse


def _add_fields(parser: argparse.ArgumentParser, cls: type, prefix: str = "",
                skip: Sequence[str] = ("progress",)) -> None:
    """A ``--[prefix-]field-name`` option per field of dataclass ``cls`` (help from its docstring,
    default from its field): the CLI never restates the API's defaults."""
    hints, docs = typing.get_type_hints(cls), _field_docs(cls)
    group = parser.add_argument_group(f"{cls.__name__} (see {cls.__module__})")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        hint, kw = hints[f.name], {}
        args = typing.get_args(hint)
        if hint is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif any(typing.get_origin(a) is Sequence for a in args):
            kw.update(nargs="+", metavar="NAME")       # layers: a preset or module names
        elif type(None) in args:
            kw["type"] = _optional(next(a for a in args if a is not type(None)))
        else:
            kw["type"] = hint
        group.add_argument(f"--{prefix}{f.name.replace('_', '-')}",
                           dest=f"{prefix.replace('-', '_')}{f.name}", default=f.default,
                           help=f"{docs.get(f.name, '')} (default: {f.default})", **kw)


def _make(cls: type, ns: argparse.Namespace, prefix: str = "", **fixed: Any) -> Any:
    """An instance of dataclass ``cls`` from the options :func:`_add_fields` added."""
    values = {}
    for f in dataclasses.fields(cls):
        dest = f"{prefix.replace('-', '_')}{f.name}"
        if f.name in fixed or not hasattr(ns, dest):  # not an option: the field's default
            continue
        v = getattr(ns, dest)
        values[f.name] = v[0] if isinstance(v, list) and len(v) == 1 else v
    return cls(**values, **fixed)


# -- inputs ----------------------------------------------------------------------------------------

def _device(name: str | None):
    import torch
    if name:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise CLIError(f"--device {name!r} is not a torch device; use cpu, cuda, cuda:1, "
                           "mps, ...") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise CLIError(f"--device {name}: this torch has no CUDA device available; use "
                           "--device cpu or install a CUDA build of torch")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _load_model(ns: argparse.Namespace):
    """(model, tokenizer) from a Hugging Face directory, in eval mode on the device."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = Path(ns.model)
    if not (path / "config.json").is_file():
        raise CLIError(f"--model {path} is not a Hugging Face model directory (no config.json); "
                       "pass a directory written by save_pretrained")
    dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16, "float64": torch.float64}[ns.dtype]
    device = _device(ns.device)
    if not ns.progress:
        transformers.utils.logging.disable_progress_bar()
    where = Path(ns.tokenizer or path)
    flag = "--tokenizer" if ns.tokenizer else "--model"
    if where.is_dir() and not any((where / f).is_file() for f in _TOKENIZER_FILES):
        raise CLIError(f"{flag} {where} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); "
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
    return model.to(device).eval(), tokenizer


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model",
                    "vocab.txt", "spiece.model")


def _load_corpus(ns: argparse.Namespace, model, tokenizer):
    """The corpus of --corpus, cut at --max-len tokens (default: the model's context)."""
    from .data import Corpus
    from .layers import context_length
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


def _queries(ns: argparse.Namespace) -> list[tuple[str, str]]:
    """(prompt, completion) pairs from --query and --queries (.jsonl: prompt, completion)."""
    pairs = [tuple(q) for q in ns.query or []]
    if ns.queries:
        path = Path(ns.queries)
        if not path.is_file():
            raise CLIError(f"--queries {path} not found; pass a .jsonl file of "
                           '{"prompt": ..., "completion": ...} lines')
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace")
                                 .splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CLIError(f"{path}:{n} is not valid JSON ({e.msg})") from None
                if not isinstance(row, dict) or not {"prompt", "completion"} <= set(row) or \
                        not all(isinstance(row[k], str) for k in ("prompt", "completion")):
                    raise CLIError(f"{path}:{n} must be an object with the text fields prompt "
                                   "and completion")
                pairs.append((row["prompt"], row["completion"]))
    if not pairs:
        raise CLIError("no queries: pass --query PROMPT COMPLETION (repeatable) or "
                       "--queries FILE.jsonl")
    return pairs


def _ids(ns: argparse.Namespace, corpus):
    """Corpus ids 0 … --limit - 1, or None for all."""
    import numpy as np
    return None if ns.limit is None else np.arange(min(ns.limit, len(corpus)))


def _print_top(result, k: int) -> None:
    for q, query in enumerate(result.queries):
        print(f"\nquery {q}: {query['prompt']!r} → {query['completion']!r} "
              f"(log p = {query['logprob']:.3f})")
        for rank, row in result.top(q, k).iterrows():
            print(f"  {rank:3d}. id {row['id']:>8d}  {row['score']:+11.4g}  {row['text'][:80]!r}")


# -- subcommands ------------------------------------------------------------------------------------

def _fit(ns: argparse.Namespace, rank: int, world: int) -> dict:
    from .curvature import FactorArgs, fit_factors
    args = _make(FactorArgs, ns, progress=ns.progress)   # bad values fail before any loading
    model, tokenizer = _load_model(ns)
    corpus = _load_corpus(ns, model, tokenizer)
    t0 = time.perf_counter()
    factors = fit_factors(model, corpus, args)
    seconds = time.perf_counter() - t0
    if rank == 0:
        factors.save(ns.out)
        print(f"{factors.args.strategy} factors of {len(factors.shapes)} layers over "
              f"{factors.n_examples} sequences ({factors.n_tokens} tokens) in {seconds:.1f} s "
              f"on {world} rank(s) -> {ns.out}")
    return dict(sequences=factors.n_examples, tokens=factors.n_tokens, seconds=seconds)


def _plan(ns: argparse.Namespace, rank: int, world: int) -> dict:
    from .curvature import FactorArgs
    from .plan import plan
    from .scoring import ScoreArgs
    from .store import write_json
    fit_args = _make(FactorArgs, ns, progress=False)
    score_args = _make(ScoreArgs, ns, "score-", progress=False)
    model, tokenizer = _load_model(ns)
    result = plan(model, _load_corpus(ns, model, tokenizer), fit_args, score_args, ns.queries)
    if rank == 0:
        print(result)
        if ns.out:
            write_json(Path(ns.out) / "plan.json", result.summary())
    result.check()                      # a run that cannot fit: one line naming what to change
    return result.summary()


def _session(ns: argparse.Namespace, score_args=None):
    """An Influence session with the model, corpus and --factors."""
    from .session import Influence
    model, tokenizer = _load_model(ns)
    inf = Influence(model, tokenizer, _load_corpus(ns, model, tokenizer), score_args=score_args)
    inf.load_factors(ns.factors)
    return inf


def _sketch(ns: argparse.Namespace, rank: int, world: int) -> dict:
    from .distributed import barrier
    from .index import IndexArgs, SketchIndex
    from .sketch import SketchArgs, build_sketches
    sketch_args = _make(SketchArgs, ns, progress=ns.progress)
    index_args = _make(IndexArgs, ns, "index-", progress=ns.progress)
    inf = _session(ns)
    out = Path(ns.out)
    t0 = time.perf_counter()
    sketches = build_sketches(inf.model, inf.factors, inf.corpus, out / "sketches",
                              sketch_args, _ids(ns, inf.corpus), inf.task)
    seconds = time.perf_counter() - t0
    if rank == 0:  # the index is derived from the sketches: rebuilt on every run
        index = SketchIndex.build(sketches, out / "index", index_args)
        print(f"{len(sketches)} sketches of {sketches.dim} dims in {seconds:.1f} s on {world} "
              f"rank(s); {index!r} -> {out}")
    barrier()
    return dict(sequences=len(sketches), dim=sketches.dim, seconds=seconds)


def _score(ns: argparse.Namespace, rank: int, world: int) -> dict:
    from .scoring import ScoreArgs
    pairs = _queries(ns)
    inf = _session(ns, _make(ScoreArgs, ns, progress=ns.progress))
    queries = inf.queries(pairs, strategy=ns.strategy)
    t0 = time.perf_counter()
    result = inf.scan(queries, ids=_ids(ns, inf.corpus),
                      out_dir=ns.scan_dir or Path(ns.out) / "scan")
    seconds = time.perf_counter() - t0
    if rank == 0:
        result.save(ns.out)
        _print_top(result, ns.top)
        print(f"\nscored {len(result.ids)} sequences on {len(queries)} queries in {seconds:.1f} s "
              f"on {world} rank(s) -> {ns.out}")
    return dict(sequences=len(result.ids), queries=len(queries), seconds=seconds)


def _search(ns: argparse.Namespace, rank: int, world: int) -> dict:
    from .retriever import Retriever
    from .scoring import ScoreArgs
    from .store import write_json
    pairs = _queries(ns)
    inf = _session(ns, _make(ScoreArgs, ns, progress=ns.progress))
    retriever = Retriever.open(inf, ns.index, ns.lexical)
    retriever.index.set_params(ns.nprobe, ns.ef_search, ns.refine)
    result = retriever.search(pairs, ns.candidates)
    if rank == 0:
        result.save(ns.out)
        info = dict(candidates=[len(c) for c in result.candidates], timings=result.timings,
                    estimated_recall=result.estimated_recall, search_size=result.search_size)
        write_json(Path(ns.out) / "search.json", info)
        _print_top(result, ns.top)
        print(f"\nrescored {len(result.ids)} candidates of {len(retriever.sketches)} sketched "
              f"sequences in {sum(result.timings.values()):.2f} s on {world} rank(s) -> {ns.out}")
    return dict(sequences=len(result.ids), timings=result.timings)


def _demo(args: argparse.Namespace, rank: int = 0, world: int = 1) -> dict:
    """The main job on the demo world, sized to finish in about a minute on 2 cores: EK-FAC
    factors fitted on a random sample of the corpus, and each query's BM25 candidates scored
    exactly (``--fit-sample all --candidates all``: the whole corpus, ≈ 20 min)."""
    import numpy as np
    import torch

    from . import demo
    from .curvature import FactorArgs, fit_factors
    from .demo.build import fact_accuracy, perplexity
    from .scoring import ScoreArgs
    from .search import BM25
    from .session import Influence
    torch.set_num_threads(args.threads)
    t0 = time.time()
    facts = demo.facts()
    bad = [i for i in args.facts if not 0 <= i < len(facts)]
    if bad:
        raise CLIError(f"--facts {bad[0]}: the demo world has facts 0 … {len(facts) - 1}")
    model, tokenizer, corpus = demo.load()
    print(f"demo world: {corpus}")
    print(f"model: {model.config.model_type}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, "
          f"loaded in {time.time() - t0:.1f} s")
    rng = np.random.default_rng(args.seed)
    acc, _ = fact_accuracy(model, tokenizer, facts)
    heldout = demo.heldout(tokenizer)
    held = heldout.subset(_sample(rng, len(heldout), args.heldout))
    ppl = perplexity(model, held)
    print(f"planted-fact accuracy {acc:.3f} over {len(facts)} facts (greedy), perplexity "
          f"{ppl:.2f} on {_share(len(held), len(heldout), 'a random sample')} held-out sequences")

    t1 = time.time()
    sample = corpus.subset(_sample(rng, len(corpus), args.fit_sample))
    factors = fit_factors(model, sample, FactorArgs(batch_size=args.batch_size, progress=False))
    print(f"\nEK-FAC factors fitted on {_share(len(sample), len(corpus), 'a random sample')} "
          f"sequences ({factors.n_tokens:,} tokens) in {time.time() - t1:.1f} s")
    inf = Influence(model, tokenizer, corpus, factors=factors,
                    score_args=ScoreArgs(progress=False))
    picked = [facts[i] for i in args.facts]
    pairs = [(f.prompt(), f.completion) for f in picked]
    t1 = time.time()
    if args.candidates is None:
        ids, how = None, "every sequence"
    else:
        bm25 = BM25(corpus.df["text"].tolist()).top([p + c for p, c in pairs], args.candidates)
        ids = np.unique(np.concatenate(bm25))
        how = (f"the {args.candidates} best BM25 matches of each query's prompt + completion "
               f"({len(ids):,} of {len(corpus):,} sequences)")
    result = inf.scan(pairs, ids=ids)
    print(f"scored exactly: {how}, on {len(picked)} queries in {time.time() - t1:.1f} s")
    for q, f in enumerate(picked):
        print(f"\nquery {q}: {f.prompt()!r} → {f.completion!r}  (fact {f.id}, "
              f"log p = {result.queries[q]['logprob']:.3f})")
        for rank, row in result.top(q, 5).iterrows():
            mark = "*" if f.id in list(row["fact_ids"]) else " "
            print(f"  {rank}.{mark} {row['score']:9.2f}  [{row['kind']}/{row['lang']}] "
                  f"{row['text'][:90]!r}")
    print("\n(* = states the queried fact; positive = raises log p(completion | prompt); "
          "influence-nb demo --fit-sample all --candidates all fits and scans the whole corpus)")
    return dict(fact_accuracy=round(acc, 4), heldout_perplexity=round(ppl, 3),
                fit_sequences=factors.n_examples, scored_sequences=len(result.ids),
                seconds=round(time.time() - t0, 1))


def _sample(rng, n: int, size: int | None):
    """Sorted ids of ``size`` of ``n`` rows drawn without replacement (all for None)."""
    import numpy as np
    if size is None or size >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size, replace=False))


def _share(part: int, whole: int, what: str) -> str:
    """"all 20,000" or "512 of 20,000 (what)"."""
    return f"all {whole:,}" if part == whole else f"{part:,} of {whole:,} ({what})"


# -- parser -----------------------------------------------------------------------------------------

REQUIRED = {"fit": ("model", "corpus", "out"), "plan": ("model", "corpus"), "sketch": ("model", "corpus", "factors", "out"),
            "score": ("model", "corpus", "factors", "out"),
            "search": ("model", "corpus", "factors", "index", "out"),
            "validate tail-patch": ("model", "corpus", "factors", "out"),
            "validate lds": ("out",)}


def _common(p: argparse.ArgumentParser, out_help: str) -> None:
    g = p.add_argument_group("inputs and outputs")
    g.add_argument("--config", metavar="FILE.toml", help="read options from a TOML file")
    g.add_argument("--model", metavar="DIR", help="Hugging Face causal-LM directory (required)")
    g.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: --model)")
    g.add_argument("--dtype", default="float32",
                   choices=["auto", "float32", "bfloat16", "float16", "float64"],
                   help="model dtype (default: float32; statistics stay float32 or better)")
    g.add_argument("--device", help="torch device (default: this rank's GPU if any, else cpu)")
    g.add_argument("--corpus", metavar="PATH",
                   help="training corpus: .txt, .jsonl, .parquet or a saved Dataset (required)")
    g.add_argument("--text-field", default="text", help="the text column (default: text)")
    g.add_argument("--max-len", type=_positive(int), help="tokens per sequence (default: model context)")
    g.add_argument("--out", metavar="DIR", help=out_help + " (required)")
    g.add_argument("--progress", default=True, action=argparse.BooleanOptionalAction,
                   help="progress bars on rank 0 (default: on)")


def _query_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("queries")
    g.add_argument("--factors", metavar="DIR", help="fitted factors (from `fit`; required)")
    g.add_argument("--query", nargs=2, action="append", metavar=("PROMPT", "COMPLETION"),
                   help="a query; repeat for several")
    g.add_argument("--queries", metavar="FILE.jsonl",
                   help='queries, one {"prompt": ..., "completion": ...} per line')
    g.add_argument("--top", type=_positive(int), default=5, help="print the top-k per query (default: 5)")


def parser() -> argparse.ArgumentParser:
    from .curvature import FactorArgs
    from .index import IndexArgs
    from .scoring import ScoreArgs
    from .sketch import SketchArgs
    p = _Parser(prog="influence-nb", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fit", help="fit EK-FAC / K-FAC factors over a corpus -> Factors dir")
    _common(f, "directory for the factors (Factors.load)")
    _add_fields(f, FactorArgs)

    pl = sub.add_parser("plan", help="predict the memory and time of a fit and of scans on "
                        "this model, corpus and machine (one batch is run); refuse what cannot fit")
    _common(pl, "directory for plan.json (optional)")
    pl.add_argument("--queries", type=_positive(int), nargs="+", default=[1, 50, 200],
                    help="query counts to plan scans for (default: 1 50 200)")
    _add_fields(pl, FactorArgs)
    _add_fields(pl, ScoreArgs, "score-")

    s = sub.add_parser("sketch", help="sketch the corpus and build the FAISS index -> dir with "
                       "sketches/ and index/ (Retriever.open)")
    _common(s, "directory for sketches/ and index/")
    s.add_argument("--factors", metavar="DIR", help="fitted factors (from `fit`; required)")
    s.add_argument("--limit", type=_positive(int), help="only the first N sequences (ids 0 … N-1)")
    _add_fields(s, SketchArgs)
    _add_fields(s, IndexArgs, "index-")

    c = sub.add_parser("score", help="exhaustive scan: score every sequence on the queries -> "
                       "InfluenceResult dir (resumable)")
    _common(c, "directory for the result (InfluenceResult.load)")
    _query_options(c)
    c.add_argument("--limit", type=_positive(int), help="only the first N sequences (ids 0 … N-1)")
    c.add_argument("--strategy", choices=["ekfac", "kfac", "identity"],
                   help="precondition with another strategy than the fitted one")
    c.add_argument("--scan-dir", metavar="DIR",
                   help="resumable chunk directory (default: OUT/scan)")
    _add_fields(c, ScoreArgs)

    r = sub.add_parser("search", help="retrieve candidates from the index, rescore them exactly "
                       "-> InfluenceResult dir")
    _common(r, "directory for the result (InfluenceResult.load)")
    _query_options(r)
    r.add_argument("--index", metavar="DIR", help="the `sketch` output directory (required)")
    r.add_argument("--candidates", type=_positive(int), default=400,
                   help="sequences rescored per query, half per sign (default: 400)")
    r.add_argument("--lexical", type=_fraction, default=None,
                   help="share of the positive half taken from BM25 matches (default: 0 where "
                        "the sketch's calibrated recall is ≥ 0.99, else 0.5)")
    docs = _field_docs(IndexArgs)
    for name in ("nprobe", "ef_search", "refine"):
        r.add_argument(f"--{name.replace('_', '-')}", type=_positive(int),
                       help=f"{docs[name]} (default: as built)")
    _add_fields(r, ScoreArgs, skip=("progress", "chunk_size"))

    v = sub.add_parser("validate", help="counterfactual checks: tail-patching on any model, the "
                       "LDS on a built-in world (see influence_nb.validate)")
    checks = v.add_subparsers(dest="check", required=True)
    t = checks.add_parser("tail-patch", help="one SGD step on each top-k candidate (by "
                          "influence, BM25, random); Δ log p of each query -> OUT/tail_patch.csv")
    _common(t, "directory for tail_patch.csv")
    _query_options(t)
    t.add_argument("--k", type=_positive(int), default=10, help="candidates per method "
                   "(default: 10)")
    t.add_argument("--lr", type=_positive(float), default=1e-4, help="SGD step size "
                   "(default: 1e-4)")
    t.add_argument("--batch-size", type=_positive(int), default=16,
                   help="sequences per forward + backward of the scan (default: 16)")
    ld = checks.add_parser("lds", help="linear datamodeling score of EK-FAC, K-FAC, identity, "
                           "BM25 and random on a built-in world, retrained from scratch "
                           "(resumable) -> OUT/lds.csv")
    ld.add_argument("--world", default="validation", choices=["validation", "micro"])
    ld.add_argument("--subsets", type=_positive(int), default=50, help="random subsets "
                    "(default: 50)")
    ld.add_argument("--seeds", type=_positive(int), default=1, help="retrains per subset, "
                    "averaged (default: 1)")
    ld.add_argument("--alpha", type=_fraction, default=0.5, help="fraction of the corpus in each "
                    "subset (default: 0.5)")
    ld.add_argument("--out", metavar="DIR", help="directory for lds.csv and the retrains "
                    "(required)")
    ld.add_argument("--progress", default=True, action=argparse.BooleanOptionalAction)

    d = sub.add_parser("demo", help="the main job on the embedded demo world: fact accuracy, "
                       "EK-FAC factors, top influential sequences of three planted facts")
    d.add_argument("--facts", type=int, nargs="+", default=[0, 45, 100],
                   help="indices of the planted facts to query")
    d.add_argument("--batch-size", type=_positive(int), default=32,
                   help="sequences per batch of the fit (default: 32)")
    d.add_argument("--fit-sample", type=_count_or_all, default=512, metavar="N",
                   help="fit the factors on N sequences drawn at random, or `all` (default: 512;"
                   " all 20,000 take ≈ 10 min on 2 cores)")
    d.add_argument("--candidates", type=_count_or_all, default=100, metavar="K",
                   help="score the K best BM25 matches of each query exactly, or `all` for an "
                   "exhaustive scan (default: 100)")
    d.add_argument("--heldout", type=_count_or_all, default=200, metavar="N",
                   help="held-out sequences for the perplexity, or `all` (default: 200)")
    d.add_argument("--seed", type=int, default=0, help="seed of the random samples (default: 0)")
    d.add_argument("--threads", type=_positive(int), default=1,
                   help="torch threads (default: 1: the demo model's matrices are tiny, and "
                   "more threads only contend, the more so on a busy machine)")
    return p


def _validate(ns: argparse.Namespace, rank: int, world: int) -> dict:
    """Counterfactual checks that need no Python callback: tail-patching on any model, the LDS
    on a built-in world (retrained from scratch with its recipe)."""
    import numpy as np
    from .scoring import ScoreArgs
    from .store import atomic_write
    from .validate import lds, tail_patch, top_ids
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    if ns.check == "lds":
        from . import demo
        from .curvature import FactorArgs
        from .session import Influence
        from .training import Retrainer
        model, tokenizer, corpus = demo.load(ns.world)
        inf = Influence(model, tokenizer, corpus, score_args=ScoreArgs(batch_size=32,
                                                                       progress=False))
        inf.fit(FactorArgs(batch_size=32, progress=ns.progress), cache=True)
        pairs, kinds = demo.query_set(ns.world, tokenizer)
        table = lds(Retrainer(model.config, corpus, demo.recipe(ns.world)), *inf.encode(pairs),
                    inf.strategy_scores(pairs), ns.subsets, ns.alpha, range(ns.seeds),
                    out / "retrains", progress=ns.progress)
        atomic_write(out / "lds.csv", table.to_csv().encode())
        atomic_write(out / "lds_per_query.csv",
                     table.attrs["per_query"].assign(kind=kinds).to_csv().encode())
        print(table.round(3).to_string())
        return dict(world=ns.world, queries=len(pairs), lds=table["lds"].round(4).to_dict())
    pairs = _queries(ns)
    inf = _session(ns, ScoreArgs(batch_size=ns.batch_size, progress=ns.progress))
    strategy = inf.factors.args.strategy
    scores = inf.strategy_scores(pairs, strategies=(strategy,))
    rng = np.random.default_rng(0)
    candidates = {strategy: top_ids(scores[strategy], ns.k), "bm25": top_ids(scores["bm25"], ns.k),
                  "random": np.stack([rng.choice(len(inf.corpus), min(ns.k, len(inf.corpus)),
                                                 replace=False) for _ in pairs])}
    frame = tail_patch(inf.model, inf.corpus, *inf.encode(pairs), candidates, ns.lr, inf.task,
                       ns.progress)
    atomic_write(out / "tail_patch.csv", frame.to_csv(index=False).encode())
    summary = frame.groupby("method")["delta"].mean()
    print("mean change of log p(completion) after one SGD step on each candidate (nats):")
    print(summary.to_string())
    return dict(k=ns.k, lr=ns.lr, mean_delta=summary.round(6).to_dict())


def _apply_config(p: argparse.ArgumentParser, argv: list[str]) -> None:
    """Set the subcommand's defaults from --config (top-level keys, then its own table)."""
    import tomllib
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("command", nargs="?")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if not known.config or known.command not in COMMANDS:
        return
    path = Path(known.config)
    try:
        config = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise CLIError(f"--config {path} not found; check the path") from None
    except tomllib.TOMLDecodeError as e:
        raise CLIError(f"--config {path} is not valid TOML ({e})") from None
    subs = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices
    dests = {c: {a.dest for a in subs[c]._actions} for c in COMMANDS}
    norm = lambda table: {k.replace("-", "_"): v for k, v in table.items()}
    shared = norm({k: v for k, v in config.items() if not isinstance(v, dict)})
    own = norm(config.get(known.command, {}))
    unknown = [f"{k!r}" for k in shared if not any(k in d for d in dests.values())]
    unknown += [f"{k!r} in [{known.command}]" for k in own if k not in dests[known.command]]
    if unknown:
        raise CLIError(f"--config {path}: unknown option {unknown[0]}; use the flag names "
                       f"of `influence-nb {known.command} --help`")
    actions = {a.dest: a for a in subs[known.command]._actions}
    values = {k: v for k, v in shared.items() if k in dests[known.command]} | own
    subs[known.command].set_defaults(**{k: _config_value(actions[k], v, f"--config {path}: {k}")
                                        for k, v in values.items()})


def _config_value(action: argparse.Action, value: Any, where: str) -> Any:
    """A TOML value checked and converted like the flag ``action`` would be on the command line
    (type, range, choices); a mismatch is a :class:`CLIError` naming the key."""
    flag = action.option_strings[0] if action.option_strings else action.dest
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise CLIError(f"{where} = {value!r} must be true or false (like {flag})")
        return value
    if action.nargs is not None and action.nargs not in ("?",):   # lists: --layers, --query
        items = value if isinstance(value, list) else [value]
        if isinstance(action, argparse._AppendAction):
            if not all(isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) for x in v)
                       for v in items):
                raise CLIError(f"{where} must be a list of [prompt, completion] string pairs")
            return [list(v) for v in items]
        if not all(isinstance(v, str) for v in items):
            raise CLIError(f"{where} = {value!r} must be a string or a list of strings "
                           f"(like {flag})")
        return items
    if isinstance(value, (dict, list, bool)) or value is None:
        raise CLIError(f"{where} = {value!r} is not a value {flag} takes")
    if action.type is None and not isinstance(value, str):
        raise CLIError(f"{where} = {value!r} must be a string (like {flag})")
    try:
        value = action.type(str(value)) if action.type else value
    except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
        raise CLIError(f"{where} = {value!r} is not valid for {flag} ({first_line(e)})"
                       ) from None
    if action.choices is not None and value not in action.choices:
        raise CLIError(f"{where} = {value!r} must be one of {', '.join(map(str, action.choices))}")
    return value


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = parser()
    try:
        _apply_config(p, argv)
    except CLIError as e:
        p.error(str(e))
    ns = p.parse_args(argv)
    required = REQUIRED.get(f"{ns.command} {getattr(ns, 'check', '')}".strip(), ())
    missing = [k for k in required if getattr(ns, k) is None]
    if missing:
        p.error(f"{ns.command} needs --{missing[0].replace('_', '-')} (a flag or a --config key)")

    from . import distributed
    created = distributed.init()  # a no-op unless launched by torchrun
    rank, world = distributed.rank_world()
    if ns.command == "demo":
        ns.out = None
    else:
        ns.progress = ns.progress and rank == 0
    run = {"fit": _fit, "plan": _plan, "sketch": _sketch, "score": _score, "search": _search,
           "validate": _validate, "demo": _demo}[ns.command]
    t0 = time.perf_counter()
    try:
        summary = run(ns, rank, world)
    except (Exception, KeyboardInterrupt) as e:  # one line, never a traceback
        where = f" (rank {rank})" if world > 1 else ""
        if isinstance(e, KeyboardInterrupt):
            message = "interrupted; what was committed is kept and a rerun resumes it"
        elif isinstance(e, (ValueError, TypeError, KeyError, OSError, ArithmeticError,
                            MemoryError)):
            message = first_line(e)        # ours name the fix; an OSError names the file
        else:                               # a library's failure: say whose, keep it short
            message = (f"{type(e).__name__}: {first_line(e)} (set INFLUENCE_NB_TRACEBACK=1 "
                       "to see where)")
        print(f"influence-nb {ns.command}: error{where}: {message}", file=sys.stderr)
        if os.environ.get("INFLUENCE_NB_TRACEBACK"):
            raise
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else 2)
    finally:
        if created:
            distributed.finish()
    if summary is None:
        return
    if rank == 0:
        print(json.dumps(dict(command=ns.command, out=str(ns.out), ranks=world,
                              total_seconds=round(time.perf_counter() - t0, 2),
                              **{k: (round(v, 3) if isinstance(v, float) else v)
                                 for k, v in summary.items()}), default=str))


if __name__ == "__main__":
    main()
