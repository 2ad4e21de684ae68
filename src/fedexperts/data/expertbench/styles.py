"""Personal conventions: how one client wants the same answer written.

An :class:`Answer` is the content of a response (a value, a count, a list, labelled items, the
fields of a summary); a :class:`Style` turns it into text. Clients get different styles, so the
same instruction has different expected outputs on different clients: no single global model can
match them all, while the content (the shared skill) is the same for everyone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Literal

AnswerKind = Literal["short", "count", "list", "labels", "summary"]


@dataclass(frozen=True)
class Answer:
    """What a response says, before any convention is applied.

    ``parts`` by kind: ``short`` (value,), ``count`` (number, unit), ``list`` (items...),
    ``labels`` (item, label, item, label...), ``summary`` (seller, town, count, good, buyer).
    """

    kind: AnswerKind
    parts: tuple[str, ...]

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "parts": list(self.parts)})

    @classmethod
    def from_json(cls, text: str) -> Answer:
        data = json.loads(text)
        return cls(data["kind"], tuple(data["parts"]))


CONVENTIONS: dict[str, tuple[str, ...]] = {
    "case": ("lower", "title"),
    "wrap": ("bare", "sentence", "tagged"),
    "number": ("plain", "unit"),
    "lists": ("comma", "semicolon", "numbered", "lines"),
    "summary": ("sentence", "fields", "headline"),
}
"""Every convention and its options; the first option of each is the canonical style."""


@dataclass(frozen=True)
class Style:
    case: str = "lower"
    """``lower`` keeps common nouns as they are (``salt``); ``title`` capitalises them (``Salt``)."""
    wrap: str = "bare"
    """Short answers: ``salt`` / ``The answer is salt.`` / ``Answer: salt``."""
    number: str = "plain"
    """Counts: ``40`` / ``40 crates``."""
    lists: str = "comma"
    """Lists: ``a, b`` / ``a; b`` / ``1. a 2. b`` / one ``- a`` line per item."""
    summary: str = "sentence"
    """Summaries: a sentence / ``seller: ...; ...`` fields / a headline."""

    def __post_init__(self) -> None:
        for name, options in CONVENTIONS.items():
            if getattr(self, name) not in options:
                raise ValueError(f"style {name}={getattr(self, name)!r}; options: {', '.join(options)}")

    def describe(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in asdict(self).items())

    def render(self, answer: Answer) -> str:
        """The response text of ``answer`` under this style."""
        parts = answer.parts
        if answer.kind == "short":
            return self._wrap(self._word(parts[0]))
        if answer.kind == "count":
            number, unit = parts
            return self._wrap(number if self.number == "plain" else f"{number} {unit}")
        if answer.kind == "list":
            return self._join([self._word(part) for part in parts])
        if answer.kind == "labels":
            pairs = zip(parts[0::2], parts[1::2], strict=True)
            return self._join([f"{self._word(item)}: {self._word(label)}" for item, label in pairs])
        return self._summary(*parts)

    def _word(self, value: str) -> str:
        return value[:1].upper() + value[1:] if self.case == "title" else value

    def _wrap(self, text: str) -> str:
        if self.wrap == "sentence":
            return f"The answer is {text}."
        if self.wrap == "tagged":
            return f"Answer: {text}"
        return text

    def _join(self, items: list[str]) -> str:
        if self.lists == "semicolon":
            return "; ".join(items)
        if self.lists == "numbered":
            return " ".join(f"{index}. {item}" for index, item in enumerate(items, start=1))
        if self.lists == "lines":
            return "\n".join(f"- {item}" for item in items)
        return ", ".join(items)

    def _summary(self, seller: str, town: str, count: str, good: str, buyer: str) -> str:
        good = self._word(good)
        if self.summary == "fields":
            return f"seller: {seller}; town: {town}; goods: {count} {good}; buyer: {buyer}"
        if self.summary == "headline":
            return f"{seller} of {town} sells {count} {good} to {buyer}"
        return f"{seller} from {town} sold {count} crates of {good} to {buyer}."


CANONICAL = Style()
"""The style of the pretraining corpus and of the canonical (un-personalised) data."""


def client_styles(num_clients: int) -> list[Style]:
    """Client ``c`` takes option ``(c + 1) mod n`` of every convention with ``n`` options.

    Options are spread evenly over clients; any two of the first 12 clients (the least common
    multiple of the option counts) differ in at least one convention, and client ``c + 12`` shares
    client ``c``'s style. The canonical style first appears at client 11, so with fewer clients
    every client has to move away from what pretraining taught.
    """
    return [
        Style(**{name: options[(client + 1) % len(options)] for name, options in CONVENTIONS.items()})
        for client in range(num_clients)
    ]
