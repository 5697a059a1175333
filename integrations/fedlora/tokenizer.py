"""Tokenizers of the reference federated app: a byte-level one built here, and an adapter over a local
Hugging Face tokenizer directory.

The byte tokenizer needs no vocabulary file, so the default app runs with no network access: ids
0..255 are the UTF-8 bytes of the text, followed by three specials (pad, bos, eos). Both classes offer
the same small interface (`Tokenizer`), which is all the dataset and training code relies on.
"""
from __future__ import annotations

import os
from typing import Protocol, Sequence

PAD_ID = 256
BOS_ID = 257
EOS_ID = 258
BYTE_VOCAB_SIZE = 259


class Tokenizer(Protocol):
    """What the app needs of a tokenizer: text <-> ids plus the pad/bos/eos ids and the vocabulary size."""

    pad_id: int
    bos_id: int
    eos_id: int
    vocab_size: int

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus pad (256), bos (257) and eos (258).

    Every string round-trips exactly (`decode(encode(s)) == s`); decoding skips the specials and
    replaces byte sequences that are not valid UTF-8 (which a model can generate) with U+FFFD.
    """

    pad_id = PAD_ID
    bos_id = BOS_ID
    eos_id = EOS_ID
    vocab_size = BYTE_VOCAB_SIZE

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """The UTF-8 bytes of `text`, optionally preceded by bos and followed by eos."""
        ids = list(text.encode("utf-8"))
        return ([BOS_ID] if add_bos else []) + ids + ([EOS_ID] if add_eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        """The text of the byte ids in `ids`; specials are skipped, ids outside the vocabulary rejected."""
        data = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                data.append(i)
            elif not PAD_ID <= i < BYTE_VOCAB_SIZE:
                raise ValueError(f"token id {i} is outside the byte tokenizer's vocabulary (0..{BYTE_VOCAB_SIZE - 1})")
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """The `Tokenizer` interface over a Hugging Face tokenizer saved in a local directory.

    For users with a real checkpoint (e.g. a LLaMA directory holding `tokenizer.json`). Nothing is
    downloaded: the directory must exist. LLaMA tokenizers have no pad token; eos then serves as pad,
    which is harmless because padded positions are masked out of attention and loss.
    """

    def __init__(self, path: str | os.PathLike):
        from transformers import AutoTokenizer

        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer directory {os.fspath(path)!r} does not exist; pass a local folder "
                                    "holding a saved Hugging Face tokenizer (this app never downloads one)")
        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if self._tok.bos_token_id is None or self._tok.eos_token_id is None:
            raise ValueError(f"the tokenizer in {os.fspath(path)!r} defines no bos or eos token; "
                             "the app needs both to frame prompts and responses")
        self.bos_id: int = self._tok.bos_token_id
        self.eos_id: int = self._tok.eos_token_id
        self.pad_id: int = self._tok.pad_token_id if self._tok.pad_token_id is not None else self.eos_id
        self.vocab_size: int = len(self._tok)

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        """The tokenizer's ids for `text` (without its own specials), optionally framed by bos/eos."""
        ids = self._tok(text, add_special_tokens=False)["input_ids"]
        return ([self.bos_id] if add_bos else []) + list(ids) + ([self.eos_id] if add_eos else [])

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`, special tokens skipped."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)
