"""Bad arguments are refused where they are passed, in one line that names the argument, its
value and what is allowed (influence_nb.checks), never as a silently wrong result."""
import pytest

from influence_nb.curvature import FactorArgs
from influence_nb.data import Corpus, CorpusError
from influence_nb.index import IndexArgs
from influence_nb.scoring import ScoreArgs
from influence_nb.sketch import SketchArgs


@pytest.mark.parametrize("make, error, message", [
    (lambda: ScoreArgs(rank=0), ValueError, "ScoreArgs(rank=0): must be an integer ≥ 1 or None"),
    (lambda: ScoreArgs(rank=-3), ValueError, "rank=-3"),
    (lambda: ScoreArgs(batch_size=0), ValueError, "batch_size=0"),
    (lambda: ScoreArgs(chunk_size=2.0), TypeError, "chunk_size=2.0"),
    (lambda: ScoreArgs(progress="no"), TypeError, "must be a bool"),
    (lambda: FactorArgs(damping=float("nan")), ValueError, "finite number > 0 or None"),
    (lambda: FactorArgs(damping=-1e-3), ValueError, "damping=-0.001"),
    (lambda: FactorArgs(damping_factor=0), ValueError, "damping_factor=0"),
    (lambda: FactorArgs(strategy="ekafc"), ValueError, "one of 'ekfac', 'kfac', 'identity'"),
    (lambda: FactorArgs(batch_size=True), TypeError, "batch_size=True"),
    (lambda: FactorArgs(max_examples=0), ValueError, "max_examples=0"),
    (lambda: SketchArgs(m=0), ValueError, "SketchArgs(m=0)"),
    (lambda: SketchArgs(structure="kron"), ValueError, "'khatri-rao', 'kronecker'"),
    (lambda: IndexArgs(kind="ivf"), ValueError, "IndexArgs(kind='ivf')"),
    (lambda: IndexArgs(nprobe=0), ValueError, "nprobe=0"),
])
def test_argument_dataclasses_refuse_bad_values_in_one_line(make, error, message):
    with pytest.raises(error) as e:
        make()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_good_values_pass():
    FactorArgs(damping=1e-3, layers=["h.0.mlp.c_fc"], max_examples=None)
    ScoreArgs(rank=None)
    IndexArgs(nlist=None, pq_m=None, shard_size=None)


def test_metadata_of_another_length_is_refused(tokenizer):
    with pytest.raises(CorpusError, match="3 texts but 2 metadata dicts"):
        Corpus.from_texts(["a b", "c d", "e f"], tokenizer, 32, metadata=[{}, {}])
