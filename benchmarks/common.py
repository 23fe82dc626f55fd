"""The benchmarks' shared harness: thread setup, the plain forward + backward baseline, timing
with repeats and their spread, JSON output, child processes and the worlds several scripts load.

Every benchmark is a script, run as ``python benchmarks/<name>.py`` (``--help`` lists its
options), with ``def main(argv=None)`` under ``if __name__ == "__main__"``; it imports its
siblings by name (``from common import plain``): Python puts the script's folder first on
``sys.path``, so no script edits the path. That also lets a script re-run itself in a child
process with another checkout's ``influence_nb`` on ``PYTHONPATH`` (``--before``) while the
harness stays this one.

This module imports ``influence_nb`` only inside the functions that need it: such a child
imports the other checkout's package, which may predate some of today's modules.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import numpy as np
import torch

K = TypeVar("K")
T = TypeVar("T")


# --- setup -------------------------------------------------------------------------------------

def set_threads(n: int = 1) -> None:
    """torch's CPU threads for this process: one by default, so that timings compare across
    runs and machines, and other jobs on a shared machine disturb them least."""
    torch.set_num_threads(n)


def one_thread_env(**extra: str) -> dict[str, str]:
    """This process's environment with ``OMP_NUM_THREADS=1`` (and ``extra``, e.g. PYTHONPATH):
    a child started with it runs torch on one thread from its first operation."""
    return os.environ | {"OMP_NUM_THREADS": "1", **extra}


# --- the baseline and timing -------------------------------------------------------------------

def plain(model: torch.nn.Module, batches: Iterable[Any], task: Any = None,
          zero_each_batch: bool = False) -> float:
    """Seconds of a plain forward + backward of the summed training loss over ``batches``: the
    floor every pass is compared with. Gradients form in every parameter that requires them and
    are dropped at the end (``zero_each_batch``: after every batch, as a training step does, so
    that a batch's peak memory holds no earlier gradients). A generator of batches is consumed
    inside the timing (collation timed too); a list was collated before.

    task: an ``influence_nb.task.Task`` (its ``forward`` and ``training_loss``); default Task().
    """
    if task is None:
        from influence_nb.task import Task
        task = Task()
    start = time.perf_counter()
    for b in batches:
        task.training_loss(task.forward(model, b), b).sum().backward()
        if zero_each_batch:
            model.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


@contextmanager
def trainable(model: torch.nn.Module, params: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """Within the block only ``params`` of the model require gradients (a fine-tune's adapter,
    say); every parameter's flag is restored after."""
    keep = {id(p) for p in params}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(id(p) in keep)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def seconds(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of ``fn()``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(runs: dict[K, Callable[[], T]], repeats: int, warmup: bool = True
                ) -> dict[K, list[T]]:
    """{name: [run's result per repeat]}: each repeat calls every run once, in order, so that
    a change in the machine's load hits them alike; ``warmup``: one discarded call of each
    first (allocator pools, lazy imports, caches)."""
    if warmup:
        for run in runs.values():
            run()
    out: dict[K, list[T]] = {k: [] for k in runs}
    for _ in range(repeats):
        for k, run in runs.items():
            out[k].append(run())
    return out


def spread(x: Iterable[float], digits: int = 3) -> list[float]:
    """[median, min, max] of repeated measurements, rounded."""
    x = [float(v) for v in x]
    return [round(float(np.median(x)), digits), round(min(x), digits), round(max(x), digits)]


def top_overlap(x: np.ndarray, y: np.ndarray, k: int = 10) -> float:
    """The share of the k largest entries of (N,) scores ``x`` that are among ``y``'s."""
    return len(set(np.argsort(-x)[:k]) & set(np.argsort(-y)[:k])) / k


def report(result: dict, indent: int | None = 1) -> None:
    """Print a benchmark's figures as JSON on stdout (``indent=None``: one line, what a parent
    process reads back from a child)."""
    print(json.dumps(result, indent=indent), flush=True)


# --- child processes and memory ----------------------------------------------------------------

class ChildFailed(RuntimeError):
    """A child process exited with an error; the message is the end of its stderr."""


def run_child(args: list[str], env: dict[str, str] | None = None,
              cwd: str | Path | None = None) -> str:
    """Run ``python *args`` (this interpreter) and return the last line of its stdout."""
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=cwd)
    if done.returncode:
        raise ChildFailed(done.stderr.strip()[-3000:] or f"exit status {done.returncode}")
    lines = done.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def status_mib(key: str = "VmHWM") -> float:
    """This process's resident memory (``VmRSS``) or its peak since the last
    :func:`reset_peak` (``VmHWM``), MiB, from /proc (Linux; NaN elsewhere)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return float("nan")
    for line in lines:
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Reset this process's peak resident memory (VmHWM) to its current one (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mib() -> float:
    """This process's peak resident memory since it started, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- worlds ------------------------------------------------------------------------------------

class World(NamedTuple):
    """A model, its tokenizer, the corpus a benchmark scans and (prompt, completion) queries."""
    model: Any
    tokenizer: Any
    corpus: Any
    pairs: list[tuple[str, str]]


def load_world(name: str, queries: int | None = None) -> World:
    """A world by name: ``markov`` (markov_world.py, independent of the demo generator; its
    model trained here), ``memorized`` (memorized_world.py: short facts learned to
    near-certainty, its model cached), ``short`` (short_world.py: 3,150 demo sentences), or a
    demo world (``demo``, ``validation``) with its query set. ``queries``: how many the Markov,
    memorized and short worlds draw (default theirs)."""
    drawn = {} if queries is None else {"queries": queries}
    if name == "markov":
        import markov_world
        w = markov_world.build(**drawn)
        return World(w.model, w.tokenizer, w.corpus, w.pairs)
    if name == "short":
        import short_world
        return World(*short_world.build(**drawn))
    if name == "memorized":
        import memorized_world
        w = memorized_world.build(**drawn)
        return World(w.model, w.tokenizer, w.corpus, w.pairs)
    from influence_nb import demo
    model, tokenizer, corpus = demo.load(name)
    return World(model, tokenizer, corpus, demo.query_set(name, tokenizer)[0])


def fact_pairs(facts: Iterable[Any], paraphrase: int = 0) -> list[tuple[str, str]]:
    """(prompt, completion) of planted facts (``demo.facts()``), canonical prompt by default."""
    return [(f.prompt(paraphrase), f.completion) for f in facts]


def encode(tokenizer: Any, pairs: Iterable[tuple[str, str]]
           ) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, completions) token ids, the completion without special tokens, as
    ``Influence.encode`` does — for code that calls ``make_queries`` without a session."""
    pairs = list(pairs)
    return ([tokenizer(p)["input_ids"] for p, _ in pairs],
            [tokenizer(c, add_special_tokens=False)["input_ids"] for _, c in pairs])


def sample_ids(n_total: int, n: int, seed: int = 0) -> np.ndarray:
    """(n,) distinct ids drawn at random from range(n_total), in draw order."""
    return np.random.default_rng(seed).choice(n_total, n, replace=False)


def length_batches(corpus: Any, ids: np.ndarray, batch_size: int,
                   window: int | None = None) -> list[Any]:
    """The batches a pass runs over ``ids``: ordered by length within windows of ``window``
    ids (default all of them: one scan chunk), then cut into ``batch_size`` sequences."""
    order = corpus.by_length(ids, window or len(ids))
    return list(corpus.batches(batch_size, ids=ids[order]))
