"""The text of a generated sequence as it grows: decoded at a constant cost per token, cut at
the first stop string, and handed out only once it is final, so that what is streamed and
the final text are the same string.

A token's text can depend on the tokens before it (a SentencePiece word marker drops its space
at the start of a decode; a UTF-8 character can span tokens), so each step decodes a short
window, from a few tokens back (`prefix`) to the end, and keeps what the newest tokens added
to the window's earlier text. Text that could be the beginning of a stop string is held back
until the next tokens decide it.
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"        # what decoding shows for an unfinished UTF-8 character
MAX_PENDING = 6               # tokens kept undecided at most (a UTF-8 character is <= 4 bytes)


class TextStream:
    """push(token) -> the new final text; finish() -> the rest. `text` is the whole text so
    far (cut before the stop string once `stopped`)."""

    def __init__(self, tokenizer, stops: tuple[str, ...] = (), context=()):
        """`context`: ids that come before this text (shown already): they are decoded with
        the first new tokens, so that those decode as they would after them."""
        self.tokenizer, self.stops = tokenizer, tuple(stops)
        self.ids: list[int] = [int(t) for t in context]
        self.prefix, self.read = 0, len(self.ids)   # ids[prefix:read] decoded; [read:] pending
        self.decoded = ""               # all text decoded so far (before any cut)
        self.given = 0                  # characters of `decoded` handed out
        self.checked = 0                # no stop string begins before this index of `decoded`
        self.cut: int | None = None     # where the first stop string begins

    @property
    def stopped(self) -> bool:
        return self.cut is not None

    @property
    def text(self) -> str:
        return self.decoded[:self.cut] if self.stopped else self.decoded

    def push(self, token: int) -> str:
        """Add one token -> the text that became final with it (often "", never undone)."""
        if self.stopped:
            return ""
        self.ids.append(int(token))
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        window = self.tokenizer.decode(self.ids[self.prefix:])
        whole = getattr(self.tokenizer, "whole", None)      # the tokenizer knows it is final
        unfinished = (window.endswith(REPLACEMENT) and len(self.ids) - self.read < MAX_PENDING
                      and not (whole is not None and whole(token)))
        if len(window) <= len(before) or unfinished:
            return ""
        self.decoded += window[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The text still pending or held back (the sequence has ended)."""
        if not self.stopped and self.read < len(self.ids):
            before = self.tokenizer.decode(self.ids[self.prefix:self.read])
            self.decoded += self.tokenizer.decode(self.ids[self.prefix:])[len(before):]
            self.read = len(self.ids)
        return self._release(final=True)

    def _find_stop(self) -> None:
        """Look for a stop string in the text added since the last look (and the few
        characters before it that a stop string could begin in)."""
        found = [i for i in (self.decoded.find(s, self.checked) for s in self.stops) if i >= 0]
        if found:
            self.cut = min(found)
        longest = max((len(s) for s in self.stops), default=1)
        self.checked = max(self.checked, len(self.decoded) - longest + 1)

    def _release(self, final: bool) -> str:
        if not self.stopped:
            self._find_stop()
        if self.stopped:
            end = self.cut
        elif final:
            end = len(self.decoded)
        else:                            # hold back a tail that may begin a stop string
            end = len(self.decoded) - self._possible_stop_start()
        end = max(end, self.given)
        out, self.given = self.decoded[self.given:end], end
        return out

    def _possible_stop_start(self) -> int:
        """Length of the longest tail of `decoded` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.decoded)), longest, -1):
                if self.decoded.endswith(stop[:n]):
                    longest = n
                    break
        return longest
