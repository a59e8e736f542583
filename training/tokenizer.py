"""The CLIP byte-pair-encoding tokenizer, offline.

Reads OpenAI CLIP's merge list shipped in `training/assets/` (MIT, see
`assets/LICENSE-clip-bpe.txt`) and reproduces CLIP's token ids: text is cleaned
with `ftfy` (mojibake, curly quotes, ligatures, full-width letters, composed
accents), HTML entities unescaped, whitespace collapsed, lower-cased), split by
CLIP's pre-tokenisation pattern, mapped byte by byte to printable characters and
merged by rank. Ids: 49406 = `<|startoftext|>`, 49407 = `<|endoftext|>`, 0 = padding.
As in OpenAI's tokenizer, those two strings in a text are the special tokens.
"""

from __future__ import annotations

import gzip
import html
from functools import lru_cache
from pathlib import Path

import ftfy
import regex
import torch

DEFAULT_VOCAB = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
SOT, EOT = "<|startoftext|>", "<|endoftext|>"  # OpenAI's strings
WORD_END = "</w>"
# CLIP's vocabulary: 256 byte symbols, the same with an end-of-word mark, the merges, two specials.
N_MERGES = 49152 - 256 - 2

_SPLIT = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)


def byte_symbols() -> tuple[list[str], list[int]]:
    """One printable character per byte value, ordered as CLIP's vocabulary lists them.

    Bytes that are already visible characters stand for themselves; the rest
    (control characters, space, a few Latin-1 gaps) are moved to code points 256+.
    """
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    seen = set(visible)
    hidden = [b for b in range(256) if b not in seen]
    order = visible + hidden
    symbol = {b: chr(b) for b in visible} | {b: chr(256 + n) for n, b in enumerate(hidden)}
    return [symbol[b] for b in order], order


def clean(text: str) -> str:
    """Normalise text the way CLIP was trained: fixed encoding, unescaped, single spaces, lower case."""
    # ftfy is a dependency, not an option: without it "women’s" and friends get ids CLIP never saw
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


class ClipTokenizer:
    """`tokenizer(list_of_texts) -> LongTensor [n, context_length]` (77 unless the model it serves says otherwise)."""

    def __init__(self, vocab_path: str | Path = DEFAULT_VOCAB, context_length: int = 77):
        self.context_length = context_length
        with gzip.open(vocab_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1 : N_MERGES + 1]  # first line is a version header
        merges = [tuple(line.split()) for line in lines]
        symbols, byte_order = byte_symbols()
        self.byte_to_symbol = dict(zip(byte_order, symbols))
        self.symbol_to_byte = {s: b for b, s in self.byte_to_symbol.items()}
        vocab = symbols + [s + WORD_END for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = vocab
        self.merge_rank = {pair: i for i, pair in enumerate(merges)}
        self.sot_id, self.eot_id = self.encoder[SOT], self.encoder[EOT]
        self.vocab_size = len(vocab)
        self._bpe = lru_cache(maxsize=100_000)(self._bpe_uncached)

    # The cache wraps a bound method and cannot be pickled (spawned data-loader workers pickle the
    # tokenizer): send everything else and rebuild an empty cache on arrival.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_bpe"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._bpe = lru_cache(maxsize=100_000)(self._bpe_uncached)

    def _bpe_uncached(self, word: str) -> tuple[str, ...]:
        """Merge the symbols of one pre-token, lowest-ranked pair first, until no known pair remains."""
        parts = list(word[:-1]) + [word[-1] + WORD_END]
        while len(parts) > 1:
            ranks = [self.merge_rank.get(pair, N_MERGES) for pair in zip(parts, parts[1:])]
            best = min(ranks)
            if best == N_MERGES:
                break
            first, second = parts[ranks.index(best)], parts[ranks.index(best) + 1]
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without start/end tokens."""
        ids = []
        for piece in _SPLIT.findall(clean(text)):
            if piece in (SOT, EOT):
                ids.append(self.encoder[piece])
                continue
            word = "".join(self.byte_to_symbol[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[token] for token in self._bpe(word))
        return ids

    def decode(self, ids) -> str:
        """Text of a row of ids; stops at the end token, drops the start token and padding."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        tokens = []
        for i in ids:
            if i == self.eot_id:
                break
            if i != self.sot_id:
                tokens.append(self.decoder[i])
        data = bytearray()
        for token in tokens:
            word_end = token.endswith(WORD_END)
            data.extend(self.symbol_to_byte[c] for c in token.removesuffix(WORD_END))
            if word_end:
                data.extend(b" ")
        return data.decode("utf-8", errors="replace").strip()

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        """Ids [len(texts), context_length]: start, tokens, end, zero padding; too long keeps its end token."""
        context_length = context_length or self.context_length
        if isinstance(texts, str):
            texts = [texts]
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text), self.eot_id]
            if len(ids) > context_length:
                ids = ids[:context_length]
                ids[-1] = self.eot_id
            out[row, : len(ids)] = torch.tensor(ids)
        return out
