import pytest

from fedexperts.data.expertbench import CANONICAL, CONVENTIONS, Answer, Style, client_styles

SHORT = Answer("short", ("salt",))
COUNT = Answer("count", ("40", "crates"))
LIST = Answer("list", ("iron", "Varo"))
LABELS = Answer("labels", ("iron", "metal", "honey", "food"))
SUMMARY = Answer("summary", ("Maren", "Varo", "12", "wool", "Lio"))


@pytest.mark.parametrize(
    ("style", "answer", "text"),
    [
        (CANONICAL, SHORT, "salt"),
        (Style(case="title", wrap="sentence"), SHORT, "The answer is Salt."),
        (Style(wrap="tagged"), SHORT, "Answer: salt"),
        (CANONICAL, COUNT, "40"),
        (Style(number="unit", wrap="sentence"), COUNT, "The answer is 40 crates."),
        (CANONICAL, LIST, "iron, Varo"),
        (Style(lists="semicolon", case="title"), LIST, "Iron; Varo"),
        (Style(lists="numbered"), LIST, "1. iron 2. Varo"),
        (Style(lists="lines"), LIST, "- iron\n- Varo"),
        (CANONICAL, LABELS, "iron: metal, honey: food"),
        (CANONICAL, SUMMARY, "Maren from Varo sold 12 crates of wool to Lio."),
        (Style(summary="fields"), SUMMARY, "seller: Maren; town: Varo; goods: 12 wool; buyer: Lio"),
        (Style(summary="headline", case="title"), SUMMARY, "Maren of Varo sells 12 Wool to Lio"),
    ],
)
def test_rendering(style, answer, text):
    assert style.render(answer) == text


def test_answer_json_round_trip():
    assert Answer.from_json(LABELS.to_json()) == LABELS


def test_unknown_option_is_refused():
    with pytest.raises(ValueError, match="style wrap='shout'"):
        Style(wrap="shout")


def test_first_twelve_client_styles_differ_and_none_is_canonical_below_eleven():
    styles = client_styles(24)
    assert len(set(styles[:12])) == 12
    assert styles[12:] == styles[:12]
    assert CANONICAL not in styles[:11]
    for name, options in CONVENTIONS.items():
        used = [getattr(style, name) for style in styles[:12]]
        assert {used.count(option) for option in options} == {12 // len(options)}, name
