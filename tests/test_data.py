"""Tests of ttt_jax.data: tokenizers, sources, packing invariants, grain pipeline state and sharding."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ttt_jax.config import ConfigError, DataConfig
from ttt_jax.data import (ByteTokenizer, DataWarning, HFTokenizer, check_data, describe, document_tokens,
                          iter_packed_rows, load_tokenizer, make_batches, open_corpus, pack_documents, read_documents,
                          validation_batches)

pytestmark = pytest.mark.unit

BYTE = ByteTokenizer()


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def check_packing(docs, rows, seq_len, chunk=None, pad_id=0, finite=True):
    """Assert every packing invariant; ``docs`` are the packed token sequences, in order."""
    docs = [np.asarray(d, np.int64) for d in docs if len(d)]
    inputs, targets, mask = rows["inputs"], rows["targets"], rows["loss_mask"]
    seg, pos = rows["segment_ids"], rows["positions"]
    assert inputs.dtype == targets.dtype == seg.dtype == pos.dtype == np.int32
    assert mask.dtype == np.float32
    for a in rows.values():
        assert a.ndim == 2 and a.shape[1] == seq_len and a.shape[0] == inputs.shape[0]
    j = off = 0  # next expected token: docs[j][off]
    for r in range(inputs.shape[0]):
        pad = seg[r] == 0
        assert np.all(inputs[r][pad] == pad_id) and np.all(targets[r][pad] == pad_id)
        assert np.all(mask[r][pad] == 0) and np.all(pos[r][pad] == 0)
        ids = [s for s in np.unique(seg[r]) if s]
        assert ids == list(range(1, len(ids) + 1)), "segment ids are 1..k"
        prev_end = 0
        for s in ids:
            idx = np.flatnonzero(seg[r] == s)
            start, m = idx[0], idx.size
            assert np.array_equal(idx, np.arange(start, start + m)), "a piece is one contiguous run"
            assert start >= prev_end, "segments are ordered left to right"
            if chunk:
                assert start % chunk == 0, "piece starts on a chunk boundary"
            if not chunk:
                assert start == prev_end, "greedy: no gap without alignment"
            if s > 1:
                assert off == 0, "only the first piece of a row continues a document"
            doc = docs[j]
            np.testing.assert_array_equal(inputs[r, idx], doc[off:off + m])
            np.testing.assert_array_equal(pos[r, idx], np.arange(m))
            tgt = doc[off + 1:off + m + 1]
            np.testing.assert_array_equal(targets[r, idx[:tgt.size]], tgt)
            np.testing.assert_array_equal(mask[r, idx[:tgt.size]], 1.0)
            assert np.all(targets[r, idx[tgt.size:]] == pad_id) and np.all(mask[r, idx[tgt.size:]] == 0)
            off += m
            if off == doc.size:
                j, off = j + 1, 0
            else:
                assert start + m == seq_len, "a document is only cut at the row end"
            prev_end = start + m
        if r < inputs.shape[0] - 1 and not chunk:
            assert not pad.any(), "only the last row has padding"
    assert j == len(docs) and off == 0, "every token of every document appears exactly once"


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def text_corpus(tmp_path, n=24, seed=0):
    """n documents 'doc<id>:' + filler of varied length, one file each."""
    rng = np.random.default_rng(seed)
    d = tmp_path / "corpus"
    d.mkdir()
    for i in range(n):
        (d / f"f{i:03d}.txt").write_text(f"<doc{i:04d}>" + "abcdefgh" * int(rng.integers(0, 40)))
    return d


def stream_doc_ids(batches):
    """Document ids in stream order, from rows concatenated in order (rows must not be shuffled)."""
    toks = np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in batches])
    return [int(m) for m in re.findall(r"<doc(\d{4})>", BYTE.decode(toks))]


def cfg_for(path, **kw):
    base = dict(source="text", paths=(str(path),), seq_len=32, batch_size=4, validation_fraction=0.2)
    base.update(kw)
    return DataConfig(**base)


def batches_equal(a, b):
    return len(a) == len(b) and all(
        set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (259, 0, 1, 2)
    for text in ["", "hello", "héllo wörld ✓ 🦀\n\t", "\x00\x7f"]:
        ids = tok.encode(text)
        assert all(3 <= i < 259 for i in ids) and len(ids) == len(text.encode())
        assert tok.decode(ids) == text
        np.testing.assert_array_equal(tok.encode_array(text), ids)
    assert tok.encode("A") == [ord("A") + 3]
    assert tok.decode([1] + tok.encode("ab") + [2, 0]) == "ab"  # specials are dropped
    assert tok.decode([0xFF + 3, ord("a") + 3]) == "\ufffda"  # invalid UTF-8 -> replacement
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([259])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])


def test_document_tokens():
    np.testing.assert_array_equal(document_tokens(BYTE, "hi"), [1, ord("h") + 3, ord("i") + 3, 2])
    assert document_tokens(BYTE, "").tolist() == [1, 2]


def _train_hf(tmp_path, specials, name="tokenizer.json"):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox", "jumps over the lazy dog", "def f(x): return x"] * 5,
                            trainer)
    path = tmp_path / name
    tok.save(str(path))
    return path


def test_hf_tokenizer(tmp_path):
    path = _train_hf(tmp_path, ["<pad>", "<s>", "</s>"])
    tok = load_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    for text in ["the quick brown fox", "unseen wörds ✓ 🦀", ""]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        np.testing.assert_array_equal(tok.encode_array(text), ids)
    assert tok.decode([1] + tok.encode("the dog") + [2]) == "the dog"
    assert load_tokenizer(str(tmp_path)).vocab_size == tok.vocab_size  # a directory works too
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])


def test_hf_tokenizer_single_separator(tmp_path):
    tok = HFTokenizer(_train_hf(tmp_path, ["<|endoftext|>"]))
    assert tok.bos_id == tok.eos_id == tok.pad_id == 0  # GPT-2 style: one token, pad falls back to eos


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_tokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="without a tokenizer.json"):
        load_tokenizer(str(tmp_path))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="could not load tokenizer"):
        load_tokenizer(str(bad))


# --------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------


def test_text_directory_and_glob(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / ".git").mkdir()
    (d / "b.txt").write_text("bee")
    (d / "a.md").write_text("ay")
    (d / "sub" / "c.py").write_text("see")
    (d / ".hidden.txt").write_text("hidden")
    (d / ".git" / "HEAD").write_text("ref")
    (d / "blob.bin").write_bytes(b"\x00\x01binary")
    assert list(read_documents("text", [str(d)], split="all")) == ["ay", "bee", "see"]
    assert list(read_documents("text", [str(d / "*.txt")], split="all")) == ["bee"]
    assert list(read_documents("text", [str(d / "**" / "*.py")], split="all")) == ["see"]
    assert list(read_documents("text", [str(d / "b.txt"), str(d)], split="all")) == ["bee", "ay", "see"]
    assert list(read_documents("text", [str(d)], split="all", max_documents=2)) == ["ay", "bee"]
    with pytest.raises(ValueError, match="nope.txt"):
        open_corpus("text", [str(d / "nope.txt")])
    with pytest.raises(ValueError, match=r"\*\.rst.*matches no files"):
        open_corpus("text", [str(d / "*.rst")])
    with pytest.raises(ValueError, match="data.paths is empty"):
        open_corpus("text", [])


def test_text_invalid_utf8(tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"ok \xff\xfe nope")
    with pytest.raises(ValueError, match=r"bad\.txt.*invalid UTF-8"):
        list(read_documents("text", [str(f)], split="all"))
    with pytest.warns(UserWarning, match="skipped 1 malformed"):
        assert list(read_documents("text", [str(f)], split="all", on_error="skip")) == []


def test_jsonl(tmp_path):
    f = write_jsonl(tmp_path / "data.jsonl", [{"text": "one", "id": 1}, {"text": "two"}, "", {"body": "x", "text": "three"}])
    assert list(read_documents("jsonl", [str(f)], split="all")) == ["one", "two", "three"]
    g = write_jsonl(tmp_path / "other.jsonl", [{"body": "b1"}, {"body": "b2"}])
    assert list(read_documents("jsonl", [str(g)], split="all", field="body")) == ["b1", "b2"]


@pytest.mark.parametrize("line,match", [
    ('{"text": "a"', r"bad\.jsonl:line 3: invalid JSON"),
    ('{"txt": "a"}', r"bad\.jsonl:line 3: missing field 'text'"),
    ('{"text": 5}', r"bad\.jsonl:line 3: field 'text' is int"),
    ('[1, 2]', r"bad\.jsonl:line 3: expected a JSON object"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, match):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, {"text": "b"}, line, {"text": "d"}])
    with pytest.raises(ValueError, match=match):
        list(read_documents("jsonl", [str(f)], split="all"))
    with pytest.warns(UserWarning, match="skipped 1 malformed"):
        assert list(read_documents("jsonl", [str(f)], split="all", on_error="skip")) == ["a", "b", "d"]


def test_jsonl_invalid_utf8_line(tmp_path):
    f = tmp_path / "u.jsonl"
    f.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"u\.jsonl:line 2: invalid UTF-8"):
        list(read_documents("jsonl", [str(f)], split="all"))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["x", "yy", None, "zzz"], "n": [1, 2, 3, 4]}), f)
    with pytest.raises(ValueError, match=r"d\.parquet:row 2: column 'content' is null"):
        list(read_documents("parquet", [str(f)], split="all", column="content"))
    with pytest.warns(UserWarning, match="skipped 1"):
        docs = list(read_documents("parquet", [str(f)], split="all", column="content", on_error="skip"))
    assert docs == ["x", "yy", "zzz"]
    with pytest.raises(ValueError, match=r"d\.parquet: no column 'text'"):
        open_corpus("parquet", [str(f)], split="all")
    with pytest.raises(ValueError, match="has type int64"):
        open_corpus("parquet", [str(f)], split="all", column="n")
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"this is not parquet")
    with pytest.raises(ValueError, match=r"junk\.parquet: unreadable Parquet"):
        open_corpus("parquet", [str(junk)], split="all", column="content")
    with pytest.warns(UserWarning) as rec:
        docs = list(read_documents("parquet", [str(tmp_path)], split="all", column="content",
                                   on_error="skip"))
    assert docs == ["x", "yy", "zzz"]
    messages = " | ".join(str(r.message) for r in rec)
    assert "unreadable Parquet file" in messages and "skipped 2 malformed" in messages


def test_split_disjoint_and_deterministic(tmp_path):
    f = write_jsonl(tmp_path / "s.jsonl", [{"text": f"d{i}"} for i in range(400)])
    kw = dict(validation_fraction=0.25)
    train = list(read_documents("jsonl", [str(f)], split="train", **kw))
    val = list(read_documents("jsonl", [str(f)], split="validation", **kw))
    assert not set(train) & set(val) and len(train) + len(val) == 400
    assert 60 < len(val) < 140
    assert val == list(read_documents("jsonl", [str(f)], split="validation", **kw))


def test_stdlib_split():
    tr = open_corpus("stdlib", split="train")
    va = open_corpus("stdlib", split="validation")
    tr_files = {tr.keys[i] for i in tr.doc_file}
    va_files = {va.keys[i] for i in va.doc_file}
    assert not tr_files & va_files
    assert tr_files | va_files == set(tr.keys) and len(tr.keys) > 500
    assert all(k.endswith(".py") and "site-packages" not in k for k in tr.keys)
    assert tr.keys == sorted(tr.keys)
    assert 0.02 < len(va) / (len(tr) + len(va)) < 0.09
    assert np.array_equal(va.doc_file, open_corpus("stdlib", split="validation").doc_file)
    small = open_corpus("stdlib", split="train", max_documents=5)
    assert len(small) == 5 and np.array_equal(small.doc_file, tr.doc_file[:5])
    assert isinstance(small.text(0), str)


# --------------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------------


def test_pack_small_example():
    docs = [[1, 10, 11, 2], [1, 20, 2], [1, 30, 31, 32, 33, 34, 2]]
    rows = pack_documents(docs, 6)
    assert rows["inputs"].tolist() == [[1, 10, 11, 2, 1, 20], [2, 1, 30, 31, 32, 33], [34, 2, 0, 0, 0, 0]]
    assert rows["targets"].tolist() == [[10, 11, 2, 0, 20, 2], [0, 30, 31, 32, 33, 34], [2, 0, 0, 0, 0, 0]]
    assert rows["segment_ids"].tolist() == [[1, 1, 1, 1, 2, 2], [1, 2, 2, 2, 2, 2], [1, 1, 0, 0, 0, 0]]
    assert rows["positions"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 0, 1, 2, 3, 4], [0, 1, 0, 0, 0, 0]]
    assert rows["loss_mask"].tolist() == [[1, 1, 1, 0, 1, 1], [0, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]]
    check_packing(docs, rows, 6)


def test_pack_chunk_aligned():
    docs = [document_tokens(BYTE, t) for t in ["abc", "defghijklmn", "", "op", "q" * 20]]
    rows = pack_documents(docs, 8, chunk_align=4)
    check_packing(docs, rows, 8, chunk=4)
    assert rows["segment_ids"][0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    with pytest.raises(ValueError, match="multiple"):
        pack_documents(docs, 10, chunk_align=4)
    assert pack_documents([], 8)["inputs"].shape == (0, 8)


def test_iter_packed_rows_is_lazy():
    def infinite():
        i = 0
        while True:
            i += 1
            yield [1] + [3 + i % 200] * (i % 17) + [2]

    rows = [row for _, row in zip(range(50), iter_packed_rows(infinite(), 16))]
    assert len(rows) == 50 and rows[0]["inputs"].shape == (16,)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.integers(0, 70), min_size=0, max_size=25),
       seq_len=st.integers(2, 24), align=st.sampled_from([None, 1, 2, 4]), seed=st.integers(0, 2**16))
def test_pack_property(lengths, seq_len, align, seed):
    if align and seq_len % align:
        seq_len = max(align, seq_len - seq_len % align)
        if seq_len < 2:
            seq_len = 2 * align
    rng = np.random.default_rng(seed)
    docs = [rng.integers(3, 1000, size=n) for n in lengths]
    rows = pack_documents(docs, seq_len, chunk_align=align)
    check_packing(docs, rows, seq_len, chunk=align)
    total = sum(lengths)
    assert int((rows["segment_ids"] > 0).sum()) == total
    assert int(rows["loss_mask"].sum()) == total - sum(1 for n in lengths if n > 0)


# --------------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------------


P1 = dict(process_index=0, process_count=1)


def test_batches_format_and_packing(tmp_path):
    d = text_corpus(tmp_path)
    cfg = cfg_for(d, shuffle=False)
    it = make_batches(cfg, "validation", **P1)
    batches = list(it)
    for b in batches:
        assert set(b) == {"inputs", "targets", "loss_mask", "segment_ids", "positions"}
        assert all(v.shape == (4, 32) for v in b.values())
    docs = [document_tokens(BYTE, t) for t in read_documents("text", [str(d)], split="validation",
                                                              validation_fraction=0.2)]
    rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    keep = rows["segment_ids"].any(axis=1) | (np.arange(len(rows["inputs"])) == 0)
    check_packing(docs, {k: v[keep] for k, v in rows.items()}, 32)
    assert it.describe()["documents"] == len(docs)


def test_chunk_aligned_batches():
    cfg = DataConfig(seq_len=64, batch_size=2, chunk_align=True, max_documents=6)
    with pytest.raises(ValueError, match="chunk_size"):
        make_batches(cfg, "train", **P1)
    with pytest.raises(ValueError, match="multiple"):
        make_batches(cfg, "train", chunk_size=24, **P1)
    it = make_batches(cfg, "train", chunk_size=16, **P1)
    for _ in range(5):
        b = next(it)
        seg = b["segment_ids"]
        starts = (seg > 0) & (np.diff(seg, axis=1, prepend=0) != 0)
        assert np.all(np.flatnonzero(starts.reshape(-1)) % 16 == 0)


@pytest.mark.parametrize("shuffle,block_rows,workers", [(True, 4, 0), (False, 3, 0), (True, 50, 0), (True, 4, 1)])
def test_state_restore_is_exact(tmp_path, shuffle, block_rows, workers):
    d = text_corpus(tmp_path, n=12)
    cfg = cfg_for(d, shuffle=shuffle, seed=7, worker_count=workers)
    kw = dict(block_rows=block_rows, **P1)
    ref = make_batches(cfg, "train", **kw)
    expected = [next(ref) for _ in range(40)]  # spans several epochs and blocks
    ref.close()
    for cut in (0, 1, 9, 23):
        it = make_batches(cfg, "train", **kw)
        for _ in range(cut):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        it.close()
        resumed = make_batches(cfg, "train", **kw)
        resumed.set_state(state)
        assert batches_equal([next(resumed) for _ in range(40 - cut)], expected[cut:])
        resumed.close()


def test_state_mismatch_is_rejected(tmp_path):
    d = text_corpus(tmp_path, n=12)
    it = make_batches(cfg_for(d), "train", block_rows=8, **P1)
    next(it)
    state = it.get_state()
    other = make_batches(cfg_for(d, seq_len=64), "train", block_rows=8, **P1)
    with pytest.raises(ValueError, match="seq_len: saved 32 vs now 64"):
        other.set_state(state)
    other.set_state(state, strict=False)
    next(other)
    with pytest.raises(ValueError, match="not a ttt-jax data iterator state"):
        other.set_state({"doc": 0})


def test_epochs_reshuffled_and_complete(tmp_path):
    d = text_corpus(tmp_path, n=16)
    cfg = cfg_for(d, validation_fraction=0.01, batch_size=1, seq_len=64, seed=3)
    n = len(open_corpus("text", [str(d)], split="train", validation_fraction=0.01))
    it = make_batches(cfg, "train", block_rows=1, **P1)  # one-row blocks: rows stay in stream order
    ids = stream_doc_ids([next(it) for _ in range(200)])
    assert len(ids) >= 2 * n + 1
    e0, e1 = ids[:n], ids[n:2 * n]
    assert sorted(e0) == sorted(e1) and len(set(e0)) == n
    assert e0 != e1 and e0 != sorted(e0)
    # one shuffled epoch, block row-shuffle on: every token exactly once
    docs = [document_tokens(BYTE, t) for t in read_documents("text", [str(d)], validation_fraction=0.01)]
    one = list(make_batches(cfg, "train", block_rows=8, repeat=False, **P1))
    got = np.concatenate([b["inputs"][b["segment_ids"] > 0] for b in one])
    np.testing.assert_array_equal(np.bincount(got, minlength=259), np.bincount(np.concatenate(docs), minlength=259))


def test_process_shards_disjoint(tmp_path):
    d = text_corpus(tmp_path, n=30)
    for shuffle in (False, True):
        cfg = cfg_for(d, shuffle=shuffle, validation_fraction=0.01)
        shards = []
        for p in range(3):
            it = make_batches(cfg, "train", repeat=False, block_rows=1, process_index=p, process_count=3)
            shards.append(stream_doc_ids(list(it)))
        n_train = len(open_corpus("text", [str(d)], split="train", validation_fraction=0.01))
        assert sum(len(s) for s in shards) == n_train
        train_ids = {int(t[4:8]) for t in read_documents("text", [str(d)], validation_fraction=0.01)}
        assert set().union(*map(set, shards)) == train_ids
        for a in range(3):
            for b in range(a + 1, 3):
                assert not set(shards[a]) & set(shards[b])
        if not shuffle:
            order = stream_doc_ids([{"inputs": document_tokens(BYTE, t)[None],
                                     "segment_ids": np.ones((1, len(t) + 2), np.int32)}
                                    for t in read_documents("text", [str(d)], validation_fraction=0.01)])
            assert shards == [order[p::3] for p in range(3)]
    with pytest.raises(ValueError, match="process_index"):
        make_batches(cfg, "train", process_index=3, process_count=3)


def test_validation_batches_and_describe(tmp_path):
    d = text_corpus(tmp_path, n=40)
    cfg = cfg_for(d)
    a = validation_batches(cfg, 25, **P1)  # more than one pass: cycles, always full
    assert len(a) == 25 and all(b["inputs"].shape == (4, 32) for b in a)
    assert all(b["segment_ids"].all() for b in a)
    assert batches_equal(a, validation_batches(cfg, 25, **P1))
    one_pass = list(make_batches(cfg, "validation", **P1))
    assert batches_equal(one_pass[:-1], a[:len(one_pass) - 1])
    stats = describe(cfg, "validation")
    assert stats["tokens"] == sum(int((b["segment_ids"] > 0).sum()) for b in one_pass)
    assert stats["documents"] == len(open_corpus("text", [str(d)], split="validation", validation_fraction=0.2))
    with pytest.raises(ValueError, match="split"):
        make_batches(cfg, "test", **P1)


def test_stdlib_default_pipeline():
    cfg = DataConfig(seq_len=128, batch_size=4)
    it = make_batches(cfg, "train", **P1)
    b = next(it)
    assert b["inputs"].shape == (4, 128) and b["inputs"].max() < 259
    assert b["loss_mask"].sum() > 0


def test_config_on_error_validated():
    with pytest.raises(ConfigError):
        dataclasses.replace(DataConfig(), on_error="ignore").validate()


def test_skip_policy_in_pipeline(tmp_path):
    f = write_jsonl(tmp_path / "m.jsonl", [{"text": f"doc {i} " * 5} if i % 5 else "{broken" for i in range(40)])
    cfg = DataConfig(source="jsonl", paths=(str(f),), seq_len=16, batch_size=2, validation_fraction=0.1)
    with pytest.raises(ValueError, match=r"m\.jsonl:line \d+: invalid JSON"):
        for _ in make_batches(cfg, "train", repeat=False, **P1):
            pass
    cfg = dataclasses.replace(cfg, on_error="skip")
    it = make_batches(cfg, "train", repeat=False, **P1)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        list(it)
    corpus = open_corpus("jsonl", [str(f)], split="train", validation_fraction=0.1, on_error="skip")
    n_broken = sum(1 for i in range(len(corpus)) if corpus.doc_record[i] % 5 == 0)
    assert n_broken > 0 and it.describe()["skipped"] == n_broken
    assert any("skipping malformed record" in str(x.message) for x in w)


def test_pipeline_with_hf_tokenizer(tmp_path):
    tok = HFTokenizer(_train_hf(tmp_path, ["<|endoftext|>", "<pad>"]))
    d = text_corpus(tmp_path, n=10)
    cfg = cfg_for(d, tokenizer=str(tmp_path / "tokenizer.json"), shuffle=False)
    batches = list(make_batches(cfg, "train", repeat=False, **P1))
    rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    assert rows["inputs"].max() < tok.vocab_size
    assert tok.pad_id == 1 and np.all(rows["inputs"][rows["segment_ids"] == 0] == tok.pad_id)
    docs = [document_tokens(tok, t) for t in read_documents("text", [str(d)], validation_fraction=0.2)]
    assert docs[0][0] == tok.bos_id == 0 and docs[0][-1] == tok.eos_id == 0
    keep = rows["segment_ids"].any(axis=1)
    check_packing(docs, {k: v[keep] for k, v in rows.items()}, 32, pad_id=tok.pad_id)


@pytest.mark.parametrize("materialise", [True, False])
def test_epoch_shuffle_paths(tmp_path, monkeypatch, materialise):
    """Both shuffles (materialised permutation / grain's index_shuffle) reshuffle per epoch and restore."""
    from ttt_jax.data.pipeline import EpochShuffleMapDataset

    if not materialise:
        monkeypatch.setattr(EpochShuffleMapDataset, "MATERIALISE_MAX", 0)
    d = text_corpus(tmp_path, n=40)
    cfg = cfg_for(d, validation_fraction=0.01, batch_size=1, seq_len=128, seed=5)
    n = len(open_corpus("text", [str(d)], split="train", validation_fraction=0.01))
    it = make_batches(cfg, "train", block_rows=1, **P1)
    batches = [next(it) for _ in range(120)]
    ids = stream_doc_ids(batches)
    assert sorted(ids[:n]) == sorted(ids[n:2 * n]) and len(set(ids[:n])) == n and ids[:n] != ids[n:2 * n]
    it2 = make_batches(cfg, "train", block_rows=1, **P1)
    for _ in range(50):
        next(it2)
    it3 = make_batches(cfg, "train", block_rows=1, **P1)
    it3.set_state(it2.get_state())
    assert batches_equal([next(it3) for _ in range(70)], batches[50:])


# --------------------------------------------------------------------------------------------------
# The up-front data check; long text files; validation carved from a small corpus
# --------------------------------------------------------------------------------------------------


def test_json_error_message_reads_once(tmp_path):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, '{"text": "unterminated'])
    with pytest.raises(ValueError) as info:
        list(read_documents("jsonl", [str(f)], split="all"))
    msg = str(info.value)
    assert "t.jsonl:line 2: invalid JSON (Unterminated string starting at column 10)" in msg, msg
    assert "at at" not in msg


def test_check_finds_bad_utf8_in_a_text_directory(tmp_path):
    d = text_corpus(tmp_path, n=12)
    (d / "f005.txt").write_bytes(b"line one\nline two \xff\xfe\nthree\n")
    cfg = cfg_for(d)
    with pytest.raises(ValueError, match=r"f005\.txt:line 2: invalid UTF-8 at byte 18 \(set data.on_error=skip"):
        check_data(cfg, progress=False)
    lines = []
    with pytest.warns(DataWarning, match=r"1 malformed record\(s\) will be skipped.*f005\.txt:line 2") \
            as caught:
        res = check_data(dataclasses.replace(cfg, on_error="skip"), progress=False, log=lines.append)
    assert res.malformed == 1 and res.files == 12 and res.documents == 12
    # The command line prints the project's warnings as one line (not file:line: UserWarning + source).
    import warnings

    from ttt_jax import cli

    cli._one_line_warnings()
    w = caught[0]
    assert warnings.formatwarning(w.message, w.category, w.filename, w.lineno) == f"warning: {w.message}\n"
    assert len(lines) == 1 and "12 file(s)" in lines[0] and "1 malformed" in lines[0]
    # A clean corpus passes, the byte count is the corpus's size.
    (d / "f005.txt").write_text("fine\n")
    res = check_data(cfg, progress=False)
    assert res.malformed == 0 and res.bytes == sum(p.stat().st_size for p in d.iterdir())


def test_check_jsonl_every_line_and_only_used_ones(tmp_path):
    recs = [{"text": f"d{i}"} for i in range(30)]
    recs[7] = '{"text": "a",}'
    recs[20] = {"body": "x"}
    f = write_jsonl(tmp_path / "c.jsonl", recs + [""])
    cfg = DataConfig(source="jsonl", paths=(str(f),), validation_fraction=0.2)
    with pytest.raises(ValueError, match=r"c\.jsonl:line 8: invalid JSON"):
        check_data(cfg, progress=False)
    with pytest.warns(UserWarning, match="2 malformed"):
        res = check_data(dataclasses.replace(cfg, on_error="skip"), progress=False)
    assert res.malformed == 2 and res.documents == 30
    # Lines no split uses (beyond max_documents in both splits) are not read.
    small = dataclasses.replace(cfg, max_documents=3)
    used = {int(r) for s in ("train", "validation")
            for r in open_corpus("jsonl", [str(f)], split=s, validation_fraction=0.2, max_documents=3).doc_record}
    assert 7 not in used and 20 not in used
    assert check_data(small, progress=False).documents == len(used)


def test_check_parquet_nulls_and_bad_bytes(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": pa.array([b"ok", b"\xffno"], pa.binary())}), tmp_path / "b.parquet")
    cfg = DataConfig(source="parquet", paths=(str(tmp_path),), validation_fraction=0.3)
    with pytest.raises(ValueError, match=r"a\.parquet:row 1: column 'text' is null"):
        check_data(cfg, progress=False)
    with pytest.warns(UserWarning, match="2 malformed"):
        res = check_data(dataclasses.replace(cfg, on_error="skip"), progress=False)
    assert res.malformed == 2 and res.files == 2 and res.documents == 5
    with pytest.raises(ValueError, match=r"b\.parquet:row 1: invalid UTF-8"):
        check_data(dataclasses.replace(cfg, paths=(str(tmp_path / "b.parquet"),)), progress=False)


def test_check_stdlib_is_skipped():
    res = check_data(DataConfig(), progress=False)
    assert res.files == 0 and res.malformed == 0


def test_long_text_file_is_cut_at_line_ends(tmp_path, monkeypatch):
    import ttt_jax.data.records as records

    monkeypatch.setattr(records, "TEXT_PIECE_BYTES", 5000)
    rng = np.random.default_rng(0)
    lines = ["".join(rng.choice(list("abcdé€ 𝄞"), size=int(rng.integers(0, 300)))) for _ in range(400)]
    body = "\n".join(lines) + "\n"
    f = tmp_path / "book.txt"
    f.write_text(body, encoding="utf-8")
    # One line far longer than the search window: cut at character boundaries.
    g = tmp_path / "one_line.txt"
    g.write_text("é𝄞x" * 6000, encoding="utf-8")
    for path, text in ((f, body), (g, g.read_text(encoding="utf-8"))):
        corpus = open_corpus("text", [str(path)], split="all")
        docs = [corpus.text(i) for i in range(len(corpus))]
        size = path.stat().st_size
        assert len(docs) == -(-size // 5000)
        assert "".join(docs) == text
        if path is f:
            assert all(d.endswith("\n") for d in docs)
            assert max(len(d.encode()) for d in docs) <= 5000 + 4096
        tr, va = (open_corpus("text", [str(path)], split=s, validation_fraction=0.3) for s in ("train", "validation"))
        assert len(tr) and len(va) and set(tr.doc_record.tolist()).isdisjoint(va.doc_record.tolist())


def test_one_text_file_gives_both_splits(tmp_path):
    f = tmp_path / "only.txt"
    f.write_text("".join(f"line {i} of the only document\n" for i in range(200)))
    tr = open_corpus("text", [str(f)], split="train", validation_fraction=0.1)
    va = open_corpus("text", [str(f)], split="validation", validation_fraction=0.1)
    assert len(tr) == len(va) == 1
    train_text, val_text = tr.text(0), va.text(0)
    assert train_text + val_text == f.read_text() and val_text.startswith("line ")
    assert 0.08 < len(val_text) / len(f.read_text()) < 0.12
    cfg = cfg_for(f, validation_fraction=0.1, seq_len=16, batch_size=2)
    assert next(make_batches(cfg, "train", **P1))["loss_mask"].sum() > 0
    assert validation_batches(cfg, 1, **P1)[0]["loss_mask"].sum() > 0
    # A tiny corpus of records: the last record becomes validation when the hash picks none.
    g = write_jsonl(tmp_path / "few.jsonl", [{"text": "a"}, {"text": "b"}])
    tr, va = (list(read_documents("jsonl", [str(g)], split=s, validation_fraction=0.01)) for s in ("train", "validation"))
    assert (tr, va) == (["a"], ["b"])
