"""The bundled model made a thinking model, for the reasoning tests: a chat template that
opens `<think>` after the generation prompt (as DeepSeek-R1's does) and a system prompt with
an example; greedy, it then writes a thought, `</think>` and an answer for the question in
`ASK`. The template reads `enable_thinking` (Qwen3's switch, through chat_template_kwargs)
and `reasoning_effort`."""

from __future__ import annotations

THINKING_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if (enable_thinking is defined and not enable_thinking)"
    " or (reasoning_effort is defined and reasoning_effort == 'none') %}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}{{ '<think>' }}{%- endif %}{%- endif %}"
)
SYSTEM = ("You think first, inside <think> and </think>, then answer.\n"
          "Example:\nUser: What is 1 + 1?\n"
          "Assistant: <think>One plus one makes two.</think>The answer is 2.\n"
          "User: What colour is the sky?\n"
          "Assistant: <think>The sky looks blue by day.</think>The sky is blue.")
ASK = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is 2 + 2?"}]
