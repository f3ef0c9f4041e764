"""Speed and memory benchmarks (``ttt-jax bench``): op level (:mod:`ttt_jax.bench.op`) and model
level (:mod:`ttt_jax.bench.model`). Results and the commands that produced them are recorded in
``benchmarks/README.md``."""
