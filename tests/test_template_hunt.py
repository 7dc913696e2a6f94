"""Chat messages -> text -> token ids, amlx against transformers, for the chat templates of
real model families (Qwen3, Qwen2.5, Gemma 3, Llama 3.1 / 3.2, Mistral v3 and Tekken,
DeepSeek-R1-distill, Phi-3), written for these tests in the shape of the released ones
(the same Jinja features: namespaces, reversed loops, string methods, `is string` /
`is iterable` tests, tojson with indent, raise_exception, strftime_now, selectattr, dict
items and equality), into test checkpoints laid out as the releases are (template in
tokenizer_config.json, or in chat_template.jinja as newer transformers saves it).

Conversations are drawn by hypothesis: unicode, empty content, content as a list of text
parts, tool calls with arguments as a dict or JSON text, system-only, assistant-last with
continue_final_message or without a generation prompt, special tokens written literally in
user text (transformers, by default, encodes them as the special tokens: so does amlx). When
transformers refuses a conversation (the template raises, or a type error), amlx must refuse
it with ChatTemplateError.

Hostile templates at the end: each gives a ChatTemplateError and the process goes on.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer as HFBackend, processors
from transformers import AutoTokenizer

from amlx.errors import ChatTemplateError
from amlx.prompt import PromptEncoder
from amlx.tokenizer import Tokenizer

try:
    from tests.helpers.tokenizers import write_tokenizer
except ImportError:  # tests/ itself on sys.path
    from helpers.tokenizers import write_tokenizer

# ------------------------------------------------------------------------------------------ templates

QWEN3 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

GEMMA3 = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# Llama 3.1's; 3.2 takes today's date from strftime_now when no date_string is given.
LLAMA31 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

LLAMA32 = LLAMA31.replace(
    '{%- if not date_string is defined %}\n    {%- set date_string = "26 Jul 2024" %}\n{%- endif %}',
    '{%- if not date_string is defined %}\n    {%- if strftime_now is defined %}\n'
    '        {%- set date_string = strftime_now("%d %b %Y") %}\n    {%- else %}\n'
    '        {%- set date_string = "26 Jul 2024" %}\n    {%- endif %}\n{%- endif %}')
assert LLAMA32 != LLAMA31

MISTRAL_V3 = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

# Mistral Nemo's (Tekken tokenizer): no spaces around [INST], the assistant text untrimmed.
MISTRAL_TEKKEN = (MISTRAL_V3.replace('"[INST] "', '"[INST]"').replace('"[AVAILABLE_TOOLS] ["', '"[AVAILABLE_TOOLS]["')
                  .replace('"[TOOL_CALLS] ["', '"[TOOL_CALLS]["').replace("'[TOOL_RESULTS] {", "'[TOOL_RESULTS]{")
                  .replace('{{- " " + message["content"]|trim + eos_token}}', '{{- message["content"] + eos_token}}'))
assert MISTRAL_TEKKEN.count("[INST] ") == 0

DEEPSEEK_R1 = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}"
    "{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    "{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    "tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + "
    "'<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}"
    "{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + "
    "'```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}"
    "{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}"
    "{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)

PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# ------------------------------------------------------------------------------------------ checkpoints

# Each family: the helper tokenizer it starts from, the added tokens of the release
# (special or not; Phi-3's strip the whitespace on their right, as the release's do), its
# bos / eos, whether tokenizer.json's post-processor adds BOS (Llama 3, Mistral, Phi-3 and the
# DeepSeek distills do, and their templates but Phi-3's write bos_token too), and where the
# template is stored.
FAMILIES: dict[str, dict] = {
    "qwen3": dict(base="bpe", template=QWEN3, file="jinja", bos=None, eos="<|im_end|>", add_bos=False,
                  special=(), plain=()),
    "qwen25": dict(base="bpe", template=QWEN25, file="config", bos=None, eos="<|im_end|>", add_bos=False,
                   special=(), plain=()),
    "gemma3": dict(base="spm", template=GEMMA3, file="config", bos="<bos>", eos="<eos>", add_bos=True,
                   special=("<start_of_image>",), plain=()),
    "llama31": dict(base="bpe", template=LLAMA31, file="config", bos="<|begin_of_text|>", eos="<|eot_id|>",
                    add_bos=True, special=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                           "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"),
                    plain=()),
    "llama32": dict(base="bpe", template=LLAMA32, file="jinja", bos="<|begin_of_text|>", eos="<|eot_id|>",
                    add_bos=True, special=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                           "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"),
                    plain=()),
    "mistral_v3": dict(base="spm", template=MISTRAL_V3, file="config", bos="<s>", eos="</s>", add_bos=True,
                       special=("<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                                "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"), plain=()),
    "mistral_tekken": dict(base="bpe", template=MISTRAL_TEKKEN, file="config", bos="<s>", eos="</s>", add_bos=True,
                           special=("<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                                    "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"), plain=()),
    "deepseek_r1": dict(base="bpe", template=DEEPSEEK_R1, file="config", bos="<｜begin▁of▁sentence｜>",
                        eos="<｜end▁of▁sentence｜>", add_bos=True,
                        special=("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
                        plain=("<｜User｜>", "<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>",
                               "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>",
                               "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
                               "<｜tool▁output▁end｜>")),
    "phi3": dict(base="spm", template=PHI3, file="config", bos="<s>", eos="<|endoftext|>", add_bos=True,
                 special=("<s>", "</s>", "<|endoftext|>"),
                 plain=(), rstrip=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")),
}


def _family_tokens(spec: dict) -> list[str]:
    return [*spec["special"], *spec["plain"], *spec.get("rstrip", ())]


def make_family(path: Path, name: str) -> Path:
    spec = FAMILIES[name]
    write_tokenizer(path, spec["base"])
    backend = HFBackend.from_file(str(path / "tokenizer.json"))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec["special"]])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec["plain"]])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False, rstrip=True)
                                for t in spec.get("rstrip", ())])
    if spec["bos"] is not None and spec["base"] == "bpe" or spec["bos"] not in (None, "<bos>"):
        bos = spec["bos"]
        adds = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                             special_tokens=[(bos, backend.token_to_id(bos))])
        if spec["base"] == "bpe":
            adds = processors.Sequence([processors.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                                             use_regex=False), adds])
        backend.post_processor = adds
    backend.save(str(path / "tokenizer.json"))
    config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["added_tokens_decoder"] = {
        str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                 "single_word": t.single_word, "special": t.special}
        for i, t in sorted(backend.get_added_tokens_decoder().items())}
    config["bos_token"] = spec["bos"]
    config["eos_token"] = spec["eos"]
    if spec["base"] == "bpe" and name not in ("qwen3", "qwen25"):
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config.pop("additional_special_tokens", None)
    if spec["base"] == "spm" and name != "gemma3":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"  # (LlamaTokenizer: README's kept difference)
        (path / "special_tokens_map.json").unlink(missing_ok=True)
    if spec["file"] == "jinja":
        config.pop("chat_template", None)
        (path / "chat_template.jinja").write_text(spec["template"], encoding="utf-8")
    else:
        config["chat_template"] = spec["template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    out = {}
    for name in FAMILIES:
        path = make_family(tmp_path_factory.mktemp(name), name)
        out[name] = (Tokenizer.from_dir(path), AutoTokenizer.from_pretrained(path))
    return out


def test_family_checkpoints_are_what_they_claim(families):
    """The post-processors add BOS where the releases' do (so a template that writes bos_token
    too would give two, were the rendered text encoded with special tokens), and the
    tokenizers agree on plain encoding."""
    for name, (ours, hf) in families.items():
        spec = FAMILIES[name]
        expected_bos = [hf.convert_tokens_to_ids(spec["bos"])] if spec["add_bos"] else []
        assert hf.encode("hi") == ours.encode("hi") and hf.encode("hi")[:len(expected_bos)] == expected_bos, name
        for token in _family_tokens(spec):
            assert ours.token_to_id(token) == hf.convert_tokens_to_ids(token) is not None, (name, token)


def test_one_bos_where_the_template_writes_it(families):
    """A template that writes bos_token, on a tokenizer whose post-processor adds BOS too:
    the prompt's ids (as generate makes them) start with one BOS, as transformers' do; Phi-3's
    template writes none, and transformers then gives none (the rendered text is encoded
    without special tokens): amlx follows it."""
    messages = [{"role": "user", "content": "hi"}]
    for name, (ours, hf) in families.items():
        spec = FAMILIES[name]
        ids = PromptEncoder(ours, 1 << 20).ids(messages)
        assert ids == hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=False), name
        bos = ours.token_to_id(spec["bos"]) if spec["bos"] else None
        writes_bos = "bos_token" in spec["template"]
        assert ids.count(bos) == (1 if writes_bos and bos is not None else 0), name
        assert (ids[0] == bos) == (writes_bos and bos is not None), name


def test_llama32_takes_todays_date(families):
    """Without date_string, Llama 3.2's template calls strftime_now("%d %b %Y")."""
    from datetime import datetime

    ours, _ = families["llama32"]
    before = datetime.now().strftime("%d %b %Y")
    text = ours.apply_chat_template([{"role": "user", "content": "hi"}])
    after = datetime.now().strftime("%d %b %Y")
    assert f"Today Date: {before}\n" in text or f"Today Date: {after}\n" in text
    assert "Today Date: 01 Jan 2030\n" in ours.apply_chat_template([{"role": "user", "content": "hi"}],
                                                                     date_string="01 Jan 2030")


# ------------------------------------------------------------------------------------------ conversations

# Texts that templates treat specially: think blocks (split by Qwen3 and DeepSeek), tool
# response markers (Qwen3's multi-step scan), whitespace (trimmed by Gemma and Llama),
# Jinja and format syntax (must stay text), and every family's control tokens.
_TOKENS = sorted({t for spec in FAMILIES.values() for t in _family_tokens(spec)}
                 | {"<|im_start|>", "<|im_end|>", "<|endoftext|>", "<bos>", "<eos>", "<start_of_turn>",
                    "<end_of_turn>", "<think>", "</think>", "<tool_call>", "</tool_call>"})
_SNIPPETS = ["", " ", "\n", "\n\n", "  padded  ", "Café 😀 東京 ñ", "e\u0301", "<think>\nhmm\n</think>\n\nok",
             "</think>after", "<tool_response>\n42\n</tool_response>", "{{ 1 + 1 }}", "{% if x %}", "%s %d {0} {}",
             "\\n", "\"quoted\" 'single'", "None", "\u200b\ufeff", "\r\n", "\t"]

TEXT = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
    st.sampled_from(_SNIPPETS),
    st.lists(st.one_of(st.sampled_from(_SNIPPETS), st.sampled_from(_TOKENS), st.text(max_size=4)),
             min_size=1, max_size=4).map("".join),
)


def _content(text_only: bool) -> st.SearchStrategy:
    plain = TEXT
    if text_only:
        return plain
    parts = st.lists(st.one_of(st.builds(lambda t: {"type": "text", "text": t}, TEXT),
                               st.just({"type": "image"})), min_size=1, max_size=3)
    return st.one_of(plain, plain, plain, parts)


ARGUMENTS = st.one_of(
    st.dictionaries(st.sampled_from(["city", "unit", "n", "q"]),
                    st.one_of(TEXT, st.integers(-5, 10**6), st.booleans(), st.none(),
                              st.lists(st.integers(0, 3), max_size=2)), max_size=3),
    st.sampled_from(['{"city": "Paris"}', "{}", '{"q": "东京 😀"}', "not json"]),
)
CALL_ID = st.text("abcdefghijklmnopqrstuvwxyzABC0123456789", min_size=9, max_size=9)


@st.composite
def tool_call(draw):
    function = {"name": draw(st.sampled_from(["get_weather", "search", "ünïcode_tool"])),
                "arguments": draw(ARGUMENTS)}
    if draw(st.booleans()):
        return {"id": draw(CALL_ID), "type": "function", "function": function}
    return {"function": function} if draw(st.booleans()) else function  # (some templates accept the bare form)


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather — in °C, for a city 🌍",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string", "description": "e.g. \"Paris\""},
                                          "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "search", "description": "<search> & </search>",
                                      "parameters": {"type": "object", "properties": {}}}},
]


@st.composite
def conversation(draw, text_only: bool = False):
    """Mostly well-formed chats (optional system, user/assistant exchanges, tool rounds,
    reasoning), some of them reordered so that templates' checks get to refuse them."""
    content = _content(text_only)
    messages = []
    if draw(st.integers(0, 2)):
        messages.append({"role": "system", "content": draw(content)})
    for _ in range(draw(st.integers(0 if messages else 1, 3))):
        messages.append({"role": "user", "content": draw(content)})
        if draw(st.integers(0, 3)) == 0:
            calls = draw(st.lists(tool_call(), min_size=1, max_size=2))
            call_msg = {"role": "assistant", "tool_calls": calls}
            shape = draw(st.integers(0, 3))
            if shape == 1:
                call_msg["content"] = None  # (OpenAI's shape; both drop None values)
            elif shape == 2:
                call_msg["content"] = draw(TEXT)
            messages.append(call_msg)
            for call in calls:
                reply = {"role": "tool", "content": draw(content)}
                if "id" in call:
                    reply["tool_call_id"] = call["id"]
                messages.append(reply)
        if draw(st.integers(0, 3)):
            reply = {"role": "assistant", "content": draw(content)}
            if draw(st.integers(0, 3)) == 0:
                reply[draw(st.sampled_from(["reasoning_content", "reasoning", "thinking"]))] = draw(TEXT)
            messages.append(reply)
    if draw(st.integers(0, 9)) == 0:
        messages = draw(st.permutations(messages))
    return messages


def _kwargs(name: str, draw) -> dict:
    kwargs = {}
    if name == "qwen3" and draw(st.booleans()):
        kwargs["enable_thinking"] = draw(st.booleans())
    if name.startswith("llama"):
        # (always for 3.2, whose default is today's date: the two renders could straddle midnight)
        if name == "llama32" or draw(st.booleans()):
            kwargs["date_string"] = draw(st.sampled_from(["26 Jul 2024", "01 Jan 2030", "32 Foo 99999"]))
        if draw(st.integers(0, 3)) == 0:
            kwargs["builtin_tools"] = ["brave_search", "code_interpreter"]
        if draw(st.integers(0, 3)) == 0:
            kwargs["tools_in_user_message"] = False
    return kwargs


def _hf(hf, messages, **kwargs):
    try:
        return hf.apply_chat_template(messages, **kwargs)
    except Exception as exc:  # the template's own refusals and its type errors alike
        return exc


def _ours(ours, messages, **kwargs):
    try:
        return ours.apply_chat_template(messages, **kwargs)
    except ChatTemplateError as exc:
        return exc


def assert_same_prompt(name, ours, hf, messages, tools=None, add_generation_prompt=True,
                       continue_final_message=False, **kwargs):
    """Text and ids alike, or both refuse."""
    options = dict(tools=tools, add_generation_prompt=add_generation_prompt,
                   continue_final_message=continue_final_message, **kwargs)
    expected = _hf(hf, json.loads(json.dumps(messages)), tokenize=False, **options)
    got = _ours(ours, json.loads(json.dumps(messages)), **options)
    if isinstance(expected, Exception):
        assert isinstance(got, ChatTemplateError), (name, expected, got)
        return
    assert got == expected, name
    expected_ids = hf.apply_chat_template(json.loads(json.dumps(messages)), tokenize=True, return_dict=False,
                                          **options)
    assert ours.encode(got, add_special_tokens=False) == expected_ids, name
    if tools is None and not kwargs and add_generation_prompt and not continue_final_message:
        # the path a list-of-messages prompt takes in generate / complete
        assert PromptEncoder(ours, 1 << 20).ids(messages) == expected_ids, name


_SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.mark.parametrize("name", sorted(FAMILIES))
@_SETTINGS
@given(data=st.data())
def test_family_templates_match_transformers(families, name, data):
    ours, hf = families[name]
    messages = data.draw(conversation(), label="messages")
    tools = TOOLS if data.draw(st.integers(0, 2)) == 0 else None
    agp = data.draw(st.booleans(), label="add_generation_prompt")
    assert_same_prompt(name, ours, hf, messages, tools=tools, add_generation_prompt=agp,
                       **_kwargs(name, data.draw))


@pytest.mark.parametrize("name", sorted(FAMILIES))
@_SETTINGS
@given(data=st.data())
def test_family_templates_continue_the_final_message(families, name, data):
    """Assistant-last chats continued (transformers' continue_final_message), by content or,
    where the template reads it, by reasoning_content."""
    ours, hf = families[name]
    messages = [m for m in data.draw(conversation(text_only=True)) if m["role"] in ("system", "user")][:3]
    if not any(m["role"] == "user" for m in messages):
        messages.append({"role": "user", "content": data.draw(TEXT)})
    last = {"role": "assistant", "content": data.draw(TEXT)}
    field: bool | str = True
    if name == "qwen3" and data.draw(st.booleans()):
        last["reasoning_content"] = data.draw(TEXT)
        field = "reasoning_content"
    assert_same_prompt(name, ours, hf, [*messages, last], add_generation_prompt=False,
                       continue_final_message=field)


# ------------------------------------------------------------------------------------------ hostile templates

def _small_limits(ours: Tokenizer, **limits) -> Tokenizer:
    import copy

    from amlx.chat_template import TemplateLimits

    ours = copy.copy(ours)
    ours.template_limits = TemplateLimits(**{"max_output": 1 << 12, **limits})
    return ours


def test_template_variables_named_template_or_limits_reach_the_template(families):
    """They collided with render()'s own parameters (TypeError: multiple values for 'template')."""
    ours, hf = families["qwen3"]
    messages = [{"role": "user", "content": "hi"}]
    source = "{{ template }}|{{ limits }}|{{ messages[0].content }}"
    expected = hf.apply_chat_template(messages, chat_template=source, tokenize=False, template="T", limits="L")
    assert ours.apply_chat_template(messages, chat_template=source, template="T", limits="L") == expected == "T|L|hi"


@pytest.mark.parametrize("source", [
    "{{ dict.update(messages[0], content='changed') }}{{ messages[0].content }}",
    "{{ dict.setdefault(messages[0], 'extra', 'x') }}",
    "{{ dict.clear(messages[0]) }}{{ messages[0].role }}",
    # doubled through update (which returns None, so no size check saw the dict it filled)
    "{% set ns = namespace(x='ab') %}{% for i in range(64) %}{% set d = dict() %}"
    "{{- dict.update(d, a=ns.x, b=ns.x) }}{% set ns.x = d %}{% endfor %}{{ ns.x | length }}",
])
def test_dict_global_cannot_mutate(families, source):
    """`dict` is transformers' limited one (a call and fromkeys): Jinja's default, the dict type,
    let templates mutate dicts through its unbound methods, past the immutable sandbox."""
    ours, hf = families["qwen3"]
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(Exception):
        hf.apply_chat_template(messages, chat_template=source, tokenize=False)
    with pytest.raises(ChatTemplateError, match="update|setdefault|clear"):
        ours.apply_chat_template(messages, chat_template=source)
    # what templates do with dict still works, and stays measured
    source = "{{ dict(a=1, b=[2]) | tojson }}|{{ dict.fromkeys(['x', 'y'], 0) | tojson }}|{{ dict([('k', 'v')]).k }}"
    expected = hf.apply_chat_template(messages, chat_template=source, tokenize=False)
    assert ours.apply_chat_template(messages, chat_template=source) == expected
    with pytest.raises(ChatTemplateError, match="call"):
        _small_limits(ours).apply_chat_template(
            messages, chat_template="{{ dict.fromkeys(range(100000), 'x' * 100) | length }}")


_X = "messages[0].content"
# Each writes the message (4,000 characters) some thousands of times in one operation.
ONE_OPERATION_BLOWUPS = {
    "% with a mapping": ("{{ ('" + "%(a)s" * 3000 + "' % {'a': " + _X + "}) | length }}", "% formatting"),
    "% with a tuple": ("{{ ('" + "%s" * 3000 + "' % ((" + _X + ",) * 3000)) | length }}", "% formatting|repetition"),
    "%r": ("{{ ('" + "%(a)r" * 300 + "' % {'a': " + _X + "}) | length }}", "% formatting"),
    "str.format": ("{{ ('" + "{0}" * 3000 + "'.format(" + _X + ")) | length }}", "str.format"),
    "str.format_map": ("{{ ('" + "{a!r}" * 3000 + "'.format_map({'a': " + _X + "})) | length }}", "str.format_map"),
    "format filter": ("{{ ('" + "%(a)s" * 3000 + "' | format(a=" + _X + ")) | length }}", "format filter"),
    "~": ("{{ (" + " ~ ".join([_X] * 2000) + ") | length }}", "concatenation"),
    # a thousand numbers fifty lists deep: each on a line of 3,200 spaces
    "tojson indent": ("{% set ns = namespace(x=range(1000) | list) %}{% for i in range(50) %}"
                      "{% set ns.x = [ns.x] %}{% endfor %}{{ (ns.x | tojson(indent=64)) | length }}", "tojson"),
    "tojson separators": ("{{ (range(1000) | list | tojson(separators=(" + _X + ", ':'))) | length }}", "tojson"),
    "bytes.replace": ("{{ (" + _X + ".encode().replace(''.encode(), " + _X + ".encode())) | length }}", "replace"),
    "join by attribute": ("{{ ([{'a': 'x'}] * 1000) | join(" + _X + ", attribute='a') | length }}", "join"),
    "urlize target": ("{{ (('www.a.co ' * 2000) | urlize(target=" + _X + ")) | length }}", "urlize"),
    "urlize rel": ("{{ (('www.a.co ' * 2000) | urlize(rel=" + _X + ")) | length }}", "urlize"),
    # ... or under 30 dict keys of 100 characters
    "pprint": ("{% set ns = namespace(x=range(1000) | list) %}{% for i in range(30) %}"
               "{% set ns.x = {" + _X + "[:100]: ns.x} %}{% endfor %}{{ (ns.x | pprint) | length }}", "pprint"),
}


@pytest.mark.parametrize("name", sorted(ONE_OPERATION_BLOWUPS))
def test_one_operation_blowups_are_refused_before_they_run(families, name):
    """Formatting and `~` wrote an argument once per conversion (operand) naming it, up to
    the size limit each, before the result was measured (if it was: `%` never was, so a
    thousand-fold copy rendered): they are bounded before they run, so the render that is
    refused never holds more than about the limit (tracemalloc's peak)."""
    import tracemalloc

    ours, hf = families["qwen3"]
    source, reason = ONE_OPERATION_BLOWUPS[name]
    # transformers renders them (it has no limits); with a short message, so does amlx, alike
    small = [{"role": "user", "content": "ab"}]
    assert ours.apply_chat_template(small, chat_template=source) == hf.apply_chat_template(
        small, chat_template=source, tokenize=False)
    ours = _small_limits(ours)  # (compiled already, by the render above: the same template cache)
    messages = [{"role": "user", "content": "0123456789" * 400}]
    tracemalloc.start()
    try:
        with pytest.raises(ChatTemplateError, match=reason):
            ours.apply_chat_template(messages, chat_template=source)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, peak  # unchecked, the operation makes 1.2 to 12 MB


def test_formatting_and_concatenation_render_as_before(families):
    """The bounds change no result: printf conversions of every kind, str.format with specs,
    format_map, the format filter, `~` of mixed values (and inside {% autoescape %})."""
    ours, hf = families["qwen3"]
    messages = [{"role": "user", "content": "Café <b>&</b> 😀 %s {0}"}]
    source = ("{{ '%s|%r|%a|%5d|%-6.2f|%x|%c|%%|%(k)s' | replace('%(k)s', '') % (messages[0].content, 'é', '😀', 42,"
              " 3.14159, 255, 65) }}|{{ '%(a)s-%(b)05.1f' % {'a': messages[0].role, 'b': 2.5} }}|"
              "{{ '{0}|{0!r}|{1:>6}|{n:_^9}|{2[0]}'.format(messages[0].content, 7, [1, 2], n='x') }}|"
              "{{ '{role}:{content}'.format_map(messages[0]) }}|{{ '%s and %s' | format('a', 1) }}|"
              "{{ '%(x)s' | format(x=none) }}|{{ 1 ~ none ~ [1, 'a'] ~ messages[0].content ~ {'k': 2} }}|"
              "{% autoescape true %}{{ messages[0].content ~ '<i>' }}{% endautoescape %}|"
              "{{ messages | tojson(indent=2) }}{{ messages | tojson(indent='\t', separators=(';', '=')) }}|"
              "{{ messages | pprint }}{{ {'k' * 30: [messages, range(30) | list]} | pprint }}|"
              "{{ 'a\tb'.encode().expandtabs(4) }}{{ 'ab'.encode().replace(''.encode(), '-'.encode()) }}|"
              "{{ messages | join(', ', attribute='role') }}|{{ 'see www.example.com, mail a@b.co' | urlize(40, true,"
              " '_blank', 'x') }}")
    expected = hf.apply_chat_template(messages, chat_template=source, tokenize=False)
    assert ours.apply_chat_template(messages, chat_template=source) == expected


@pytest.mark.parametrize("source", [
    "{{ range(100000) | select('in', [1, 2]) | list | length }}",
    "{% for x in range(100000) | reject('ge', 0) %}{% endfor %}",
    "{{ ([messages[0]] * 100000) | selectattr('role', 'equalto', 'x') | list | length }}",
    "{{ range(100000) | select('gt', 10 ** 6) | first is undefined }}",
])
def test_tests_are_steps(families, source):
    """select / reject (and their attribute forms) run a test per item but yield only the items
    kept, so the loop that reads them saw no step for the others: with each test scanning a long
    list, a render ran minutes past its deadline. Tests count as steps (a small step budget
    here, so that nothing is timed)."""
    ours, hf = families["qwen3"]
    messages = [{"role": "user", "content": "hi"}]
    expected = hf.apply_chat_template(messages, chat_template=source, tokenize=False)
    assert ours.apply_chat_template(messages, chat_template=source) == expected
    with pytest.raises(ChatTemplateError, match="steps"):
        _small_limits(ours, max_steps=50_000, max_output=4 << 20).apply_chat_template(messages, chat_template=source)


@pytest.mark.parametrize("source, says", [
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
    ("{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}", "RecursionError"),
    ("{{ raise_exception('Conversation roles must alternate: ' ~ messages[0].role) }}",
     "^Conversation roles must alternate: user$"),
    ("{{ cycler.__init__.__globals__ }}", "SecurityError"),
    ("{% include 'other.jinja' %}", "TemplateNotFound|no loader"),
    ("{% if %}", "TemplateSyntaxError"),
])
def test_failing_templates_name_the_failure_and_the_next_render_works(families, source, says):
    """On the thread a prompt is rendered on (as generate does), the failure is a
    ChatTemplateError saying what went wrong, and the tokenizer renders the next chat."""
    import threading

    ours, hf = families["qwen3"]
    messages = [{"role": "user", "content": "hi"}]
    caught: list[BaseException] = []

    def render():
        try:
            ours.apply_chat_template(messages, chat_template=source)
        except BaseException as exc:  # noqa: BLE001 - whatever it is, the test reports it
            caught.append(exc)

    thread = threading.Thread(target=render)
    thread.start()
    thread.join()
    assert len(caught) == 1 and isinstance(caught[0], ChatTemplateError), caught
    assert re.search(says, str(caught[0])), str(caught[0])
    assert ours.apply_chat_template(messages) == hf.apply_chat_template(messages, tokenize=False,
                                                                        add_generation_prompt=True)


@pytest.mark.parametrize("codec", ["punycode", "PUNYCODE", "idna", "IDNA"])
def test_quadratic_codecs_are_refused(families, codec):
    """str.encode('punycode') takes 20 s for 8,000 distinct characters (a template writes them
    with '%c'), in one call that no step can interrupt; idna runs punycode on its labels."""
    ours, _ = families["qwen3"]
    messages = [{"role": "user", "content": "hi"}]
    for source in ("{{ ('%c%c%c' % (19968, 19969, 19970)).encode('" + codec + "') }}",
                   "{{ 'xn--bcher-kva'.encode().decode('" + codec + "') }}"):
        with pytest.raises(ChatTemplateError, match=codec.lower()):
            ours.apply_chat_template(messages, chat_template=source)
    # other codecs still work as before
    ok = "{{ 'bücher €'.encode('utf-8') | length }}|{{ 'abc'.encode('utf-16') | length }}|{{ 'x'.encode('ascii').decode() }}"
    assert ours.apply_chat_template(messages, chat_template=ok) == "11|8|x"
