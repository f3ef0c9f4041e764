"""RULER-style tasks: deterministic generation, token lengths, answers, and the scoring equivalence
(one teacher-forced forward pass == greedy decoding by repeated full forwards)."""

import re

import numpy as np
import pytest
from flax import nnx

from ttt_jax.data import ByteTokenizer, HFTokenizer
from ttt_jax.eval.ruler import (TASKS, Haystack, Sample, generate_sample, generate_suite,
                                greedy_answer, score_samples)
from ttt_jax.eval.scoring import Scorer
from ttt_jax.models import CausalLM

from test_model import _activate_ttt, _forward, tiny

pytestmark = pytest.mark.model

BYTE = ByteTokenizer()


@pytest.fixture(scope="module")
def noise():
    return Haystack(BYTE, "noise")


def _text(s: Sample, tok=BYTE) -> str:
    return tok.decode(s.prompt)


@pytest.mark.parametrize("task", TASKS)
def test_samples_are_deterministic_and_fit_their_length(task, noise):
    a = generate_sample(task, 1024, BYTE, noise, seed=3, index=1)
    b = generate_sample(task, 1024, BYTE, noise, seed=3, index=1)
    c = generate_sample(task, 1024, BYTE, noise, seed=4, index=1)
    np.testing.assert_array_equal(a.prompt, b.prompt)
    assert a.answer_text == b.answer_text and a.answer_text != c.answer_text
    assert 1024 - 100 < a.num_tokens <= 1024 and a.prompt[0] == BYTE.bos_id
    assert BYTE.decode(a.answer) == a.answer_text


def test_answers_follow_from_the_prompt(noise):
    s = generate_sample("niah_multivalue", 2048, BYTE, noise, seed=1)
    text, values = _text(s), s.answer_text.strip().split(", ")
    key = s.meta["keys"][0]
    assert re.findall(rf"magic numbers for {key} is: (\d+)\.", text) == values
    s = generate_sample("niah_multiquery", 2048, BYTE, noise, seed=1)
    text = _text(s)
    found = [re.search(rf"for {k} is: (\d+)\.", text).group(1) for k in s.meta["keys"]]
    assert found == s.answer_text.strip().split(", ")
    s = generate_sample("niah_multikey", 2048, BYTE, noise, seed=1)
    assert re.search(rf"for {s.meta['keys'][0]} is: {s.answer_text.strip()}\.", _text(s))
    s = generate_sample("variable_tracking", 2048, BYTE, noise, seed=1)
    names, text = s.answer_text.split(), _text(s)
    assert f"VAR {names[0]} = {s.meta['value']}." in text
    assert all(f"VAR {b} = VAR {a}." in text for a, b in zip(names, names[1:]))
    s = generate_sample("common_words", 2048, BYTE, seed=1)
    words = re.findall(r"^\d+\. (\w+)$", _text(s), flags=re.M)
    counts = {w: words.count(w) for w in words}
    common = s.answer_text.strip().split(", ")
    assert len(common) == 10 and min(counts[w] for w in common) > max(
        c for w, c in counts.items() if w not in common)
    assert common == sorted(common, key=words.index)            # order of first appearance
    s = generate_sample("frequent_words", 2048, BYTE, seed=1)
    body = _text(s).split("\n")[1]
    counts = {}
    for w in body.split():
        counts[w] = counts.get(w, 0) + 1
    top = sorted(counts, key=lambda w: -counts[w])[:3]
    assert s.answer_text.split() == top


def test_corpus_haystack_and_needle_depth(tmp_path):
    lines = [f"line {i} of the local corpus.\n" for i in range(400)]
    (tmp_path / "doc.txt").write_text("".join(lines))
    hs = Haystack(BYTE, source="text", paths=[str(tmp_path)], split="all")
    s = generate_sample("niah_single", 4096, BYTE, hs, seed=0)
    text = _text(s)
    assert "of the local corpus." in text and "special magic number for" in text
    needle_at = text.index("One of the special magic numbers")
    depth = s.meta["depths"][0]
    assert abs(needle_at / len(text) - depth) < 0.1
    with pytest.raises(ValueError, match="too short"):
        generate_sample("niah_multivalue", 200, BYTE, hs)
    with pytest.raises(ValueError, match="unknown RULER task"):
        generate_suite(["niah_everything"], [1024], 1, BYTE, hs)


def test_hugging_face_tokenizer_lengths(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers, decoders

    tk = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = [NOISE_TEXT, "One of the special magic numbers for key is: 1234567.", "VAR ABCDE = 1."]
    tk.train_from_iterator(corpus * 50, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.save(str(tmp_path / "tokenizer.json"))
    tok = HFTokenizer(tmp_path / "tokenizer.json")
    hs = Haystack(tok, "noise")
    for task in TASKS:
        s = generate_sample(task, 1024, tok, hs, seed=0)
        assert 1024 - 120 < s.num_tokens <= 1024, (task, s.num_tokens)
        assert s.prompt[0] == tok.bos_id
        assert tok.decode(s.answer).strip() == s.answer_text.strip()


NOISE_TEXT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@pytest.fixture(scope="module")
def peaked_model():
    """In-Place TTT on, chunks of 8 (< every sequence here), sizeable weights: peaked logits."""
    m = CausalLM(tiny(initializer_range=0.3), rngs=nnx.Rngs(0))
    _activate_ttt(m)
    return m


def test_teacher_forced_exact_match_equals_greedy_decoding(peaked_model):
    m = peaked_model
    rng = np.random.default_rng(0)
    prompt = np.concatenate([[BYTE.bos_id], rng.integers(3, 259, 36)]).astype(np.int32)
    n = 4
    greedy = greedy_answer(m, prompt, n, forward=lambda x: _forward(m, x))
    golds = [greedy]
    for k in range(n):                       # the gold answer leaves greedy's output at k
        g = greedy.copy()
        g[k] = 3 + (g[k] - 3 + 1) % 256
        golds.append(g)
    samples = [Sample("niah_single", 64, i, prompt, g, "", {}) for i, g in enumerate(golds)]
    scores = score_samples(Scorer(m, logits_chunk=16), samples, pad_id=0, batch_size=len(golds))
    assert scores[0] == {"exact": True, "token_accuracy": 1.0, "prefix": n}
    for k, sc in enumerate(scores[1:]):
        assert not sc["exact"] and sc["prefix"] == k    # where greedy and the gold first differ



@pytest.mark.parametrize("task", TASKS)
def test_too_short_is_a_clear_error(task, noise):
    with pytest.raises(ValueError, match="too short"):
        generate_sample(task, 200, BYTE, noise)
