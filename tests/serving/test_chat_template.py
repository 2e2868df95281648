"""ChatTemplate: the model's Jinja chat template, rendered like HF apply_chat_template, sandboxed."""

from __future__ import annotations

import json
from datetime import datetime

import jinja2
import pytest

from llmserve.serving.chat_template import CHATML_TEMPLATE, ChatTemplate, TemplateError

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DEFAULT_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n"
)


# -- the SmolLM2 template ---------------------------------------------------------------------


def test_smollm2_with_generation_prompt_adds_default_system():
    t = ChatTemplate(SMOLLM2_TEMPLATE)
    out = t.render([{"role": "user", "content": "Hi!"}], add_generation_prompt=True)
    assert out == DEFAULT_SYSTEM + "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"


def test_smollm2_generation_prompt_is_the_default():
    t = ChatTemplate(SMOLLM2_TEMPLATE)
    msgs = [{"role": "user", "content": "Hi!"}]
    assert t.render(msgs) == t.render(msgs, add_generation_prompt=True)


def test_smollm2_without_generation_prompt():
    t = ChatTemplate(SMOLLM2_TEMPLATE)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
    ]
    out = t.render(msgs, add_generation_prompt=False)
    assert out == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
    )


def test_smollm2_keeps_content_verbatim():
    t = ChatTemplate(SMOLLM2_TEMPLATE)
    content = "  line one\n\n{% not a tag %} {{ nor this }} 中文 😀\n"
    out = t.render([{"role": "system", "content": "s"}, {"role": "user", "content": content}],
                   add_generation_prompt=False)
    assert out == f"<|im_start|>system\ns<|im_end|>\n<|im_start|>user\n{content}<|im_end|>\n"


def test_chatml_fallback_template():
    t = ChatTemplate(CHATML_TEMPLATE)
    out = t.render([{"role": "user", "content": "x"}])
    assert out == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
    assert t.render([{"role": "user", "content": "x"}], add_generation_prompt=False) == (
        "<|im_start|>user\nx<|im_end|>\n"
    )


# -- variables and helpers ----------------------------------------------------------------


def test_bos_and_eos_tokens_are_variables():
    t = ChatTemplate("{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}",
                     bos_token="<s>", eos_token="</s>")
    assert t.render([{"role": "user", "content": "hi"}]) == "<s>hi</s>"


def test_bos_and_eos_default_to_empty():
    t = ChatTemplate("[{{ bos_token }}|{{ eos_token }}]")
    assert t.render([]) == "[|]"


def test_extra_variables_pass_through():
    t = ChatTemplate("{% if tools %}T{% else %}none{% endif %}{{ custom }}")
    assert t.render([], tools=None, custom="!") == "none!"
    assert t.render([], tools=[{"x": 1}], custom="") == "T"


def test_undefined_variable_renders_empty_like_hf():
    t = ChatTemplate("a{{ nothing_here }}b{% if also_missing %}x{% endif %}")
    assert t.render([]) == "ab"


def test_raise_exception_raises_template_error_with_message():
    src = (
        "{% for m in messages %}{% if m['role'] == 'tool' %}"
        "{{ raise_exception('Tool messages are not supported') }}{% endif %}{% endfor %}ok"
    )
    t = ChatTemplate(src)
    assert t.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(TemplateError) as info:
        t.render([{"role": "tool", "content": "x"}])
    assert str(info.value) == "Tool messages are not supported"


def test_template_error_is_a_value_error():
    assert issubclass(TemplateError, ValueError)


def test_runtime_error_in_template_becomes_template_error():
    t = ChatTemplate("{{ messages[0]['content'] }}")
    with pytest.raises(TemplateError, match="chat template failed"):
        t.render([])


def test_syntax_error_raised_at_construction():
    with pytest.raises(jinja2.TemplateSyntaxError):
        ChatTemplate("{% for m in messages %}")


def test_strftime_now():
    t = ChatTemplate("{{ strftime_now('%Y') }}")
    assert t.render([]) == str(datetime.now().year)


def test_loop_controls_extension():
    t = ChatTemplate(
        "{% for m in messages %}{% if m['role'] == 'stop' %}{% break %}{% endif %}"
        "{% if m['role'] == 'skip' %}{% continue %}{% endif %}{{ m['content'] }}{% endfor %}"
    )
    msgs = [{"role": "u", "content": "a"}, {"role": "skip", "content": "b"},
            {"role": "u", "content": "c"}, {"role": "stop", "content": "d"},
            {"role": "u", "content": "e"}]
    assert t.render(msgs) == "ac"


# -- tojson -----------------------------------------------------------------------------------


def test_tojson_keeps_non_ascii():
    t = ChatTemplate("{{ x|tojson }}")
    out = t.render([], x={"text": "中文", "emoji": "😀"})
    assert out == '{"text": "中文", "emoji": "😀"}'
    assert "\\u" not in out


def test_tojson_does_not_html_escape():
    t = ChatTemplate("{{ x|tojson }}")
    value = {"a": "<b>&'\"</b>"}
    assert t.render([], x=value) == json.dumps(value, ensure_ascii=False)


def test_tojson_indent_and_sort_keys():
    t = ChatTemplate("{{ x|tojson(indent=2, sort_keys=true) }}")
    value = {"b": 1, "a": ["中"]}
    assert t.render([], x=value) == json.dumps(value, ensure_ascii=False, indent=2, sort_keys=True)


# -- sandbox --------------------------------------------------------------------------------


def test_sandbox_refuses_dunder_attribute_chain():
    t = ChatTemplate("{{ ''.__class__.__mro__ }}")
    with pytest.raises(TemplateError, match="unsafe"):
        t.render([])


@pytest.mark.parametrize(
    "src",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ raise_exception.__globals__ }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
    ],
)
def test_sandbox_refuses_escape_attempts(src):
    t = ChatTemplate(src)
    try:
        out = t.render([{"role": "user", "content": "x"}])
    except TemplateError:
        return
    # If it rendered at all, nothing of Python's internals leaked.
    assert "class" not in out and "module" not in out and "function" not in out


def test_sandbox_lone_dunder_access_leaks_nothing():
    t = ChatTemplate("[{{ ''.__class__ }}]")
    try:
        out = t.render([])
    except TemplateError:
        return
    assert out == "[]"


def test_sandbox_is_immutable():
    t = ChatTemplate("{% set _ = messages.append({'role': 'x'}) %}{{ messages|length }}")
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(TemplateError):
        t.render(msgs)
    assert msgs == [{"role": "user", "content": "x"}]
    t = ChatTemplate("{% set _ = messages[0].update({'content': 'y'}) %}")
    with pytest.raises(TemplateError):
        t.render(msgs)
    assert msgs[0]["content"] == "x"


def test_template_error_wraps_security_error():
    with pytest.raises(TemplateError) as info:
        ChatTemplate("{{ ''.__class__.__mro__ }}").render([])
    assert isinstance(info.value.__cause__, jinja2.exceptions.SecurityError)


# -- whitespace: trim_blocks and lstrip_blocks, as HF sets them ------------------------------


def test_trim_blocks_removes_newline_after_block_tag():
    t = ChatTemplate("{% if true %}\nA\n{% endif %}\nB")
    assert t.render([]) == "A\nB"


def test_lstrip_blocks_strips_indentation_before_block_tag():
    src = (
        "{% for m in messages %}\n"
        "    {% if m['role'] == 'user' %}\n"
        "U:{{ m['content'] }}\n"
        "    {% else %}\n"
        "A:{{ m['content'] }}\n"
        "    {% endif %}\n"
        "{% endfor %}\n"
    )
    t = ChatTemplate(src)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert t.render(msgs) == "U:hi\nA:yo\n"


def test_newline_after_expression_is_kept():
    t = ChatTemplate("{{ 'a' }}\n{{ 'b' }}\nc")
    assert t.render([]) == "a\nb\nc"


def test_single_trailing_newline_of_template_dropped_like_hf():
    # HF leaves jinja's keep_trailing_newline at False.
    assert ChatTemplate("{{ 'a' }}\n").render([]) == "a"
    assert ChatTemplate("{{ 'a' }}\n\n").render([]) == "a\n"


def test_lstrip_does_not_touch_whitespace_before_expressions_or_mid_line():
    t = ChatTemplate("  {{ 'x' }}\nk  {% if true %}y{% endif %}")
    assert t.render([]) == "  x\nk  y"


def test_explicit_whitespace_control_still_works():
    t = ChatTemplate("a   {%- if true -%}   b   {%- endif %}")
    assert t.render([]) == "ab"


def test_whitespace_matches_a_plain_jinja_env_with_hf_settings():
    src = "{% for m in messages %}\n  {{ m['content'] }}\n  {% if not loop.last %}\n,\n  {% endif %}\n{% endfor %}"
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    msgs = [{"content": "a"}, {"content": "b"}]
    assert ChatTemplate(src).render(msgs) == env.from_string(src).render(messages=msgs)


# -- continue_final_message -------------------------------------------------------------------


def test_continue_final_message_ends_at_the_last_message_s_content():
    t = ChatTemplate(SMOLLM2_TEMPLATE)
    msgs = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, I am "}]
    out = t.render(msgs, add_generation_prompt=False, continue_final_message=True)
    # stripped, as Hugging Face cuts it: the template wrote it whole, the end of turn is cut
    assert out == DEFAULT_SYSTEM + "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello, I am"


def test_continue_final_message_cuts_at_the_last_occurrence():
    t = ChatTemplate(CHATML_TEMPLATE)
    msgs = [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "ok"}]
    out = t.render(msgs, add_generation_prompt=False, continue_final_message=True)
    assert out == "<|im_start|>user\nok<|im_end|>\n<|im_start|>assistant\nok"


def test_continue_final_message_with_text_parts():
    t = ChatTemplate("{% for m in messages %}[{{ m['content'][0]['text'] }}]{% endfor %}")
    msgs = [{"role": "assistant", "content": [{"type": "text", "text": "go on"}]}]
    assert t.render(msgs, add_generation_prompt=False, continue_final_message=True) == "[go on"


@pytest.mark.parametrize("msgs, add, message", [
    ([{"role": "assistant", "content": "x"}], True, "cannot both be true"),
    ([{"role": "assistant", "content": "  "}], False, "text to continue"),
    ([], False, "text to continue"),
])
def test_continue_final_message_refusals(msgs, add, message):
    with pytest.raises(TemplateError, match=message):
        ChatTemplate(CHATML_TEMPLATE).render(msgs, add_generation_prompt=add,
                                             continue_final_message=True)


def test_continue_final_message_needs_the_content_written_as_is():
    t = ChatTemplate("{% for m in messages %}{{ m['content'] | upper }}{% endfor %}")
    with pytest.raises(TemplateError, match="no place to continue"):
        t.render([{"role": "assistant", "content": "abc"}], add_generation_prompt=False,
                 continue_final_message=True)
