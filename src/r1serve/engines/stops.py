"""Stop strings for engines that produce tokens: where streamed text must end."""

from __future__ import annotations


class StopMatcher:
    """Finds the first stop string in streamed text, holding back only what could still start one.

    ``feed`` returns the text safe to emit and whether a stop string was hit (text after it is dropped).
    """

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""
        self._longest = max((len(s) for s in self._stops), default=0)

    def feed(self, text: str) -> tuple[str, bool]:
        if not self._stops:
            return text, False
        buf = self._held + text
        first = min((i for i in (buf.find(s) for s in self._stops) if i >= 0), default=-1)
        if first >= 0:
            self._held = ""
            return buf[:first], True
        keep = self._partial_suffix(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _partial_suffix(self, buf: str) -> int:
        # Longest suffix of buf that is a proper prefix of some stop string.
        for n in range(min(len(buf), self._longest - 1), 0, -1):
            tail = buf[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0
