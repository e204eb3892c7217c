"""JSON schemas for the structured-output tests: each with a prompt that invites it.

They cover what OpenAI's structured outputs support: nested objects, arrays with
minItems/maxItems, enums and consts, anyOf, $ref/$defs (nested), string
formats and patterns, numbers and integers with bounds, required and optional fields,
nullable types. Every string has a maxLength (or a bounded format or pattern), every
array a maxItems, every float a multipleOf and every object `additionalProperties:
false`, so that no output of a small model can run past the token limit: a test that
sees an output cut must fail, not skip. The `time` and `date-time` formats need a
maxLength of their own: RFC 3339 allows any number of digits of a second, and SmolLM2,
given the room, writes hundreds of them.
"""

from __future__ import annotations

from typing import Any

MAX_TOKENS = 400  # generous: the bounded schemas below need far fewer


def text(max_length: int = 24, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "maxLength": max_length, **extra}


def integer(minimum: int = 0, maximum: int = 1000) -> dict[str, Any]:
    return {"type": "integer", "minimum": minimum, "maximum": maximum}


def number(minimum: float = 0, maximum: float = 1000, step: float = 0.01) -> dict[str, Any]:
    return {"type": "number", "minimum": minimum, "maximum": maximum, "multipleOf": step}


def array(items: dict[str, Any], min_items: int = 0, max_items: int = 4) -> dict[str, Any]:
    return {"type": "array", "items": items, "minItems": min_items, "maxItems": max_items}


def obj(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    """An object with only these properties; all required unless `required` says."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
    }


ADDRESS = obj({"street": text(30), "city": text(20), "zip": text(10, pattern=r"^[0-9]{5}$")})
# Three levels through $defs (a recursive tree lets a small model nest until the limit).
TREE = {
    "$defs": {
        "leaf": obj({"name": text(12)}),
        "child": obj({"name": text(12), "children": array({"$ref": "#/$defs/leaf"}, max_items=2)}),
    },
    **obj({"name": text(12), "children": array({"$ref": "#/$defs/child"}, max_items=2)}),
}

SCHEMAS: list[tuple[str, str, dict[str, Any]]] = [
    ("person", "Describe a person.", obj({"name": text(), "age": integer(0, 120)})),
    ("book", "Describe a book.", obj({"title": text(40), "author": text(), "year": integer(1400, 2030)})),
    ("weather", "Report the weather in Paris.",
     obj({"city": text(), "celsius": number(-50, 60, 0.5), "sky": {"enum": ["sunny", "cloudy", "rainy"]}})),
    ("colors", "List some colors.", obj({"colors": array(text(12), 1, 4)})),
    ("exactly_three", "Name three fruits.", obj({"fruits": array(text(12), 3, 3)})),
    ("yes_no", "Is the sky blue?", obj({"answer": {"enum": ["yes", "no"]}})),
    ("boolean", "Is water wet?", obj({"wet": {"type": "boolean"}})),
    ("nullable", "Give a middle name if any.", obj({"first": text(), "middle": {"type": ["string", "null"], "maxLength": 16}})),
    ("optional", "Describe a pet; the nickname is optional.",
     obj({"species": text(), "nickname": text(16)}, required=["species"])),
    ("all_optional", "Describe a car.", obj({"make": text(), "model": text(), "doors": integer(1, 6)}, required=[])),
    ("address", "Give an address in the USA.", obj({"name": text(), "address": ADDRESS})),
    ("nested3", "Describe a company with its headquarters.",
     obj({"company": obj({"name": text(), "hq": obj({"city": text(), "country": text()})})})),
    ("order", "Create an order of items.",
     obj({"order_id": integer(1, 99999), "items": array(obj({"sku": text(12), "qty": integer(1, 99)}), 1, 3)})),
    ("matrix", "A 2x2 matrix of small integers.", obj({"rows": array(array(integer(0, 9), 2, 2), 2, 2)})),
    ("date", "When did the Apollo 11 land? Give the date.", obj({"event": text(30), "date": {"type": "string", "format": "date"}})),
    ("date_time", "Give a meeting time.", obj({"title": text(), "starts": {"type": "string", "format": "date-time", "maxLength": 32}})),
    ("time", "What time is lunch?", obj({"lunch": {"type": "string", "format": "time", "maxLength": 20}})),
    ("email", "Give a contact email.", obj({"name": text(), "email": {"type": "string", "format": "email", "maxLength": 40}})),
    ("uuid", "Give a record with an id.", obj({"id": {"type": "string", "format": "uuid"}, "label": text()})),
    ("ipv4", "Give a server address.", obj({"host": text(), "ip": {"type": "string", "format": "ipv4"}})),
    ("hostname", "Name a web server.", obj({"hostname": {"type": "string", "format": "hostname", "maxLength": 30}})),
    ("pattern_code", "Give a product code like ABC-1234.", obj({"code": {"type": "string", "pattern": r"^[A-Z]{3}-[0-9]{4}$"}})),
    ("pattern_phone", "Give a phone number.", obj({"phone": {"type": "string", "pattern": r"^\+[0-9]{2} [0-9]{3} [0-9]{4}$"}})),
    ("pattern_hex", "Give a color in hex.", obj({"hex": {"type": "string", "pattern": r"^#[0-9a-f]{6}$"}})),
    ("min_length", "Give a password.", obj({"password": text(16, minLength=8)})),
    ("int_range", "Pick a number from 1 to 10.", obj({"n": integer(1, 10)})),
    ("negative", "Give a temperature below zero.", obj({"celsius": integer(-90, -1)})),
    ("exclusive", "Give a probability.", obj({"p": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1, "multipleOf": 0.01}})),
    ("multiple_of", "Give an even number.", obj({"even": {"type": "integer", "multipleOf": 2, "minimum": 0, "maximum": 100}})),
    ("price", "Price a sandwich.", obj({"item": text(), "price": number(0, 100, 0.01), "currency": {"enum": ["USD", "EUR"]}})),
    ("enum_int", "Rate a movie from 1 to 5 stars.", obj({"movie": text(), "stars": {"enum": [1, 2, 3, 4, 5]}})),
    ("enum_mixed", "Give a value.", obj({"value": {"enum": ["low", 1, None, True]}})),
    ("const", "Say you are version 2.", obj({"version": {"const": 2}, "name": text()})),
    ("any_of_types", "Give an id as a number or text.", obj({"id": {"anyOf": [integer(0, 999), text(8)]}})),
    ("any_of_objects", "Describe a shape.",
     obj({"shape": {"anyOf": [obj({"kind": {"const": "circle"}, "radius": integer(1, 99)}),
                              obj({"kind": {"const": "square"}, "side": integer(1, 99)})]}})),
    ("any_of_null", "Give a nickname or nothing.", obj({"nickname": {"anyOf": [text(12), {"type": "null"}]}})),
    ("ref_defs", "Give two addresses.",
     {"$defs": {"addr": obj({"city": text(), "street": text(30)})},
      **obj({"home": {"$ref": "#/$defs/addr"}, "work": {"$ref": "#/$defs/addr"}})}),
    ("nested_refs", "Describe a small family tree.", TREE),
    ("ref_array", "List people.",
     {"$defs": {"p": obj({"name": text(), "age": integer(0, 120)})},
      **obj({"people": array({"$ref": "#/$defs/p"}, 1, 3)})}),
    ("tags", "Tag a blog post.", obj({"title": text(40), "tags": array({"enum": ["tech", "food", "travel", "art"]}, 1, 3)})),
    ("steps", "Explain how to make tea in steps.", obj({"steps": array(obj({"n": integer(1, 9), "text": text(40)}), 1, 4)})),
    ("math", "Solve 2x + 3 = 7.", obj({"steps": array(text(40), 1, 3), "answer": integer(-100, 100)})),
    ("sentiment", "Classify: 'I love this phone.'",
     obj({"label": {"enum": ["positive", "negative", "neutral"]}, "confidence": number(0, 1, 0.01)})),
    ("entities", "Extract entities from 'Alice met Bob in Rome.'",
     obj({"entities": array(obj({"text": text(16), "type": {"enum": ["person", "place", "org"]}}), 1, 4)})),
    ("calendar", "Plan a week.", obj({"days": array(obj({"day": {"enum": ["mon", "tue", "wed", "thu", "fri"]}, "task": text(20)}), 1, 5)})),
    ("recipe", "Give a recipe.",
     obj({"name": text(), "servings": integer(1, 12),
          "ingredients": array(obj({"item": text(16), "grams": integer(1, 1000)}), 1, 4)})),
    ("user_profile", "Create a user profile.",
     obj({"username": text(16, pattern=r"^[a-z0-9_]{3,16}$"), "email": {"type": "string", "format": "email", "maxLength": 40},
          "age": integer(13, 120), "verified": {"type": "boolean"}}, required=["username", "email"])),
    ("coordinates", "Give the coordinates of a city.",
     obj({"city": text(), "lat": number(-90, 90, 0.01), "lon": number(-180, 180, 0.01)})),
    ("inventory", "List a store's inventory.",
     obj({"store": text(), "stock": array(obj({"name": text(12), "count": integer(0, 500), "on_sale": {"type": "boolean"}}), 0, 3)})),
    ("empty_array_ok", "List your bugs, if any.", obj({"bugs": array(text(20), 0, 2)})),
    ("deep_arrays", "Give groups of numbers.", obj({"groups": array(obj({"values": array(integer(0, 99), 1, 3)}), 1, 2)})),
    ("flight", "Book a flight.",
     obj({"from": text(3, pattern=r"^[A-Z]{3}$"), "to": text(3, pattern=r"^[A-Z]{3}$"),
          "date": {"type": "string", "format": "date"}, "seats": integer(1, 9),
          "class": {"enum": ["economy", "business"]}})),
    ("event_log", "Write a log entry.",
     obj({"level": {"enum": ["info", "warn", "error"]}, "at": {"type": "string", "format": "date-time", "maxLength": 32}, "message": text(40)})),
    ("top_level_array", "List two animals as a JSON array.", array(text(12), 2, 2)),
    ("top_level_enum", "Pick a primary color.", {"enum": ["red", "green", "blue"]}),
    ("top_level_integer", "How many legs does a spider have?", integer(0, 100)),
    ("description_only", "Summarize the plot of Hamlet.", obj({"summary": text(80, description="one sentence")})),
]  # fmt: skip


def schema_ids() -> list[str]:
    return [name for name, _, _ in SCHEMAS]
