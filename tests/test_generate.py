"""Generation: sampling filters, greedy == argmax of the forward pass, stop tokens, the CLI."""

import io
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax.infer import GenerationConfig, filter_logits, generate
from ttt_jax.infer import sample_logits as _sample_logits

from test_infer import CASES, PROMPTS, setup

pytestmark = pytest.mark.integration


def test_filter_logits_top_k_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    filt = jax.jit(filter_logits)
    kept = lambda k, p: np.flatnonzero(np.asarray(filt(logits, k, p))[0] > -1e29).tolist()
    assert kept(0, 1.0) == [0, 1, 2, 3, 4]
    assert kept(2, 1.0) == [0, 1]
    assert kept(0, 0.5) == [0]                # the most likely token alone reaches 0.5
    assert kept(0, 0.6) == [0, 1]
    assert kept(0, 0.86) == [0, 1, 2, 3]
    assert kept(3, 0.99) == [0, 1, 2]
    assert kept(0, 1e-6) == [0]               # the most likely token always stays


def test_sampling_greedy_seeded_and_filtered():
    logits = jax.random.normal(jax.random.key(0), (4, 50))
    sample_logits = jax.jit(_sample_logits)
    greedy = sample_logits(logits, jax.random.key(1), 0.0, 0, 1.0)
    np.testing.assert_array_equal(greedy, jnp.argmax(logits, -1))
    a = sample_logits(logits, jax.random.key(1), 1.0, 3, 1.0)
    b = sample_logits(logits, jax.random.key(1), 1.0, 3, 1.0)
    np.testing.assert_array_equal(a, b)
    top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
    for s in range(20):
        draw = np.asarray(sample_logits(logits, jax.random.key(s), 5.0, 3, 1.0))
        assert all(draw[i] in top3[i] for i in range(4))


@pytest.mark.slow
def test_greedy_generation_is_the_argmax_of_the_forward_pass():
    model, engine, tokens, _ = setup("full_attention_embeddings")
    prompts = [tokens[i, :n].tolist() for i, n in enumerate(PROMPTS)]
    res = generate(engine, prompts, GenerationConfig(max_new_tokens=6), return_logits=True)
    assert res.stop_reasons == ["length"] * 3
    # Teacher-forced logits of prompt + generated tokens (prefill == forward pass: test_infer).
    seqs = [p + t for p, t in zip(prompts, res.tokens)]
    full, _ = engine.prefill(engine.init_cache(3, max(map(len, seqs))), seqs, logits="all")
    full = np.asarray(full)
    for i, (p, t) in enumerate(zip(prompts, res.tokens)):
        ref = full[i, len(p) - 1:len(p) - 1 + 6]
        np.testing.assert_allclose(res.logits[i], ref, rtol=1e-4, atol=1e-4)
        assert t == np.argmax(ref, -1).tolist()
    # A stop token ends a sequence (and is not part of its output); the others go on.
    stop = res.tokens[0][2]
    res2 = generate(engine, prompts, GenerationConfig(max_new_tokens=6, stop_tokens=(stop,)),
                    return_logits=True)
    for i in range(3):
        want = res.tokens[i][:res.tokens[i].index(stop)] if stop in res.tokens[i] else res.tokens[i]
        assert res2.tokens[i] == want
        assert res2.stop_reasons[i] == ("stop" if stop in res.tokens[i] else "length")
    assert len(res2.logits[0]) == res.tokens[0].index(stop) + 1     # the stop token's logits too
    # Seeded sampling is reproducible.
    cfg = GenerationConfig(max_new_tokens=4, temperature=1.0, top_p=0.9, seed=3)
    assert generate(engine, prompts, cfg).tokens == generate(engine, prompts, cfg).tokens


def test_generation_config_errors():
    engine = setup("full_attention_embeddings")[1]
    with pytest.raises(ValueError, match="top_p"):
        generate(engine, [[1, 2]], GenerationConfig(top_p=0.0))
    with pytest.raises(ValueError, match="at least one token"):
        generate(engine, [[]], GenerationConfig())


# --------------------------------------------------------------------------------------------------
# ttt-jax generate
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The test_infer model, saved as a model-only checkpoint (loading it back gives the same graph,
    so the compiled prefill/decode functions are shared)."""
    import dataclasses

    from ttt_jax.config import Config, DataConfig
    from ttt_jax.checkpoint import save_model

    model = setup("full_attention_embeddings")[0]
    cfg = Config(model=CASES["full_attention_embeddings"], data=DataConfig(seq_len=64))
    path = tmp_path_factory.mktemp("gen") / "model"
    save_model(path, model, cfg)
    return path, cfg, model


def _hf_tokenizer_json(tmp_path):
    """A byte-level BPE tokenizer.json of 259 tokens (256 bytes + 3 specials: the model's vocabulary)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=259, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"], trainer)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def _cli(argv):
    from ttt_jax.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.slow
def test_cli_generate_streams_the_greedy_continuation(checkpoint, tmp_path):
    from ttt_jax.data.tokenizer import ByteTokenizer

    path, cfg, model = checkpoint
    tok = ByteTokenizer()
    code, out, err = _cli(["generate", str(path), "--prompt", "def f(x):", "--max-new-tokens", "7",
                           "--stop-token", "258", "--prefill-block", "12", "--decode-block", "2"])
    assert code == 0, err
    want = generate(model, [[tok.bos_id] + tok.encode("def f(x):")],
                    GenerationConfig(max_new_tokens=7, stop_tokens=(258,)), prefill_block=12)
    assert out == tok.decode(want.tokens[0]) + "\n"
    assert "generated" in err and "tokens/s" in err, err
    # --prompt-file and sampling flags; an HF tokenizer.json (ids < the model's vocabulary).
    tj = _hf_tokenizer_json(tmp_path)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the quick brown")
    code, out, err = _cli(["generate", str(path), "--prompt-file", str(prompt), "--tokenizer", str(tj),
                           "--max-new-tokens", "5", "--temperature", "0.8", "--top-k", "20",
                           "--top-p", "0.9", "--seed", "1", "--prefill-block", "12"])
    assert code == 0, err
    assert "prompt tokens" in err


@pytest.mark.slow
def test_cli_generate_prompt_ids(checkpoint, tmp_path):
    """Token ids in, token ids out: the same greedy continuation, even where the configured
    tokenizer does not fit the model (a converted model without tokenizer.json)."""
    path, cfg, model = checkpoint
    prompt = [1, 100, 101, 102, 40]
    want = generate(model, [prompt], GenerationConfig(max_new_tokens=6, stop_tokens=(258,)), prefill_block=12)
    code, out, err = _cli(["generate", str(path), "--prompt-ids", ",".join(map(str, prompt)),
                           "--max-new-tokens", "6", "--stop-token", "258", "--prefill-block", "12"])
    assert code == 0, err
    assert out == ",".join(map(str, want.tokens[0])) + "\n"
    big = _hf_tokenizer_json(tmp_path)  # 259 tokens: fits; a bigger vocabulary must not be needed
    import json as _json

    data = _json.loads(big.read_text())
    data["added_tokens"].append({"id": 400, "content": "<extra>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    big.write_text(_json.dumps(data))
    code, out, err = _cli(["generate", str(path), "--prompt-ids", "1,2", "--tokenizer", str(big),
                           "--max-new-tokens", "2", "--decode-block", "0"])
    assert code == 0, err
    assert len(out.strip().split(",")) >= 1
    code, _, err = _cli(["generate", str(path), "--prompt", "x", "--tokenizer", str(big)])
    assert code == 2 and "--prompt-ids" in err
    code, _, err = _cli(["generate", str(path), "--prompt-ids", "1,999"])
    assert code == 2 and "token id 999 is outside" in err


def test_cli_generate_errors(checkpoint, tmp_path):
    path, _, _ = checkpoint
    code, _, err = _cli(["generate", str(path), "--prompt", "x", "--top-p", "2"])
    assert code == 2 and "top_p" in err
    code, _, err = _cli(["generate", str(tmp_path / "missing"), "--prompt", "x"])
    assert code == 2 and "does not exist" in err
    code, _, err = _cli(["generate", str(path), "--prompt", "x", "--qttt-layers", "a,b"])
    assert code == 2 and "qttt-layers" in err


@pytest.mark.slow
def test_generation_with_sharded_parameters_matches_unsharded(checkpoint):
    """load_model(path, mesh=...) places every parameter in its FSDP sharding; prefill and
    decode then run partitioned over the 8 emulated devices with the unsharded model's logits."""
    from ttt_jax.parallel.mesh import make_mesh
    from ttt_jax.checkpoint import load_model

    path, _, model = checkpoint
    mesh = make_mesh(data=2, fsdp=4)          # (vocabulary 259: no tensor split of the embedding)
    _, sharded = load_model(path, mesh=mesh)
    shardings = {x.sharding for x in jax.tree.leaves(nnx_state(sharded))}
    assert any(len(s.device_set) == 8 and not s.is_fully_replicated for s in shardings)
    prompts = [[1, 5, 9, 33], [1, 70, 71, 72, 73, 74, 75, 76, 77, 78]]
    gen = GenerationConfig(max_new_tokens=5)
    want = generate(model, prompts, gen, return_logits=True, prefill_block=12)
    with jax.set_mesh(mesh):
        got = generate(sharded, prompts, gen, return_logits=True, prefill_block=12)
    assert got.tokens == want.tokens
    for a, b in zip(got.logits, want.logits):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def nnx_state(model):
    from flax import nnx

    return nnx.state(model, nnx.Param)
