from sse import stream_post


def test_health_and_stream(server, http):
    assert http.get("/health").status_code == 200
    s = stream_post(http, "/v1/chat/completions", {
        "model": "smollm2-135m-instruct", "stream": True, "max_tokens": 4, "temperature": 0,
        "messages": [{"role": "user", "content": "hi"}],
    })
    assert s.status == 200 and s.done
