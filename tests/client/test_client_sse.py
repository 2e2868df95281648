"""SSE parsing of the chat client: data and ids, comments skipped, a cut-off event dropped."""

from __future__ import annotations

from llmserve.client.sse import Event, iter_events


def test_events_with_ids_and_comments():
    lines = [": keep-alive", "", "id: 0", 'data: {"a": 1}', "", "data: x", "data: y", "",
             "id: 2", "data: [DONE]", ""]
    assert list(iter_events(lines)) == [Event('{"a": 1}', "0"), Event("x\ny"),
                                        Event("[DONE]", "2")]


def test_an_event_without_its_blank_line_is_cut_off_and_not_given():
    # A resume asks for it again from the last complete event's id.
    assert list(iter_events(["id: 0", "data: a", "", "id: 1", "data: b"])) == [Event("a", "0")]
