"""RULER-style synthetic long-context tasks, generated locally and deterministically from a seed.

Tasks (after Hsieh et al. 2024, "RULER"; the templates are restated, not copied):

==================  ================================================================================
``niah_single``     one needle "One of the special magic numbers for {key} is: {value}." at a random
                    depth of the haystack; answer the value.
``niah_multikey``   four needles with different keys at evenly spaced depths (the others are
                    distractors); one key is asked.
``niah_multivalue`` four needles with the same key and different values; answer all four values
                    in order of appearance, ``", "``-separated.
``niah_multiquery`` four needles with different keys; all four are asked, answer in query order.
``variable_tracking`` a chain ``VAR A = 12345.``, ``VAR B = VAR A.``, ... (5 names) spread over the
                    haystack; answer every name holding the value, in chain order.
``common_words``    a numbered list of words in which 10 words are repeated more often than every
                    other word; answer the 10, in order of first appearance.
``frequent_words``  a text of Zipf-distributed coded words; answer the 3 most frequent, most
                    frequent first.
==================  ================================================================================

Haystacks (NIAH and variable tracking) are consecutive lines of a corpus — the embedded default
(Python standard library), or any local text / JSONL / Parquet — starting at a random line, or the
repeated "noise" paragraph of RULER (``Haystack(kind="noise")``). Needles are inserted at line
boundaries. Keys are adjective-noun pairs, values 7-digit numbers, words random pronounceable
strings, all drawn from ``numpy.random.default_rng((seed, task, length, index))``: the suite is the
same on every machine for a given seed, tokenizer and corpus.

Lengths are **token** lengths measured with the evaluating tokenizer (byte-level or a Hugging Face
``tokenizer.json``). A sample is built as token ids: ``[bos]``, then the separately tokenized
pieces (instruction, haystack lines, needles, question with its answer prefix), then the answer;
the haystack is filled line by line until the next line would not fit, so a sample of length
``L`` has ``L - (one line) < len <= L`` tokens, answer included (the word-list tasks: up to a
few list entries short of ``L``).

Scoring and the suite's runner: :mod:`ttt_jax.eval.ruler`. (Over the ~400-line guide: the seven
task generators share the haystack, needle-insertion, assembly and seeded-draw helpers.)
"""


from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from ttt_jax.data.sources import open_corpus

__all__ = ["TASKS", "Haystack", "Sample", "generate_sample", "generate_suite"]

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
         "variable_tracking", "common_words", "frequent_words")

NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
         "again.\n")

_ADJECTIVES = ("ancient", "bitter", "brave", "calm", "clever", "crimson", "curious", "dark",
               "eager", "elegant", "fancy", "fierce", "gentle", "golden", "grumpy", "happy",
               "hollow", "icy", "jolly", "lazy", "lively", "lucky", "mighty", "misty", "noisy",
               "odd", "proud", "quiet", "rapid", "silent", "silver", "sleepy", "tiny", "wild")
_NOUNS = ("anchor", "badger", "banjo", "beacon", "canyon", "castle", "comet", "falcon", "forest",
          "garden", "glacier", "harbor", "island", "jacket", "kettle", "lantern", "meadow",
          "mirror", "needle", "orchard", "otter", "parrot", "pebble", "pillow", "quarry", "river",
          "saddle", "spider", "teapot", "thunder", "tiger", "violin", "walrus", "window")
_ONSETS = ("b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
           "z", "br", "ch", "cl", "dr", "fl", "gr", "pl", "sh", "st", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "oo")


def _rng(seed: int, *parts: Any) -> np.random.Generator:
    """A generator fixed by ``seed`` and the parts (strings hashed machine-independently)."""
    words = [int(seed) & 0xFFFFFFFF]
    for p in parts:
        words.append(zlib.crc32(str(p).encode()) if isinstance(p, str) else int(p) & 0xFFFFFFFF)
    return np.random.default_rng(words)


def _word(rng: np.random.Generator, syllables: int) -> str:
    return "".join(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
                   for _ in range(syllables))


def _distinct_words(rng: np.random.Generator, n: int, syllables: Sequence[int] = (2, 3)) -> list[str]:
    out: dict[str, None] = {}
    while len(out) < n:
        out[_word(rng, int(rng.choice(syllables)))] = None
    return list(out)


def _keys(rng: np.random.Generator, n: int) -> list[str]:
    pairs = rng.choice(len(_ADJECTIVES) * len(_NOUNS), size=n, replace=False)
    return [f"{_ADJECTIVES[p // len(_NOUNS)]}-{_NOUNS[p % len(_NOUNS)]}" for p in pairs]


def _numbers(rng: np.random.Generator, n: int, digits: int = 7) -> list[str]:
    vals: dict[int, None] = {}
    while len(vals) < n:
        vals[int(rng.integers(10 ** (digits - 1), 10 ** digits))] = None
    return [str(v) for v in vals]


# --------------------------------------------------------------------------------------------------
# Haystacks
# --------------------------------------------------------------------------------------------------


class Haystack:
    """Filler lines, each a tokenized line of text (newline included).

    ``kind="corpus"``: lines of the documents of ``split`` of a source (``source``/``paths``/
    ``field``/``column`` as in :func:`ttt_jax.data.open_corpus`; default the embedded stdlib
    corpus), read in corpus order from a random document and line, wrapping around.
    ``kind="noise"``: RULER's repeated noise paragraph. Lines longer than ``max_line_tokens``
    are split, so one line never overshoots a target length by much. Tokenized documents are
    cached.
    """

    def __init__(self, tokenizer: Any, kind: str = "corpus", *, source: str = "stdlib",
                 paths: Sequence[str] = (), split: str = "validation", field: str = "text",
                 column: str = "text", max_line_tokens: int = 64):
        if kind not in ("corpus", "noise"):
            raise ValueError(f"haystack kind {kind!r}: expected 'corpus' or 'noise'")
        self.tokenizer = tokenizer
        self.kind = kind
        self.max_line_tokens = int(max_line_tokens)
        self.description = "noise" if kind == "noise" else (
            f"{source}" + (f" {list(paths)}" if paths else "") + f" ({split})")
        self._cache: dict[int, list[np.ndarray]] = {}
        if kind == "corpus":
            self._corpus = open_corpus(source, paths, split=split, field=field, column=column)
            if len(self._corpus) == 0:
                raise ValueError(f"the {split} split of the {source} corpus has no documents for "
                                 "a haystack; use another split or corpus")
        else:
            self._noise = self._tokenize_lines(NOISE)

    def _tokenize_lines(self, text: str) -> list[np.ndarray]:
        out = []
        for line in text.splitlines(keepends=True):
            if not line.endswith(("\n", "\r")):   # a document's last line: keep lines separate
                line += "\n"
            ids = np.asarray(self.tokenizer.encode(line), np.int32)
            for a in range(0, len(ids), self.max_line_tokens):
                out.append(ids[a:a + self.max_line_tokens])
        return out

    def _doc_lines(self, i: int) -> list[np.ndarray]:
        if i not in self._cache:
            self._cache[i] = self._tokenize_lines(self._corpus.text(i) or "")
        return self._cache[i]

    def lines(self, budget: int, rng: np.random.Generator) -> list[np.ndarray]:
        """Consecutive lines totalling at most ``budget`` tokens (as many as fit)."""
        out: list[np.ndarray] = []
        used = 0
        if self.kind == "noise":
            source = iter(lambda: self._noise, None)
            doc_iter = (line for lines in source for line in lines)
        else:
            n = len(self._corpus)
            first = int(rng.integers(n))
            start_line = int(rng.integers(max(1, len(self._doc_lines(first)))))

            def gen():
                for k in range(n * 1000):  # wraps around the corpus; bounded for safety
                    lines = self._doc_lines((first + k) % n)
                    yield from (lines[start_line:] if k == 0 else lines)
            doc_iter = gen()
        for line in doc_iter:
            if used + len(line) > budget:
                break
            out.append(line)
            used += len(line)
        return out


# --------------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Sample:
    """One task instance: ``prompt`` ``[n]`` int32 (``bos`` first) then ``answer`` ``[m]`` int32
    (the gold continuation); ``answer_text`` its text; ``meta``: needle depths, keys, counts."""

    task: str
    length: int
    index: int
    prompt: np.ndarray
    answer: np.ndarray
    answer_text: str
    meta: dict[str, Any]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.answer)


def _enc(tokenizer: Any, text: str) -> np.ndarray:
    return np.asarray(tokenizer.encode(text), np.int32)


def _insert(lines: list[np.ndarray], items: list[np.ndarray], depths: Sequence[float]) -> list[np.ndarray]:
    """``lines`` with ``items[k]`` inserted before line ``round(depths[k] * len(lines))``."""
    at = [int(round(d * len(lines))) for d in depths]
    out: list[np.ndarray] = []
    order = sorted(range(len(items)), key=lambda k: (at[k], k))
    j = 0
    for i in range(len(lines) + 1):
        while j < len(order) and at[order[j]] == i:
            out.append(items[order[j]])
            j += 1
        if i < len(lines):
            out.append(lines[i])
    return out


def _assemble(tokenizer: Any, length: int, task: str, index: int, head: str,
              middle: Callable[[int], list[np.ndarray]], question: str, answer: str,
              meta: dict[str, Any]) -> Sample:
    """bos + head + middle(budget) + question, then answer; ``middle`` fills the token budget."""
    bos = np.asarray([tokenizer.bos_id], np.int32)
    head_ids, q_ids, a_ids = _enc(tokenizer, head), _enc(tokenizer, question), _enc(tokenizer, answer)
    budget = length - (1 + len(head_ids) + len(q_ids) + len(a_ids))
    if budget < 0:
        raise ValueError(f"length {length} is too short for task {task!r} (the instruction, "
                         f"question and answer alone take {length - budget} tokens)")
    body = middle(budget)
    prompt = np.concatenate([bos, head_ids, *body, q_ids]).astype(np.int32)
    if len(prompt) + len(a_ids) > length:  # middle() must respect its budget
        raise AssertionError(f"{task}: built {len(prompt) + len(a_ids)} tokens for length {length}")
    return Sample(task=task, length=length, index=index, prompt=prompt, answer=a_ids,
                  answer_text=answer, meta=meta)


def _locate(body: list[np.ndarray], items: list[np.ndarray], meta: dict[str, Any]) -> list[np.ndarray]:
    """Record in ``meta["needle_positions"]`` the offsets in ``body`` where ``items`` start."""
    offsets, at = {}, 0
    for piece in body:
        for k, item in enumerate(items):
            if piece is item:
                offsets[k] = at
        at += len(piece)
    meta["needle_positions"] = [offsets[k] for k in range(len(items))]
    return body


def _offset(sample: Sample, tokenizer: Any, head: str) -> Sample:
    """Make ``needle_positions`` absolute (prompt token indices; bos and the head come first) and
    add ``needle_distances``: tokens from each needle's start to the first answer token."""
    shift = 1 + len(_enc(tokenizer, head))
    pos = [p + shift for p in sample.meta["needle_positions"]]
    sample.meta["needle_positions"] = pos
    sample.meta["needle_distances"] = [len(sample.prompt) - p for p in pos]
    return sample


_NIAH_HEAD = ("Some special magic numbers are hidden within the following text. Make sure to "
              "memorize them. I will quiz you about the numbers afterwards.\n")


def _needle(tokenizer: Any, key: str, value: str) -> np.ndarray:
    return _enc(tokenizer, f"One of the special magic numbers for {key} is: {value}.\n")


def _niah(task: str, length: int, index: int, tokenizer: Any, haystack: Haystack,
          rng: np.random.Generator, n_needles: int = 4) -> Sample:
    if task == "niah_single":
        keys, values = _keys(rng, 1), _numbers(rng, 1)
        depths = [float(rng.uniform(0.0, 1.0))]
        pairs, asked = [(keys[0], values[0])], [keys[0]]
        answer_values = values
    elif task == "niah_multikey":
        keys, values = _keys(rng, n_needles), _numbers(rng, n_needles)
        depths = list(np.linspace(0.0, 1.0, n_needles + 2)[1:-1])
        pairs = list(zip(keys, values))
        q = int(rng.integers(n_needles))
        asked, answer_values = [keys[q]], [values[q]]
    elif task == "niah_multivalue":
        key, values = _keys(rng, 1)[0], _numbers(rng, n_needles)
        depths = list(np.linspace(0.0, 1.0, n_needles + 2)[1:-1])
        pairs, asked, answer_values = [(key, v) for v in values], [key], values
    else:  # niah_multiquery
        keys, values = _keys(rng, n_needles), _numbers(rng, n_needles)
        depths = list(np.linspace(0.0, 1.0, n_needles + 2)[1:-1])
        pairs = list(zip(keys, values))
        order = rng.permutation(n_needles)
        asked = [keys[i] for i in order]
        answer_values = [values[i] for i in order]
    needles = [_needle(tokenizer, k, v) for k, v in pairs]
    many = len(answer_values) > 1
    what = "numbers" if many else "number"
    about = ", ".join(asked[:-1]) + " and " + asked[-1] if len(asked) > 1 else asked[0]
    verb = "are" if many else "is"
    question = (f"\nWhat {verb} the special magic {what} for {about} mentioned in the provided "
                f"text? The special magic {what} for {about} mentioned in the provided text "
                f"{verb}:")
    answer = " " + ", ".join(answer_values)

    meta = {"depths": [float(d) for d in depths], "keys": asked, "haystack": haystack.description}

    def middle(budget: int) -> list[np.ndarray]:
        budget -= sum(len(n) for n in needles)
        if budget < 0:
            raise ValueError(f"length {length} is too short for task {task!r} (the needles, "
                             "instruction and question do not fit)")
        lines = haystack.lines(budget, rng)
        return _locate(_insert(lines, needles, depths), needles, meta)

    return _offset(_assemble(tokenizer, length, task, index, _NIAH_HEAD, middle, question, answer,
                             meta), tokenizer, _NIAH_HEAD)


def _variable_tracking(length: int, index: int, tokenizer: Any, haystack: Haystack,
                       rng: np.random.Generator, hops: int = 4) -> Sample:
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(chr(ord("A") + int(c)) for c in rng.integers(0, 26, 5))
        if name not in names:
            names.append(name)
    value = _numbers(rng, 1, digits=5)[0]
    stmts = [f"VAR {names[0]} = {value}.\n"] + [f"VAR {names[i + 1]} = VAR {names[i]}.\n"
                                               for i in range(hops)]
    stmt_ids = [_enc(tokenizer, s) for s in stmts]
    depths = list(np.linspace(0.0, 1.0, len(stmts) + 2)[1:-1])
    head = ("Memorize and track the chain of variable assignments hidden in the following text.\n")
    question = (f"\nQuestion: Find all variables that are assigned the value {value} in the text "
                f"above. Answer: According to the chain of variable assignments in the text "
                f"above, {len(names)} variables are assigned the value {value}, they are:")
    answer = " " + " ".join(names)

    meta = {"depths": [float(d) for d in depths], "value": value,
            "haystack": haystack.description}

    def middle(budget: int) -> list[np.ndarray]:
        budget -= sum(len(s) for s in stmt_ids)
        if budget < 0:
            raise ValueError(f"length {length} is too short for task 'variable_tracking'")
        lines = haystack.lines(budget, rng)
        return _locate(_insert(lines, stmt_ids, depths), stmt_ids, meta)

    return _offset(_assemble(tokenizer, length, "variable_tracking", index, head, middle,
                             question, answer, meta), tokenizer, head)


def _fit_entries(tokenizer: Any, budget: int, make: Callable[[int], list[str]],
                 start: int) -> list[np.ndarray]:
    """Token arrays of ``make(n)`` for the largest ``n <= start`` whose total fits ``budget``
    (shrinking proportionally until it fits, then a binary search up to the last miss)."""
    def build(n: int) -> tuple[list[np.ndarray], int]:
        entries = [_enc(tokenizer, e) for e in make(n)]
        return entries, sum(len(e) for e in entries)

    best, total = build(start)
    if total <= budget:
        return best
    hi = n = start
    while True:
        n = min(n - 1, int(n * budget / total))
        if n < 0:
            raise ValueError(f"no entries fit a budget of {budget} tokens")
        best, total = build(n)
        if total <= budget:
            break
        hi = n
    lo = n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        entries, total = build(mid)
        if total <= budget:
            lo, best = mid, entries
        else:
            hi = mid
    return best


def _common_words(length: int, index: int, tokenizer: Any, rng: np.random.Generator,
                  n_common: int = 10) -> Sample:
    head = ("Below is a numbered list of words. Some of them appear more often than the others. "
            "Memorize the ones that appear most often.\n")
    question = (f"\nQuestion: What are the {n_common} most common words in the list above? "
                f"Answer: The {n_common} words that appear most often in the list, in order of "
                "first appearance, are:")
    # Sizes from an estimate of tokens per entry; _fit_entries trims the rare words to fit.
    per_entry = max(1, len(_enc(tokenizer, "123. shaveatoo\n")))
    est = max(1, length // per_entry)
    freq = int(np.clip(est // (4 * n_common), 3, 30))
    uncommon_freq = 1 if freq < 6 else 3
    vocab = _distinct_words(rng, n_common + 2 * est // uncommon_freq + 1)  # more than fit
    common, rare = vocab[:n_common], vocab[n_common:]
    rare_order = rng.permutation(len(rare))
    seed = int(rng.integers(2**31))

    def make(n_rare_words: int) -> list[str]:
        bag = [w for w in common for _ in range(freq)]
        bag += [rare[i] for i in rare_order[:n_rare_words] for _ in range(uncommon_freq)]
        perm = np.random.default_rng(seed).permutation(len(bag))
        return [f"{i + 1}. {bag[j]}\n" for i, j in enumerate(perm)]

    # The answer (order of first appearance) depends on the final list, so build the list first,
    # against the answer's length in another order (+2 tokens of slack for BPE merges).
    fixed = 1 + len(_enc(tokenizer, head)) + len(_enc(tokenizer, question))
    budget = length - fixed - len(_enc(tokenizer, " " + ", ".join(common))) - 2
    too_short = ValueError(f"length {length} is too short for task 'common_words'")
    if budget <= 0:
        raise too_short
    try:
        entries = _fit_entries(tokenizer, budget, make, len(rare))
    except ValueError:
        raise too_short from None
    words = [tokenizer.decode(e).split(". ", 1)[1].strip() for e in entries]
    seen: list[str] = []
    for w in words:
        if w in common and w not in seen:
            seen.append(w)
    if len(seen) < n_common:
        raise too_short
    answer = " " + ", ".join(seen)
    counts = {w: words.count(w) for w in common}
    meta = {"common_frequency": freq, "uncommon_frequency": uncommon_freq, "entries": len(words),
            "min_common_count": min(counts.values())}
    return _assemble(tokenizer, length, "common_words", index, head, lambda b: entries, question,
                     answer, meta)


def _frequent_words(length: int, index: int, tokenizer: Any, rng: np.random.Generator,
                    alpha: float = 2.0, top: int = 3) -> Sample:
    head = ("Read the following coded text and track how often each coded word appears.\n")
    question = (f"\nQuestion: What are the {top} most frequent coded words in the text above? "
                f"Answer: According to the coded text above, the {top} most frequent coded words "
                "are:")
    per_word = max(1, len(_enc(tokenizer, " shavea")))
    est = max(1, length // per_word)
    vocab = _distinct_words(rng, max(top + 1, est), syllables=(2, 3))
    seed = int(rng.integers(2**31))
    # The smallest scale at which the top + 1 counts are strictly decreasing (a unique answer).
    k_min = next(k for k in range(1, 10**6)
                 if all(int(k / r ** alpha) > int(k / (r + 1) ** alpha) for r in range(1, top + 1)))

    def make(total_words: int) -> list[str]:
        # Zipf counts c_r = floor(K / r^alpha); K from the total so that sum c_r ~ total_words.
        zeta = sum(1.0 / r ** alpha for r in range(1, len(vocab) + 1))
        k = max(total_words / zeta, k_min)
        counts = [int(k / r ** alpha) for r in range(1, len(vocab) + 1)]
        bag = [vocab[r] for r, c in enumerate(counts) for _ in range(c)]
        perm = np.random.default_rng(seed).permutation(len(bag))
        return [" " + bag[j] for j in perm]

    fixed = 1 + len(_enc(tokenizer, head)) + len(_enc(tokenizer, question))
    answer = " " + " ".join(vocab[:top])
    budget = length - fixed - len(_enc(tokenizer, answer))
    if budget <= 0:
        raise ValueError(f"length {length} is too short for task 'frequent_words'")
    words = _fit_entries(tokenizer, budget, make, est)
    counts = {w: 0 for w in vocab[:top + 1]}
    for e in words:
        w = tokenizer.decode(e).strip()
        if w in counts:
            counts[w] += 1
    c = [counts[w] for w in vocab[:top + 1]]
    if not all(c[i] > c[i + 1] for i in range(top)):
        raise ValueError(f"length {length} is too short for task 'frequent_words' (the top "
                         f"{top} counts {c} are not distinct)")
    meta = {"top_counts": c[:top], "words": len(words)}
    return _assemble(tokenizer, length, "frequent_words", index, head, lambda b: words, question,
                     answer, meta)


def generate_sample(task: str, length: int, tokenizer: Any, haystack: Optional[Haystack] = None, *,
                    seed: int = 0, index: int = 0) -> Sample:
    """Sample ``index`` of ``task`` at token length ``length`` (deterministic in all arguments).

    ``haystack`` is needed by the NIAH tasks and variable tracking (default: the stdlib corpus's
    validation split). Raises ``ValueError`` for an unknown task or a length too short for it.
    """
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; tasks: {', '.join(TASKS)}")
    rng = _rng(seed, task, length, index)
    if task.startswith("niah") or task == "variable_tracking":
        haystack = haystack or Haystack(tokenizer)
        if task == "variable_tracking":
            return _variable_tracking(length, index, tokenizer, haystack, rng)
        return _niah(task, length, index, tokenizer, haystack, rng)
    if task == "common_words":
        return _common_words(length, index, tokenizer, rng)
    return _frequent_words(length, index, tokenizer, rng)


def generate_suite(tasks: Iterable[str], lengths: Iterable[int], num_samples: int, tokenizer: Any,
                   haystack: Optional[Haystack] = None, *, seed: int = 0) -> list[Sample]:
    """``num_samples`` samples of every task at every length, ordered by length then task."""
    tasks, lengths = list(tasks), sorted(set(int(n) for n in lengths))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown RULER task(s) {unknown}; tasks: {', '.join(TASKS)}")
    if any(t.startswith("niah") or t == "variable_tracking" for t in tasks) and haystack is None:
        haystack = Haystack(tokenizer)
    return [generate_sample(t, n, tokenizer, haystack, seed=seed, index=i)
            for n in lengths for t in tasks for i in range(num_samples)]
