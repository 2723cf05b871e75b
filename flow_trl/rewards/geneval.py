"""GenEval-style prompt metadata: object clauses, relations, and a parser for GenEval's prompt grammar.

GenEval (Ghosh et al. 2023) writes its prompts from six templates, one per task family (:data:`TAGS`):

- ``single_object``: "a photo of a bench"
- ``two_object``: "a photo of a toilet and a computer mouse"
- ``counting``: "a photo of three sheep" (two to four objects, see :data:`NUMBER_WORDS`)
- ``colors``: "a photo of a pink car"
- ``position``: "a photo of a dog right of a teddy bear"
- ``color_attr``: "a photo of a red umbrella and a blue cow"

A prompt's metadata (:class:`GenEvalMetadata`) is its ``tag``, its ``objects`` (one :class:`Clause` per noun phrase)
and its ``relation``, which reads "objects[0] <relation> objects[1]". Datasets carry the same metadata as
``objects`` and ``relation`` columns; :func:`parse_geneval_prompt` recovers it from the prompt text when they do not.
Object names are GenEval's vocabulary, the 80 COCO classes (:data:`COCO_CLASSES`), or any other noun.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, TypedDict


TAGS = ("single_object", "colors", "two_object", "counting", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
TEMPLATES = ("a photo of",)

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "computer mouse", "tv remote", "computer keyboard", "cell phone", "microwave", "oven", "toaster",
    "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
IRREGULAR_PLURALS = {
    "person": ("people", "persons"),
    "sheep": ("sheep",),
    "skis": ("skis",),
    "knife": ("knives",),
    "computer mouse": ("computer mice",),
    "scissors": ("scissors",),
    "broccoli": ("broccoli", "broccolis"),
}  # plural forms of COCO classes that the English suffix rules of `pluralize` do not produce
MAX_NOUN_WORDS = 3  # longer "nouns" are free-form text, not a GenEval object name
_NOT_IN_A_NOUN = {"a", "an", "the", "of", "and", "with", "on", "in", "at", "one", "five", "six", "seven", "eight",
                  "nine", "ten", *RELATIONS, *NUMBER_WORDS.values()}  # fmt: skip


class Clause(TypedDict):
    """One noun phrase of a prompt: `count` objects named `shape` (any object noun, singular), of `color` or of any
    colour (`None`). The key is ``shape`` because the shapes world's datasets use the same columns."""

    shape: str
    color: str | None
    count: int


class GenEvalMetadata(TypedDict):
    """A prompt's metadata: its GenEval family (one of :data:`TAGS`), its object clauses and its relation (``None``
    or one of :data:`RELATIONS`, between exactly two clauses)."""

    tag: str
    objects: list[Clause]
    relation: str | None


def make_clause(shape: str, color: str | None = None, count: int = 1) -> Clause:
    """A :class:`Clause`."""
    return {"shape": shape, "color": color, "count": count}


def pluralize(noun: str) -> str:
    """The plural of an object noun: the COCO irregulars of :data:`IRREGULAR_PLURALS`, else English suffix rules on
    the last word (``bus -> buses``, ``hair drier -> hair driers``, ``strawberry -> strawberries``)."""
    if noun in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[noun][0]
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in ("a", "e", "i", "o", "u", ""):
        return noun[:-1] + "ies"
    return noun + "s"


def noun_phrase(item: Clause) -> str:
    """A clause as GenEval writes it: ``"a dog"``, ``"an orange cat"``, ``"three wine glasses"``."""
    color = [item["color"]] if item["color"] else []
    if item["count"] == 1:
        words = [*color, item["shape"]]
        return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)
    return " ".join([NUMBER_WORDS[item["count"]], *color, pluralize(item["shape"])])


_SINGULARS = {
    **{pluralize(noun): noun for noun in COCO_CLASSES},
    **{plural: noun for noun, plurals in IRREGULAR_PLURALS.items() for plural in plurals},
}


def singularize(noun: str) -> str:
    """The singular of a plural object noun: exact for the COCO classes, else the inverse of English suffix rules
    (``strawberries -> strawberry``, ``boxes -> box``, ``horses -> horse``); a noun that is not plural is kept."""
    if noun in _SINGULARS:
        return _SINGULARS[noun]
    if noun.endswith("ies") and len(noun) > 4:
        return noun[:-3] + "y"
    if noun.endswith(("sses", "xes", "zes", "ches", "shes")):
        return noun[:-2]
    if noun.endswith("s") and not noun.endswith("ss"):
        return noun[:-1]
    return noun


def _parse_noun_phrase(text: str, colors: Collection[str], nouns: Collection[str] | None) -> Clause:
    """``"a red dog"``, ``"an airplane"``, ``"three hot dogs"`` -> a :class:`Clause`."""
    words = text.split()
    numbers = {word: count for count, word in NUMBER_WORDS.items()}
    if words and words[0] in ("a", "an"):
        count = 1
    elif words and words[0] in numbers:
        count = numbers[words[0]]
    else:
        raise ValueError(f"{text!r} does not start with 'a', 'an' or a count ({', '.join(NUMBER_WORDS.values())})")
    words = words[1:]
    color = None
    if len(words) > 1 and words[0] in colors:  # "an orange" is the fruit, "an orange cat" a colour
        color, words = words[0], words[1:]
    noun = " ".join(words)
    if count > 1:
        noun = singularize(noun)
    is_name = noun.replace(" ", "").replace("-", "").isalpha() and not _NOT_IN_A_NOUN & set(words)
    if not words or len(words) > MAX_NOUN_WORDS or not is_name:
        raise ValueError(f"{text!r} does not name an object")
    if nouns is not None and noun not in nouns:
        raise ValueError(f"unknown object {noun!r} in {text!r}")
    return make_clause(noun, color, count)


def parse_geneval_prompt(
    prompt: str,
    templates: Sequence[str] = TEMPLATES,
    colors: Collection[str] = COLORS,
    nouns: Collection[str] | None = None,
    require_template: bool = True,
    grammar: str = "GenEval-style",
) -> GenEvalMetadata:
    """Recover a prompt's :class:`GenEvalMetadata` from its text (case-insensitive).

    Args:
        prompt: a prompt in GenEval's grammar, e.g. ``"a photo of two wine glasses"``.
        templates: the prefixes a prompt may start with (GenEval's is ``"a photo of"``).
        colors: the colour words (a colour is read only before a noun, so ``"an orange"`` is an object).
        nouns: the object names (singular) to accept, e.g. :data:`COCO_CLASSES`; any noun of up to
            :data:`MAX_NOUN_WORDS` words by default.
        require_template: refuse a prompt that does not start with one of `templates`.
        grammar: what error messages call a prompt of this grammar.

    Raises:
        ValueError: if the prompt is not in the grammar, saying why; pass the metadata columns for other prompts.
    """
    text = " ".join(prompt.strip().lower().split())
    body = next((text[len(t) + 1 :] for t in templates if text.startswith(t + " ")), None)
    try:
        if body is None:
            if require_template:
                raise ValueError(f"it does not start with {' or '.join(repr(t) for t in templates)}")
            body = text
        for relation in RELATIONS:
            if f" {relation} " in body:
                first, second = body.split(f" {relation} ", 1)
                objects = [_parse_noun_phrase(p, colors, nouns) for p in (first, second)]
                return {"tag": "position", "objects": objects, "relation": relation}
        objects = [_parse_noun_phrase(p, colors, nouns) for p in body.split(" and ")]
        if len(objects) > 2:
            raise ValueError("at most two clauses")
    except ValueError as err:
        raise ValueError(
            f"{prompt!r} is not a {grammar} prompt ({err}). Pass the dataset's 'objects' and 'relation' metadata "
            "columns for other prompts."
        ) from None
    if len(objects) == 2:
        tag = "color_attr" if all(o["color"] for o in objects) else "two_object"
    else:
        tag = "counting" if objects[0]["count"] > 1 else ("colors" if objects[0]["color"] else "single_object")
    return {"tag": tag, "objects": objects, "relation": None}


def check_metadata(meta: dict[str, Any]) -> None:
    """Raise a `ValueError` unless ``meta`` has non-empty object clauses and a valid (or no) relation."""
    objects = meta.get("objects")
    if not objects:
        raise ValueError(f"Metadata needs a non-empty 'objects' list; got {meta!r}.")
    for item in objects:
        if not isinstance(item.get("shape"), str) or not item["shape"] or int(item.get("count", 0)) < 1:
            raise ValueError(f"Bad object clause {item!r}: 'shape' must name the object and 'count' be >= 1.")
    if meta.get("relation") is not None and (meta["relation"] not in RELATIONS or len(objects) != 2):
        raise ValueError(f"A relation must be one of {RELATIONS} between exactly two object clauses; got {meta!r}.")


__all__ = [
    "COCO_CLASSES",
    "COLORS",
    "IRREGULAR_PLURALS",
    "NUMBER_WORDS",
    "RELATIONS",
    "TAGS",
    "TEMPLATES",
    "Clause",
    "GenEvalMetadata",
    "check_metadata",
    "make_clause",
    "noun_phrase",
    "parse_geneval_prompt",
    "pluralize",
    "singularize",
]
