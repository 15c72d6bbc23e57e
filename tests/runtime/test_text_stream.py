"""The streamed text of a sequence: the same string as decoding it whole, cut at the first stop
string, at a constant decoding cost per token."""
import random

import pytest

from infini_trt.runtime.text_stream import MAX_PENDING, TextStream
from infini_trt.runtime.tokenizer import ByteTokenizer


class WordTokenizer:
    """Words with a SentencePiece-like marker: decoding drops the space before the first
    word, so a token's text depends on what is decoded before it. Counts decoded tokens."""

    def __init__(self, words):
        self.words, self.decoded = words, []

    def decode(self, ids):
        self.decoded.append(len(ids))
        return " ".join(self.words[i] for i in ids)


def streamed(tokenizer, ids, stops=()):
    stream = TextStream(tokenizer, stops)
    pieces = []
    for token in ids:
        pieces.append(stream.push(token))
        if stream.stopped:
            break
    pieces.append(stream.finish())
    assert "".join(pieces) == stream.text
    return stream


def test_words_keep_their_spaces_and_the_cost_per_token_is_constant():
    words = ["alpha", "beta", "gamma", "delta"]
    tok = WordTokenizer(words)
    ids = [random.Random(0).randrange(4) for _ in range(2000)]
    assert streamed(tok, ids).text == " ".join(words[i] for i in ids)
    assert max(tok.decoded) <= 2                  # never the whole sequence again


@pytest.mark.parametrize("seed", range(20))
def test_bytes_with_stops_equal_the_whole_text_cut_at_the_first_stop(seed):
    rng = random.Random(seed)
    alphabet = "ab é€\n"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 60)))
    stops = tuple({"".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 4)))
                   for _ in range(rng.randrange(0, 3))})
    tok = ByteTokenizer()
    stream = streamed(tok, tok.encode(text), stops)
    found = [text.find(s) for s in stops if s in text]
    # the first stop to be completed: the one whose end comes first
    ends = sorted((text.find(s) + len(s), text.find(s)) for s in stops if s in text)
    want = text[:min(start for end, start in ends if end == ends[0][0])] if found else text
    assert stream.text == want and stream.stopped == bool(found)


def test_text_that_may_begin_a_stop_string_is_held_back_until_decided():
    tok = ByteTokenizer()
    stream = TextStream(tok, ("sky",))
    assert [stream.push(t) for t in tok.encode("a sk")] == ["a", " ", "", ""]
    assert stream.push(tok.encode("i")[0]) == "ski"         # not the stop after all
    assert [stream.push(t) for t in tok.encode(" sky!")] == [" ", "", "", "", ""]
    assert stream.stopped and stream.text == "a ski " and stream.finish() == ""


def test_an_unfinished_character_waits_a_few_tokens_at_most():
    tok = ByteTokenizer()
    stream = TextStream(tok)
    euro = tok.encode("€")                                  # 3 bytes
    assert [stream.push(t) for t in euro] == ["", "", "€"]
    lone = [0xE2] * MAX_PENDING                             # never finished: given anyway
    pieces = [stream.push(t) for t in lone]
    assert pieces[:-1] == [""] * (MAX_PENDING - 1) and pieces[-1].startswith("\ufffd")


def test_an_id_that_is_no_byte_is_given_at_once():
    """A vocabulary larger than bytes (the random `small`): such an id shows as U+FFFD, which
    is final (not the start of a character), so it is streamed with its own token."""
    stream = TextStream(ByteTokenizer())
    assert [stream.push(t) for t in (1000, 65, 0xE2, 2000)] == ["\ufffd", "A", "", "\ufffd\ufffd"]
    assert stream.finish() == "" and stream.text == "\ufffdA\ufffd\ufffd"
