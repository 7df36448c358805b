"""Writes qwen2.5_expected.json: the Qwen2.5 chat template (qwen2.5.jinja, as stored in
shared/models/synth/synth-qwen2-tiny-*.gguf) rendered by Hugging Face transformers' own
`render_jinja_template` (jinja2 sandbox, trim_blocks, lstrip_blocks, its tojson/raise_exception),
the reference kiln's renderer must match byte for byte.

    pip install transformers jinja2   # no torch needed
    python gen_qwen25.py
"""

import json
from pathlib import Path

from transformers.utils.chat_template_utils import render_jinja_template

HERE = Path(__file__).parent
TEMPLATE = (HERE / "qwen2.5.jinja").read_text()

GET_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city, e.g. Zürich or 東京"}},
            "required": ["city"],
        },
    },
}
GET_TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current local time",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}, "24h": {"type": "boolean"}}},
    },
}


def call(name, arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


CASES = [
    ("system_user", [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there!"}], None),
    ("no_system", [{"role": "user", "content": "What is 2+2?"}], None),
    (
        "multi_turn",
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi there!"},
            {"role": "assistant", "content": "Hello. What do you need?"},
            {"role": "user", "content": "Ünïcödé 🦙 and\nnew lines  "},
        ],
        None,
    ),
    (
        "tools",
        [
            {"role": "user", "content": "What's the weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [call("get_weather", {"city": "Paris"})]},
            {"role": "tool", "content": '{"temperature": 22, "sky": "ensoleillé"}', "tool_call_id": "call_1",
             "name": "get_weather"},
        ],
        [GET_WEATHER],
    ),
    (
        "tools_system_two_calls",
        [
            {"role": "system", "content": "Use the tools."},
            {"role": "user", "content": "Weather in Zürich, and the time?"},
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [call("get_weather", {"city": "Zürich"}), call("get_time", {"tz": "Europe/Zurich", "24h": True, "n": 1.5})],
            },
            {"role": "tool", "content": "14 °C", "tool_call_id": "a"},
            {"role": "tool", "content": "13:05", "tool_call_id": "b"},
            {"role": "assistant", "content": "14 °C at 13:05."},
            {"role": "user", "content": "Thanks"},
        ],
        [GET_WEATHER, GET_TIME],
    ),
]

out = []
for name, messages, tools in CASES:
    for agp in (True, False):
        rendered, _ = render_jinja_template(
            [messages],
            tools=tools,
            chat_template=TEMPLATE,
            add_generation_prompt=agp,
            bos_token="<|endoftext|>",
            eos_token="<|im_end|>",
        )
        out.append({"name": name, "add_generation_prompt": agp, "tools": tools, "messages": messages,
                    "expected": rendered[0]})
(HERE / "qwen2.5_expected.json").write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")
print(f"{len(out)} renderings")
