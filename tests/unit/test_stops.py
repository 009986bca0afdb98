from __future__ import annotations

from app.engine.stops import StopStringMatcher


def feed_all(matcher: StopStringMatcher, pieces: list[str]) -> str:
    return "".join(matcher.feed(p) for p in pieces) + matcher.flush()


def test_stop_split_across_pieces_is_never_emitted() -> None:
    matcher = StopStringMatcher(["</end>"])
    assert matcher.feed("hello </e") == "hello "
    assert matcher.feed("nd> more") == ""
    assert matcher.stopped and matcher.flush() == ""


def test_partial_match_that_fails_is_released() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert feed_all(matcher, ["a ST", "ill going"]) == "a STill going"
    assert not matcher.stopped


def test_earliest_of_several_stops_wins() -> None:
    matcher = StopStringMatcher(["Paris", "France"])
    assert feed_all(matcher, ["The capital of France is Paris."]) == "The capital of "


def test_no_stops_passes_through() -> None:
    matcher = StopStringMatcher([])
    assert matcher.feed("abc") == "abc" and matcher.flush() == ""
