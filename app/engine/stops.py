"""Stop strings matched on decoded text, not tokens: a stop string rarely aligns with tokens.

Text that might be the start of a stop string is held back until it is decided, so the stop
text itself never reaches the client.
"""

from __future__ import annotations


class StopStringMatcher:
    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, text: str) -> str:
        """Add decoded text; return what is safe to emit now. Sets `stopped` on a match."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        self._held += text
        hits = [(self._held.find(s), s) for s in self._stops]
        found = [i for i, _ in hits if i >= 0]
        if found:
            self.stopped = True
            at, self.matched = min((i, s) for i, s in hits if i >= 0)
            out, self._held = self._held[:at], ""
            return out
        keep = self._longest_partial_suffix()
        cut = len(self._held) - keep
        out, self._held = self._held[:cut], self._held[cut:]
        return out

    def flush(self) -> str:
        """The generation ended without a match: release what was held back."""
        out, self._held = ("" if self.stopped else self._held), ""
        return out

    def _longest_partial_suffix(self) -> int:
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._held)), best, -1):
                if self._held.endswith(stop[:n]):
                    best = n
                    break
        return best
