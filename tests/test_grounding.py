"""Grounding parser: well-formed output, the malformed shapes real models emit, fuzzing."""
import random

import pytest

from model.grounding import parse_grounding, strip_grounding

W, H = 999, 1998  # 999 wide makes x pixels equal the raw coordinates


def boxes(text, w=W, h=H):
    return [(b["label"], b["box"]) for b in parse_grounding(text, w, h)]


def test_well_formed():
    text = "<|ref|>cat<|/ref|><|det|>[[10,20,30,40],[0,0,999,999]]<|/det|> and <|ref|> dog <|/ref|><|det|>[[1,2,3,4]]<|/det|>"
    assert boxes(text) == [
        ("cat", [10, 40, 30, 80]),
        ("cat", [0, 0, 999, 1998]),
        ("dog", [1, 4, 3, 8]),
    ]
    assert boxes(text, 500, 250)[1] == ("cat", [0, 0, 500, 250])
    assert boxes("<|ref|>x<|/ref|><|det|>[[333,333,666,666]]<|/det|>", 300, 300) == [("x", [100.0, 100.0, 200.0, 200.0])]


def test_no_grounding():
    assert parse_grounding("", 10, 10) == []
    assert parse_grounding("just text [[1,2,3,4]]", 10, 10) == []
    assert parse_grounding("<|ref|>only a ref<|/ref|>", 10, 10) == []


@pytest.mark.parametrize(
    "text,want",
    [
        # odd-length / non-4 lists: complete boxes kept, leftovers dropped
        ("<|ref|>a<|/ref|><|det|>[[1,2,3,4,5]]<|/det|>", [("a", [1, 4, 3, 8])]),
        ("<|ref|>a<|/ref|><|det|>[[1,2,3],[5,6,7,8]]<|/det|>", [("a", [5, 12, 7, 16])]),
        ("<|ref|>a<|/ref|><|det|>[[1,2]]<|/det|>", []),
        # over 999 and runaway digits clamp to the image edge
        ("<|ref|>a<|/ref|><|det|>[[0,0,1500,99999999999999999999999]]<|/det|>", [("a", [0, 0, 999, 1998])]),
        ("<|det|>[[0,0,5," + "9" * 10000 + "]]<|/det|>", [("", [0, 0, 5, 1998])]),
        # nested / flat lists
        ("<|ref|>a<|/ref|><|det|>[[[1,2,3,4]]]<|/det|>", [("a", [1, 4, 3, 8])]),
        ("<|ref|>a<|/ref|><|det|>[1, 2, 3, 4]<|/det|>", [("a", [1, 4, 3, 8])]),
        # missing <|/det|> (generation hit the token limit)
        ("<|ref|>a<|/ref|><|det|>[[1,2,3,4],[5,6,7,8],[9,9", [("a", [1, 4, 3, 8]), ("a", [5, 12, 7, 16])]),
        ("<|det|>[[1,2,3,4]] and 5 6 7 8 apples", [("", [1, 4, 3, 8])]),
        ("<|ref|>a<|/ref|><|det|>[[1,2,3,4]<|ref|>b<|/ref|><|det|>[[5,6,7,8]]<|/det|>", [("a", [1, 4, 3, 8]), ("b", [5, 12, 7, 16])]),
        # det without ref, unterminated ref, second det without its own ref
        ("<|det|>[[1,2,3,4]]<|/det|>", [("", [1, 4, 3, 8])]),
        ("<|ref|>a<|det|>[[1,2,3,4]]<|/det|>", [("a", [1, 4, 3, 8])]),
        ("<|ref|>a<|/ref|><|det|>[[1,2,3,4]]<|/det|><|det|>[[5,6,7,8]]<|/det|>", [("a", [1, 4, 3, 8]), ("", [5, 12, 7, 16])]),
        # swapped corners are ordered; garbage inside is ignored
        ("<|det|>[[30,40,10,20]]<|/det|>", [("", [10, 40, 30, 80])]),
        ("<|det|>[[a,b,c,d]]<|/det|>", []),
        ("<|det|>[[-5,2,3,4]]<|/det|>", [("", [0, 4, 3, 8])]),
        ("<|/det|><|/ref|><|det|><|/det|><|ref|>", []),
    ],
)
def test_malformed(text, want):
    assert boxes(text) == want


def test_bad_sizes_and_types_do_not_raise():
    assert parse_grounding(None, 10, 10) == []  # type: ignore[arg-type]
    assert parse_grounding("<|det|>[[1,2,3,4]]<|/det|>", 0, -5)[0]["box"] == [0, 0, 0, 0]
    assert parse_grounding("<|det|>[[1,2,3,4]]<|/det|>", "x", 5) == []  # type: ignore[arg-type]


def test_boxes_always_inside_image():
    rng = random.Random(1)
    for _ in range(200):
        vals = [rng.choice([0, 999, 1000, rng.randint(0, 10**6)]) for _ in range(rng.randint(0, 9))]
        w, h = rng.randint(1, 5000), rng.randint(1, 5000)
        for b in parse_grounding(f"<|det|>[{vals}]<|/det|>", w, h):
            x1, y1, x2, y2 = b["box"]
            assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h


def test_fuzz_never_raises():
    rng = random.Random(0)
    atoms = ["<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>", "[", "]", "[[", "]]", ",", " ",
             "0", "999", "12", "99999999", "-", ".", "a", "é", "\n", "<|", "|>", "<", "\x00", "1e9"]  # fmt: skip
    for _ in range(500):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 60)))
        out = parse_grounding(text, rng.randint(0, 4000), rng.randint(0, 4000))
        assert isinstance(out, list)
        for b in out:
            assert isinstance(b["label"], str) and len(b["box"]) == 4
        assert isinstance(strip_grounding(text), str)
    for _ in range(300):  # arbitrary unicode too
        text = "".join(chr(rng.randint(0, 0x2FFF)) for _ in range(rng.randint(0, 80)))
        assert parse_grounding(text, 100, 100) == [] or "<|det|>" in text
        strip_grounding(text)


@pytest.mark.parametrize(
    "text,want",
    [
        ("The <|ref|>cat<|/ref|><|det|>[[1,2,3,4]]<|/det|> sits.", "The cat sits."),
        ("<|grounding|>A <|ref|>dog<|/ref|>.", "A dog."),
        ("x <|det|>[[1,2,3,4]]<|/det|> y", "x  y"),
        ("<|ref|>a<|/ref|><|det|>[[1,2,3,4],[5,6", "a"),
        ("<|ref|>a<|/ref|><|det|>[[1,2,3,4]] then text", "a then text"),
        ("<|det|>[[1,2]<|ref|>b<|/ref|><|det|>[[5,6,7,8]]<|/det|>!", "b!"),
        ("no tags", "no tags"),
    ],
)
def test_strip_grounding(text, want):
    assert strip_grounding(text) == want
