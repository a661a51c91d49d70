"""How the emulator counts tokens: a real BPE tokenizer, so its counts share nothing with the estimator's rule.

The tokenizer is the Claude BPE that release 0.25.0 of the `anthropic` package shipped
(`anthropic/tokenizer.json`), read with the `tokenizers` package. It is not the current models'
tokenizer, but it is a real one: CJK text, code and long numbers cost what a BPE makes them cost,
not characters / 4. The install step (`make install`) fetches it from the package registry into the
virtualenv (`<sys.prefix>/share/batch_bridge/claude-tokenizer.json`); `BATCH_BRIDGE_TOKENIZER` names
another file. Without the file the emulator falls back to a characters / 4 rule and says so (a log
warning, `tokenizer` in `GET /_emulator/config` and in the stats).

Framing follows the conversation format that tokenizer was made for: every message costs the tokens
of its "\\n\\nHuman: " or "\\n\\nAssistant: " turn marker, a request the final "\\n\\nAssistant:" that
primes the answer. Tools cost their JSON definition plus the tool-use system prompt the API documents
(346 tokens with `tool_choice` auto/none, 313 with any/tool); a JSON-schema output format costs the
schema's JSON plus SCHEMA_INSTRUCTIONS (the emulator's assumption: the API does not publish it).

Speed: the tokenizer's own regex pre-tokenizer costs ~0.5 µs per character, which would make counting
the larger part of processing a request. Plain ASCII text is therefore split into words here, with the
same pattern run by Python's `re`, and the BPE of each distinct word is counted once; a text whose
spaces are all single (most prompts) is cut at them with `str.split` and each piece's count looked up
(~10 µs for 600 characters against ~30 µs through the pattern). Other text is
counted by the library in pieces cut where its pre-tokenizer always starts a new word, with repeated
pieces cached. Both give exactly the library's count of the whole text (tests/test_emulator_responder.py).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from functools import lru_cache
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("batch_bridge.emulator")

ENV_TOKENIZER = "BATCH_BRIDGE_TOKENIZER"
TOKENIZER_RELPATH = Path("share") / "batch_bridge" / "claude-tokenizer.json"
# The API's documented tool-use system prompt, by tool_choice (Claude 4 models, "Tool use" pricing table).
TOOL_PROMPT_AUTO = 346
TOOL_PROMPT_FORCED = 313
SCHEMA_INSTRUCTIONS = 50
PIECE_CHARS = 64
SHORT_TEXT = 2048  # texts up to this long are remembered whole (system prompts, schemas, few-shot turns)
_PIECE_CUT = re.compile(r"(?<=\S) (?=\S)")
# The byte-level pre-tokenizer's pattern (GPT-2's) for ASCII text whose only controls are \t \n \r:
# letters, digits and whitespace written out instead of \p{L}, \p{N} and \s.
# Words first (the commonest match): no contraction starts with a letter or a space, so the order of
# the alternatives that can match at one position is the pattern's own.
_ASCII_WORDS = re.compile(r" ?[A-Za-z]+|'s|'t|'re|'ve|'m|'ll|'d| ?[0-9]+| ?[^ \t\n\rA-Za-z0-9]+|[ \t\n\r]+(?![^ \t\n\r])|[ \t\n\r]+")
_NOT_PLAIN = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# A space with whitespace beside it. A plain text without one has only single spaces between two
# non-spaces, where the pre-tokenizer starts a word whatever came before (BpeCounter._ascii_count).
# Looked for as substrings, the pairs with a tab or line break only in a text that has one: a regex
# tries every position (16 µs for 600 characters, this ~1 µs).
_SPACE_BESIDE_BREAK = (" \n", "\n ", " \t", "\t ", " \r", "\r ")
# Byte-level alphabet: a byte that is not printable ASCII becomes chr(256 + b) (GPT-2's bytes_to_unicode).
_BYTE_LEVEL = {b: chr(256 + b) for b in range(33)}
IMAGE_TOKENS = 1600
PDF_TOKENS = 2000


class TokenCounter(Protocol):
    name: str  # what counts: shown in the config and stats

    def text(self, text: str) -> int: ...
    def cut(self, text: str, tokens: int) -> str: ...
    def turn(self, role: str) -> int: ...
    def request(self) -> int: ...
    def tools(self, tool_choice: Any) -> int: ...
    def schema(self) -> int: ...


class _WordCounts(dict):
    """BPE token count per pre-tokenized word, filled on first sight (so a lookup is a dict hit in C)."""

    def __init__(self, tokenize: Any) -> None:
        super().__init__()
        self._tokenize = tokenize

    def __missing__(self, word: str) -> int:
        if len(self) > 200_000:
            self.clear()
        n = self[word] = len(self._tokenize(word.translate(_BYTE_LEVEL)))
        return n


class _PieceCounts(dict):
    """Token count per piece of plain ASCII text between single spaces, filled on first sight from its
    pre-tokenized words; `lead` is what precedes a piece as it is counted (" ": the space before it)."""

    def __init__(self, words: _WordCounts, lead: str) -> None:
        super().__init__()
        self._words = words
        self._lead = lead

    def __missing__(self, piece: str) -> int:
        if len(self) > 200_000:
            self.clear()
        n = self[piece] = sum(map(self._words.__getitem__, _ASCII_WORDS.findall(self._lead + piece)))
        return n


class BpeCounter:
    """Counts with the Claude BPE."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))
        self.name = f"bpe:{path.name}"
        self.path = path
        self._turns = {role: self._count(f"\n\n{label}: ") for role, label in (("user", "Human"), ("assistant", "Assistant"))}
        self._primer = self._count("\n\nAssistant:")
        # Shared texts (system prompts, few-shot turns, schemas) recur in every request of a job, and
        # pieces of long texts recur too (the tokenizer's regex pre-tokenizer costs ~1 ms per 1,000 chars).
        self._piece = lru_cache(maxsize=8192)(self._count)
        self._texts: dict[str, int] = {}  # whole short texts: a job's system prompt is counted once
        self._words = _WordCounts(self._tok.model.tokenize)
        self._first_pieces = _PieceCounts(self._words, "")
        self._later_pieces = _PieceCounts(self._words, " ")
        self._added = [t.content for t in self._tok.get_added_tokens_decoder().values()]
        self._added_start = {a[0] for a in self._added}  # a text without these characters has no added token

    def _count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False).ids) if text else 0

    def _has_added(self, text: str) -> bool:
        return any(c in text for c in self._added_start) and any(a in text for a in self._added)

    def _ascii_count(self, text: str) -> int:
        """Plain ASCII text (the usual prompt): split into words by the byte-level pre-tokenizer's own
        pattern, here run by Python's `re` (exact for ASCII, and ~5x faster than the tokenizer's), and
        the BPE of each distinct word counted once.

        Most texts are words between single spaces. Such a text is cut at every space (`str.split`, in
        C) and each piece's count looked up, a piece after a space counted with that space: the pattern
        has no lookbehind, no word of it crosses a space with a non-space on either side, and the word
        that follows such a space begins with it, so the pieces' counts add up to the whole's. A text
        with a space beside other whitespace is split into words as a whole."""
        if "  " in text or (("\n" in text or "\t" in text or "\r" in text)
                            and any(pair in text for pair in _SPACE_BESIDE_BREAK)):
            return sum(map(self._words.__getitem__, _ASCII_WORDS.findall(text)))
        pieces = text.split(" ")
        return self._first_pieces[pieces[0]] + sum(map(self._later_pieces.__getitem__, islice(pieces, 1, None)))

    def text(self, text: str) -> int:
        """Tokens of `text`: the sum over pieces cut before a single space between two non-spaces, where
        the byte-level pre-tokenizer always starts a new word, so the sum equals the count of the whole."""
        short = len(text) <= SHORT_TEXT
        if short:
            n = self._texts.get(text)
            if n is not None:
                return n
        n = self._uncached(text)
        if short:
            if len(self._texts) > 4096:
                self._texts.clear()
            self._texts[text] = n
        return n

    def _uncached(self, text: str) -> int:
        if text.isascii() and not _NOT_PLAIN.search(text) and not self._has_added(text):
            return self._ascii_count(text)
        if len(text) <= PIECE_CHARS:
            return self._piece(text)
        total, start, n = 0, 0, len(text)
        while start < n:
            m = _PIECE_CUT.search(text, start + PIECE_CHARS) if start + PIECE_CHARS < n else None
            end = m.start() if m else n
            total += self._piece(text[start:end])
            start = end
        return total

    def cut(self, text: str, tokens: int) -> str:
        enc = self._tok.encode(text, add_special_tokens=False)
        if tokens <= 0:
            return ""
        if len(enc.ids) <= tokens:
            return text
        return text[: enc.offsets[tokens - 1][1]]

    def turn(self, role: str) -> int:
        return self._turns.get(role, self._turns["user"])

    def request(self) -> int:
        return self._primer

    def tools(self, tool_choice: Any) -> int:
        kind = tool_choice.get("type") if isinstance(tool_choice, dict) else None
        return TOOL_PROMPT_FORCED if kind in ("any", "tool") else TOOL_PROMPT_AUTO

    def schema(self) -> int:
        return SCHEMA_INSTRUCTIONS


class RuleCounter:
    """The fallback when the tokenizer file is absent: ceil(characters / 4) and fixed framing."""

    name = "fallback:characters/4 (tokenizer file absent)"

    def text(self, text: str) -> int:
        return (len(text) + 3) // 4

    def cut(self, text: str, tokens: int) -> str:
        return text[: max(tokens, 0) * 4]

    def turn(self, role: str) -> int:
        return 4

    def request(self) -> int:
        return 3

    def tools(self, tool_choice: Any) -> int:
        return 10

    def schema(self) -> int:
        return 20


def tokenizer_path() -> Path:
    """Where the tokenizer file is looked for: BATCH_BRIDGE_TOKENIZER, else the virtualenv's share dir."""
    override = os.environ.get(ENV_TOKENIZER)
    return Path(override) if override else Path(sys.prefix) / TOKENIZER_RELPATH


_lock = threading.Lock()
_counter: TokenCounter | None = None


def counter() -> TokenCounter:
    """The process's token counter, loaded on first use."""
    global _counter
    if _counter is None:
        with _lock:
            if _counter is None:
                _counter = load_counter(tokenizer_path())
    return _counter


def load_counter(path: Path) -> TokenCounter:
    if path.is_file():
        try:
            return BpeCounter(path)
        except Exception as exc:  # a truncated or foreign file: counted by the rule, and said
            log.warning("emulator: cannot read the tokenizer %s (%s); counting tokens as characters / 4", path, exc)
            return RuleCounter()
    log.warning("emulator: no tokenizer at %s; counting tokens as characters / 4. To count with it: `make install` "
                "in a clone of batch_bridge, or `pip download --no-deps anthropic==0.25.0` and unzip "
                "anthropic/tokenizer.json from that wheel to that path (or set %s to where it is)",
                path, ENV_TOKENIZER)
    return RuleCounter()


def describe() -> dict[str, Any]:
    """What counts tokens, for /_emulator/config and the stats."""
    c = counter()
    return {"counter": c.name, "path": str(getattr(c, "path", tokenizer_path())), "fallback": isinstance(c, RuleCounter)}
