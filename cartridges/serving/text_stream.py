"""Tokens to text as they come: whole characters only, cut at the first stop string.

The text of a token can depend on the tokens after it (a multi-byte character split across tokens
decodes to U+FFFD until its last byte arrives), so the answer is decoded whole and only what is
settled goes out. Text that could still become the start of a stop string is held back until it
cannot, so a stop string never reaches the client, not even in part.
"""


class TextStream:
    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer = tokenizer
        self.stops = stops
        self.token_ids: list[int] = []
        self.sent = 0  # characters of the decoded answer already given out
        self.stopped = False  # a stop string appeared: the answer ends before it
        self._text = ""

    def add(self, token: int) -> str:
        """The settled text that `token` adds (possibly empty)."""
        self.token_ids.append(token)
        self._text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        end = len(self._text)
        for stop in self.stops:
            found = self._text.find(stop)
            if found != -1:
                end, self.stopped = min(end, found), True
        if self.stopped:
            self._text = self._text[:end]
            return self._take(end)
        if self._text.endswith("\ufffd"):  # a character still being completed
            end = len(self._text.rstrip("\ufffd"))
        return self._take(end - self._held_back(end))

    def flush(self) -> str:
        """Everything not given out yet: the answer is over, so a character left incomplete stays U+FFFD,
        as `cartridges ask` shows it."""
        return self._take(len(self._text))

    def _held_back(self, end: int) -> int:
        """Characters at the end that begin some stop string."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, end - self.sent), 0, -1):
                if self._text[end - size : end] == stop[:size]:
                    longest = max(longest, size)
                    break
        return longest

    def _take(self, end: int) -> str:
        if end <= self.sent:
            return ""
        piece, self.sent = self._text[self.sent : end], end
        return piece
