"""Tokenizers and token streams for language-model runs.

A run's tokenizer is trained on its corpus's training split only (byte-level BPE with Hugging
Face `tokenizers`, or plain bytes: a BPE with no merges) and saved with the run as
`tokenizer.json`, a JSON file that loading never executes. Runs that start from another run
(uptraining, fine-tuning) take that run's tokenizer. Each split becomes one stream of token ids,
documents joined by an end-of-text token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, TiedmaskError
from .corpus import SPLITS, Corpus

END_OF_TEXT = "<|endoftext|>"
TOKENIZERS = ("bpe", "bytes")
BYTES_VOCAB = 257  # 256 bytes and the end-of-text token


def _library():
    try:
        import tokenizers
    except ImportError:
        raise ConfigError("language-model runs need Hugging Face tokenizers: pip install 'tiedmask[hf]'") from None
    return tokenizers


def train_tokenizer(kind: str, vocab_size: int, texts: list[str]):
    """A byte-level BPE of `vocab_size` ids (`bytes`: no merges) learned from `texts`."""
    tk = _library()
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    size = BYTES_VOCAB if kind == "bytes" else vocab_size
    trainer = tk.trainers.BpeTrainer(vocab_size=size, special_tokens=[END_OF_TEXT], show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts if kind == "bpe" else [], trainer=trainer)
    return tokenizer


def load_tokenizer(path: Path):
    try:
        tokenizer = _library().Tokenizer.from_file(str(path))
    except Exception as exc:  # the library raises its own exception type on a damaged file
        raise TiedmaskError(f"cannot read tokenizer {path} ({str(exc)[:120]}); copy it again from its run") from None
    if tokenizer.token_to_id(END_OF_TEXT) is None:
        raise TiedmaskError(f"tokenizer {path} has no {END_OF_TEXT} token; use a tokenizer saved by tiedmask")
    return tokenizer


@dataclass
class TokenData:
    """Each split's token stream, and what made it."""

    streams: dict[str, torch.Tensor]  # split -> 1-D int64 ids
    tokenizer: object  # tokenizers.Tokenizer
    corpus: Corpus

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def summary(self) -> dict:
        """What `corpus.json` keeps with the run (which text, split how, tokenized how)."""
        return {"corpus": self.corpus.name, "sha256": self.corpus.digest, "vocab_size": self.vocab_size,
                "documents": self.corpus.sizes(),
                "tokens": {split: len(stream) for split, stream in self.streams.items()}}


def tokenize(corpus: Corpus, tokenizer) -> TokenData:
    eot = tokenizer.token_to_id(END_OF_TEXT)
    streams = {}
    for split in SPLITS:
        ids: list[int] = []
        for encoding in tokenizer.encode_batch(corpus.documents[split]):
            ids += encoding.ids
            ids.append(eot)
        streams[split] = torch.tensor(ids, dtype=torch.int64)
    return TokenData(streams, tokenizer, corpus)
