"""Preparer: messages and prompts -> prompt tokens and params, checked against the model,
with the real bundled model's tokenizer and template."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from llmserve.engines.llamacpp import LlamaCppEngine
from llmserve.errors import ContextLengthExceeded, InvalidRequest
from llmserve.models import bundled_model_path
from llmserve.serving.chat_template import ChatTemplate
from llmserve.serving.prepare import Preparer
from llmserve.serving.sampling import SamplingRequest

CONTEXT = 512


@pytest.fixture(scope="module")
def engine():
    engine = LlamaCppEngine(bundled_model_path(), context_length=CONTEXT, max_sequences=2)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def preparer(engine) -> Preparer:
    template = ChatTemplate(engine.chat_template, bos_token=engine.bos_token,
                            eos_token=engine.eos_token)
    return Preparer(engine, template)


def run(coro):
    return asyncio.run(coro)


def test_chat_is_the_rendered_template_tokenized(engine, preparer):
    messages = [{"role": "user", "content": "Hi there"}]
    got = run(preparer.chat(messages, SamplingRequest(max_tokens=8), ["x"]))
    [prompt] = got.prompts
    text = ChatTemplate(engine.chat_template).render(messages, add_generation_prompt=True)
    assert prompt.tokens == engine.tokenize(text, add_bos=False)
    assert [p.max_tokens for p in prompt.params] == [8]
    assert got.stop == ["x"] and got.n == 1


def test_completion_prompts_of_text_and_token_ids(engine, preparer):
    got = run(preparer.completion(["Hello", [1, 2, 3]], SamplingRequest(n=2, max_tokens=4), []))
    assert [p.tokens for p in got.prompts] == [engine.tokenize("Hello", add_bos=engine.add_bos),
                                                [1, 2, 3]]
    assert all(len(p.params) == 2 for p in got.prompts)


@pytest.mark.parametrize("prompt, message", [
    ([""], "Prompt 0 is empty"),
    ([[5, 10**9]], "outside the vocabulary"),
])
def test_bad_completion_prompts_name_the_prompt(preparer, prompt, message):
    with pytest.raises(InvalidRequest, match=message) as err:
        run(preparer.completion(prompt, SamplingRequest(max_tokens=4), []))
    assert err.value.param == "prompt"


def test_n_above_the_batch_is_refused_before_any_work(preparer):
    with pytest.raises(InvalidRequest) as err:
        run(preparer.chat([{"role": "user", "content": "x"}], SamplingRequest(n=3), []))
    assert err.value.param == "n"


def test_a_huge_prompt_is_refused_without_tokenizing(engine, preparer, monkeypatch):
    """Far more text than the context can hold: refused by its length alone."""
    def no_tokenizing(*_a, **_k):
        raise AssertionError("tokenized")

    monkeypatch.setattr(engine, "tokenize", no_tokenizing)
    huge = "word " * 200_000
    with pytest.raises(ContextLengthExceeded) as err:
        run(preparer.chat([{"role": "user", "content": huge}], SamplingRequest(), []))
    assert err.value.param == "messages"
    with pytest.raises(ContextLengthExceeded) as err:
        run(preparer.completion([huge], SamplingRequest(max_tokens=4), []))
    assert err.value.param == "prompt"
    with pytest.raises(ContextLengthExceeded):
        run(preparer.completion([[1] * CONTEXT], SamplingRequest(max_tokens=4), []))


def test_the_length_check_never_refuses_what_fits(engine, preparer):
    """The check is a lower bound: a prompt of long tokens that fits is still served."""
    longest = max(range(engine.vocab_size), key=lambda t: len(engine.token_bytes(t)))
    text = engine.token_bytes(longest).decode("utf-8", "replace") * 50
    tokens = engine.tokenize(text, add_bos=engine.add_bos)
    assert len(tokens) < CONTEXT - 4
    got = run(preparer.completion([text], SamplingRequest(max_tokens=4), []))
    assert got.prompts[0].tokens == tokens


def test_prompt_that_does_not_fit_after_tokenizing(preparer):
    with pytest.raises(ContextLengthExceeded) as err:
        run(preparer.completion(["hello " * 400], SamplingRequest(max_tokens=200), []))
    assert err.value.param == "max_tokens"


def test_templating_runs_off_the_event_loop(engine, preparer, monkeypatch):
    """While a slow prompt is tokenized, the event loop goes on serving others."""
    real = engine.tokenize
    threads = []

    def slow_tokenize(text, *, add_bos):
        threads.append(threading.current_thread())
        time.sleep(0.5)
        return real(text, add_bos=add_bos)

    monkeypatch.setattr(engine, "tokenize", slow_tokenize)

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        await preparer.chat([{"role": "user", "content": "hi"}], SamplingRequest(max_tokens=4), [])
        task.cancel()
        return ticks

    assert run(main()) >= 20
    assert threads and threads[0] is not threading.main_thread()



# -- tokens alone (/tokenize, /detokenize) ----------------------------------------------------


def test_chat_tokens_are_the_chat_prompt(preparer):
    """With and without tools: the very tokens a chat completion reads."""
    from llmserve.serving.tool_calls import OutputRequest, Tool

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好 😀"}]
    tools = OutputRequest(tools=[Tool("f", "A function.", {"type": "object"})])
    for output in (None, tools):
        [prompt] = run(preparer.chat(messages, SamplingRequest(max_tokens=4), [], output)).prompts
        assert run(preparer.chat_tokens(messages, output)) == prompt.tokens
    assert len(run(preparer.chat_tokens(messages, tools))) > len(run(preparer.chat_tokens(messages)))


def test_chat_tokens_generation_prompt_continue_and_kwargs(engine, preparer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    template = ChatTemplate(engine.chat_template)
    closed = run(preparer.chat_tokens(messages, add_generation_prompt=False))
    assert closed == engine.tokenize(template.render(messages, add_generation_prompt=False),
                                     add_bos=False)
    opened = run(preparer.chat_tokens(messages, add_generation_prompt=False,
                                      continue_final_message=True))
    assert engine.detokenize(opened).endswith("<|im_start|>assistant\nHello")
    assert run(preparer.chat_tokens(messages, template_kwargs={"unused": 1})) == \
        run(preparer.chat_tokens(messages))
    with pytest.raises(InvalidRequest) as err:
        run(preparer.chat_tokens(messages, template_kwargs={"messages": [], "bos_token": "x"}))
    assert err.value.param == "chat_template_kwargs" and "bos_token, messages" in err.value.message
    with pytest.raises(InvalidRequest) as err:  # the template's refusal: a 400 on messages
        run(preparer.chat_tokens(messages, continue_final_message=True))
    assert err.value.param == "messages"


def test_text_tokens_and_detokenize(engine, preparer):
    text = "Hello 大海 😀"
    assert run(preparer.text_tokens(text)) == engine.tokenize(text, add_bos=engine.add_bos)
    ids = run(preparer.text_tokens(text, add_special_tokens=False))
    assert ids == engine.tokenize(text, add_bos=False)
    assert run(preparer.detokenize(ids)) == text
    assert run(preparer.token_strs(ids)) == engine.token_strs(ids)
    for bad in ([engine.vocab_size], [-1]):
        with pytest.raises(InvalidRequest, match="outside the vocabulary") as err:
            run(preparer.detokenize([1, *bad]))
        assert err.value.param == "tokens"
