"""Tokenizers: a byte-level tokenizer (no files needed) and a Hugging Face ``tokenizer.json`` wrapper.

Every tokenizer has the same small interface (:class:`Tokenizer`)::

    encode(text: str) -> list[int]          # no special tokens added
    encode_array(text: str) -> np.ndarray   # [n] int32, same ids (fast path used by the pipeline)
    decode(ids) -> str                      # special tokens (bos/eos/pad) are dropped
    vocab_size: int; bos_id: int; eos_id: int; pad_id: int

The data pipeline wraps every document as ``[bos_id] + encode(text) + [eos_id]``
(:func:`ttt_jax.data.packing.document_tokens`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional, Protocol, runtime_checkable

import numpy as np

__all__ = ["Tokenizer", "ByteTokenizer", "HFTokenizer", "load_tokenizer"]


@runtime_checkable
class Tokenizer(Protocol):
    """What the data layer needs from a tokenizer."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


def _as_int_array(ids: Iterable[int]) -> np.ndarray:
    arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids))
    if arr.size == 0:
        return arr.reshape(0).astype(np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"token ids must be a flat sequence of integers, got shape {arr.shape} dtype {arr.dtype}")
    return arr.astype(np.int64)


class ByteTokenizer:
    """UTF-8 bytes as tokens: ``pad=0, bos=1, eos=2``, byte ``b`` -> id ``b + 3``; ``vocab_size=259``.

    Needs no files, round-trips any string exactly, and is the embedded default (``data.tokenizer=byte``).
    """

    OFFSET = 3
    vocab_size = 256 + OFFSET
    pad_id = 0
    bos_id = 1
    eos_id = 2

    def encode(self, text: str) -> list[int]:
        """``text`` -> ids in ``[3, 259)`` (one per UTF-8 byte; no bos/eos)."""
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        """Like :meth:`encode` but returns a ``[n_bytes]`` int32 array (vectorised; ~1 GB/s)."""
        raw = text.encode("utf-8", errors="surrogatepass")
        return np.frombuffer(raw, dtype=np.uint8).astype(np.int32) + self.OFFSET

    def decode(self, ids: Iterable[int]) -> str:
        """ids -> text. Special ids (0, 1, 2) are dropped; invalid UTF-8 becomes U+FFFD.

        Raises ``ValueError`` for ids outside ``[0, 259)``.
        """
        arr = _as_int_array(ids)
        bad = arr[(arr < 0) | (arr >= self.vocab_size)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is out of range for ByteTokenizer "
                             f"(vocab_size={self.vocab_size}, valid ids 0..{self.vocab_size - 1})")
        data = (arr[arr >= self.OFFSET] - self.OFFSET).astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259, pad=0, bos=1, eos=2)"


# Special-token names, most specific first. "<|endoftext|>" doubles as BOS for GPT-2/Qwen-style
# tokenizers, which have a single document separator.
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<|startoftext|>", "<bos>", "[BOS]", "<|endoftext|>")
_EOS_NAMES = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>", "[EOS]", "<|eot_id|>")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>", "<|finetune_right_pad_id|>")


def _token_content(value: Any) -> Optional[str]:
    """``tokenizer_config.json`` stores special tokens as strings or ``{"content": ...}`` dicts."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` loaded with the ``tokenizers`` library (``pip install ttt-jax[hf]``).

    Special ids: explicit ``bos_token`` / ``eos_token`` / ``pad_token`` arguments win; otherwise a
    ``tokenizer_config.json`` next to the file; otherwise the first common name found among the
    tokenizer's added tokens (then its vocabulary): ``<|begin_of_text|>``, ``<s>``, ... for BOS and
    ``<|end_of_text|>``, ``</s>``, ``<|endoftext|>``, ... for EOS. A missing BOS falls back to EOS and
    vice versa; a missing pad falls back to EOS (it is always masked out), then 0.

    Args:
      path: a ``tokenizer.json`` file, or a directory containing one.
    """

    def __init__(self, path: str | Path, *, bos_token: Optional[str] = None,
                 eos_token: Optional[str] = None, pad_token: Optional[str] = None):
        try:
            import tokenizers
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("HFTokenizer needs the `tokenizers` package: pip install ttt-jax[hf] "
                              "(or pip install tokenizers)") from e
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"tokenizer file {str(path)!r} does not exist; pass a tokenizer.json "
                             "or a directory containing one (or use data.tokenizer=byte)")
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
            spec = json.loads(path.read_text(encoding="utf-8"))
        except Exception as e:  # tokenizers raises a plain Exception on malformed files
            raise ValueError(f"could not load tokenizer {str(path)!r}: {e}") from e
        self.path = path
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        added = {t.get("content"): int(t["id"]) for t in spec.get("added_tokens") or []
                 if isinstance(t, dict) and "id" in t}
        hf_config: dict[str, Any] = {}
        cfg_path = path.parent / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                hf_config = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                hf_config = {}

        def find(explicit: Optional[str], key: str, names: tuple[str, ...]) -> Optional[int]:
            if explicit is not None:
                tid = added.get(explicit, self._tok.token_to_id(explicit))
                if tid is None:
                    raise ValueError(f"{key}={explicit!r} is not a token of {str(path)!r}")
                return int(tid)
            configured = _token_content(hf_config.get(key))
            candidates = ((configured,) if configured else ()) + names
            for name in candidates:
                if name in added:
                    return added[name]
            for name in candidates:
                tid = self._tok.token_to_id(name)
                if tid is not None:
                    return int(tid)
            return None

        bos = find(bos_token, "bos_token", _BOS_NAMES)
        eos = find(eos_token, "eos_token", _EOS_NAMES)
        if bos is None and eos is None:
            raise ValueError(f"{str(path)!r} defines no BOS/EOS special token (looked for "
                             f"{', '.join(_BOS_NAMES + _EOS_NAMES)}); pass bos_token=/eos_token= "
                             "to HFTokenizer")
        self.bos_id = int(bos if bos is not None else eos)
        self.eos_id = int(eos if eos is not None else bos)
        pad = find(pad_token, "pad_token", _PAD_NAMES)
        self.pad_id = int(pad if pad is not None else self.eos_id)

    def encode(self, text: str) -> list[int]:
        """``text`` -> ids (no special tokens added by the tokenizer's post-processor)."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_array(self, text: str) -> np.ndarray:
        """Like :meth:`encode`, as a ``[n]`` int32 array."""
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        """ids -> text, skipping special tokens. Raises ``ValueError`` for ids outside the vocabulary."""
        arr = _as_int_array(ids)
        bad = arr[(arr < 0) | (arr >= self.vocab_size)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is out of range for {str(self.path)!r} "
                             f"(vocab_size={self.vocab_size})")
        return self._tok.decode(arr.tolist(), skip_special_tokens=True)

    def __repr__(self) -> str:
        return (f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
                f"eos={self.eos_id}, pad={self.pad_id})")


def load_tokenizer(spec: str | Path) -> ByteTokenizer | HFTokenizer:
    """``"byte"`` -> :class:`ByteTokenizer`; a ``tokenizer.json`` path (or a directory holding one)
    -> :class:`HFTokenizer`. Raises ``ValueError`` naming the path when it does not exist."""
    if str(spec) == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_dir() and not (path / "tokenizer.json").is_file():
        raise ValueError(f"data.tokenizer={str(spec)!r} is a directory without a tokenizer.json; "
                         "point it at a tokenizer.json file or use data.tokenizer=byte")
    if not path.exists():
        raise ValueError(f"data.tokenizer={str(spec)!r}: no such file; expected 'byte' or a path to a "
                         "Hugging Face tokenizer.json (or a directory containing one)")
    return HFTokenizer(path)
