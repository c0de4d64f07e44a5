"""A corpus of JSON schemas for structured output tests, each small enough that a random model,
masked, finishes it in a bounded number of tokens: every free string has a maxLength, every
array a maxItems, every recursion an optional branch."""

S = {"type": "string", "maxLength": 5}
N = {"type": "integer", "minimum": 0, "maximum": 99}


def obj(props: dict, required=None, **extra) -> dict:
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
        "additionalProperties": False,
        **extra,
    }


SCHEMAS = [
    # scalars
    {"type": "boolean"},
    {"type": "null"},
    N,
    {"type": "integer", "minimum": -50, "maximum": -10},
    {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 5},
    {"type": "number", "minimum": 0, "maximum": 10, "multipleOf": 0.5},
    {"type": "string", "maxLength": 4},
    {"type": "string", "minLength": 3, "maxLength": 6},
    {"type": "string", "pattern": "^[a-z]{2,4}$"},
    {"type": "string", "pattern": "^[A-Z][0-9]{3}$"},
    {"type": "string", "format": "date"},
    {"type": "string", "format": "uuid"},
    {"type": "string", "format": "email", "maxLength": 20},
    {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"},
    {"enum": ["red", "green", "blue"]},
    {"enum": [1, "two", None, True]},
    {"const": "fixed"},
    {"const": {"a": [1, 2]}},
    # objects
    obj({"name": S}),
    obj({"name": S, "age": N}),
    obj({"name": S, "age": N, "ok": {"type": "boolean"}}, required=["name"]),
    obj({"a": S, "b": S, "c": S}, required=["b"]),
    obj({"id": {"type": "string", "format": "uuid"}, "when": {"type": "string", "format": "date"}}),
    obj({"email": {"type": "string", "format": "email", "maxLength": 16}}),
    obj({"color": {"enum": ["red", "green"]}, "size": {"enum": ["S", "M", "L"]}}),
    obj({"kind": {"const": "point"}, "x": N, "y": N}),
    obj({"price": {"type": "number", "minimum": 0, "maximum": 100, "multipleOf": 0.25}}),
    obj({"code": {"type": "string", "pattern": "^[0-9]{3}-[0-9]{2}$"}}),
    obj({"flag": {"type": "boolean"}, "none": {"type": "null"}}),
    obj({}, required=[]),
    {
        "type": "object",
        "properties": {"a": N},
        "required": ["a"],
        "additionalProperties": False,
        "maxProperties": 1,
    },
    # nested objects
    obj({"person": obj({"name": S, "age": N})}),
    obj({"outer": obj({"inner": obj({"leaf": {"type": "boolean"}})})}),
    obj({"box": obj({"x": N, "y": N, "w": N, "h": N}), "label": S}),
    obj({"meta": obj({"tag": S}, required=[]), "n": N}, required=["n"]),
    # arrays
    {"type": "array", "items": N, "maxItems": 3},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 2},
    {"type": "array", "items": S, "minItems": 1, "maxItems": 3},
    {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 4},
    {"type": "array", "prefixItems": [N, S], "items": False},
    obj({"tags": {"type": "array", "items": S, "maxItems": 2}}),
    obj(
        {"points": {"type": "array", "items": obj({"x": N, "y": N}), "minItems": 1, "maxItems": 2}}
    ),
    {"type": "array", "items": {"type": "array", "items": N, "maxItems": 2}, "maxItems": 2},
    # anyOf / oneOf / allOf
    {"anyOf": [N, S]},
    {"oneOf": [obj({"cat": S}), obj({"dog": N})]},
    {"anyOf": [{"type": "null"}, obj({"v": N})]},
    obj({"value": {"anyOf": [{"type": "boolean"}, {"enum": ["x", "y"]}]}}),
    {
        "allOf": [
            obj({"a": N}, required=["a"]),
            {"type": "object", "properties": {"a": {"maximum": 9}}},
        ]
    },
    # $ref and $defs, recursive
    {
        "$defs": {"pt": obj({"x": N, "y": N})},
        "type": "object",
        "properties": {"from": {"$ref": "#/$defs/pt"}, "to": {"$ref": "#/$defs/pt"}},
        "required": ["from", "to"],
        "additionalProperties": False,
    },
    {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {"v": N, "next": {"$ref": "#/$defs/node"}},
                "required": ["v"],
                "additionalProperties": False,
            }
        },
        "$ref": "#/$defs/node",
    },
    {
        "$defs": {
            "tree": {
                "type": "object",
                "properties": {
                    "n": N,
                    "kids": {"type": "array", "items": {"$ref": "#/$defs/tree"}, "maxItems": 2},
                },
                "required": ["n"],
                "additionalProperties": False,
            }
        },
        "$ref": "#/$defs/tree",
    },
    {
        "definitions": {"name": S},
        "type": "array",
        "items": {"$ref": "#/definitions/name"},
        "maxItems": 2,
    },
    # a receipt, as a user would ask
    obj(
        {
            "vendor": {"type": "string", "maxLength": 8},
            "date": {"type": "string", "format": "date"},
            "total": {"type": "number", "minimum": 0, "maximum": 1000, "multipleOf": 0.01},
            "items": {
                "type": "array",
                "maxItems": 2,
                "items": obj({"name": S, "qty": {"type": "integer", "minimum": 1, "maximum": 9}}),
            },
        },
        required=["vendor", "total"],
    ),
    # a GUI action
    {
        "oneOf": [
            obj({"action": {"const": "click"}, "x": N, "y": N}),
            obj({"action": {"const": "type"}, "text": S}),
            obj({"action": {"const": "done"}}),
        ]
    },
]
