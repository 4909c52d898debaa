"""``loco tokenize``: a byte-level BPE tokenizer trained here on a text corpus (HuggingFace
``tokenizers``: nothing is downloaded), and the corpus written as a token file with its
sidecar and the tokenizer beside it (node/token_files.py)."""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ConfigError
from .token_files import write_tokens

END_OF_TEXT = "<|endoftext|>"  # between documents (GPT-2's separator); id 0


@dataclass(frozen=True)
class Tokenized:
    tokens: Path
    tokenizer: Path
    documents: int
    token_count: int
    vocab_size: int


def corpus_files(corpus: Path | None) -> list[Path]:
    """Files of a text corpus in a fixed order; None: the Python standard library's .py
    files (the corpus the daemon trains on by default)."""
    if corpus is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    if not corpus.exists():
        raise ConfigError(f"tokenize: {corpus} does not exist")
    return sorted(p for p in corpus.rglob("*") if p.is_file()) if corpus.is_dir() else [corpus]


def read_documents(files: list[Path], max_bytes: int) -> list[str]:
    """Up to ``max_bytes`` of the files as text (bytes that are not UTF-8 become U+FFFD)."""
    docs: list[str] = []
    left = max_bytes
    for path in files:
        if left <= 0:
            break
        try:
            data = path.read_bytes()[:left]
        except OSError:
            continue
        docs.append(data.decode("utf-8", errors="replace"))
        left -= len(data)
    return docs


def train_tokenizer(docs: list[str], vocab_size: int):
    """A byte-level BPE (every byte is in the alphabet: any text encodes and decodes back)."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise ConfigError("loco tokenize needs the tokenizers package: pip install 'loco[hf]'") from None
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def encode_documents(tok, docs: list[str]) -> np.ndarray:
    """One stream of ids: each document followed by END_OF_TEXT."""
    eot = tok.token_to_id(END_OF_TEXT)
    parts = []
    for enc in tok.encode_batch(docs):
        parts.append(np.asarray(enc.ids, dtype=np.int64))
        parts.append(np.array([eot], dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def tokenize_corpus(corpus: Path | None, out: Path, vocab_size: int, max_bytes: int) -> Tokenized:
    """``out/tokens.bin`` + ``out/tokens.json`` (dtype, vocabulary, tokenizer) +
    ``out/tokenizer.json``."""
    if vocab_size < 257:
        raise ConfigError(f"tokenize: --vocab-size {vocab_size} is below 257 (the 256 bytes and {END_OF_TEXT})")
    docs = read_documents(corpus_files(corpus), max_bytes)
    if not any(docs):
        raise ConfigError(f"tokenize: {corpus or 'the corpus'} holds no text")
    tok = train_tokenizer(docs, vocab_size)
    ids = encode_documents(tok, docs)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    write_tokens(out / "tokens.bin", ids, vocab_size=tok.get_vocab_size(), tokenizer="tokenizer.json")
    return Tokenized(out / "tokens.bin", out / "tokenizer.json", len(docs), len(ids), tok.get_vocab_size())
