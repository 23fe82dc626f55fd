"""Every artifact sealed and bound to the run that made it, and no stale state: an edited manifest
field, a data file swapped between two artifacts, a manifest older than sealing, a chunk of
another run, chunks left behind by a deleted manifest, and a model whose weights changed since
its factors were fitted are each refused in one line that names the file (or the problem) and
the fix."""
import copy
import json
import shutil

import numpy as np
import pytest
import torch

from influence_nb import store
from influence_nb.calibration import CalibrationArgs, calibrate
from influence_nb.curvature import FactorArgs, Factors, fit_factors
from influence_nb.data import Corpus
from influence_nb.index import IndexArgs, IndexFileError, SketchIndex
from influence_nb.projection import SketchArgs
from influence_nb.results import InfluenceResult
from influence_nb.scoring import ScoreArgs
from influence_nb.session import Influence
from influence_nb.sketch import SketchError, Sketches, build_sketches, merge_sketches
from influence_nb.training import Retrainer, TrainConfig, code_fingerprint
from influence_nb.validate import lds
from test_counterfactual import Direct, Linear
from test_scoring import TEXTS, tiny_model

PAIR, OTHER = ("alpha number", " 0 is"), ("beta number", " 1 is")
ARGS = ScoreArgs(rank=None, chunk_size=12, batch_size=6, progress=False)


@pytest.fixture(scope="module")
def small(tokenizer):
    """A tiny float64 GPT-NeoX, a corpus and its EK-FAC factors."""
    model = tiny_model(len(tokenizer))
    corpus = Corpus.from_texts(TEXTS, tokenizer, max_len=64)
    return model, corpus, fit_factors(model, corpus, FactorArgs(batch_size=6, progress=False))


@pytest.fixture
def inf(small, tokenizer):
    model, corpus, factors = small
    return Influence(model, tokenizer, corpus, factors, ARGS)


def _edit(file, change):
    """Rewrite the JSON manifest ``file`` with ``change(manifest)`` applied, seal untouched."""
    m = json.loads(file.read_text())
    change(m)
    file.write_text(json.dumps(m))


def _refused(error, load, *needles):
    """``load()`` raises ``error`` in one line containing every needle."""
    with pytest.raises(error) as e:
        load()
    message = str(e.value)
    assert "\n" not in message and all(n in message for n in needles), message
    return message


# -- sealed manifests ---------------------------------------------------------------------------

def test_the_seal_covers_every_field_and_every_order(tmp_path):
    m = dict(format="x", b=[1, 2.5], a={"z": "é", "y": None})
    seal = store.seal_of(m)
    assert store.seal_of(m | {"seal": "anything"}) == seal
    assert store.seal_of(m | {"b": [2.5, 1]}) != seal
    assert store.seal_of(m | {"a": {"y": None, "z": "é"}}) != seal    # layers are in module order
    store.write_manifest(tmp_path / "m.json", m | {"seal": "stale"})  # sealed anew
    assert store.read_manifest(tmp_path / "m.json", "x", ValueError, "fix") == m


@pytest.mark.parametrize("field, change", [
    ("damping_factor", lambda m: m["args"].update(damping_factor=0.5)),
    ("strategy", lambda m: m["args"].update(strategy="kfac")),
    ("n_examples", lambda m: m.update(n_examples=m["n_examples"] * 2)),
    ("layer order", lambda m: m.update(layers=dict(reversed(list(m["layers"].items()))))),
    ("model fingerprint", lambda m: m.update(model_fingerprint="0" * 16)),
])
def test_an_edited_factors_manifest_is_refused(small, tmp_path, field, change):
    small[2].save(tmp_path)
    _edit(tmp_path / "manifest.json", change)
    _refused(ValueError, lambda: Factors.load(tmp_path), f"{tmp_path / 'manifest.json'} fails "
             "its seal (edited or damaged since it was written)", "refit them with fit_factors")


def test_factors_tensors_swapped_between_two_saves_are_refused(small, tmp_path):
    model, corpus, factors = small
    factors.save(tmp_path / "a")
    fit_factors(model, corpus, FactorArgs(batch_size=6, seed=1, progress=False)).save(
        tmp_path / "b")
    name = json.loads((tmp_path / "a" / "manifest.json").read_text())["tensors"]
    other = json.loads((tmp_path / "b" / "manifest.json").read_text())["tensors"]
    shutil.copy(tmp_path / "b" / other, tmp_path / "a" / name)
    _refused(ValueError, lambda: Factors.load(tmp_path / "a"), f"({name} fails the manifest's "
             "SHA-256)", "refit them")
    shutil.copy(tmp_path / "b" / "manifest.json", tmp_path / "a" / "manifest.json")
    _refused(ValueError, lambda: Factors.load(tmp_path / "a"), f"({other} fails")


@pytest.mark.parametrize("field, change", [
    ("a prompt", lambda m: m["queries"][0].update(prompt="gamma number")),
    ("n_train", lambda m: m.update(n_train=10 * m["n_train"])),
    ("layer order", lambda m: m["layer_names"].reverse()),
    ("query order", lambda m: m["queries"].reverse()),
    ("the corpus", lambda m: m.update(corpus_fingerprint="0" * 16)),
])
def test_an_edited_result_manifest_is_refused(inf, tmp_path, field, change):
    inf.scan([PAIR, OTHER]).save(tmp_path)
    _edit(tmp_path / "result.json", change)
    _refused(ValueError, lambda: InfluenceResult.load(tmp_path),
             f"{tmp_path / 'result.json'} fails its seal", "save the result again")


def test_manifests_older_than_sealing_are_refused_with_the_way_to_rebuild(inf, tmp_path):
    inf.factors.save(tmp_path / "f")
    inf.scan(PAIR).save(tmp_path / "r")
    inf.scan(PAIR, out_dir=tmp_path / "s")
    cases = [(tmp_path / "f/manifest.json", lambda: Factors.load(tmp_path / "f"),
              "refit them with fit_factors"),
             (tmp_path / "r/result.json", lambda: InfluenceResult.load(tmp_path / "r"),
              "save the result again"),
             (tmp_path / "s/manifest.json", lambda: inf.scan(PAIR, out_dir=tmp_path / "s"),
              f"delete {tmp_path / 's'} and run the scan again")]
    for file, load, fix in cases:
        _edit(file, lambda m: m.pop("seal"))
        _refused(ValueError, load, f"{file} predates sealed manifests", fix)


@pytest.fixture
def sketched(inf, tmp_path):
    """Sketches of ids 0–11, then 12–23 appended (the extend path), an index and a
    calibration, in ``tmp_path``."""
    args = SketchArgs(m=16, chunk_size=12, batch_size=6, progress=False)
    build_sketches(inf.model, inf.factors, inf.corpus, tmp_path / "s", args, ids=range(12))
    sketches = build_sketches(inf.model, inf.factors, inf.corpus, tmp_path / "s", args,
                              ids=range(24))
    SketchIndex.build(sketches, tmp_path / "i", IndexArgs(progress=False))
    calibrate(inf, sketches, CalibrationArgs(sample=12, queries=2))
    return sketches


def test_sketches_index_and_calibration_are_sealed_through_appends(inf, sketched, tmp_path):
    sketches = Sketches.open(tmp_path / "s", inf.model, inf.factors)
    assert len(sketches) == 24 and len(sketches.manifest["chunks"]) == 2
    SketchIndex.load(tmp_path / "i", sketches)
    args = CalibrationArgs(sample=12, queries=2)
    assert calibrate(inf, sketches, args).n_sample == 12
    cases = [
        ("s/sketches.json", lambda m: m["projection"].update(m=32), SketchError,
         lambda: Sketches.open(tmp_path / "s"), "rebuild with build_sketches"),
        ("s/sketches.json", lambda m: m["chunks"].reverse(), SketchError,
         lambda: Sketches.open(tmp_path / "s"), "rebuild with build_sketches"),
        ("i/index.json", lambda m: m["args"].update(nprobe=1), IndexFileError,
         lambda: SketchIndex.load(tmp_path / "i", sketches), "rebuild with SketchIndex.build"),
        ("s/calibration.json", lambda m: m["positive"][0].reverse(), SketchError,
         lambda: calibrate(inf, sketches, args), "to calibrate the store again"),
    ]
    for name, change, error, load, fix in cases:
        good = (tmp_path / name).read_bytes()
        _edit(tmp_path / name, change)
        _refused(error, load, f"{tmp_path / name} fails its seal", fix)
        (tmp_path / name).write_bytes(good)
    build_sketches(inf.model, inf.factors, inf.corpus, tmp_path / "t",     # the same rows,
                   SketchArgs(m=16, chunk_size=12, batch_size=6, progress=False),  # reversed
                   ids=range(23, -1, -1))
    for name in ("sketches.f16", "rows.bin"):                  # swapped between two stores
        good = (tmp_path / "s" / name).read_bytes()
        shutil.copy(tmp_path / "t" / name, tmp_path / "s" / name)
        _refused(SketchError, lambda: Sketches.open(tmp_path / "s"),
                 f"{tmp_path / 's'} is corrupt (chunk 0, rows 0–12, fails its CRC-32)")
        (tmp_path / "s" / name).write_bytes(good)


def test_merged_sketch_parts_are_sealed(inf, tmp_path):
    args = SketchArgs(m=16, chunk_size=12, batch_size=6, progress=False)
    parts = [build_sketches(inf.model, inf.factors, inf.corpus, tmp_path / f"p{k}", args,
                            ids=range(12 * k, 12 * k + 12)) for k in range(2)]
    merged = merge_sketches(tmp_path / "m", parts)
    assert merged.ids.tolist() == list(range(24))
    assert "seal" in json.loads((tmp_path / "m" / "sketches.json").read_text())


# -- chunks bound to their run ------------------------------------------------------------------

def test_a_scan_chunk_copied_from_another_scans_folder_is_refused(inf, tmp_path):
    whole = inf.scan(PAIR, out_dir=tmp_path / "a").scores
    inf.scan(OTHER, out_dir=tmp_path / "b")
    chunk = "chunk_0000000012.npz"
    shutil.copy(tmp_path / "b" / chunk, tmp_path / "a" / chunk)
    _refused(ValueError, lambda: inf.scan(PAIR, out_dir=tmp_path / "a"),
             f"{tmp_path / 'a' / chunk} is a chunk from another run", "delete it and resume")
    (tmp_path / "a" / chunk).unlink()
    np.testing.assert_array_equal(inf.scan(PAIR, out_dir=tmp_path / "a").scores, whole)


def test_chunks_left_by_a_deleted_manifest_are_never_adopted(inf, tmp_path):
    inf.scan(PAIR, out_dir=tmp_path)
    (tmp_path / "manifest.json").unlink()
    n = len(list(tmp_path.glob("chunk_*.npz")))
    _refused(ValueError, lambda: inf.scan(OTHER, out_dir=tmp_path),
             f"{tmp_path} holds {n} chunks but no manifest.json", "delete them")
    assert not (tmp_path / "manifest.json").exists()
    for chunk in tmp_path.glob("chunk_*.npz"):
        chunk.unlink()
    np.testing.assert_array_equal(inf.scan(OTHER, out_dir=tmp_path).scores,
                                  inf.scan(OTHER).scores)


def test_an_lds_chunk_of_another_recipes_run_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 20))

    def retrain(ids, seed):
        return Linear(torch.tensor(w[:, ids].sum(1)))

    def other(ids, seed):
        return Linear(torch.tensor(-w[:, ids].sum(1)))

    kw = dict(subsets=4, seeds=(0,), task=Direct(), progress=False)
    pairs = ([[1]] * 2, [[2]] * 2)
    lds(retrain, *pairs, {"w": w}, out_dir=tmp_path / "a", **kw)
    lds(other, *pairs, {"w": w}, out_dir=tmp_path / "b", **kw)
    shutil.copy(tmp_path / "b" / "chunk_0000000001.npz", tmp_path / "a")
    _refused(ValueError, lambda: lds(retrain, *pairs, {"w": w}, out_dir=tmp_path / "a", **kw),
             "chunk_0000000001.npz is a chunk from another run", "resume the retraining run")
    lds(other, *pairs, {"w": w}, out_dir=tmp_path / "c", **kw)   # two recipes never share one
    _refused(ValueError, lambda: lds(retrain, *pairs, {"w": w}, out_dir=tmp_path / "c", **kw),
             f"{tmp_path / 'c'} holds a retraining run of other retrain")


def test_retraining_stores_are_keyed_by_the_recipes_code_never_an_address(tmp_path, tokenizer):
    def retrain(ids, seed):
        return Linear(torch.tensor([float(np.sum(ids))]))

    assert code_fingerprint(retrain) == code_fingerprint(retrain) and "0x" not in \
        code_fingerprint(retrain)
    kw = dict(subsets=2, seeds=(0,), task=Direct(), progress=False)
    args = ([[1]], [[2]], {"s": np.arange(8.0)[None]})
    anonymous = lambda ids, seed: retrain(ids, seed)                        # noqa: E731
    lds(anonymous, *args, **kw)                                       # no store: no key needed
    _refused(ValueError, lambda: lds(anonymous, *args, out_dir=tmp_path, **kw),
             "retrain <function", "define it with def, or name its recipe: "
             "retrain.fingerprint = 'a name for this recipe'")
    anonymous.fingerprint = "sum of ids"
    lds(anonymous, *args, out_dir=tmp_path, **kw)
    corpus = Corpus.from_texts(TEXTS[:2], tokenizer, 64)
    _refused(ValueError, lambda: Retrainer(lambda seed: None, corpus, TrainConfig()).fingerprint,
             "the Retrainer's config <function", "config.fingerprint = ")


# -- stale state --------------------------------------------------------------------------------

def test_a_scan_after_the_weights_changed_in_place_is_refused(small, tokenizer):
    model, corpus, factors = small
    model = copy.deepcopy(model)                        # the module's model stays as it is
    inf = Influence(model, tokenizer, corpus, factors, ARGS)
    before = inf.scan(PAIR).scores
    np.testing.assert_array_equal(inf.scan(PAIR).scores, before)     # unchanged: no refusal
    with torch.no_grad():
        model.gpt_neox.layers[0].mlp.dense_h_to_4h.weight.mul_(1 + 1e-9)   # below bfloat16
    stale = ("the model's weights changed since the factors were fitted or loaded",
             "refit with inf.fit(...), or call inf.keep_factors()")
    for use in (lambda: inf.scan(PAIR), lambda: inf.queries(PAIR), inf.self_influence):
        _refused(ValueError, use, *stale)
    inf.keep_factors()                                  # the override: old curvature, new weights
    assert not np.array_equal(inf.scan(PAIR).scores, before)
    with torch.no_grad():
        model.gpt_neox.embed_in.weight[0, 0] += 0.5     # an untracked weight counts too
    _refused(ValueError, lambda: inf.scan(PAIR), *stale)
    inf.fit(FactorArgs(batch_size=6, progress=False))   # refitted: scans again
    inf.scan(PAIR)


def test_a_chunk_write_killed_before_its_rename_leaves_nothing_behind(tmp_path):
    """Opening a chunk store removes this host's temporaries whose writer is gone; a live
    writer's stay (it may still rename them)."""
    import os
    import socket
    import subprocess
    import sys
    from influence_nb.store import ChunkStore
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    host = socket.gethostname()
    dead = tmp_path / f".chunk_00000000.npz.{host}.{gone}.tmp"
    live = tmp_path / f".chunk_00000008.npz.{host}.{os.getpid()}.tmp"
    for p in (dead, live):
        p.write_bytes(b"part")
    ChunkStore(tmp_path, {"what": 1})
    assert not dead.exists() and live.exists()


def test_read_safetensors_reads_what_safetensors_wrote_and_refuses_forged_headers(tmp_path):
    """Each tensor read straight from the file, bit for bit, under the file's SHA-256; a
    wrong digest, a cut file, or a header naming a tensor the file does not hold (larger than
    the file: it would be allocated first) is None, not an exception or a huge allocation."""
    import struct

    import safetensors.torch
    tensors = {"a": torch.randn(3, 5, dtype=torch.float64), "b": torch.arange(7.0).half(),
               "c": torch.randn(2, 2).bfloat16()}
    path = tmp_path / "t.safetensors"
    safetensors.torch.save_file(tensors, path)
    sha = store.sha256_file(path)
    got = store.read_safetensors(path, sha)
    assert got.keys() == tensors.keys()
    assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in tensors.items())
    assert store.read_safetensors(path, "0" * 64) is None
    blob = path.read_bytes()
    (tmp_path / "cut").write_bytes(blob[:-3])
    assert store.read_safetensors(tmp_path / "cut", store.sha256_file(tmp_path / "cut")) is None
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    header["a"]["shape"] = [1 << 40, 1 << 20]              # 2^63 bytes: never allocated
    forged = json.dumps(header).encode()
    (tmp_path / "forged").write_bytes(struct.pack("<Q", len(forged)) + forged + blob[8 + n:])
    assert store.read_safetensors(tmp_path / "forged",
                                  store.sha256_file(tmp_path / "forged")) is None
