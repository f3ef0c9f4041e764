"""Small-scale test of In-Place TTT's long-context claims: train six models from scratch, evaluate.

Variants (all from ``configs/research/compare.yaml``, same data, seed, steps and batch, so the same
token budget; parameter counts matched to the In-Place TTT model's by choosing the ``d_ff`` of every
other variant: wider MLPs for the models without TTT, narrower ones for the TTT-Linear/MLP models):

* ``swa``                     sliding-window attention (the window of the base config), no TTT;
* ``swa_ttt_aligned``         SWA + In-Place TTT, next-token-aligned target (embeddings source);
* ``swa_ttt_reconstruction``  the same with the reconstruction target (``model.ttt.target``), the
                              ablation: the target conv loses its look-ahead, nothing else changes;
* ``full``                    full causal attention, no TTT;
* ``swa_ttt_linear``          SWA + a TTT-Linear layer (``model.ttt_seq``, Sun et al. 2024) beside
                              the sliding-window attention (``mode=beside``) on the layers that
                              carry In-Place TTT in the other TTT variants (``model.ttt.layers``),
                              no In-Place TTT; mini-batch 16, published base lr, no output gate;
* ``swa_ttt_mlp``             the same with TTT-MLP (4x hidden, GELU) as the inner model.

Short names work too: ``aligned``, ``reconstruction``, ``ttt_linear``, ``ttt_mlp``.

Training data: the train split of the embedded corpus (Python standard library) mixed with
RULER-style recall documents (``--recall-fraction`` of the tokens; generated from the train split
with a seed other than the evaluation's), written once as JSONL into the output directory.

Evaluation (held-out: the corpus's validation split, evaluation seed 0):

* validation loss: mean NLL over positions ``[0, seq_len)`` of validation spans;
* loss at positions beyond the window (``[2 window, seq_len)``) and beyond the training length
  (``[seq_len, 2 seq_len)``, extrapolation), from the per-position curve;
* sliding-window perplexity: loss on the final ``window`` tokens as the context grows;
* RULER-style exact match per task and length, and on the haystack tasks whose needles all lie more
  than ``window`` tokens before the answer ("beyond the window").

Writes ``results.json``, ``results.md`` and plots into ``--out``. A variant whose final checkpoint
exists in ``--out/runs/<name>`` is loaded instead of retrained, and one whose evaluation (with the
same settings) is in ``--out/runs/<name>/eval.json`` is not re-evaluated (delete them to redo), so
the variants can be run in separate calls (``--variants``) and reported together by a last call.
``--merge results.json`` adds the variants of an earlier report (same settings, checked before
training) that this call does not run, so new rows can be trained alone and reported beside the
old ones. ``--work-dir`` puts the training mix and the checkpoints elsewhere than the report.

Usage::

    python benchmarks/research_compare.py --smoke --out /tmp/research_smoke     # CPU, < 5 minutes
    python benchmarks/research_compare.py --out runs/research                   # one GPU
    cp runs/research/results.* runs/research/*.png benchmarks/results/research/ # keep the report
    # the TTT-Linear/MLP rows alone, reported with the committed rows of the other four:
    python benchmarks/research_compare.py --out runs/research_ttt_seq --work-dir runs/research \\
        --models ttt_linear ttt_mlp --merge benchmarks/results/research/results.json

(the work directory, ``--out`` by default, holds the training mix, ~40 MB, and the checkpoints.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("swa", "swa_ttt_aligned", "swa_ttt_reconstruction", "full", "swa_ttt_linear",
            "swa_ttt_mlp")
ALIASES = {"aligned": "swa_ttt_aligned", "reconstruction": "swa_ttt_reconstruction",
           "ttt_linear": "swa_ttt_linear", "ttt_mlp": "swa_ttt_mlp"}
INPLACE_TTT = ("swa_ttt_aligned", "swa_ttt_reconstruction")
TTT_SEQ = {"swa_ttt_linear": "linear", "swa_ttt_mlp": "mlp"}


def resolve_variants(names) -> list[str]:
    """Variant names from ``--variants``/``--models`` (commas or spaces, short aliases), without
    repeats, in the order given."""
    out: list[str] = []
    for part in names:
        for n in part.split(","):
            n = ALIASES.get(n.strip(), n.strip())
            if not n:
                continue
            if n not in VARIANTS:
                raise SystemExit(f"unknown variant {n!r}; variants: {', '.join(VARIANTS)} "
                                 f"(or {', '.join(ALIASES)})")
            if n not in out:
                out.append(n)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/research_compare", help="output directory")
    p.add_argument("--smoke", action="store_true", help="tiny CPU setting (numbers mean nothing)")
    p.add_argument("--config", default=None,
                   help="base config (default research/compare, or research/compare_smoke)")
    p.add_argument("--variants", "--models", nargs="+", default=[",".join(VARIANTS)],
                   metavar="NAME", help="subset to run (commas or spaces; default all): "
                   + ", ".join(VARIANTS) + "; short: " + ", ".join(ALIASES))
    p.add_argument("--merge", default=None, metavar="RESULTS_JSON",
                   help="results.json of an earlier run with the same settings: its variants not "
                   "run now are added to the report")
    p.add_argument("--work-dir", default=None,
                   help="where the training mix and checkpoints go (default: --out)")
    p.add_argument("--steps", type=int, default=None, help="override train.steps")
    p.add_argument("--recall-fraction", type=float, default=0.25,
                   help="share of training tokens from RULER-style recall documents (0 = none)")
    p.add_argument("--ppl-samples", type=int, default=None, help="validation spans (16; smoke 3)")
    p.add_argument("--ruler-samples", type=int, default=None,
                   help="RULER samples per task and length (20; smoke 1)")
    p.add_argument("--ruler-lengths", default=None,
                   help="comma-separated (default seq_len/2, seq_len, 2 seq_len; smoke 1024)")
    p.add_argument("--batch-size", type=int, default=None, help="evaluation batch (8; smoke 1)")
    p.add_argument("--seed", type=int, default=0, help="training seed (data order and init)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides applied to every variant")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Variants with matched parameter counts
# --------------------------------------------------------------------------------------------------


def param_count(model_cfg) -> int:
    from flax import nnx

    from ttt_jax.models.lm import CausalLM, count_params

    return count_params(nnx.eval_shape(lambda: CausalLM(model_cfg, rngs=nnx.Rngs(0))))


def variant_config(base, name: str, target_params: int):
    """The config of variant ``name``; every variant but In-Place TTT's gets the ``d_ff`` whose
    parameter count is closest to ``target_params`` (the In-Place TTT model's): wider MLPs without
    TTT, narrower ones with the (larger) TTT-Linear/MLP layers. The TTT-Linear/MLP layers sit
    beside the sliding-window attention on the In-Place TTT layers of the base config."""
    from ttt_jax.config import replace

    window = base.model.attention_window
    inplace = name in INPLACE_TTT
    model: dict[str, Any] = {
        "attention_window": 0 if name == "full" else window,
        "ttt": {"enabled": inplace,
                "target": "reconstruction" if name.endswith("reconstruction") else "aligned"}}
    if name in TTT_SEQ:
        layers = list(replace(base, model={"ttt": {"enabled": True}}).model.ttt.layer_ids(
            base.model.n_layers))
        model["ttt_seq"] = {"enabled": True, "kind": TTT_SEQ[name], "layers": layers,
                            "mode": "beside"}
    cfg = replace(base, model=model)
    if not inplace:
        m = cfg.model
        per_unit = 3 * m.d_model * m.n_layers           # gate, up, down per unit of d_ff
        d_ff = m.d_ff + round((target_params - param_count(m)) / per_unit)
        if d_ff < 1:
            raise SystemExit(f"{name}: no d_ff matches {target_params:,} parameters")
        cfg = replace(cfg, model={"d_ff": d_ff})
    return cfg


# --------------------------------------------------------------------------------------------------
# Training data: corpus + recall documents
# --------------------------------------------------------------------------------------------------


def build_mix(path: Path, cfg, recall_fraction: float, seed: int, max_docs: int | None) -> dict:
    """Write the training JSONL (corpus train split + recall documents, shuffled); returns stats."""
    from ttt_jax.data import load_tokenizer, open_corpus
    from ttt_jax.eval.ruler import TASKS, Haystack, generate_sample

    corpus = open_corpus("stdlib", split="train", max_documents=max_docs)
    docs = [t for t in corpus if t]
    corpus_bytes = sum(len(t.encode()) for t in docs)
    tok = load_tokenizer(cfg.data.tokenizer)
    seq = cfg.data.seq_len
    lengths = [seq // 2, (3 * seq) // 4, seq - 2]
    n_recall = 0
    if recall_fraction > 0:
        per_doc = sum(lengths) / len(lengths)
        n_recall = max(len(TASKS), round(recall_fraction / (1 - recall_fraction) * corpus_bytes
                                         / per_doc))
    hay = Haystack(tok, source="stdlib", split="train")
    rng = np.random.default_rng(seed)
    recall = []
    for i in range(n_recall):
        task, length = TASKS[i % len(TASKS)], lengths[int(rng.integers(len(lengths)))]
        try:
            s = generate_sample(task, length, tok, hay, seed=10_000 + seed, index=i)
        except ValueError:       # a length too short for a task at the smoke size
            continue
        recall.append(tok.decode(s.prompt) + s.answer_text)
    all_docs = docs + recall
    order = rng.permutation(len(all_docs))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for i in order:
            f.write(json.dumps({"text": all_docs[i]}) + "\n")
    os.replace(tmp, path)
    recall_bytes = sum(len(t.encode()) for t in recall)
    return {"corpus_documents": len(docs), "corpus_bytes": corpus_bytes,
            "recall_documents": len(recall), "recall_bytes": recall_bytes,
            "recall_fraction": recall_bytes / max(1, recall_bytes + corpus_bytes)}


# --------------------------------------------------------------------------------------------------
# Train / load, evaluate
# --------------------------------------------------------------------------------------------------


def train_or_load(cfg, log) -> tuple[Any, dict]:
    from ttt_jax.checkpoint import load_model
    from ttt_jax.train.trainer import train

    ck = Path(cfg.train.run_dir) / "checkpoints" / str(cfg.train.steps)
    if (ck / "state").exists():
        log(f"  loading the trained model from {ck}")
        _, model = load_model(ck)
        metrics = Path(cfg.train.run_dir) / "train_info.json"
        return model, json.loads(metrics.read_text()) if metrics.exists() else {}
    t0 = time.perf_counter()
    result = train(cfg, log=lambda m: log("  " + m))
    seconds = time.perf_counter() - t0
    info = {"train_seconds": seconds, "steps": result.step, "final_train_loss": result.train_loss,
            "val_losses_mixed_data": result.val_losses,
            "tokens": cfg.train.steps * cfg.data.batch_size * cfg.data.seq_len,
            "tokens_per_second_incl_compile": cfg.train.steps * cfg.data.batch_size
            * cfg.data.seq_len / seconds}
    (Path(cfg.train.run_dir) / "train_info.json").write_text(json.dumps(info, indent=1))
    return result.model, info


def evaluate(model, cfg, ref_window, spans, context_lengths, ruler_lengths, ruler_samples,
             batch_size, haystack, log) -> dict:
    """Every metric of one model; ``ref_window`` is the SWA window of the base config, used as the
    reference for "beyond the window" for every variant (full attention included)."""
    from ttt_jax.data import load_tokenizer
    from ttt_jax.eval import Scorer, run_ruler, sliding_window_perplexity

    model = _to_single_device(model)
    seq = cfg.data.seq_len
    l_max = spans.shape[1] - 1
    scorer = Scorer(model, logits_chunk=1024)
    t0 = time.perf_counter()
    ppl = sliding_window_perplexity(model, spans, scorer=scorer, block_size=ref_window,
                                    context_lengths=context_lengths, batch_size=batch_size)
    pos = ppl.position_loss
    out = {"ppl": ppl.to_dict(),
           "val_loss": float(pos[:seq].mean()),
           "loss_beyond_window": float(pos[2 * ref_window:seq].mean()),
           "loss_first_window": float(pos[:ref_window].mean()),
           "loss_extrapolation": float(pos[seq:].mean()) if l_max > seq else None,
           "ppl_seconds": time.perf_counter() - t0}
    log(f"  val loss {out['val_loss']:.4f}, beyond the window {out['loss_beyond_window']:.4f}, "
        f"final-block loss by context "
        f"{ {n: round(x, 4) for n, x in zip(ppl.context_lengths, ppl.loss)} }")
    t0 = time.perf_counter()
    tok = load_tokenizer(cfg.data.tokenizer)
    ruler = run_ruler(model, tok, lengths=ruler_lengths, num_samples=ruler_samples, seed=0,
                      haystack=haystack, batch_size=batch_size, scorer=scorer)
    far = [r["exact"] for r in ruler.samples
           if r.get("needle_distances") and min(r["needle_distances"]) > ref_window]
    out["ruler"] = ruler.to_dict()
    out["ruler_beyond_window"] = {"accuracy": float(np.mean(far)) if far else None, "n": len(far)}
    out["ruler_seconds"] = time.perf_counter() - t0
    log(f"  RULER mean by length {ruler.mean}; haystack tasks with every needle beyond the window: "
        f"{out['ruler_beyond_window']}")
    return out


def _to_single_device(model):
    """Evaluation runs unsharded on the default device (the trainer may have sharded the model)."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    dev = jax.devices()[0]
    state = jax.tree.map(lambda x: jax.device_put(x, dev), state)
    return nnx.merge(graphdef, state)


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _fmt(x, nd=3) -> str:
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def write_report(out: Path, results: dict, meta: dict) -> str:
    from ttt_jax.eval.plots import plot_context_loss, plot_position_loss, plot_ruler_heatmap

    names = list(results)
    w = meta["window"]
    ctx = results[names[0]]["eval"]["ppl"]["context_lengths"]
    rl = results[names[0]]["eval"]["ruler"]["lengths"]
    lines = [f"Device: {meta['device']}; {meta['date']}; command: `{meta['command']}`", ""]
    if meta.get("merged_from"):
        mf = meta["merged_from"]
        lines += [f"Rows {', '.join(mf['variants'])} merged from an earlier run "
                  f"({mf['date']}, `{mf['command']}`); devices: "
                  + "; ".join(f"{n}: {d}" for n, d in meta["variant_devices"].items()), ""]
    lines += [
             f"Training: {meta['steps']} steps x {meta['batch_size']} x {meta['seq_len']} tokens "
             f"({meta['tokens'] / 1e6:.1f}M tokens) per model, seed {meta['seed']}; data: "
             f"{meta['mix']['corpus_documents']} corpus documents + {meta['mix']['recall_documents']}"
             f" recall documents ({100 * meta['mix']['recall_fraction']:.0f}% of bytes). "
             f"Window {w}. Evaluation: {meta['ppl_spans']} validation spans of "
             f"{ctx[-1]} tokens; RULER {meta['ruler_samples']} samples per task and length, seed 0.",
             "",
             "| model | params | train s | val loss | loss [0, w) | loss [2w, T) | loss [T, 2T) | "
             + " | ".join(f"RULER {n}" for n in rl) + " | RULER beyond w (n) |",
             "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(rl) + "---:|"]
    for n in names:
        e, r = results[n]["eval"], results[n]
        bw = e["ruler_beyond_window"]
        lines.append(
            f"| {n} | {r['params']:,} | {_fmt(r['train'].get('train_seconds'), 0)} | "
            f"{e['val_loss']:.4f} | {e['loss_first_window']:.4f} | {e['loss_beyond_window']:.4f} | "
            f"{_fmt(e['loss_extrapolation'], 4)} | "
            + " | ".join(f"{e['ruler']['mean'][str(L)]:.3f}" for L in rl)
            + f" | {_fmt(bw['accuracy'])} ({bw['n']}) |")
    lines += ["", "Loss on the final block vs context length (nats/byte):", "",
              "| model | " + " | ".join(str(c) for c in ctx) + " |",
              "|---|" + "---:|" * len(ctx)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{x:.4f}" for x in results[n]["eval"]["ppl"]["loss"])
                     + " |")
    lines += ["", "RULER exact match per task (columns: lengths):", ""]
    for n in names:
        acc = results[n]["eval"]["ruler"]["accuracy"]
        lines += [f"*{n}*", "", "| task | " + " | ".join(str(L) for L in rl) + " |",
                  "|---|" + "---:|" * len(rl)]
        lines += [f"| {t} | " + " | ".join(f"{acc[t][str(L)]:.2f}" for L in rl) + " |"
                  for t in acc]
        lines.append("")
    md = "\n".join(lines)
    (out / "results.md").write_text(md + "\n")
    curves = {n: results[n]["eval"]["ppl"] for n in names}
    plot_context_loss(curves, out / "context_loss.png", window=w,
                      title="Loss on the final block vs context length")
    plot_position_loss(curves, out / "position_loss.png", window=w,
                       title="Loss by position (validation spans)")
    for n in names:
        plot_ruler_heatmap(results[n]["eval"]["ruler"]["accuracy"], rl, out / f"ruler_{n}.png",
                           title=f"RULER-style exact match: {n}")
    _plot_ruler_mean({n: results[n]["eval"]["ruler"]["mean"] for n in names}, rl,
                     out / "ruler_mean.png")
    return md


def _plot_ruler_mean(means: dict, lengths, path: Path) -> None:
    from ttt_jax.eval.plots import agg_pyplot

    plt = agg_pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for n, m in means.items():
        ax.plot(lengths, [m[str(L)] for L in lengths], marker="o", label=n)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("length (tokens)")
    ax.set_ylabel("mean exact match over tasks")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("RULER-style accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_merge(merged: dict, base, spans, ruler_lengths, ruler_samples: int, seed: int,
                mix: dict) -> None:
    """Refuse (``SystemExit``) an earlier report made with other training or evaluation settings
    (called before training, so a mismatch costs nothing)."""
    meta = merged["meta"]
    mine = {"window": base.model.attention_window, "seq_len": base.data.seq_len,
            "steps": base.train.steps, "batch_size": base.data.batch_size, "seed": seed,
            "ppl_spans": int(spans.shape[0]), "ruler_samples": ruler_samples,
            "ruler_lengths": list(ruler_lengths)}
    diff = {k: (meta.get(k), v) for k, v in mine.items() if meta.get(k) != v}
    for k in ("corpus_documents", "recall_documents"):
        if meta["mix"].get(k) != mix.get(k):
            diff["mix." + k] = (meta["mix"].get(k), mix.get(k))
    if diff:
        raise SystemExit(f"--merge: the earlier report used other settings (earlier, now): {diff}")


def merge_results(results: dict, devices: dict, merged: dict, base, spans, ruler_lengths,
                  ruler_samples: int, seed: int, mix: dict, log) -> tuple[dict, dict]:
    """``results`` plus the variants of an earlier ``results.json`` not run now, in ``VARIANTS``
    order; refuses a report made with other training or evaluation settings."""
    check_merge(merged, base, spans, ruler_lengths, ruler_samples, seed, mix)
    meta = merged["meta"]
    old_device = meta["device"]
    for n, r in merged["results"].items():
        if n not in results:
            results[n] = r
            devices[n] = meta.get("variant_devices", {}).get(n, old_device)
            log(f"== {n}: merged from the earlier report ({devices[n]}, {meta['date']})")
    order = sorted(results, key=lambda n: VARIANTS.index(n) if n in VARIANTS else len(VARIANTS))
    return {n: results[n] for n in order}, {n: devices[n] for n in order}


# --------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    from ttt_jax.config import load_config, replace
    from ttt_jax.data import load_tokenizer
    from ttt_jax.eval import Haystack, default_context_lengths, evaluation_spans

    t_start = time.perf_counter()
    variants = resolve_variants(args.variants)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir).absolute() if args.work_dir else out
    work.mkdir(parents=True, exist_ok=True)
    merged = json.loads(Path(args.merge).read_text()) if args.merge else None
    log = lambda m: print(m, flush=True)  # noqa: E731
    base = load_config(args.config or ("research/compare_smoke" if args.smoke else "research/compare"),
                       args.overrides)
    if args.steps:
        base = replace(base, train={"steps": args.steps, "warmup_steps": min(
            base.train.warmup_steps, args.steps), "eval_every": args.steps,
            "checkpoint_every": args.steps})
    if base.model.attention_window <= 0:
        raise SystemExit("the base config needs model.attention_window > 0 (the SWA window)")
    window, seq = base.model.attention_window, base.data.seq_len
    mix_path = work / "train_mix.jsonl"
    mix_info_path = work / "train_mix.json"
    if not mix_path.exists():
        log(f"writing the training mix to {mix_path}")
        t0 = time.perf_counter()
        info = build_mix(mix_path, base, args.recall_fraction, args.seed,
                         max_docs=150 if args.smoke else None)
        info["seconds"] = time.perf_counter() - t0
        mix_info_path.write_text(json.dumps(info, indent=1))
    mix = json.loads(mix_info_path.read_text())
    log(f"training mix: {mix}")
    base = replace(base, data={"source": "jsonl", "paths": [str(mix_path)], "seed": args.seed},
                   train={"seed": args.seed})

    target_params = param_count(replace(base, model={"ttt": {"enabled": True}}).model)
    tok = load_tokenizer(base.data.tokenizer)
    ppl_samples = args.ppl_samples or (3 if args.smoke else 16)
    spans = evaluation_spans(tok, 2 * seq, ppl_samples, source="stdlib", split="validation")
    ruler_lengths = ([int(x) for x in args.ruler_lengths.split(",")] if args.ruler_lengths else
                     [1024] if args.smoke else [seq // 2, seq, 2 * seq])
    ruler_samples = args.ruler_samples or (1 if args.smoke else 20)
    # Final block = the window; contexts double from it (smoke: two, to compile less).
    context_lengths = ([seq, 2 * seq] if args.smoke else
                       default_context_lengths(2 * seq, window))
    batch = args.batch_size or (1 if args.smoke else 8)
    haystack = Haystack(tok, source="stdlib", split="validation")

    if merged is not None:
        check_merge(merged, base, spans, ruler_lengths, ruler_samples, args.seed, mix)
    results: dict[str, Any] = {}
    for name in variants:
        cfg = variant_config(base, name, target_params)
        cfg = replace(cfg, train={"run_dir": str(work / "runs" / name)})
        n_params = param_count(cfg.model)
        m = cfg.model
        ttt = (f"In-Place TTT on {list(m.ttt.layer_ids(m.n_layers))} {m.ttt.target}"
               if m.ttt.enabled else
               f"TTT-{m.ttt_seq.kind} {m.ttt_seq.mode} attention on "
               f"{list(m.ttt_seq.layer_ids(m.n_layers))}" if m.ttt_seq.enabled else "no TTT")
        log(f"== {name}: {n_params:,} parameters ({100 * (n_params / target_params - 1):+.3f}% "
            f"vs In-Place TTT; window {m.attention_window or 'full'}, {ttt}, d_ff {m.d_ff})")
        eval_path = work / "runs" / name / "eval.json"
        eval_key = {"context_lengths": context_lengths, "ruler_lengths": ruler_lengths,
                    "ruler_samples": ruler_samples, "ppl_spans": int(spans.shape[0]),
                    "steps": cfg.train.steps}
        cached = json.loads(eval_path.read_text()) if eval_path.exists() else None
        if cached is not None and cached.get("key") == eval_key:
            log("  reusing the evaluation in " + str(eval_path))
            train_info, ev = cached["train"], cached["eval"]
        else:
            model, train_info = train_or_load(cfg, log)
            log(f"  trained: {train_info}")
            ev = evaluate(model, cfg, window, spans, context_lengths, ruler_lengths,
                          ruler_samples, batch, haystack, log)
            eval_path.write_text(json.dumps({"key": eval_key, "train": train_info, "eval": ev},
                                            indent=1, default=float))
        results[name] = {"params": n_params, "config": cfg.to_dict(), "train": train_info,
                         "eval": ev}
        (out / "results.json").write_text(json.dumps({"results": results}, indent=1, default=float))

    dev = jax.devices()[0]
    devices = {n: f"{dev.device_kind} ({dev.platform})" for n in results}
    if merged is not None:
        results, devices = merge_results(results, devices, merged, base, spans, ruler_lengths,
                                         ruler_samples, args.seed, mix, log)
    meta = {"device": f"{dev.device_kind} ({dev.platform})", "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "python benchmarks/research_compare.py " + " ".join(
                sys.argv[1:] if argv is None else argv),
            "window": window, "seq_len": seq, "steps": base.train.steps,
            "batch_size": base.data.batch_size, "tokens": base.train.steps * base.data.batch_size * seq,
            "seed": args.seed, "mix": mix, "ppl_spans": int(spans.shape[0]),
            "ruler_samples": ruler_samples, "ruler_lengths": ruler_lengths,
            "variant_devices": devices,
            "merged_from": {"path": args.merge, "command": merged["meta"]["command"],
                            "date": merged["meta"]["date"],
                            "variants": [n for n in results if n not in variants]}
            if merged is not None else None,
            "total_seconds": time.perf_counter() - t_start}
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1,
                                                 default=float))
    md = write_report(out, results, meta)
    log("\n" + md)
    log(f"total {meta['total_seconds']:.0f} s; outputs in {out}/ (results.json, results.md, *.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
