"""kill -9 at random points in a fit, a factor save, a scan, a sketch build and an LDS run:
every resume bit-identical, nothing finished lost (issue #28's acceptance).

For each operation three uninterrupted runs give the reference artifacts (they must agree)
and its duration. Each trial then starts the operation in a child process on a fresh folder,
sends it SIGKILL after a delay drawn uniformly within the shortest whole run seen, checks what
the kill left, runs the operation again to completion in the same folder (the resume) and
compares (``--trials`` kills that land while the run is going, per operation):

- **identical**: every artifact equals the reference's, the bytes of each file, or for a scan
  or retraining chunk store the bytes of each array and every manifest field, except the fields
  that name the run (``VOLATILE``: a store draws a run id when a fresh folder gets its
  manifest, so a trial's differs from the reference's by design; each chunk carries it and its
  CRC-32 covers it, the manifest's seal covers it; the resume must keep the id the killed run
  drew, checked) and the lock files (the holder's process id);
- **nothing finished lost**: every piece committed before the kill (a scan or LDS chunk, a
  sketch chunk named by the manifest, a completed cache entry, the folder's previous factors)
  reads back whole right after the kill and is not rewritten by the resume (same inode and
  mtime; sketch chunks: same bytes), and the resume computes exactly the pieces that were
  missing (counted by wrapping the function that computes one);
- **nothing partial accepted**: a torn piece left by the kill is either invisible to the
  reader or refused; accepting one would show as a difference from the reference.

Temporary files a killed atomic write leaves behind (``.<name>.<host>.<pid>.tmp``, never read) are
counted apart. Children are forked from this process once the inputs are built (no import per
trial): each is a separate process that SIGKILL ends at an arbitrary instruction, leaving what
it had handed the kernel (a kill -9 keeps the page cache; a power cut is not tested).

    python benchmarks/kill_resume.py --trials 20
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import signal
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from common import report, set_threads

VOLATILE = {"manifest.json": ("run", "seal"), ".npz": ("run", "crc32")}  # chunk stores only
CHUNKS = "influence_nb.chunks/1"   # store.ChunkStore.FORMAT
LOCKS = (".lock", ".manifest.lock", ".fitting")


# --- the world ---------------------------------------------------------------------------------

def tiny_model(vocab: int, hidden: int = 16, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    """A GPT-NeoX of the tests' size (hidden 16), or wider, seeded, float32, eval mode."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=4 * hidden,
                        max_position_embeddings=64)
    return GPTNeoXForCausalLM(cfg).eval()


def texts(n: int) -> list[str]:
    """n short sentences of varying length (the batches bucket them)."""
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    return [f"{words[i % 8]} number {i} is {'odd' if i % 2 else 'even'}" + " and so on" * (i % 4)
            + "." for i in range(n)]


PAIRS = [("alpha number", " 0 is even."), ("gamma number 2 is", " even"), ("theta", " number 7"),
         ("beta number 9", " is odd and so on.")]


def tally(log: Path) -> None:
    """Note in ``log`` that a run starts computing a piece (a line each)."""
    with open(log, "a") as fh:
        fh.write("1\n")


def computed(log: Path) -> int:
    """How many pieces the run that wrote ``log`` started computing."""
    return len(log.read_text().splitlines()) if log.exists() else 0


class Counted:
    """Wraps ``module.name`` in the child: each call is tallied in ``log`` first."""

    def __init__(self, module: object, name: str, log: Path):
        self.fn, self.log = getattr(module, name), log
        setattr(module, name, self)

    def __call__(self, *args, **kw):
        tally(self.log)
        return self.fn(*args, **kw)


# --- the operations ----------------------------------------------------------------------------

def file_ids(paths) -> dict[str, tuple[int, int]]:
    """{name: (inode, mtime ns)} (lock files aside): a file rewritten, atomically or in place,
    changes one of them."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(paths)
            if p.name not in LOCKS}


class Op:
    """One operation: inputs built once in the parent (:meth:`build`); :meth:`run` is what a
    child does in ``folder``; :meth:`finished` names the committed pieces, each with what must
    not change once committed; :meth:`check` lists problems with what a kill left."""
    name = ""
    pieces = 0   # pieces a whole run computes (set by build)

    def build(self, world: dict, root: Path) -> None:
        pass

    def prepare(self, folder: Path) -> None:
        folder.mkdir(parents=True)

    def run(self, folder: Path, log: Path) -> None:
        raise NotImplementedError

    def finished(self, folder: Path) -> dict[str, object]:
        raise NotImplementedError

    def check(self, folder: Path) -> list[str]:
        return []

    def at_kill(self, folder: Path) -> object:
        """What the kill left, for the record: by default how many pieces were committed."""
        return len(self.finished(folder))


class Chunks(Op):
    """An operation whose pieces are a :class:`~influence_nb.store.ChunkStore`'s chunk files in
    ``folder / sub``: each present one must be a whole ``.npz`` with its CRC-32 and run id."""
    sub = "."

    def finished(self, folder: Path) -> dict[str, object]:
        return file_ids((folder / self.sub).glob("chunk_*.npz"))

    def check(self, folder: Path) -> list[str]:
        """Each chunk file there read back by the store (CRC-32, run id, shape of its ids)."""
        from influence_nb.store import ChunkStore
        root = folder / self.sub
        files = sorted(root.glob("chunk_*.npz"))
        if not files:
            return []
        try:
            description = json.loads((root / "manifest.json").read_text())["description"]
            chunks = ChunkStore(root, description, self.name)
        except (OSError, ValueError, KeyError) as e:
            return [f"{len(files)} chunks, but the store does not open: {e}"]
        bad = []
        for p in files:
            try:
                with np.load(p) as z:
                    ids = z["ids"]
                chunks.read(int(p.stem.split("_")[1]), ids)
            except Exception as e:   # noqa: BLE001 - any failure to read is the finding
                bad.append(f"{p.name} does not read back after the kill: {e}")
        return bad


class Scan(Chunks):
    """A 4-query scan of 480 sequences in 60 resumable chunks of 8, then the result saved."""
    name, sub = "scan", "chunks"

    def build(self, world: dict, root: Path) -> None:
        from influence_nb.scoring import ScoreArgs
        self.world, self.args = world, ScoreArgs(batch_size=8, chunk_size=8, progress=False)
        self.pieces = -(-len(world["corpus"]) // 8)

    def run(self, folder: Path, log: Path) -> None:
        import influence_nb.scoring
        from influence_nb.session import Influence
        Counted(influence_nb.scoring, "corpus_pass", log)
        w = self.world
        inf = Influence(w["model"], w["tokenizer"], w["corpus"], w["factors"], self.args)
        inf.scan(PAIRS, out_dir=folder / self.sub).save(folder / "result")


class Lds(Chunks):
    """LDS of one score matrix over 10 subsets × 2 seeds of a tiny GPT-NeoX retrained from
    scratch (20 retrains, each a chunk in the work folder); the table and measurements saved."""
    name, sub = "lds", "retrains"

    def build(self, world: dict, root: Path) -> None:
        from influence_nb.curvature import FactorArgs
        from influence_nb.scoring import ScoreArgs
        from influence_nb.session import Influence
        from influence_nb.training import Retrainer, TrainConfig
        from influence_nb.validate import spearman
        tok, corpus = world["tokenizer"], world["small_corpus"]
        inf = Influence(tiny_model(len(tok)), tok, corpus, score_args=ScoreArgs(progress=False))
        inf.fit(FactorArgs(batch_size=8, progress=False))
        self.scores = inf.scan(PAIRS).scores
        self.prompts, self.completions = inf.encode(PAIRS)
        self.retrainer = Retrainer(inf.model.config, corpus,
                                   TrainConfig(epochs=8, batch_size=8, warmup_steps=2))
        self.subsets, self.seeds = 10, (0, 1)
        self.pieces = self.subsets * len(self.seeds)
        # what the children would import on first use (transformers' auto classes, scipy's
        # Spearman), here once, so that a child's time is the run's
        self.retrainer(np.arange(2), 0)
        spearman(np.arange(3.0), np.arange(3.0))

    def run(self, folder: Path, log: Path) -> None:
        from influence_nb.store import atomic_write
        from influence_nb.validate import lds
        retrainer = self.retrainer

        def retrain(ids, seed):
            tally(log)
            return retrainer(ids, seed)
        retrain.fingerprint = retrainer.fingerprint
        out = lds(retrain, self.prompts, self.completions, {"ekfac": self.scores},
                  subsets=self.subsets, seeds=self.seeds, out_dir=folder / self.sub,
                  progress=False)
        buf = io.BytesIO()
        np.savez(buf, table=out.to_numpy(), measured=out.attrs["measured"])
        atomic_write(folder / "lds.npz", buf.getvalue())


class Sketch(Op):
    """A sketch build of 480 sequences in 30 chunks of 16 (append-only rows, manifest last)."""
    name = "sketch"

    def build(self, world: dict, root: Path) -> None:
        from influence_nb.projection import SketchArgs
        self.world = world
        self.args = SketchArgs(m=64, batch_size=8, chunk_size=16, progress=False)
        self.pieces = -(-len(world["corpus"]) // 16)

    def run(self, folder: Path, log: Path) -> None:
        import influence_nb.sketch
        Counted(influence_nb.sketch, "corpus_pass", log)
        w = self.world
        influence_nb.sketch.build_sketches(w["model"], w["factors"], w["corpus"], folder,
                                           self.args)

    def finished(self, folder: Path) -> dict[str, object]:
        """Chunk k of the committed manifest: its CRC-32s (one per file: rows, sketches, norms
        and, where kept, the exact token factors) and the digest of its rows and sketches."""
        from influence_nb.sketch import Sketches, SketchError
        try:
            s = Sketches.open(folder, verify=False)
        except (SketchError, FileNotFoundError):
            return {}
        out, start = {}, 0
        for k, (size, *crcs) in enumerate(s.manifest["chunks"]):
            rows = s.rows[start:start + size].tobytes() + s.data[start:start + size].tobytes()
            out[f"chunk {k}"] = (*crcs, hashlib.sha256(rows).hexdigest())
            start += size
        return out

    def check(self, folder: Path) -> list[str]:
        from influence_nb.sketch import Sketches, SketchError
        if not (folder / "sketches.json").exists():
            return []
        try:
            Sketches.open(folder, self.world["model"], self.world["factors"], verify=True)
        except SketchError as e:
            return [f"the committed store does not open after the kill: {e}"]
        return []


class Fit(Op):
    """``Influence.fit(cache=True)`` of K-FAC, then of EK-FAC, on a GPT-NeoX of width 256 over
    160 sequences, the cache (``$INFLUENCE_NB_CACHE``) in the trial's folder: two entries, a
    complete one reused as it is, a torn one refitted."""
    name, pieces = "fit", 2

    def build(self, world: dict, root: Path) -> None:
        from influence_nb.curvature import FactorArgs
        self.world, self.model = world, tiny_model(len(world["tokenizer"]), hidden=256)
        self.args = [FactorArgs(strategy=s, batch_size=8, progress=False)
                     for s in ("kfac", "ekfac")]

    def run(self, folder: Path, log: Path) -> None:
        import influence_nb.session
        Counted(influence_nb.session, "fit_factors", log)
        os.environ["INFLUENCE_NB_CACHE"] = str(folder)
        inf = influence_nb.session.Influence(self.model, self.world["tokenizer"],
                                             self.world["fit_corpus"])
        for args in self.args:
            inf.fit(args, cache=True)

    def finished(self, folder: Path) -> dict[str, object]:
        from influence_nb.curvature import Factors
        out = {}
        for entry in sorted(folder.glob("factors-*/manifest.json")):
            try:
                Factors.load(entry.parent, self.model)
            except ValueError:
                continue
            out[entry.parent.name] = file_ids(entry.parent.glob("*"))
        return out


class Save(Op):
    """``Factors.save`` of a width-384 GPT-NeoX's EK-FAC factors (50 MB) into a folder holding
    its K-FAC factors: after the kill the folder must load as the one or the other, whole; the
    save run again must leave exactly the new ones."""
    name, pieces = "save", 1

    def build(self, world: dict, root: Path) -> None:
        from influence_nb.curvature import FactorArgs, fit_factors
        self.model = tiny_model(len(world["tokenizer"]), hidden=384)
        self.sha = {}
        for strategy in ("kfac", "ekfac"):
            factors = fit_factors(self.model, world["fit_corpus"],
                                  FactorArgs(strategy=strategy, batch_size=8, progress=False))
            factors.save(root / strategy)
            self.sha[json.loads((root / strategy / "manifest.json").read_text())["sha256"]] = \
                "old" if strategy == "kfac" else "new"
        self.old, self.new = root / "kfac", factors

    def prepare(self, folder: Path) -> None:
        shutil.copytree(self.old, folder, ignore=shutil.ignore_patterns(*LOCKS))

    def run(self, folder: Path, log: Path) -> None:
        tally(log)
        self.new.save(folder)

    def which(self, folder: Path) -> str:
        """"old", "new", or what else the folder loads as."""
        from influence_nb.curvature import Factors
        try:
            sha = json.loads((folder / "manifest.json").read_text())["sha256"]
            Factors.load(folder, self.model)
        except (ValueError, FileNotFoundError, KeyError) as e:
            return f"unloadable: {e}"
        return self.sha.get(sha, sha)

    def finished(self, folder: Path) -> dict[str, object]:
        return {}   # a save is not resumed but done again: nothing of it to keep

    def at_kill(self, folder: Path) -> object:
        return self.which(folder)

    def check(self, folder: Path) -> list[str]:
        state = self.which(folder)
        return [] if state in ("old", "new") else [f"after the kill the folder is {state}"]


OPS = {op.name: op for op in (Fit(), Save(), Scan(), Sketch(), Lds())}


def build_world(root: Path, ops: list[str]) -> None:
    """The inputs the children share, made once here (the children are forked after): the
    demo tokenizer, a tiny GPT-NeoX (width 16) with its factors and corpora of short sentences;
    each operation adds its own."""
    from transformers import AutoTokenizer
    from influence_nb.curvature import FactorArgs, fit_factors
    from influence_nb.data import Corpus
    from influence_nb.demo.world import ASSETS
    import influence_nb.session  # noqa: F401 - imported once here, not by each child
    tok = AutoTokenizer.from_pretrained(ASSETS)
    w = dict(tokenizer=tok, model=tiny_model(len(tok)), corpus=Corpus.from_texts(texts(480), tok),
             small_corpus=Corpus.from_texts(texts(24), tok),
             fit_corpus=Corpus.from_texts(texts(160), tok))
    w["factors"] = fit_factors(w["model"], w["corpus"], FactorArgs(batch_size=8, progress=False))
    for name in ops:
        OPS[name].build(w, root)


# --- comparing artifacts -----------------------------------------------------------------------

def digest(path: Path) -> str:
    """SHA-256 of a file, or for a chunk store's files of what they hold less ``VOLATILE``:
    a chunk's arrays (name, dtype, shape, bytes), a manifest's JSON."""
    if path.suffix == ".npz" and path.name.startswith("chunk_"):
        h = hashlib.sha256()
        with np.load(path) as z:
            for k in sorted(set(z.files) - set(VOLATILE[".npz"])):
                a = np.ascontiguousarray(z[k])
                h.update(f"{k} {a.dtype.str} {a.shape}".encode() + a.tobytes())
        return h.hexdigest()
    if path.name == "manifest.json":
        try:
            m = json.loads(path.read_text())
        except ValueError:
            m = {}
        if isinstance(m, dict) and m.get("format") == CHUNKS:
            body = {k: v for k, v in m.items() if k not in VOLATILE["manifest.json"]}
            return hashlib.sha256(json.dumps(body).encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def temporary(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp")


def artifacts(folder: Path) -> dict[str, str]:
    """{relative path: :func:`digest`} of every file under ``folder``, locks and temporary
    files aside."""
    return {str(p.relative_to(folder)): digest(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in LOCKS and not temporary(p)}


def run_ids(folder: Path) -> dict[str, str]:
    """{chunk store manifest: its run id}."""
    out = {}
    for p in folder.rglob("manifest.json"):
        m = json.loads(p.read_text())
        if m.get("format") == CHUNKS:
            out[str(p.relative_to(folder))] = m["run"]
    return out


def differences(reference: dict[str, str], got: dict[str, str]) -> list[str]:
    missing = sorted(set(reference) - set(got))
    extra = sorted(set(got) - set(reference))
    changed = sorted(k for k in set(reference) & set(got) if reference[k] != got[k])
    return ([f"missing {k}" for k in missing] + [f"extra {k}" for k in extra]
            + [f"differs {k}" for k in changed])


# --- children ----------------------------------------------------------------------------------

def start(op: Op, folder: Path, log: Path) -> int:
    """Fork a child that runs ``op`` in ``folder`` (stdout and stderr to ``folder``.err) and
    exits 0, or 1 with its traceback."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        with open(f"{folder}.err", "a") as err:
            os.dup2(err.fileno(), 1)
            os.dup2(err.fileno(), 2)
        op.run(folder, log)
        code = 0
    except BaseException:   # noqa: BLE001 - the child reports and exits whatever happened
        traceback.print_exc()
    finally:
        os._exit(code)


def finish(pid: int, folder: Path) -> None:
    """Wait for the child; one that failed is a RuntimeError with the end of its stderr."""
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(Path(f"{folder}.err").read_text()[-2000:])


def reference(op: Op, root: Path, repeats: int = 3) -> tuple[dict[str, str], float, int]:
    """(artifacts, seconds, pieces computed) of ``repeats`` uninterrupted runs, each in a fresh
    folder; runs that disagree are a RuntimeError (nothing to compare a resume with). The
    seconds are the shortest run's: a kill drawn within them finds most children running."""
    seen, seconds = [], []
    for r in range(repeats):
        folder = root / op.name / f"reference-{r}"
        op.prepare(folder)
        t0 = time.perf_counter()
        finish(start(op, folder, Path(f"{folder}.log")), folder)
        seconds.append(time.perf_counter() - t0)
        seen.append(artifacts(folder))
    if any(differences(seen[0], s) for s in seen[1:]):
        raise RuntimeError(f"{op.name}: uninterrupted runs differ: "
                           f"{[differences(seen[0], s) for s in seen[1:]]}")
    return seen[0], min(seconds), computed(Path(f"{folder}.log"))


def kill_after(pid: int, delay: float) -> tuple[str, float]:
    """SIGKILL the child ``delay`` s after its start (now) -> ("killed", delay), or
    ("finished" / "failed", seconds it ran) when it had exited before."""
    t0 = time.perf_counter()
    while time.perf_counter() < t0 + delay:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            ran = time.perf_counter() - t0
            return ("failed" if os.waitstatus_to_exitcode(status) else "finished"), ran
        time.sleep(min(0.002, max(0.0, t0 + delay - time.perf_counter())))
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return ("killed" if code == -signal.SIGKILL else "failed" if code else "finished"), delay


def trial(op: Op, root: Path, k: int, delay: float, ref: dict[str, str]) -> dict:
    """Kill a run of ``op`` after ``delay`` s, check what is left, resume, compare."""
    folder = root / op.name / f"trial-{k}"
    op.prepare(folder)
    ended, ran = kill_after(start(op, folder, Path(f"{folder}.killed.log")), delay)
    out = dict(trial=k, kill_s=round(delay, 3), killed=ended == "killed", ran_s=ran,
               at_kill=op.at_kill(folder),
               failures=[f"after the kill: {p}" for p in op.check(folder)])
    if ended == "failed":
        err = Path(f"{folder}.err").read_text().strip().splitlines()
        out["failures"].append(f"the run failed before the kill: {err[-1] if err else '?'}")
    kept, runs = op.finished(folder), run_ids(folder)
    try:
        finish(start(op, folder, Path(f"{folder}.resume.log")), folder)
    except RuntimeError as e:
        out["failures"].append(f"the resume failed: {str(e).strip().splitlines()[-1]}")
        return out
    after = op.finished(folder)
    lost = [p for p in kept if after.get(p) != kept[p]]
    out["failures"] += [f"finished piece {p} lost or rewritten by the resume" for p in lost]
    out["failures"] += [f"the resume drew a new run id for {m}" for m, r in runs.items()
                        if run_ids(folder).get(m) != r]
    out["recomputed"], missing = computed(Path(f"{folder}.resume.log")), op.pieces - len(kept)
    if out["recomputed"] != missing:
        out["failures"].append(f"the resume computed {out['recomputed']} pieces; {missing} "
                               "were missing")
    diff = differences(ref, artifacts(folder))
    out["failures"] += diff
    out.update(identical=not diff, kept=not lost and out["recomputed"] == missing,
               temporary_files=sum(temporary(p) for p in folder.rglob("*")))
    return out


def campaign(op: Op, root: Path, trials: int, rng: np.random.Generator) -> dict:
    """The reference runs, then kills and resumes until ``trials`` kills landed while the run
    was going (at most 3 · ``trials`` tries). The kill time is drawn uniformly within the
    shortest whole run seen so far: the references', or a trial's that finished before its
    kill time (the machine's load varies, a save's fsync most); such a trial is compared too
    but is not counted. The folders of trials that pass are removed as they end. ``kept``:
    trials whose resume kept every finished piece and computed only the missing ones."""
    ref, seconds, ref_computed = reference(op, root)
    runs, reference_s = [], seconds
    while sum(r["killed"] for r in runs) < trials and len(runs) < 3 * trials:
        runs.append(trial(op, root, len(runs), float(rng.uniform(0, seconds)), ref))
        if not runs[-1]["killed"]:
            seconds = min(seconds, runs[-1]["ran_s"])
        runs[-1]["ran_s"] = round(runs[-1]["ran_s"], 3)
        if not runs[-1]["failures"]:   # a failed trial's folder stays for a look (--keep)
            shutil.rmtree(root / op.name / f"trial-{len(runs) - 1}")
    killed = [r for r in runs if r["killed"]]
    count = lambda key: sum(bool(r.get(key)) for r in killed)  # noqa: E731
    return dict(reference_s=round(reference_s, 3), window_s=round(seconds, 3),
                pieces=op.pieces, reference_computed=ref_computed, artifacts=len(ref),
                trials=len(killed), identical=count("identical"),
                kept=count("kept"), failed=count("failures"),
                finished_before_kill=len(runs) - len(killed),
                failed_any=sum(bool(r["failures"]) for r in runs),
                temporary_files=sum(r.get("temporary_files", 0) for r in runs), runs=runs)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=20,
                   help="kills per operation that land while the run is going")
    p.add_argument("--ops", nargs="+", choices=list(OPS), default=list(OPS))
    p.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    p.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    a = p.parse_args(argv)
    set_threads(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"   # the children are forked
    root = Path(a.keep or tempfile.mkdtemp(prefix="kill_resume-"))
    try:
        t0 = time.perf_counter()
        build_world(root, a.ops)
        rng = np.random.default_rng(a.seed)
        result = dict(trials=a.trials, seed=a.seed, setup_s=round(time.perf_counter() - t0, 1),
                      ops={name: campaign(OPS[name], root, a.trials, rng) for name in a.ops})
        result["wall_s"] = round(time.perf_counter() - t0, 1)
        report(result)
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
