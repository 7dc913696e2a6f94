"""Hostile chat templates and malformed chat requests: each fails its one render or request
with a clear error (ChatTemplateError / ValueError in Python, an OpenAI-shaped 400 over HTTP),
in bounded time and memory, and everything else goes on.

Each test here was written for a fault that fuzzing found (see the commit that added it)."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amlx.chat_template import TemplateLimits
from amlx.errors import ChatTemplateError
from amlx.tokenizer import Tokenizer

try:
    from tests.helpers.tokenizers import write_tokenizer
except ImportError:  # tests/ itself on sys.path
    from helpers.tokenizers import write_tokenizer

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("chat-faults-tok")
    write_tokenizer(path, "bpe")
    return Tokenizer.from_dir(path)


def small(tok: Tokenizer, **limits) -> Tokenizer:
    """The tokenizer with smaller template limits (so a test without the fix stays quick)."""
    tok = copy.copy(tok)
    tok.template_limits = TemplateLimits(**limits)
    return tok


# -- templates: objects whose str() writes out what they hold ----------------------------------

# Each wraps X twice in an object that none of the size checks measured: a namespace, and the
# views of a dict. Doubling it 64 times made `{{ x }}` (or `~`, `%`, `|string`) write out 2**64
# copies: the render hung for good, its one Python operation never reaching the time check.
DOUBLERS = {
    "namespace": "namespace(a=X, b=X)",
    "dict values": "{'a': X, 'b': X}.values()",
    "dict items": "{'a': X, 'b': X}.items()",
    "namespace in a list": "[namespace(a=X), namespace(a=X)]",
    "values of a namespace": "dict(a=namespace(a=X), b=X).values()",
}
USES = ["{{ ns.x }}", "{{ '' ~ ns.x }}", "{{ '%s' % ns.x }}", "{{ ns.x | string | length }}",
        "{{ '{}'.format(ns.x) }}", "{{ ns.x | pprint }}"]


@settings(max_examples=30, deadline=None)
@given(doubler=st.sampled_from(sorted(DOUBLERS)), use=st.sampled_from(USES), rounds=st.integers(14, 18))
def test_doubling_through_namespaces_and_dict_views_is_refused_when_built(tok, doubler, use, rounds):
    template = ("{% set ns = namespace(x='ab') %}{% for i in range(" + str(rounds) + ") %}"
                "{% set ns.x = " + DOUBLERS[doubler].replace("X", "ns.x") + " %}{% endfor %}" + use)
    with pytest.raises(ChatTemplateError, match="would make"):  # at creation, not once written out
        small(tok, max_output=1 << 12).apply_chat_template(USER, chat_template=template)


def test_namespaces_and_dict_views_of_normal_size_still_render(tok):
    template = ("{% set ns = namespace(a=1, b='x') %}{{ ns.b }}{{ ns.a }}|{{ {'k': 'v'}.items() | list }}|"
                "{{ {'k': 'v'}.values() | list }}{% for m in messages %}|{{ m.content }}{% endfor %}")
    assert tok.apply_chat_template(USER, chat_template=template) == "x1|[('k', 'v')]|['v']|hi"


# -- templates: numbers that cost more than their size ------------------------------------------

@settings(max_examples=25, deadline=None)
@given(value=st.sampled_from(["7", "7.5", "123456789"]), method=st.sampled_from(["", ", 'floor'", ", 'ceil'"]),
       precision=st.integers(100_000, 1_000_000).flatmap(lambda n: st.sampled_from([n, -n])))
def test_round_with_a_huge_precision_is_refused(tok, value, method, precision):
    """`7|round(-10**9)` and `x|round(10**9, 'floor')` compute 10 ** precision exactly: the
    render hung (10**7 alone takes 7 s). The precision is refused before. (Smaller precisions
    here, so that the test fails quickly without the check.)"""
    template = "{{ " + value + " | round(" + str(precision) + method + ") }}"
    with pytest.raises(ChatTemplateError, match="round filter's precision"):
        tok.apply_chat_template(USER, chat_template=template)


def test_round_of_ordinary_precisions_still_works(tok):
    assert tok.apply_chat_template(USER, chat_template="{{ 2.567 | round(2) }} {{ 2.5 | round(0, 'ceil') }} "
                                   "{{ 1234 | round(-2) }} {{ 1.25 | round(precision=1, method='floor') }}") == \
        "2.57 3.0 1200 1.2"


@pytest.mark.parametrize("call", ["(5).to_bytes(10**8, 'big')", "(5).to_bytes(length=10**8, byteorder='big')"])
def test_int_to_bytes_of_a_huge_length_is_refused_before_it_allocates(tok, call):
    """`(5).to_bytes(2 * 10**9, 'big')` allocated 2 GB before its result was measured (and a
    larger length raised MemoryError, or took the machine's memory)."""
    with pytest.raises(ChatTemplateError, match="int.to_bytes would make"):
        small(tok, max_output=1 << 12).apply_chat_template(USER, chat_template="{{ " + call + " | length }}")
    assert tok.apply_chat_template(USER, chat_template="{{ (258).to_bytes(2, 'big') | list }}") == "[1, 2]"


# -- templates: too large to compile -------------------------------------------------------------

def test_a_template_too_large_to_compile_is_refused_after_counting_its_tokens(tok):
    """Jinja compiles with no limit: a 700 KB template of `{{ a }}` took 9 s and 1.1 GB to
    compile, and 7 MB would take 90 s and 11 GB, once for every request (a failed compile is
    not cached). It is refused after its first 100,000 tokens are counted."""
    template = "{{ messages[0].content }}" * 40_000  # 240,000 tokens
    with pytest.raises(ChatTemplateError, match="more than 100000 Jinja tokens"):
        tok.apply_chat_template(USER, chat_template=template)
    plain = "x" * 3_000_000 + "{{ messages[0].content }}"  # a long text is one token, cheap to compile
    assert tok.apply_chat_template(USER, chat_template=plain).endswith("xhi")
