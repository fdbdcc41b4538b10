"""Tests for hyperconn.data: KVRetrieval and ByteText."""

import os
import time
from itertools import islice

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hyperconn.data import IGNORE_INDEX, ByteText, KVRetrieval
from hyperconn.data import byte_text as bt_mod

# ---------------------------------------------------------------- KVRetrieval


def test_kv_layout_and_ranges():
    p, t, v = 8, 64, 256
    kv = KVRetrieval(pairs=p, seq_len=t, vocab=v, seed=3)
    x, y = kv.train_batch(0, 32)
    assert x.shape == y.shape == (32, t) and x.dtype == y.dtype == torch.int64
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        keys, vals = row_x[0 : 2 * p : 2], row_x[1 : 2 * p : 2]
        assert len(set(keys)) == p
        assert all(0 <= k < v // 2 for k in keys)
        assert all(v // 2 <= val < v for val in vals)
        assert row_x[2 * p : t - p] == [0] * (t - 3 * p)
        queries = row_x[t - p :]
        assert sorted(queries) == sorted(keys)
        table = dict(zip(keys, vals))
        assert row_y[t - p :] == [table[q] for q in queries]
        assert row_y[: t - p] == [IGNORE_INDEX] * (t - p)
    # queries are shuffled, not always in pair order
    assert any(x[i, t - p :].tolist() != x[i, 0 : 2 * p : 2].tolist() for i in range(32))
    assert kv.chance_accuracy == pytest.approx(1 / p)
    assert kv.query_slice == slice(t - p, t)


def test_kv_loss_is_query_only():
    kv = KVRetrieval(pairs=4, seq_len=32)
    x, y = kv.train_batch(0, 8)
    logits = torch.randn(8, 32, 256)
    full = F.cross_entropy(logits.view(-1, 256), y.view(-1), ignore_index=-100)
    q = kv.query_slice
    ref = F.cross_entropy(logits[:, q].reshape(-1, 256), y[:, q].reshape(-1))
    assert torch.allclose(full, ref) and torch.allclose(kv.loss(logits, y), ref)
    perfect = F.one_hot(y.clamp(min=0), 256).float()
    assert kv.accuracy(perfect, y).item() == 1.0
    perfect[:, -1] = 0  # last query now predicts token 0 -> wrong
    assert kv.accuracy(perfect, y).item() == pytest.approx(3 / 4)


def test_kv_determinism_and_resume():
    a, b, c = KVRetrieval(seed=1), KVRetrieval(seed=1), KVRetrieval(seed=2)
    for (xa, ya), (xb, yb) in zip(islice(a.train_batches(4), 3), islice(b.train_batches(4), 3)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.train_batch(0, 4)[0], c.train_batch(0, 4)[0])
    assert not torch.equal(a.train_batch(0, 4)[0], a.train_batch(1, 4)[0])
    stream = list(islice(a.train_batches(4), 6))
    for step in (0, 5):
        assert torch.equal(stream[step][0], a.train_batch(step, 4)[0])
    resumed = next(a.train_batches(4, start_step=5))
    assert torch.equal(resumed[1], stream[5][1])
    e1 = list(a.eval_batches(4, 2))
    e2 = list(b.eval_batches(4, 2))
    assert len(e1) == 2 and all(torch.equal(u[0], w[0]) for u, w in zip(e1, e2))


@pytest.mark.parametrize("pairs,vocab", [(1, 16), (2, 8), (8, 256)])
def test_kv_train_eval_disjoint(pairs, vocab):
    # the small settings have only a few hundred distinct sequences, so without the
    # partition the two streams would certainly overlap
    kv = KVRetrieval(pairs=pairs, seq_len=3 * pairs, vocab=vocab, seed=0)
    other = KVRetrieval(pairs=pairs, seq_len=3 * pairs, vocab=vocab, seed=7)
    train = {tuple(r) for s in range(40) for r in kv.train_batch(s, 64)[0].tolist()}
    train |= {tuple(r) for s in range(40) for r in other.train_batch(s, 64)[0].tolist()}
    evals = {tuple(r) for xb, _ in kv.eval_batches(64, 40) for r in xb.tolist()}
    assert len(evals) > 10 and not (train & evals)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(pairs=0), "pairs=0"),
        (dict(pairs=10, seq_len=29), r"pairs=10 do not fit in seq_len=29: need 3\*pairs <= seq_len"),
        (dict(pairs=5, vocab=8, seq_len=64), "pairs=5"),
        (dict(vocab=3, pairs=1), "vocab=3"),
        (dict(seq_len=2.5), "seq_len"),
    ],
)
def test_kv_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KVRetrieval(**kwargs)


def test_kv_call_errors():
    kv = KVRetrieval(pairs=2, seq_len=8)
    with pytest.raises(ValueError, match="split"):
        kv.batch(0, 2, "test")
    with pytest.raises(ValueError, match="batch_size"):
        kv.train_batch(0, 0)
    with pytest.raises(ValueError, match="IGNORE_INDEX"):
        kv.accuracy(torch.zeros(1, 3, 5), torch.full((1, 3), -100))


# ---------------------------------------------------------------- ByteText


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for i in range(12):
        d = root / ("sub" if i % 2 else "")
        (d / f"f{i:02d}.txt").write_bytes(bytes(range(i, i + 100)) * 3)
    (root / "empty.txt").write_bytes(b"")
    return root


def test_bytetext_small_corpus(corpus, tmp_path):
    cache = tmp_path / "cache"
    tr = ByteText(corpus, seq_len=32, split="train", val_fraction=0.25, cache_dir=cache)
    va = ByteText(corpus, seq_len=32, split="val", val_fraction=0.25, cache_dir=cache)
    assert tr.num_files + va.num_files == 12 and va.num_files >= 1 and tr.num_files >= 1
    assert not set(tr.files) & set(va.files)
    assert tr.num_bytes == tr.num_files * 301 and tr.num_documents == tr.num_files
    assert tr.offsets[-1] == tr.num_bytes and tr.vocab_size == 256
    x, y = tr.train_batch(0, 16)
    assert x.shape == y.shape == (16, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and int(x.max()) < 256
    assert torch.equal(next(tr.batches(16))[0], x)
    assert torch.equal(list(islice(tr.batches(16), 3))[2][1], tr.train_batch(2, 16)[1])
    assert not torch.equal(tr.train_batch(1, 16)[0], x)
    e1, e2 = list(va.eval_batches(4, 2)), list(va.eval_batches(4, 2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(e1, e2))
    # same seed, new instance: identical; cache reused, not rewritten
    mtime = os.stat(tr.cache_path).st_mtime_ns
    tr2 = ByteText(str(corpus / "**" / "*.txt"), seq_len=32, val_fraction=0.25, cache_dir=cache)
    assert torch.equal(tr2.train_batch(0, 16)[0], x)
    assert os.stat(tr.cache_path).st_mtime_ns == mtime
    assert ByteText.bits_per_byte(np.log(2.0)) == pytest.approx(1.0)


def test_bytetext_single_file_split_by_bytes(tmp_path):
    f = tmp_path / "one.txt"
    f.write_bytes(b"abcdefghij" * 100)
    tr = ByteText([f], seq_len=16, val_fraction=0.1, cache_dir=tmp_path / "c")
    va = ByteText(f, seq_len=16, split="val", val_fraction=0.1, cache_dir=tmp_path / "c")
    assert (tr.num_bytes, va.num_bytes) == (901, 101)
    assert bytes(np.asarray(va._data[:-1])) == (b"abcdefghij" * 100)[900:]


def test_bytetext_errors(corpus, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="no files matched paths="):
        ByteText(tmp_path / "nothing", cache_dir=cache)
    with pytest.raises(ValueError, match="no files matched paths="):
        ByteText(str(tmp_path / "nothing" / "*.txt"), cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="missing"):
        ByteText(tmp_path / "missing", cache_dir=cache)
    with pytest.raises(ValueError, match=r"seq_len=400 is longer than the longest document \(300 bytes\) in split 'train'"):
        ByteText(corpus, seq_len=400, cache_dir=cache)
    with pytest.raises(ValueError, match="split='test'"):
        ByteText(corpus, split="test", cache_dir=cache)
    for vf in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="val_fraction"):
            ByteText(corpus, val_fraction=vf, cache_dir=cache)
    one = tmp_path / "tiny.txt"
    one.write_bytes(b"x")  # one file is split by bytes: train gets int(0.95 * 1) = 0 bytes
    with pytest.raises(ValueError, match="split 'train' is empty"):
        ByteText(one, seq_len=1, cache_dir=cache)

    real_read = bt_mod._read_bytes

    def flaky(path):
        if path.name == "f03.txt":
            raise PermissionError(13, "Permission denied")
        return real_read(path)

    monkeypatch.setattr(bt_mod, "_read_bytes", flaky)
    with pytest.raises(OSError, match="cannot read file .*f03.txt"):
        ByteText(corpus, seq_len=8, split="train", val_fraction=0.01, cache_dir=tmp_path / "c2")


def test_bytetext_cache_env(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("HYPERCONN_CACHE", str(tmp_path / "envcache"))
    ds = ByteText(corpus, seq_len=8)
    assert ds.cache_path.parent == tmp_path / "envcache" / "bytetext" and ds.cache_path.exists()


def test_bytetext_stdlib_default(tmp_path):
    cache = tmp_path / "cache"
    t0 = time.perf_counter()
    tr = ByteText(seq_len=128, cache_dir=cache)
    va = ByteText(seq_len=128, split="val", cache_dir=cache)
    built = time.perf_counter() - t0
    assert built < 15, f"building the stdlib cache took {built:.1f}s"
    assert isinstance(tr._data, np.memmap) and tr.num_bytes > 5_000_000
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in tr.files)
    assert not set(tr.files) & set(va.files)
    assert 0.01 < va.num_files / (tr.num_files + va.num_files) < 0.15
    x, y = tr.train_batch(7, 8)
    assert torch.equal(x[:, 1:], y[:, :-1])
    xv, _ = next(va.eval_batches(8, 1))
    assert xv.shape == (8, 128)
