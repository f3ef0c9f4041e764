"""Property-based tests (hypothesis): the op on random shapes and layouts, config parsing, the
tokenizers, packing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ttt_jax.config import ConfigError, load_config
from ttt_jax.data.packing import pack_documents
from ttt_jax.data.tokenizer import ByteTokenizer, HFTokenizer
from ttt_jax.ops import inplace_ttt
from ttt_jax.ops import inplace_ttt_reference as ref

pytestmark = pytest.mark.unit


@st.composite
def op_case(draw):
    b = draw(st.integers(1, 3))
    t = draw(st.integers(1, 40))
    c = draw(st.integers(1, 12))
    f = draw(st.integers(1, 6))
    d = draw(st.integers(1, 5))
    packed = draw(st.booleans())
    seg = None
    if packed:
        rows = []
        for _ in range(b):
            cuts = sorted(draw(st.lists(st.integers(1, max(1, t - 1)), max_size=4, unique=True)))
            row = np.zeros(t, np.int32)
            bounds = [0] + [x for x in cuts if x < t] + [t]
            for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
                row[lo:hi] = i + 1
            pad = draw(st.integers(0, t // 3))
            if pad:
                row[t - pad:] = 0
            rows.append(row)
        seg = jnp.asarray(np.stack(rows))
    seed = draw(st.integers(0, 2 ** 16))
    return b, t, c, f, d, seg, seed


# Every example compiles new shapes: the op under both implementations and the oracle, ~1.5 s on a
# quiet 2-core machine (several times that under the parallel suite). Each drawn layout is checked
# under both implementations against one oracle evaluation (24 op checks per run for 12 oracle
# compiles; 20 single-impl examples before); hypothesis draws new layouts every run, and the two
# explicit examples pin the corners: one token; documents cut on chunk boundaries followed by a
# whole chunk of padding (and, in a second row, cut mid-chunk before half a chunk of padding).
_CHUNK_ALIGNED = np.asarray([[1] * 8 + [2] * 8 + [0] * 8,
                             [1] * 5 + [2] * 11 + [3] * 4 + [0] * 4], np.int32)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(case=(1, 1, 1, 1, 1, None, 0))
@example(case=(2, 24, 8, 3, 2, _CHUNK_ALIGNED, 1))
@given(case=op_case())
@pytest.mark.slow
def test_op_matches_oracle_on_random_layouts(case):
    b, t, c, f, d, seg, seed = case
    k = jax.random.split(jax.random.key(seed), 3)
    z = jax.random.normal(k[0], (b, t, f))
    v = jax.random.normal(k[1], (b, t, d))
    w0 = jax.random.normal(k[2], (f, d))
    want = jax.jit(lambda z, v, w0, seg: ref.linear_attention(z, v, w0, lr=0.2, chunk_size=c,
                                                              segment_ids=seg))(z, v, w0, seg)
    valid = np.ones((b, t), bool) if seg is None else np.asarray(seg) != 0
    for impl in ("scan", "associative"):
        got = jax.jit(lambda z, v, w0, seg: inplace_ttt(z, v, w0, lr=0.2, chunk_size=c, segment_ids=seg,
                                                        impl=impl))(z, v, w0, seg)
        np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-4,
                                   rtol=1e-4, err_msg=impl)


_INT_KEYS = ["model.d_model", "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.d_ff",
             "model.ttt.chunk_size", "model.ttt.conv_kernel", "data.seq_len", "data.batch_size",
             "train.steps", "train.warmup_steps", "train.log_every"]


@settings(max_examples=60, deadline=None)
@example("model.d_model", 4)     # head_dim = 4 / 4 heads = 1: the error names d_model and n_heads
@example("model.n_heads", 256)   # head_dim = 1 again, from the other side
@given(st.sampled_from(_INT_KEYS),
       st.one_of(st.integers(-5, 5000), st.floats(allow_nan=True), st.text(max_size=6), st.booleans()))
def test_config_overrides_validate_or_name_the_key(key, value):
    """Any override either yields a validated config or a ConfigError naming the key -- never
    another exception and never a silently accepted invalid value."""
    try:
        cfg = load_config("tiny", [f"{key}={value}"])
    except ConfigError as e:
        assert key.split(".")[-1] in str(e), str(e)
        return
    section, *rest = key.split(".")
    obj = getattr(cfg, section)
    for part in rest:
        obj = getattr(obj, part)
    assert isinstance(obj, int) and obj >= 0


# --- Tokenizers ----------------------------------------------------------------------------------------

BYTE = ByteTokenizer()


@settings(max_examples=150, deadline=None)
@given(st.text())   # any code points, lone surrogates included
def test_byte_tokenizer_round_trip(text):
    """One id per UTF-8 byte, in [3, 259); decoding gives the text back. A lone surrogate (not
    valid Unicode text, but a Python str can hold one) is encoded with ``surrogatepass`` and
    decodes to U+FFFD replacement characters -- exactly what UTF-8 decoding of those bytes gives."""
    raw = text.encode("utf-8", errors="surrogatepass")
    ids = BYTE.encode(text)
    assert ids == [b + 3 for b in raw]
    np.testing.assert_array_equal(BYTE.encode_array(text), ids)
    assert BYTE.decode(ids) == raw.decode("utf-8", errors="replace")
    if not any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        assert BYTE.decode(ids) == text


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(-3, 262)))
def test_byte_tokenizer_decodes_any_ids_or_names_the_bad_one(ids):
    """Any ids in range decode (special ids dropped, invalid UTF-8 replaced) and re-encode to the
    same text; an id out of range is a ValueError naming it."""
    bad = [i for i in ids if not 0 <= i < 259]
    if bad:
        with pytest.raises(ValueError, match=f"token id {bad[0]} is out of range"):
            BYTE.decode(ids)
        return
    text = BYTE.decode(ids)
    assert text == bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")
    assert BYTE.decode(BYTE.encode(text)) == text


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    """A byte-level BPE ``tokenizer.json`` trained here with the ``tokenizers`` library."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog", "def f(x):\n    return x + 1",
                             "héllo wörld, ünïcode ✓ 🦀"] * 10, trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return HFTokenizer(path)


_SPECIALS = ("<pad>", "<s>", "</s>")
# Valid Unicode text: every code point but the surrogates (the `tokenizers` library takes only
# strings that encode to UTF-8).
_UNICODE = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_UNICODE)
def test_hf_tokenizer_round_trip(hf_tok, text):
    """Encoding adds no special tokens, every id is below ``vocab_size``, and decoding gives the
    text back (byte-level BPE covers every byte). Text spelling a special token is excluded: it
    encodes to that token, which decoding drops by design."""
    from hypothesis import assume

    assume(not any(s in text for s in _SPECIALS))
    ids = hf_tok.encode(text)
    assert all(0 <= i < hf_tok.vocab_size for i in ids)
    assert not set(ids) & {hf_tok.bos_id, hf_tok.eos_id, hf_tok.pad_id}
    np.testing.assert_array_equal(hf_tok.encode_array(text), ids)
    assert hf_tok.decode(ids) == text
    assert hf_tok.decode([hf_tok.bos_id, *ids, hf_tok.eos_id]) == text


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(0, 10_000), max_size=40))
def test_hf_tokenizer_decode_is_consistent_with_encode(hf_tok, raw):
    """For any in-range ids, ``decode`` gives text that encodes and decodes to itself."""
    from hypothesis import assume

    ids = [i % hf_tok.vocab_size for i in raw]
    text = hf_tok.decode(ids)
    assume(not any(s in text for s in _SPECIALS))
    again = hf_tok.encode(text)
    assert all(0 <= i < hf_tok.vocab_size for i in again)
    assert hf_tok.decode(again) == text
    with pytest.raises(ValueError, match="out of range"):
        hf_tok.decode(ids + [hf_tok.vocab_size])


# --- Packing --------------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=20), st.integers(2, 24), st.sampled_from([None, 1, 2, 4]))
def test_packing_never_mixes_documents_within_a_segment(lengths, seq_len, align):
    """Each (row, segment id) holds tokens of exactly one document, in order, and each document is
    the concatenation of its pieces in row order: a segment id never spans two documents and no
    token is lost or repeated."""
    if align and seq_len % align:
        seq_len = align * max(1, seq_len // align) if seq_len >= align else align * 2
    # Token 1000 * (k + 1) + j: document k, position j; the document is recoverable from any token.
    docs = [np.arange(n) + 1000 * (k + 1) for k, n in enumerate(lengths)]
    rows = pack_documents(docs, seq_len, chunk_align=align)
    pieces = []   # (document, tokens) per segment, in row order
    for r in range(rows["inputs"].shape[0]):
        seg = rows["segment_ids"][r]
        for s in sorted(set(seg[seg > 0].tolist())):
            toks = rows["inputs"][r][seg == s]
            owners = set((toks // 1000).tolist())
            assert len(owners) == 1, f"row {r} segment {s} mixes documents {owners}"
            pieces.append((owners.pop() - 1, toks))
    for k, doc in enumerate(docs):
        mine = [t for owner, t in pieces if owner == k]
        got = np.concatenate(mine) if mine else np.zeros(0, doc.dtype)
        np.testing.assert_array_equal(got, doc)
    # Pieces of a document are consecutive in the stream (documents are packed in order).
    owners = [o for o, _ in pieces]
    assert owners == sorted(owners)
