"""What the bench sends: each workload's prompts, and the conversations that carry them in a
known cache state.

Workloads:
- `free`: open questions (prompts.json); the answer is the model's own text.
- `grounded`: rewrite, copy-edit or extract from a text given in the prompt; the answer is
  largely copied from it, which is where prompt-lookup speculative decoding drafts well.

Every request's conversation opens with a system message that starts with a nonce no other
request of the run has (`PromptMaker`), so two requests share at most the chat template's
first tokens and part of a nonce: a cache holds nothing of a request it was not sent. A cold
block sends such requests once; a warm block sends the same ones twice, the first pass
untimed (run.py), so every system meets its measured prompts in the same state.
"""

from __future__ import annotations

import json
import random
from importlib import resources

WORKLOADS = ("free", "grounded")
CACHE_MODES = ("cold", "warm")

Messages = list[dict[str, str]]

# What a block sends first, to open its connections: short, so it costs any workload little.
PROBE = "Say hello."

_SPELLING = (
    "Repeat this paragraph, fixing the spelling mistakes and changing nothing else:\n\n"
    "The old lighthose stood at the edge of the clif for more than a centery, guiding ships "
    "through the narow strait between the two ilands. Its keeper, a quiet man named Elias "
    "Marsh, climbed the spiral stares every evening to light the great lamp, and every morning "
    "he wrote the wether, the passing ships and the state of the sea in a worn lether book. "
    "When the harbour board decided to replace him with an automatic light, the fishermen of "
    "Port Avery signed a leter asking them to let him stay until the end of the winter, and "
    "the board, to everyones surprise, agreed. He kept the light for three more years, and "
    "when he finaly left, the whole vilage came down to the harbour to say goodbye."
)

_RENAME = (
    "Rename the variable `total` to `running_sum` in this Python code. Reply with the whole "
    "code and nothing else.\n\n"
    "```python\n"
    "def summarize(orders, tax_rate):\n"
    "    total = 0\n"
    "    count = 0\n"
    "    for order in orders:\n"
    "        if order.status == \"cancelled\":\n"
    "            continue\n"
    "        total += order.price * order.quantity\n"
    "        count += 1\n"
    "    if count == 0:\n"
    "        return {\"total\": 0, \"average\": 0, \"tax\": 0}\n"
    "    tax = total * tax_rate\n"
    "    average = total / count\n"
    "    print(f\"{count} orders, total {total:.2f}, tax {tax:.2f}\")\n"
    "    return {\"total\": total + tax, \"average\": average, \"tax\": tax}\n"
    "```"
)

_NAMES = (
    "List the names of the people that appear in this document, one per line, in the order "
    "they first appear, each with the sentence it first appears in.\n\n"
    "Minutes of the garden committee, 14 March. Present were Margaret Okafor, who chaired the "
    "meeting, Tomas Lindqvist, Aisha Rahman and Peter Novak. Margaret opened by thanking "
    "Helen Brooks for donating forty tulip bulbs to the east beds. Tomas reported that the "
    "water butt behind the shed is cracked and asked whether Samuel Ortiz, who repaired the "
    "fence last year, could look at it. Aisha proposed a seed swap for the last Saturday of "
    "April and offered to make the posters with her nephew Daniel. Peter asked that the "
    "compost rota be posted on the gate, since nobody had turned the heap since Grace Chen "
    "moved away. The meeting closed at eight, and the next one will be held at Ruth "
    "Adeyemi's house."
)

_EMAIL = (
    "Copy-edit this email: fix the capitalization and punctuation only, keep every word, and "
    "reply with the corrected email.\n\n"
    "hi jordan\n\n"
    "thanks for sending the draft of the quarterly report on friday i read it over the "
    "weekend and i think the structure works well the section on customer retention is "
    "especially clear but the numbers in the second table do not match the ones in the "
    "summary could you check which ones are right before we send it to the board also the "
    "chart on page four has no title and the colours are hard to tell apart when printed in "
    "black and white if you can fix those two things by wednesday i will review it once more "
    "and pass it on to maria\n\n"
    "best regards\n"
    "sam"
)

_RECIPE = (
    "Rewrite this recipe as a numbered list of steps, one sentence per step, keeping the "
    "original wording.\n\n"
    "To make the bread, warm three hundred millilitres of water until it is just warm to the "
    "touch. Stir in one teaspoon of sugar and seven grams of dried yeast, then leave it for "
    "ten minutes until it foams. Mix five hundred grams of strong white flour with one and a "
    "half teaspoons of salt in a large bowl. Pour in the yeast mixture and two tablespoons of "
    "olive oil, and stir until a rough dough forms. Knead the dough on a floured surface for "
    "ten minutes until it is smooth and springs back when pressed. Put it back in the bowl, "
    "cover it with a damp cloth and leave it somewhere warm for an hour. Knock it back, shape "
    "it into a loaf and put it in a greased tin. Bake it at two hundred degrees for thirty "
    "minutes, until it sounds hollow when tapped underneath."
)

_JSON = (
    "In this JSON document, rename every key \"user_id\" to \"account_id\" and change "
    "nothing else. Reply with the whole document.\n\n"
    "{\n"
    "  \"orders\": [\n"
    "    {\"order_id\": 1041, \"user_id\": 77, \"item\": \"desk lamp\", \"price\": 24.5, "
    "\"shipped\": true},\n"
    "    {\"order_id\": 1042, \"user_id\": 12, \"item\": \"notebook\", \"price\": 3.2, "
    "\"shipped\": false},\n"
    "    {\"order_id\": 1043, \"user_id\": 77, \"item\": \"pen set\", \"price\": 8.75, "
    "\"shipped\": true},\n"
    "    {\"order_id\": 1044, \"user_id\": 35, \"item\": \"backpack\", \"price\": 41.0, "
    "\"shipped\": true},\n"
    "    {\"order_id\": 1045, \"user_id\": 12, \"item\": \"stapler\", \"price\": 6.4, "
    "\"shipped\": false}\n"
    "  ],\n"
    "  \"owner\": {\"user_id\": 1, \"name\": \"shop admin\", \"role\": \"manager\"}\n"
    "}"
)

GROUNDED = [_SPELLING, _RENAME, _NAMES, _EMAIL, _RECIPE, _JSON]


def workload_prompts(workload: str) -> list[str]:
    """The user prompts of `workload`, in the order every system gets them."""
    if workload == "free":
        return json.loads(resources.files("llmserve.bench").joinpath("prompts.json").read_text())
    if workload == "grounded":
        return list(GROUNDED)
    raise ValueError(f"workload: one of {WORKLOADS}, not {workload!r}")


class PromptMaker:
    """Conversations for blocks of requests, each opening with a nonce of its own.

    The nonce leads the system message, right after the template's opening tokens, so no
    prefix of a conversation beyond them (and part of a nonce) reaches any cache before that
    conversation is sent. Nonces are random by default: a server started before the run
    (`--url`) has seen none of them either."""

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)
        self._used: set[str] = set()

    def nonce(self) -> str:
        while True:
            n = f"{self._rng.getrandbits(32):08x}"
            if n not in self._used:
                self._used.add(n)
                return n

    def conversation(self, prompt: str) -> Messages:
        return [{"role": "system", "content": f"{self.nonce()} You are a helpful assistant."},
                {"role": "user", "content": prompt}]

    def block(self, prompts: list[str], requests: int) -> list[Messages]:
        """`requests` new conversations on `prompts` in turn, from the first: every system's
        block asks the same questions in the same order."""
        return [self.conversation(prompts[i % len(prompts)]) for i in range(requests)]
