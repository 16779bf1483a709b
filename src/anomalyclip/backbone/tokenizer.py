"""CLIP's byte-pair-encoding tokenizer, token for token as OpenAI's.

The vocabulary ships as package data (MIT, see ``LICENSE-CLIP``). ``ftfy`` is used to
repair mojibake when it is installed, as OpenAI's tokenizer does; plain ASCII and
well-formed Unicode tokenise identically without it.
"""

from __future__ import annotations

import gzip
import html
from functools import lru_cache
from importlib import resources
from pathlib import Path

import regex
import torch

from anomalyclip.utils.quoting import quoted

CONTEXT_LENGTH = 77
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"


@lru_cache
def _bytes_to_unicode() -> dict[int, str]:
    """Reversible map from bytes to printable unicode characters, as GPT-2 and CLIP use."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def _pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return set(zip(word[:-1], word[1:], strict=False))


def _clean(text: str) -> str:
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip()


def default_vocab_path() -> Path:
    return Path(str(resources.files("anomalyclip.backbone") / "bpe_simple_vocab_16e6.txt.gz"))


class SimpleTokenizer:
    """Lower-cases, splits with CLIP's pattern and merges byte pairs by rank."""

    def __init__(self, vocab_path: str | Path | None = None) -> None:
        path = Path(vocab_path) if vocab_path else default_vocab_path()
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            merges_text = handle.read().split("\n")
        merges = [tuple(line.split()) for line in merges_text[1 : 49152 - 256 - 2 + 1]]
        byte_chars = list(_bytes_to_unicode().values())
        vocab = byte_chars + [c + "</w>" for c in byte_chars]
        vocab += ["".join(pair) for pair in merges]
        vocab += [SOT_TOKEN, EOT_TOKEN]
        self.encoder = {token: index for index, token in enumerate(vocab)}
        self.decoder = {index: token for token, index in self.encoder.items()}
        self.byte_encoder = _bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.cache = {SOT_TOKEN: SOT_TOKEN, EOT_TOKEN: EOT_TOKEN}
        self.pattern = regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            regex.IGNORECASE,
        )
        self.sot_token_id = self.encoder[SOT_TOKEN]
        self.eot_token_id = self.encoder[EOT_TOKEN]

    def _bpe(self, token: str) -> str:
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = _pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            merged: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    merged.extend(word[i:])
                    break
                merged.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
            if len(word) == 1:
                break
            pairs = _pairs(word)
        result = " ".join(word)
        self.cache[token] = result
        return result

    def encode(self, text: str) -> list[int]:
        tokens: list[int] = []
        for piece in regex.findall(self.pattern, _clean(text).lower()):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            tokens.extend(self.encoder[bpe] for bpe in self._bpe(piece).split(" "))
        return tokens

    def decode(self, tokens: list[int]) -> str:
        text = "".join(self.decoder[t] for t in tokens)
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(
        self, texts: str | list[str], context_length: int = CONTEXT_LENGTH, truncate: bool = False
    ) -> torch.Tensor:
        """Token ids of shape (len(texts), context_length), zero-padded, int64."""
        if isinstance(texts, str):
            texts = [texts]
        result = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > context_length:
                if not truncate:
                    raise ValueError(
                        f"text {quoted(text)} is {len(ids):,} tokens long, more than the "
                        "context "
                        f"length {context_length}"
                    )
                ids = ids[:context_length]
                ids[-1] = self.eot_token_id
            result[row, : len(ids)] = torch.tensor(ids)
        return result


@lru_cache(maxsize=1)
def get_tokenizer() -> SimpleTokenizer:
    """The shared tokenizer; building the merge table takes about a second."""
    return SimpleTokenizer()


def tokenize(texts: str | list[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    return get_tokenizer()(texts, context_length)
