"""Sliding-window perplexity, the chunked scoring it uses, evaluation spans and `ttt-jax eval`."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.config import load_config
from ttt_jax.data import ByteTokenizer
from ttt_jax.eval import (default_context_lengths, evaluation_spans,
                          sliding_window_perplexity, token_scores, token_scores_reference)
from ttt_jax.models import CausalLM

from test_model import V, _activate_ttt, _forward, tiny

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model():
    m = CausalLM(tiny(attention_window=16, ttt=dict(chunk_size=16, lr=1.0)), rngs=nnx.Rngs(0))
    _activate_ttt(m, scale=0.1)
    return m


@pytest.mark.parametrize("b,t,chunk", [(1, 37, 8), (3, 5, 64)])
def test_token_scores_match_full_logits(b, t, chunk):
    k1, k2, k3 = jax.random.split(jax.random.key(b * t), 3)
    hidden = jax.random.normal(k1, (b, t, 24))
    head = jax.random.normal(k2, (24, 50))
    targets = jax.random.randint(k3, (b, t), 0, 50)
    nll, pred = jax.jit(token_scores, static_argnames="chunk_size")(hidden, head, targets,
                                                                   chunk_size=chunk)
    ref_nll, ref_pred = token_scores_reference(hidden, head, targets)
    np.testing.assert_allclose(nll, ref_nll, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(pred, ref_pred)


def test_sliding_window_perplexity_matches_direct_forward(model):
    rng = np.random.default_rng(0)
    spans = rng.integers(3, V, size=(3, 65)).astype(np.int32)
    lengths, block = [32, 64], 16
    res = sliding_window_perplexity(model, spans, context_lengths=lengths, block_size=block,
                                    batch_size=2, logits_chunk=24)
    for i, n in enumerate(lengths):
        window = jnp.asarray(spans[:, 64 - n:])
        logp = jax.nn.log_softmax(_forward(model, window[:, :-1]), axis=-1)
        nll = -jnp.take_along_axis(logp, window[:, 1:, None], axis=-1)[..., 0]
        np.testing.assert_allclose(res.loss[i], float(nll[:, -block:].mean()), rtol=1e-5)
        np.testing.assert_allclose(res.loss_per_span[i], nll[:, -block:].mean(axis=1), rtol=1e-5)
        if n == 64:
            np.testing.assert_allclose(res.position_loss, nll.mean(axis=0), rtol=1e-5, atol=1e-6)
    assert res.perplexity == pytest.approx([float(np.exp(x)) for x in res.loss])
    d = res.to_dict(bins=8)
    json.dumps(d)
    assert d["position_loss"]["end"][-1] == 64 and d["position_loss"]["start"][0] == 0
    with pytest.raises(ValueError, match="context lengths"):
        sliding_window_perplexity(model, spans, context_lengths=[8, 64], block_size=16)
    assert "| 64 |" in res.markdown()


def test_default_context_lengths():
    assert default_context_lengths(32768, 256)[:3] == [256, 512, 1024]
    assert default_context_lengths(32768, 256)[-1] == 32768
    assert default_context_lengths(1000, 256) == [256, 512, 1000]


def test_evaluation_spans(tmp_path):
    tok = ByteTokenizer()
    (tmp_path / "a.txt").write_text("x" * 100)
    (tmp_path / "b.txt").write_text("y" * 10)
    (tmp_path / "c.txt").write_text("z" * 60)
    spans = evaluation_spans(tok, 50, 5, source="text", paths=[str(tmp_path)], split="all")
    assert spans.shape == (2, 51) and spans[0, 0] == tok.bos_id       # a and c, not b
    assert tok.decode(spans[1]) == "z" * 50
    cat = evaluation_spans(tok, 50, 5, source="text", paths=[str(tmp_path)], split="all",
                           concat=True)
    assert cat.shape == (3, 51)                                       # 176 tokens in all
    with pytest.raises(ValueError, match="concat"):
        evaluation_spans(tok, 500, 1, source="text", paths=[str(tmp_path)], split="all")


def test_cli_eval(tmp_path, model, capsys, monkeypatch):
    from ttt_jax.cli import main
    from ttt_jax.checkpoint import save_model

    cfg = load_config("tiny", ["data.seq_len=64"])
    cfg = type(cfg)(model=model.cfg, data=cfg.data, train=cfg.train, mesh=cfg.mesh)
    save_model(tmp_path / "run", model, cfg)
    (tmp_path / "corpus").mkdir()
    for name in ("a.py", "b.py"):
        (tmp_path / "corpus" / name).write_text(f"def {name[0]}(x):\n    return x + 1\n" * 100)
    out = tmp_path / "eval_ppl"
    argv = ["eval", str(tmp_path / "run"), "--data", str(tmp_path / "corpus"),
            "--split", "all", "--num-samples", "2", "--no-progress"]
    ppl_argv = argv + ["--out", str(out), "--suite", "ppl", "--lengths", "32,64", "--block-size", "16"]
    assert main(ppl_argv) == 0
    ppl = json.loads((out / "ppl.json").read_text())
    assert ppl["context_lengths"] == [32, 64] and len(ppl["loss"]) == 2
    assert (out / "ppl_context.png").stat().st_size > 0 and (out / "ppl_position.png").is_file()
    # Earlier results are not overwritten: the same --out is refused, unless --overwrite.
    capsys.readouterr()
    assert main(ppl_argv) == 2
    assert "already holds files" in capsys.readouterr().err
    # By default a new directory under ./eval, named after run, step and suite; nothing is written
    # beside the checkpoint. Lengths beyond max_seq_len (256) are noted, as for ppl.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").chmod(0o555)
    try:
        assert main(argv + ["--suite", "ruler", "--lengths", "512", "--tasks",
                            "niah_single,frequent_words"]) == 0
    finally:
        (tmp_path / "run").chmod(0o755)
    assert "exceed the model's max_seq_len 256" in capsys.readouterr().out
    (default_out,) = (tmp_path / "eval").iterdir()
    assert default_out.name.startswith("run-") and default_out.name.endswith("-ruler")
    ruler = json.loads((default_out / "ruler.json").read_text())
    assert set(ruler["accuracy"]) == {"niah_single", "frequent_words"}
    assert len(ruler["samples"]) == 4 and (default_out / "ruler.png").is_file()
    assert "| niah_single |" in (default_out / "ruler.md").read_text()
    assert not (tmp_path / "run" / "eval").exists()
    capsys.readouterr()
    assert main(argv + ["--suite", "ruler", "--tasks", "niah_everything"]) == 2
    assert "unknown RULER task" in capsys.readouterr().err


def test_eval_output_dirs_are_new(tmp_path, monkeypatch):
    import argparse

    from ttt_jax.eval.cli import output_dir

    monkeypatch.chdir(tmp_path)
    ck = tmp_path / "runs" / "mine" / "checkpoints"
    args = argparse.Namespace(out=None, overwrite=False, suite="ppl")
    first = output_dir(args, ck, 40)
    assert (first.parent.name, first.name) == ("eval", "mine-40-ppl")
    first.mkdir(parents=True)
    assert first.parent.samefile(tmp_path / "eval")
    assert output_dir(args, ck, 40).name == "mine-40-ppl-2"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        output_dir(argparse.Namespace(out=str(tmp_path / "afile"), overwrite=False, suite="ppl"), ck, 40)
    with pytest.raises(ValueError, match="cannot create"):
        output_dir(argparse.Namespace(out=str(tmp_path / "afile" / "x"), overwrite=False, suite="ppl"), ck, 40)


def _research_compare():
    """benchmarks/research_compare.py as a module (benchmarks/ is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "research_compare.py"
    spec = importlib.util.spec_from_file_location("research_compare", path)
    rc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rc)
    return rc


def test_research_compare_variants_match_parameters():
    """benchmarks/research_compare.py: the six variants differ only where intended."""
    rc = _research_compare()
    base = load_config("research/compare")
    target = rc.param_count(base.model)
    cfgs = {n: rc.variant_config(base, n, target) for n in rc.VARIANTS}
    m = base.model
    for name, cfg in cfgs.items():
        assert abs(rc.param_count(cfg.model) - target) <= 3 * m.d_model * m.n_layers / 2, name
        assert cfg.data == base.data and cfg.train == base.train
    assert cfgs["full"].model.attention_window == 0
    assert {cfgs[n].model.attention_window for n in rc.VARIANTS if n != "full"} == {m.attention_window}
    a, r = cfgs["swa_ttt_aligned"].model, cfgs["swa_ttt_reconstruction"].model
    assert a.ttt.target == "aligned" and r.ttt.target == "reconstruction"
    assert a == type(a)(**{**a.__dict__, "ttt": type(a.ttt)(**{**r.ttt.__dict__, "target": "aligned"})})
    assert not cfgs["swa"].model.ttt.enabled and not cfgs["full"].model.ttt.enabled
    for name, kind in (("swa_ttt_linear", "linear"), ("swa_ttt_mlp", "mlp")):
        s = cfgs[name].model
        assert not s.ttt.enabled and s.ttt_seq.kind == kind and s.ttt_seq.mode == "beside"
        assert s.ttt_seq.layer_ids(m.n_layers) == m.ttt.layer_ids(m.n_layers) == (1, 3, 5)
        assert s.d_ff < m.d_ff                    # narrower MLPs pay for the TTT-Linear/MLP layers
        assert abs(rc.param_count(s) / target - 1) < 3e-4
    assert all(not cfgs[n].model.ttt_seq.enabled for n in rc.VARIANTS if n not in rc.TTT_SEQ)
    assert rc.resolve_variants(["ttt_linear", "ttt_mlp,swa", "swa"]) == [
        "swa_ttt_linear", "swa_ttt_mlp", "swa"]
    with pytest.raises(SystemExit, match="unknown variant"):
        rc.resolve_variants(["ttt_rnn"])


def test_research_compare_merge_keeps_order_and_refuses_other_settings():
    """``--merge``: earlier rows join the new ones in the canonical order; other settings refuse."""
    rc = _research_compare()
    base = load_config("research/compare_smoke")
    spans = np.zeros((3, 1025), np.int32)
    mix = {"corpus_documents": 5, "recall_documents": 2}
    meta = {"window": 32, "seq_len": 512, "steps": 20, "batch_size": 2, "seed": 0, "ppl_spans": 3,
            "ruler_samples": 1, "ruler_lengths": [1024], "mix": mix, "device": "old (gpu)",
            "date": "d", "command": "c"}
    merged = {"meta": meta, "results": {"swa": {"x": 1}, "swa_ttt_mlp": {"x": 2}}}
    res, dev = rc.merge_results({"swa_ttt_mlp": {"x": 3}, "swa_ttt_linear": {"x": 4}},
                                {"swa_ttt_mlp": "new", "swa_ttt_linear": "new"}, merged, base,
                                spans, [1024], 1, 0, mix, lambda m: None)
    assert list(res) == ["swa", "swa_ttt_linear", "swa_ttt_mlp"]
    assert res["swa_ttt_mlp"] == {"x": 3} and dev == {"swa": "old (gpu)", "swa_ttt_linear": "new",
                                                      "swa_ttt_mlp": "new"}
    with pytest.raises(SystemExit, match="other settings"):
        rc.merge_results({}, {}, merged, base, spans, [512, 1024], 1, 0, mix, lambda m: None)
