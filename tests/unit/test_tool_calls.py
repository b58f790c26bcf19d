"""Tool calls (kiln.serve.tool_calls, tool_parsers, tool_grammar): the hermes and llama3_json parsers,
whole and streamed; detection from the chat template; the grammars that force a call, run by llguidance."""

from __future__ import annotations

import itertools
import json
import re

import llguidance
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from kiln.serve.tool_calls import ContentDelta, ParsedOutput, ToolCallDelta, collect
from kiln.serve.tool_grammar import tool_call_grammar
from kiln.serve.tool_parsers import (
    HermesToolParser,
    Llama3JsonToolParser,
    detect_parser,
    get_tool_parser,
    parse_tool_calls,
)

ID = re.compile(r"call_[0-9a-f]{24}")


def calls(parsed: ParsedOutput) -> list[tuple[str, str]]:
    assert all(ID.fullmatch(c.id) for c in parsed.tool_calls)
    return [(c.name, c.arguments) for c in parsed.tool_calls]


def hermes_block(name: str, args: str, key: str = "arguments") -> str:
    return f'<tool_call>\n{{"name": {json.dumps(name)}, "{key}": {args}}}\n</tool_call>'


# --- hermes ---------------------------------------------------------------------------------------------


def test_hermes_single_call() -> None:
    out = HermesToolParser.parse(hermes_block("get_weather", '{"city": "Paris"}'))
    assert out.content is None
    assert calls(out) == [("get_weather", '{"city": "Paris"}')]


def test_hermes_content_then_several_calls() -> None:
    second = hermes_block("b", '{"x": [1, {"y": "}"}]}')
    text = "Let me look.\n\n" + hermes_block("a", "{}") + "\n" + second + "\n"
    out = parse_tool_calls(text, "hermes")
    assert out.content == "Let me look."
    assert calls(out) == [("a", "{}"), ("b", '{"x": [1, {"y": "}"}]}')]
    assert len({c.id for c in out.tool_calls}) == 2


def test_hermes_text_between_and_after_calls_is_content() -> None:
    text = "A " + hermes_block("a", "{}") + " B " + hermes_block("b", "{}") + "\nC\n"
    out = HermesToolParser.parse(text)
    assert out.content == "ABC\n"
    assert calls(out) == [("a", "{}"), ("b", "{}")]


@pytest.mark.parametrize(
    "text",
    [
        "Just an answer, no tools.",
        "hello <tool_call>not json</tool_call> bye",
        '<tool_call>\n{"name": 3, "arguments": {}}\n</tool_call>',
        '<tool_call>\n{"arguments": {"a": 1}}\n</tool_call>',
        '<tool_call>\n{"name": "f"}\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>',
        '<tool_call>\n{"arguments": {"a": 1}, bad}\n</tool_call>',  # read whole: not JSON
        "ends with a partial tag <tool_ca",
        "<tool_call>",
        "  \n",
    ],
)
def test_hermes_malformed_is_content(text: str) -> None:
    assert HermesToolParser.parse(text) == ParsedOutput(text, [])


def test_hermes_other_key_order_and_string_arguments() -> None:
    text = '<tool_call>\n{"arguments": {"q": 1}, "name": "s"}\n</tool_call>'
    assert calls(HermesToolParser.parse(text)) == [("s", '{"q": 1}')]
    text = '<tool_call>\n{"name": "s", "arguments": "{\\"q\\": 1}"}\n</tool_call>'
    assert calls(HermesToolParser.parse(text)) == [("s", '{"q": 1}')]


def test_hermes_forgives_a_missing_close_tag_and_brace() -> None:
    out = HermesToolParser.parse('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\nDone.')
    assert (out.content, calls(out)) == ("Done.", [("f", '{"a": 1}')])
    out = HermesToolParser.parse('<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>')
    assert (out.content, calls(out)) == (None, [("f", '{"a": 1}')])


def test_a_committed_call_cut_off_keeps_its_partial_arguments() -> None:
    out = HermesToolParser.parse('<tool_call>\n{"name": "f", "arguments": {"a": [1, ')
    assert calls(out) == [("f", '{"a": [1, ')]


# --- llama3_json ----------------------------------------------------------------------------------------


def test_llama3_single_call_parameters_or_arguments() -> None:
    out = Llama3JsonToolParser.parse('{"name": "get_weather", "parameters": {"city": "Paris"}}')
    assert (out.content, calls(out)) == (None, [("get_weather", '{"city": "Paris"}')])
    out = Llama3JsonToolParser.parse('\n{"name": "f", "arguments": {}}')
    assert (out.content, calls(out)) == (None, [("f", "{}")])


def test_llama3_python_tag_and_several_calls() -> None:
    text = '<|python_tag|>{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {}};'
    out = parse_tool_calls(text, "llama3_json")
    assert (out.content, calls(out)) == (None, [("a", '{"x": 1}'), ("b", "{}")])


def test_llama3_other_keys_are_read_whole() -> None:
    out = Llama3JsonToolParser.parse('{"type": "function", "name": "f", "parameters": {"a": true}}')
    assert calls(out) == [("f", '{"a": true}')]


@pytest.mark.parametrize(
    "text",
    [
        "The answer is 4.",
        'Sure: {"name": "f", "parameters": {}}',  # a call must open the message
        '{"answer": 42}',
        "<|python_tag|>brave_search.call(query='kiln')",
        "{not json}",
        "<|python_",
        "",
    ],
)
def test_llama3_not_a_call_is_content(text: str) -> None:
    assert Llama3JsonToolParser.parse(text) == ParsedOutput(text or None, [])


def test_llama3_call_cut_off_after_its_arguments_stands() -> None:
    assert calls(Llama3JsonToolParser.parse('{"name": "f", "parameters": {}')) == [("f", "{}")]


def test_llama3_text_after_the_calls_is_content() -> None:
    out = Llama3JsonToolParser.parse('{"name": "a", "parameters": {}}; oops')
    assert (out.content, calls(out)) == ("oops", [("a", "{}")])


# --- streaming ------------------------------------------------------------------------------------------


def stream(cls: type, pieces: list[str]) -> tuple[list, ParsedOutput]:
    ids = itertools.count()
    parser = cls(id_factory=lambda: f"call_{next(ids):024x}")
    deltas = [d for p in pieces for d in parser.feed(p)]
    deltas += parser.finish()
    return deltas, collect(deltas)


def test_stream_holds_back_what_may_be_a_call() -> None:
    parser = HermesToolParser()
    assert parser.feed("Hi there \n<tool_") == [ContentDelta("Hi there")]
    assert parser.feed("call>\n") == []
    assert parser.feed('{"name": "f", "arg') == []
    header, *rest = parser.feed('uments": {"a": ')
    assert header.name == "f" and header.arguments == "" and ID.fullmatch(header.id)
    assert rest == [ToolCallDelta(0, arguments='{"a": ')]
    assert parser.feed("1}}\n</tool_call>\n") == [ToolCallDelta(0, arguments="1}")]
    assert parser.finish() == []
    llama = Llama3JsonToolParser()
    assert llama.feed("  <|python") == []
    assert llama.feed("_tag|>{") == []
    assert llama.feed('"name"') == []


def test_delta_openai_shapes() -> None:
    deltas, out = stream(HermesToolParser, ["ok " + hermes_block("f", '{"a": 1}')])
    assert [type(d) for d in deltas] == [ContentDelta, ToolCallDelta, ToolCallDelta]
    assert deltas[1].to_openai() == {
        "index": 0,
        "id": "call_" + "0" * 24,
        "type": "function",
        "function": {"name": "f", "arguments": ""},
    }
    assert deltas[2].to_openai() == {"index": 0, "function": {"arguments": '{"a": 1}'}}
    assert out.tool_calls[0].to_openai()["function"] == {"name": "f", "arguments": '{"a": 1}'}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
arguments = st.dictionaries(st.text(max_size=5), json_values, max_size=3)
names = st.text(min_size=1, max_size=8)


def render_args(args: dict, ascii_only: bool) -> str:
    return json.dumps(args, ensure_ascii=ascii_only)


@settings(max_examples=150, deadline=None)
@given(st.text("ab .\n", max_size=12), st.lists(st.tuples(names, arguments, st.booleans()), max_size=3))
def test_hermes_reads_back_rendered_calls(content: str, rendered: list) -> None:
    blocks = [hermes_block(n, render_args(a, asc)) for n, a, asc in rendered]
    out = HermesToolParser.parse(content + "\n".join(blocks))
    expect = content.rstrip(" \n") if blocks else content
    assert out.content == (expect or None)
    assert calls(out) == [(n, render_args(a, asc)) for n, a, asc in rendered]


@settings(max_examples=150, deadline=None)
@given(st.booleans(), st.lists(st.tuples(names, arguments, st.booleans()), min_size=1, max_size=3))
def test_llama3_reads_back_rendered_calls(tag: bool, rendered: list) -> None:
    objs = [f'{{"name": {json.dumps(n)}, "parameters": {render_args(a, asc)}}}' for n, a, asc in rendered]
    out = Llama3JsonToolParser.parse(("<|python_tag|>" if tag else "") + "; ".join(objs))
    assert out.content is None
    assert calls(out) == [(n, render_args(a, asc)) for n, a, asc in rendered]


# Pieces that outputs are made of: calls, broken calls, tags, JSON-ish and plain text.
CALL = hermes_block("get_weather", '{"city": "Pa\\"ris}", "days": [1, 2]}')
LLAMA_CALL = '{"name": "f", "parameters": {"q": "a;b", "n": {"m": null}}}'
PIECES = st.sampled_from(
    [
        CALL,
        CALL[:30],
        CALL[:50],
        CALL.replace("</tool_call>", ""),
        hermes_block("x", "{}").replace('"name"', '"nam"'),
        '<tool_call>\n{"arguments": {}, "name": "late"}',
        "<tool_call>",
        "</tool_call>",
        "<tool_c",
        "<|python_tag|>",
        LLAMA_CALL,
        LLAMA_CALL[:20],
        "; ",
        ";",
        '{"a": 1}',
        "{",
        "}",
        '"',
        "\\",
        " ",
        "\n",
        "Hello",
        "ok.",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([HermesToolParser, Llama3JsonToolParser]), st.lists(PIECES, max_size=6), st.data())
def test_streaming_adds_up_to_the_whole_parse(cls: type, pieces: list[str], data: st.DataObject) -> None:
    text = "".join(pieces)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    whole = stream(cls, [text])[1]
    deltas, streamed = stream(cls, chunks)
    assert streamed == whole
    assert stream(cls, list(text))[1] == whole  # a character at a time
    # Each call: one header first (id, name), then argument fragments only, calls in order.
    headers = [d.index for d in deltas if isinstance(d, ToolCallDelta) and d.name is not None]
    assert headers == list(range(len(whole.tool_calls)))
    seen: set[int] = set()
    for d in deltas:
        if isinstance(d, ToolCallDelta):
            assert (d.name is not None) == (d.index not in seen) and (d.id is None) == (d.name is None)
            assert d.index == max(seen | {d.index})
            seen.add(d.index)
    plain = cls.parse(text)  # parse() itself: the same, up to the random ids
    assert (plain.content, calls(plain)) == (whole.content, [(c.name, c.arguments) for c in whole.tool_calls])


# --- detection and lookup -------------------------------------------------------------------------------

QWEN = '{%- if tools %}...<tools>{{ tool | tojson }}</tools>...<tool_call>\\n{"name": ...}</tool_call>{%- endif %}'
LLAMA31 = "{{- '<|start_header_id|>ipython<|end_header_id|>' }}{{- '<|python_tag|>' + tool_call.name }}"
LLAMA32 = "{%- if message.role == 'ipython' %}<|start_header_id|>ipython<|end_header_id|>{% endif %}"
CHATML = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{% endfor %}"


@pytest.mark.parametrize(
    ("template", "parser"),
    [
        (QWEN, "hermes"),
        (LLAMA31, "llama3_json"),
        (LLAMA32, "llama3_json"),
        (CHATML, None),
        (None, None),
        ("", None),
    ],
)
def test_detect_parser(template: str | None, parser: str | None) -> None:
    assert detect_parser(template) == parser


def test_get_tool_parser() -> None:
    assert get_tool_parser("hermes") is HermesToolParser
    with pytest.raises(ValueError, match="llama3_json"):
        get_tool_parser("mistral")


# --- grammars -------------------------------------------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"tz": {"$ref": "#/$defs/tz"}},
                "required": ["tz"],
                "$defs": {"tz": {"enum": ["UTC", "CET"]}},
            },
        },
    },
    {"type": "function", "function": {"name": "ping"}},  # no parameters: takes none
]


def byte_tokenizer(tags: tuple[str, ...] = ()) -> llguidance.LLTokenizer:
    """A byte-level BPE with no merges (any text tokenizes), eos 0, and `tags` as added tokens."""
    vocab = {"<|end|>": 0}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|end|>", special=True)])
    tok.add_tokens([AddedToken(t, special=False) for t in tags])
    return llguidance.LLTokenizer(tok.to_str(), eos_token=0)


@pytest.fixture(scope="module")
def tokenizer() -> llguidance.LLTokenizer:
    return byte_tokenizer()


def matcher(tokenizer: llguidance.LLTokenizer, lark: str) -> llguidance.LLMatcher:
    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    assert llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer) == (False, [])
    m = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    assert not m.is_error(), m.get_error()
    return m


def accepts(tokenizer: llguidance.LLTokenizer, lark: str, text: str) -> bool:
    m = matcher(tokenizer, lark)
    return m.consume_tokens(tokenizer.tokenize_str(text)) and m.is_accepting()


FORMATS = {
    "hermes": (lambda name, args: hermes_block(name, args), "\n"),
    "llama3_json": (lambda name, args: f'{{"name": {json.dumps(name)}, "parameters": {args}}}', "; "),
}
GOOD = [("get_weather", '{"city": "Paris", "days": 2}'), ("get_time", '{"tz": "UTC"}'), ("ping", "{}")]


@pytest.mark.parametrize("parser", FORMATS)
def test_required_grammar_accepts_calls_the_parser_reads(tokenizer, parser: str) -> None:
    render, sep = FORMATS[parser]
    lark = tool_call_grammar(parser, TOOLS, "required", parallel=True)
    for name, args in GOOD:
        assert accepts(tokenizer, lark, render(name, args))
    both = sep.join(render(n, a) for n, a in GOOD)
    assert accepts(tokenizer, lark, both)
    assert calls(parse_tool_calls(both, parser)) == GOOD  # what the grammar lets out, the parser reads in
    single = tool_call_grammar(parser, TOOLS, "required", parallel=False)
    assert accepts(tokenizer, single, render(*GOOD[0]))
    assert not accepts(tokenizer, single, both)


@pytest.mark.parametrize("parser", FORMATS)
@pytest.mark.parametrize(
    "bad",
    [
        ("get_wether", '{"city": "Paris"}'),  # no such function
        ("get_weather", '{"days": 2}'),  # required argument missing
        ("get_weather", '{"city": "Paris", "days": 0}'),  # below the minimum
        ("get_weather", '{"city": 7}'),  # wrong type
        ("get_time", '{"tz": "PST"}'),  # not in the $ref'd enum
        ("ping", '{"a": 1}'),  # takes no arguments
        ("get_weather", '{"city":"Paris"}'),  # not the models' spacing
    ],
)
def test_required_grammar_rejects_bad_calls(tokenizer, parser: str, bad: tuple[str, str]) -> None:
    render, _ = FORMATS[parser]
    assert not accepts(tokenizer, tool_call_grammar(parser, TOOLS, "required"), render(*bad))


def test_grammar_rejects_unfinished_calls_and_leading_text(tokenizer) -> None:
    lark = tool_call_grammar("hermes", TOOLS, "required")
    good = hermes_block(*GOOD[0])
    assert not accepts(tokenizer, lark, good.removesuffix("\n</tool_call>"))  # missing close tag
    assert not accepts(tokenizer, lark, good[:-1])
    assert not accepts(tokenizer, lark, "Sure. " + good)
    assert not accepts(tokenizer, lark, "")


@pytest.mark.parametrize("parser", FORMATS)
def test_named_function_grammar(tokenizer, parser: str) -> None:
    render, _ = FORMATS[parser]
    lark = tool_call_grammar(parser, TOOLS, {"type": "function", "function": {"name": "get_time"}}, False)
    assert accepts(tokenizer, lark, render("get_time", '{"tz": "CET"}'))
    assert not accepts(tokenizer, lark, render(*GOOD[0]))


def test_tags_that_are_added_tokens_are_matched_as_tokens() -> None:
    tags = ("<tool_call>", "</tool_call>")
    tokenizer = byte_tokenizer(tags)  # llguidance takes every added token as special, as Qwen's tags
    text = hermes_block("ping", "{}")
    assert not accepts(tokenizer, tool_call_grammar("hermes", TOOLS, "required"), text)
    assert accepts(tokenizer, tool_call_grammar("hermes", TOOLS, "required", special_tokens=tags), text)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("hermes", TOOLS, "auto"), "not enforced"),
        (("hermes", TOOLS, {"type": "function", "function": {"name": "nope"}}), "not among"),
        (("hermes", [], "required"), "at least one"),
        (("mistral", TOOLS, "required"), "no tool call grammar"),
        (("hermes", [{"type": "function", "function": {}}], "required"), "non-empty name"),
    ],
)
def test_grammar_errors(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tool_call_grammar(*args)
