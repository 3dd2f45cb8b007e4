"""The one incremental detokenizer: generated token ids in, text deltas out, with stop strings.

Used by the engine for every way in (generate/stream with a tokenizer, the pipeline, the CLI, the
server). Its guarantees:
- the deltas joined are exactly the final text (`text` once finished);
- a delta never ends inside a character: text whose last character is still incomplete (a trailing
  U+FFFD while a multi-byte character is split across tokens) or may still change (a tokenizer's
  `unstable_tail`, e.g. BERT's "##" pieces and punctuation clean-up) is held back;
- text that could still be the start of a stop string is held back; at a stop string the text
  ends before it and nothing after it is ever released.
The continuation is decoded after a few prompt tokens of context, so tokenizers that join or space
tokens by their neighbours give the text a whole decode gives. Only a window of recent tokens is
re-decoded at each step (older text is final), so the cost per token stays bounded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

_REPLACEMENT = "\ufffd"  # what a decoder shows for the first bytes of a character split across tokens


class TextDecoder(Protocol):
    def decode(self, ids: Sequence[int]) -> str: ...

    def unstable_tail(self, ids: Sequence[int]) -> int: ...


class Detokenizer:
    """One sequence's continuation text; `push` each generated token, `finish` at the end."""

    CONTEXT = 4  # prompt (or earlier) tokens decoded before the window, for the join
    WINDOW = 32  # the window is cut back to this many tokens once it holds twice as many

    def __init__(self, tokenizer: TextDecoder, prompt: Sequence[int], stop: Sequence[str] = ()) -> None:
        self.tok = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # the continuation text so far (final once finished)
        self.stopped = False  # a stop string ended the text
        self._final = ""  # text of ids[:_anchor], never re-decoded
        self._anchor = 0
        self._sent = 0  # characters of `text` released
        self._set_context(list(prompt[-self.CONTEXT:]))

    def push(self, token_id: int) -> str:
        """Add a generated token; return the text it releases ("" while held back).

        After a stop string `stopped` is True and every later push returns "".
        """
        if self.stopped:
            return ""
        self.ids.append(token_id)
        window = self.ids[self._anchor :]
        full = self._final + self._decode(window)
        for s in self.stop:
            at = full.find(s, max(0, self._sent - len(s) + 1))
            if at != -1:
                self.text, self.stopped = full[:at], True
                return self._release(at)
        self.text = full
        stable = self._final + self._stable(window, full[len(self._final):])
        end = len(stable.rstrip(_REPLACEMENT))
        end -= _partial_stop(stable[:end], self.stop)
        delta = self._release(end)
        if len(window) > 2 * self.WINDOW:
            self._advance(full)
        return delta

    def finish(self) -> str:
        """The rest of the text, at the end of generation (a trailing U+FFFD stays: the decode of an
        incomplete last character)."""
        return self._release(len(self.text))

    # -- internals
    def _set_context(self, ctx: list[int]) -> None:
        self._ctx, self._ctx_text = ctx, self.tok.decode(ctx)

    def _decode(self, ids: list[int]) -> str:
        full = self.tok.decode(self._ctx + ids)
        return full[len(self._ctx_text):] if full.startswith(self._ctx_text) else self.tok.decode(ids)

    def _stable(self, window: list[int], text: str) -> str:
        """The part of the window's text that later tokens cannot change."""
        hold = self.tok.unstable_tail(self._ctx + window)
        if not hold:
            return text
        older = self._decode(window[: max(0, len(window) - hold)])
        return os.path.commonprefix([older, text]).rstrip()

    def _release(self, end: int) -> str:
        if end <= self._sent:
            return ""
        out, self._sent = self.text[self._sent : end], end
        return out

    def _advance(self, full: str) -> None:
        """Make the window's first WINDOW tokens final, if their text is released and re-decoding
        the rest after them gives the same text (it does for every tokenizer gpt3zh ships)."""
        j = self._anchor + self.WINDOW
        head = self._decode(self.ids[self._anchor : j])
        final = self._final + head
        if len(final) > self._sent or head.endswith(_REPLACEMENT):
            return
        ctx, ctx_text = self._ctx, self._ctx_text
        self._set_context(self.ids[j - self.CONTEXT : j])
        if final + self._decode(self.ids[j:]) != full:
            self._ctx, self._ctx_text = ctx, ctx_text  # keep the longer window
            return
        self._final, self._anchor = final, j


def _partial_stop(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
