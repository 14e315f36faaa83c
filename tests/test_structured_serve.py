"""Structured output through `gptlab serve`: response_format json_object / json_schema, forced and free tool
calls for models with and without tool tokens, the errors, and the clients users reach for (the official
`openai` client's `parse`, LangChain's ChatOpenAI). A tiny random model over loopback: constrained decoding
makes its output parse anyway, which is the point."""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from gptlab.infer.constraints import MAX_SOURCE_BYTES, Constraint
from gptlab.infer.sampling import SamplingParams
from gptlab.serve.app import ServeConfig, create_app
from gptlab.serve.routes import wait_all
from gptlab.serve.state import ApiError, ServerState
from gptlab.tools.calls import JsonCallParser, call_schema, parse_tools, to_chat_messages
from tests._serve_helpers import LiveServer, load_engine, make_model_dir

MODEL = "tiny"
HELLO = [{"role": "user", "content": "Tell me about a person."}]
# a plain chat template of the kind imported models carry (no tool tokens): tools go through the prompt
TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}### assistant\n{% endif %}")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 6}},
                   "required": ["zone"], "additionalProperties": False}}}


class Person(BaseModel):  # bounded fields, no extra keys: a random model would otherwise write until max_tokens
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=120)
    mood: Literal["happy", "sad"]
    tags: list[Literal["a", "b", "c"]] = Field(max_length=3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module", params=["native", "template"])
def server(request, model_dir):
    """Two servers: the model in gptlab's own chat format (tool tokens), and the same model behind a plain
    chat template, as an imported model without tool tokens."""
    engine = load_engine(model_dir)
    if request.param == "template":
        engine.tokenizer.chat_template = TEMPLATE
    live = LiveServer(create_app(engine, ServeConfig(model_name=MODEL, max_batch=8)))
    live.kind = request.param
    yield live
    live.stop()


def client_for(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def post(server, path, **body):
    return httpx.post(server.url + path, json={"model": MODEL, **body}, timeout=300)


def test_openai_parse_with_a_pydantic_model(server):
    client = client_for(server)
    for seed in range(3):
        reply = client.chat.completions.parse(model=MODEL, messages=HELLO, response_format=Person, max_tokens=200,
                                              temperature=1.0, seed=seed)
        choice = reply.choices[0]
        assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Person)
        assert Person.model_validate_json(choice.message.content) == choice.message.parsed
    # streamed: the deltas concatenate to one schema-valid document
    schema = Person.model_json_schema()
    chunks = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=200, stream=True, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}})
    chunks = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    jsonschema.validate(json.loads(text), schema)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_json_object_in_both_endpoints(server):
    chat = post(server, "/v1/chat/completions", messages=HELLO, max_tokens=40, response_format={"type": "json_object"})
    completion = post(server, "/v1/completions", prompt="A JSON object:", max_tokens=40, n=2,
                      response_format={"type": "json_object"})
    texts = [chat.json()["choices"][0]["message"]["content"]] + [c["text"] for c in completion.json()["choices"]]
    finishes = [chat.json()["choices"][0]["finish_reason"]] + [c["finish_reason"] for c in completion.json()["choices"]]
    for text, finish in zip(texts, finishes):
        if finish == "stop":
            assert isinstance(json.loads(text), dict)
        else:  # cut by max_tokens: an unfinished object, never a closed-off "valid" one
            assert finish == "length" and text.startswith("{")


def test_max_tokens_inside_an_object_is_length_with_the_partial_text(server):
    schema = {"type": "object", "properties": {"description": {"type": "string"}}, "required": ["description"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "d", "schema": schema}}
    reply = post(server, "/v1/chat/completions", messages=HELLO, max_tokens=3, response_format=fmt).json()
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"].startswith('{"')
    with pytest.raises(json.JSONDecodeError):
        json.loads(choice["message"]["content"])
    streamed = client_for(server).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, stream=True,
                                                          response_format=fmt)
    finishes = [c.choices[0].finish_reason for c in streamed if c.choices]
    assert finishes[-1] == "length"


@pytest.mark.parametrize("response_format, contains", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}},
     'Unimplemented keys: ["not"]'),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"type": "strin"}}}}}, "$.properties.a.type"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}},
     "Unsatisfiable"),
    ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}, "json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "needs"),
    ({"type": "xml"}, "response_format type"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": ["v" * 100] * (MAX_SOURCE_BYTES // 100)}}},
     f"the limit is {MAX_SOURCE_BYTES}"),
])
def test_bad_response_formats_are_400s_naming_the_problem(server, response_format, contains):
    for path, body in (("/v1/chat/completions", {"messages": HELLO}), ("/v1/completions", {"prompt": "x"})):
        response = post(server, path, max_tokens=4, response_format=response_format, **body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "response_format" and contains in error["message"] and "\n" not in error["message"]


def test_a_dead_end_ends_its_own_request_while_the_batch_goes_on(model_dir):
    """After "a" this grammar needs <|endoftext|>, a stop token, which is allowed only where the grammar
    may end: no token is left. That request fails with a clear 400; the one decoding beside it finishes."""
    state = ServerState(load_engine(model_dir), ServeConfig(model_name=MODEL))
    state.scheduler.start()

    async def run():
        free = state.submit([1, 2, 3], SamplingParams(max_new_tokens=12, temperature=0), 1, None)
        dead = state.submit([1, 2, 3], SamplingParams(max_new_tokens=12, constraint=Constraint.lark(
            'start: "a" <|endoftext|>')), 1, None)
        with pytest.raises(ApiError, match="admits no token") as info:
            await wait_all(state, [dead], _never)
        assert info.value.status == 400 and info.value.code == "constraint_failed"
        (steps,) = await wait_all(state, [free], _never)
        return [e for events in steps for e in events]

    try:
        events = asyncio.run(run())
    finally:
        state.scheduler.stop()
    assert events[-1].finish_reason == "length" and sum(e.completion_tokens for e in events) == 12


async def _never() -> bool:
    return False


def _call_arguments(message, tools_by_name) -> tuple[str, dict]:
    (call,) = message.tool_calls
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, tools_by_name[call.function.name]["function"]["parameters"])
    return call.function.name, arguments


def test_forced_tool_calls_match_the_tool_schema(server):
    client = client_for(server)
    by_name = {"get_weather": WEATHER, "get_time": TIME}
    for seed in range(3):
        reply = client.chat.completions.create(model=MODEL, messages=HELLO, tools=[WEATHER, TIME], tool_choice="required",
                                               max_tokens=200, temperature=1.0, seed=seed)
        assert reply.choices[0].finish_reason == "tool_calls"
        assert _call_arguments(reply.choices[0].message, by_name)[0] in by_name
    named = client.chat.completions.create(model=MODEL, messages=HELLO, tools=[WEATHER, TIME], max_tokens=200,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert _call_arguments(named.choices[0].message, by_name)[0] == "get_time"
    # the call goes back with its output, and the model answers (any text: it is a random model)
    messages = HELLO + [named.choices[0].message, {"role": "tool", "tool_call_id": named.choices[0].message.tool_calls[0].id,
                                                   "content": "12:00"}]
    again = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, TIME], max_tokens=5)
    assert again.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # streamed: one delta carries the whole call, then finish_reason tool_calls
    chunks = [c for c in client.chat.completions.create(model=MODEL, messages=HELLO, tools=[WEATHER], stream=True,
                                                        tool_choice="required", max_tokens=200) if c.choices]
    calls = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert len(calls) == 1 and calls[0].function.name == "get_weather" and chunks[-1].choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])


@pytest.mark.parametrize("extra, contains", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
    ({"tool_choice": "sometimes"}, "tool_choice must be"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "exclude each other"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}],
      "tool_choice": "required"}, 'Unimplemented keys: ["not"]'),
])
def test_bad_tool_choices(server, extra, contains):
    response = post(server, "/v1/chat/completions", messages=HELLO, max_tokens=4, **{"tools": [WEATHER], **extra})
    assert response.status_code == 400 and contains in response.json()["error"]["message"], response.text


def test_tools_in_the_prompt_of_a_model_without_tool_tokens():
    offered = parse_tools([WEATHER])
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    messages = [{"role": "system", "content": "Be brief."}, HELLO[0],
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "snow"}, {"role": "user", "content": "And?"}]
    converted = to_chat_messages(messages, offered, native=False)
    assert [m["role"] for m in converted] == ["system", "user", "assistant", "user"]
    assert converted[0]["content"].startswith("Be brief.\n\n") and '"get_weather"' in converted[0]["content"]
    assert json.loads(converted[2]["content"]) == {"name": "get_weather", "arguments": {"city": "Oslo"}}
    assert converted[3]["content"] == "Output of get_weather: snow\n\nAnd?"


def test_json_call_parser_reads_calls_defensively_and_streams_text():
    def run(pieces, forced=False, finish="stop"):
        parser = JsonCallParser(frozenset({"get_weather"}), forced)
        out = [parser.feed(0, piece, finish if i == len(pieces) - 1 else None) for i, piece in enumerate(pieces)]
        return "".join(o[0] for o in out), [o[1] for o in out if o[1]], out[-1][2]

    content, calls, finish = run(["```json\n{'name': 'get_weather', ", "'arguments': {'city': 'Oslo',}}\n```"])
    assert (content, finish) == ("", "tool_calls") and json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    parser = JsonCallParser(frozenset({"get_weather"}))
    assert parser.feed(0, "It is", None) == ("It is", None, None)  # text streams at once
    assert run(['{"name": "get_time", "arguments": {}}']) == ('{"name": "get_time", "arguments": {}}', [], "stop")
    assert run(['{"name": "get_weather", "argu'], forced=True, finish="length") == (
        '{"name": "get_weather", "argu', [], "length")  # cut by max_tokens: the partial text, not a call


def test_call_schema_binds_each_name_to_its_parameters():
    offered = parse_tools([WEATHER, TIME])
    schema = call_schema(offered, ("get_weather", "get_time"))
    jsonschema.validate({"name": "get_time", "arguments": {"zone": "UTC"}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "get_time", "arguments": {"city": "Oslo", "unit": "C"}}, schema)
    assert call_schema(offered, ("get_time",))["properties"]["name"] == {"const": "get_time"}
    # parameters that leave additionalProperties out (LangChain, pydantic) are closed, nested objects too
    loose = parse_tools([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}}},
        "$defs": {"D": {"type": "object", "properties": {}}}}}}])
    schema = call_schema(loose, ("f",))
    jsonschema.validate({"name": "f", "arguments": {"a": {"b": 1}}}, schema)
    for extra in ({"a": {"b": 1}, "c": 2}, {"a": {"b": 1, "c": 2}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"name": "f", "arguments": extra}, schema)
    assert schema["properties"]["arguments"]["$defs"]["D"]["additionalProperties"] is False
    assert "additionalProperties" not in loose[0]["parameters"]  # the request's schema is left as it was


def test_langchain_bind_tools_and_structured_output(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=server.url + "/v1", api_key="unused", max_tokens=200, max_retries=0,
                     temperature=1.0)
    message = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("Weather in Oslo?")
    (call,) = message.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"].get("city"), str)
    for method in ("json_schema", "function_calling"):
        person = llm.with_structured_output(Person, method=method).invoke("Describe a person.")
        assert isinstance(person, Person)
