"""Tools from typed functions: schema from signature and docstring, validation, errors as observations."""

import json

import jsonschema

from gptlab.common import GptlabError
from gptlab.tools import Toolbox, tool


@tool
def scale(values: list[float], factor: float = 2.0, label: str | None = None) -> dict:
    """Multiply every value by a factor.

    Second paragraph is not part of the description.

    Args:
        values: the numbers to scale
        factor: what to multiply by,
            defaults to two
        label: an optional name
    """
    if factor == 0:
        raise GptlabError("factor must not be zero")
    if factor < 0:
        raise RuntimeError("negative")
    return {"label": label, "scaled": [v * factor for v in values]}


def test_schema_comes_from_signature_and_docstring():
    spec = scale.openai_spec()["function"]
    assert spec["name"] == "scale"
    assert spec["description"] == "Multiply every value by a factor."
    params = spec["parameters"]
    jsonschema.Draft202012Validator.check_schema(params)
    assert params["required"] == ["values"]
    assert params["properties"]["factor"]["default"] == 2.0
    assert params["properties"]["factor"]["description"] == "what to multiply by, defaults to two"
    assert params["properties"]["values"]["description"] == "the numbers to scale"
    # The schema accepts exactly what the validator accepts.
    jsonschema.validate({"values": [1, 2], "factor": 3}, params)
    # the model is not shown additionalProperties (a validation detail, costly in a small model's context);
    # the full schema, which validation uses, has it
    assert "additionalProperties" not in params
    assert not jsonschema.Draft202012Validator(scale.parameters).is_valid({"values": [1], "extra": 1})


def test_call_validates_and_reports_errors_as_observations():
    box = Toolbox([scale])
    ok = box.call("scale", '{"values": [1, 2.5], "factor": "3"}')  # lax mode: "3" -> 3.0
    assert ok.ok and json.loads(ok.output) == {"label": None, "scaled": [3.0, 7.5]}
    for name, args, expected in [
        ("nope", {}, "unknown tool 'nope' (available: scale)"),
        ("scale", "{bad", "not valid JSON"),
        ("scale", "[1]", "must be a JSON object"),
        ("scale", {"factor": 2}, "values: Field required"),
        ("scale", {"values": [1], "colour": "red"}, "colour: Extra inputs are not permitted"),
        ("scale", {"values": [1], "factor": 0}, "error: factor must not be zero"),
        ("scale", {"values": [1], "factor": -1}, "scale failed: RuntimeError: negative"),
    ]:
        result = box.call(name, args)
        assert not result.ok and result.output.startswith("error: ") and expected in result.output, result


def test_bad_definitions_are_refused():
    import pytest

    def untyped(x):
        return x

    with pytest.raises(GptlabError, match="needs a type hint"):
        tool(untyped)
    with pytest.raises(GptlabError, match="must match"):
        tool(name="bad name")(scale.fn)
    with pytest.raises(GptlabError, match="two tools"):
        Toolbox([scale, scale])
