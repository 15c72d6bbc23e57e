"""The passkey retrieval task of the Infini-attention paper (Table 3), as token sequences.

    intro | filler ... | key sentence | filler ... | question | answer

The filler repeats the paper's five sentences; the key sentence ("The pass key is 71432.
Remember it. 71432 is the pass key.") sits at a chosen depth of the filler; the question ("What
is the pass key? The pass key is") is followed by the 5 answer digits. The same generator makes
the training data (`examples/passkey/`) and the evaluation prompts (`runtime/passkey.py`).

Depth 0 puts the key right after the intro ("start"), 1 as late as it may go ("end"): the key
always ends before the segment that holds the question, so that only the compressive memory can
carry it there (local attention never sees it). Everything is built from text pieces encoded
once by the model's tokenizer and concatenated as ids, so a prompt has exactly the requested
number of tokens, and is deterministic given the key (and the key given a seeded generator).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from infini_trt.export.errors import InputError

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
         "memorize them. I will quiz you about the important information there.")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
          "There and back again.")
KEY_SENTENCE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
KEY_DIGITS = 5
DEPTHS = {"start": 0.0, "middle": 0.5, "end": 1.0}
UNKNOWN = "<unk>"

# what each token of a prompt is (PasskeyPrompt.kinds)
INTRO_TOKEN, FILLER_TOKEN, KEY_TOKEN, QUESTION_TOKEN, ANSWER_TOKEN = range(5)

_WORDS = re.compile(r"\d|\w+|[^\w\s]+")      # what the bundled word-level tokenizer splits


def vocabulary() -> list[str]:
    """Every word of the task (digits as single tokens), `<unk>` first: the bundled model's
    word-level vocabulary."""
    text = " ".join([INTRO, *FILLER, KEY_SENTENCE.format(key="0123456789"), QUESTION])
    words = [UNKNOWN]
    for word in _WORDS.findall(text):
        if word not in words:
            words.append(word)
    return words


@dataclass(frozen=True)
class Part:
    """A run of prompt tokens of one kind; a filler part reads the filler period cyclically
    from `phase`, so that a million-token prompt is never held in memory."""

    kind: int
    start: int                    # position of the first token in the prompt
    tokens: np.ndarray            # the ids; for filler, one period of the filler
    length: int
    phase: int = 0

    def take(self, lo: int, hi: int) -> np.ndarray:
        """Tokens lo .. hi-1, counted from the part's start."""
        if self.kind != FILLER_TOKEN:
            return self.tokens[lo:hi]
        return self.tokens[(self.phase + np.arange(lo, hi)) % len(self.tokens)]


@dataclass(frozen=True)
class PasskeyPrompt:
    """One prompt with its answer (prompt + answer digits, to be teacher-forced), generated
    on demand: `window(start, stop)` costs only the tokens asked for."""

    parts: tuple[Part, ...]
    key: str                      # the 5 digits
    key_start: int                # position of the first token of the key sentence
    answer_start: int             # position of the first answer token

    @property
    def length(self) -> int:
        last = self.parts[-1]
        return last.start + last.length

    def window(self, start: int, stop: int, kinds: bool = False) -> np.ndarray:
        """ids (or kinds) of positions start .. stop-1, as an int64 (uint8) array."""
        stop = min(stop, self.length)
        chunks = []
        for part in self.parts:
            lo, hi = max(start, part.start), min(stop, part.start + part.length)
            if lo < hi:
                chunks.append(np.full(hi - lo, part.kind, dtype=np.uint8) if kinds
                              else part.take(lo - part.start, hi - part.start))
        return np.concatenate(chunks) if chunks else np.zeros(0, np.uint8 if kinds else np.int64)

    @property
    def ids(self) -> np.ndarray:
        """All ids (T,) int64 (for short prompts: training, tests)."""
        return self.window(0, self.length)

    @property
    def kinds(self) -> np.ndarray:
        """What each token is (T,) uint8: INTRO_TOKEN ... ANSWER_TOKEN."""
        return self.window(0, self.length, kinds=True)

    @property
    def answer_ids(self) -> np.ndarray:
        return self.window(self.answer_start, self.length)


class PasskeyGenerator:
    """Passkey prompts of exact lengths for a model with segments of `segment_len` tokens.

    `encode` is the model's tokenizer (text -> ids); pieces are encoded once, with a leading
    space where they follow other text. `decode` (ids -> text), if given, shows answers.
    """

    def __init__(self, encode: Callable[[str], Sequence[int]], segment_len: int,
                 decode: Callable[[list[int]], str] | None = None):
        self.encode = lambda text: np.asarray(list(encode(text)), dtype=np.int64)
        self.decode = decode
        self.segment_len = segment_len
        self.intro = self.encode(INTRO)
        sentences = [self.encode(" " + s) for s in FILLER]
        self.filler = np.concatenate(sentences)                     # one period of filler
        self.boundaries = np.cumsum([0] + [len(s) for s in sentences])[:-1]   # sentence starts
        self.question = self.encode(" " + QUESTION)
        # sizes do not depend on the key's digits with a tokenizer that splits digits; checked
        self.key_len = len(self.encode(" " + KEY_SENTENCE.format(key="0" * KEY_DIGITS)))
        self.answer_len = len(self.encode(" " + "0" * KEY_DIGITS))

    # ---------------------------------------------------------------------------------------
    def min_length(self) -> int:
        """The shortest prompt with the key a whole segment before the question's segment."""
        n = self.segment_len
        head = len(self.intro) + self.key_len
        return -(-head // n) * n + len(self.question) + self.answer_len

    def key_window(self, length: int) -> tuple[int, int]:
        """(earliest, latest) start of the key sentence in a prompt of `length` tokens."""
        question_at = length - len(self.question) - self.answer_len
        segment_start = question_at // self.segment_len * self.segment_len
        earliest, latest = len(self.intro), segment_start - self.key_len
        if latest < earliest:
            raise InputError(f"a {length}-token passkey prompt is too short for segments of "
                             f"{self.segment_len} tokens: the key must lie a whole segment "
                             f"before the question (at least {self.min_length()} tokens)")
        return earliest, latest

    def prompt(self, length: int, depth: float, key: str) -> PasskeyPrompt:
        """The prompt of exactly `length` tokens (answer included), the key sentence at `depth`
        (0 = right after the intro, 1 = the last position before the question's segment),
        snapped down to a filler sentence boundary."""
        if not 0.0 <= depth <= 1.0:
            raise InputError(f"depth must be between 0 and 1, got {depth}")
        if len(key) != KEY_DIGITS or not key.isdigit():
            raise InputError(f"a pass key is {KEY_DIGITS} digits, got {key!r}")
        key_ids = self.encode(" " + KEY_SENTENCE.format(key=key))
        answer = self.encode(" " + key)
        if len(key_ids) != self.key_len or len(answer) != self.answer_len:
            raise InputError("this tokenizer does not encode every pass key with the same "
                             "number of tokens; the passkey task needs one that does")
        earliest, latest = self.key_window(length)
        target = earliest + int(depth * (latest - earliest))
        before = self._snap(target - earliest)
        after = length - len(self.intro) - self.key_len - len(self.question) - len(answer) - before
        pieces = [(INTRO_TOKEN, self.intro, len(self.intro), 0),
                  (FILLER_TOKEN, self.filler, before, 0),
                  (KEY_TOKEN, key_ids, len(key_ids), 0),
                  (FILLER_TOKEN, self.filler, after, before % len(self.filler)),
                  (QUESTION_TOKEN, self.question, len(self.question), 0),
                  (ANSWER_TOKEN, answer, len(answer), 0)]
        parts, at = [], 0
        for kind, tokens, size, phase in pieces:
            parts.append(Part(kind, at, tokens, size, phase))
            at += size
        assert at == length
        return PasskeyPrompt(tuple(parts), key, len(self.intro) + before, length - len(answer))

    def _snap(self, offset: int) -> int:
        """The largest filler sentence start <= offset (offsets count from the filler start)."""
        period = len(self.filler)
        cycles, within = divmod(offset, period)
        return cycles * period + int(self.boundaries[self.boundaries <= within].max())

    @staticmethod
    def random_key(rng: np.random.Generator) -> str:
        return "".join(str(d) for d in rng.integers(0, 10, KEY_DIGITS))

    def batch(self, rng: np.random.Generator, count: int, length: int,
              depth: float | None = None) -> list[PasskeyPrompt]:
        """`count` prompts of one length with random keys; random depths when depth is None."""
        return [self.prompt(length, float(rng.uniform()) if depth is None else depth,
                            self.random_key(rng)) for _ in range(count)]
