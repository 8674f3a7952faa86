"""Plates: Peruvian normalisation, OCR look-alikes match, real differences do not."""

from __future__ import annotations

import gc
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from centinela.errors import InvalidArgument
from centinela.matcher.plates import (
    ALPHABET,
    PlateIndex,
    PlateRead,
    display_plate,
    is_lookalike,
    normalise_plate,
    plate_format,
    weighted_distance,
)

# (listed plate, camera read): one OCR look-alike apart -> must match.
ONE_LOOKALIKE_AWAY = [
    ("ABC-123", "A8C-123"),
    ("ABC-123", "ABC-I23"),
    ("ABC-123", "ABC-1Z3"),
    ("A1B-234", "AIB-234"),
    ("A1B-234", "A1B-Z34"),
    ("B0D-456", "BOD-456"),
    ("B0D-456", "B0O-456"),
    ("B0D-456", "B0D-4S6"),
    ("1234-AB", "I234-AB"),
    ("1234-AB", "1234-A8"),
    ("1234-AB", "1Z34-AB"),
    ("GHS-550", "GHS-5S0"),
    ("GHS-550", "6HS-550"),
    ("TKU-789", "TKV-789"),
    ("QWE-101", "0WE-101"),
    ("M7T-555", "N7T-555"),
    ("F6G-808", "F6G-B08"),
]

# (listed plate, camera read): one real character apart -> must not match.
ONE_REAL_CHARACTER_AWAY = [
    ("ABC-123", "ABC-124"),
    ("ABC-123", "ABC-193"),
    ("ABC-123", "XBC-123"),
    ("ABC-123", "ABC-12"),
    ("ABC-123", "ABC-1234"),
    ("A1B-234", "A1B-294"),
    ("A1B-234", "W1B-234"),
    ("1234-AB", "1294-AB"),
    ("1234-AB", "1234-AH"),
    ("B0D-456", "B0D-496"),
    ("GHS-550", "GHS-590"),
    ("TKU-789", "TKU-780"),
    ("QWE-101", "QWE-191"),
]


@pytest.mark.parametrize(("listed", "read"), ONE_LOOKALIKE_AWAY)
def test_one_lookalike_away_matches(listed: str, read: str) -> None:
    index = PlateIndex()
    index.add("veh_1", listed)
    hits = index.search(PlateRead(read))
    assert [h.ref for h in hits] == ["veh_1"]
    assert 0.9 < hits[0].score < 1.0
    assert hits[0].normalised == normalise_plate(listed)


@pytest.mark.parametrize(("listed", "read"), ONE_REAL_CHARACTER_AWAY)
def test_one_real_character_away_does_not_match(listed: str, read: str) -> None:
    index = PlateIndex()
    index.add("veh_1", listed)
    assert index.search(PlateRead(read)) == []


@pytest.mark.parametrize(("listed", "read"), ONE_REAL_CHARACTER_AWAY[:4])
def test_low_confidence_never_makes_a_real_difference_match(listed: str, read: str) -> None:
    index = PlateIndex()
    index.add("veh_1", listed)
    n = len(normalise_plate(read))
    assert index.search(PlateRead(read, confidences=[0.0] * n)) == []


def test_low_confidence_cheapens_lookalikes() -> None:
    index = PlateIndex()
    index.add("veh_1", "ABC-123")
    read = "A8C-IZ3"  # three look-alikes
    assert index.search(PlateRead(read)) == []
    unsure = PlateRead(read, confidences=[1.0, 0.2, 1.0, 1.0, 0.2, 0.2])
    assert [h.ref for h in index.search(unsure)] == ["veh_1"]


def test_alternative_read_is_used_with_a_penalty() -> None:
    index = PlateIndex()
    index.add("veh_1", "ABC-123")
    hits = index.search(PlateRead("XYZ-999", alternatives=["ABC-123"]))
    assert [h.ref for h in hits] == ["veh_1"]
    assert hits[0].score < 1.0
    exact = index.search(PlateRead("abc 123"))
    assert exact[0].score == 1.0


def test_threshold_is_configurable() -> None:
    strict = PlateIndex(max_distance=0.0)
    strict.add("veh_1", "ABC-123")
    assert strict.search(PlateRead("A8C-123")) == []
    assert strict.search(PlateRead("A8C-123"), max_distance=0.3)
    loose = PlateIndex(max_distance=1.0)
    loose.add("veh_1", "ABC-123")
    assert loose.search(PlateRead("ABC-124"))


def test_removed_plate_never_matches_and_can_return() -> None:
    index = PlateIndex()
    index.add("veh_1", "ABC-123")
    index.add("veh_2", "DEF-456")
    assert index.remove("veh_1")
    assert not index.remove("veh_1")
    assert index.search(PlateRead("ABC-123")) == []
    index.add("veh_1", "ABC-123")
    assert [h.ref for h in index.search(PlateRead("ABC123"))] == ["veh_1"]
    assert len(index) == 2


def test_candidates_found_among_many_plates() -> None:
    """HNSW candidate generation finds the listed plate among thousands for look-alike reads."""
    rng = random.Random(5)
    letters, digits = ALPHABET[:26], ALPHABET[26:]
    plates = {
        "".join(rng.choices(letters, k=3)) + "".join(rng.choices(digits, k=3)) for _ in range(3000)
    }
    index = PlateIndex()
    for i, p in enumerate(sorted(plates)):
        index.add(f"veh_{i}", p)
    swaps = {
        "B": "8",
        "O": "0",
        "S": "5",
        "Z": "2",
        "G": "6",
        "I": "1",
        "1": "I",
        "0": "O",
        "8": "B",
        "5": "S",
    }
    missed = 0
    checked = 0
    for i, p in enumerate(sorted(plates)[:300]):
        pos = [j for j, c in enumerate(p) if c in swaps]
        if not pos:
            continue
        j = pos[0]
        read = p[:j] + swaps[p[j]] + p[j + 1 :]
        checked += 1
        missed += f"veh_{i}" not in {h.ref for h in index.search(PlateRead(read))}
    assert checked > 100
    assert missed == 0


def test_two_reports_of_one_plate_are_listed_and_unlisted_apart() -> None:
    index = PlateIndex()
    index.add("veh_1", "ABC-123")
    index.add("veh_2", "ABC-123")  # the same plate reported twice (cloned plates)
    index.add("veh_2", "ABC-123")  # listing it again changes nothing
    assert sorted(h.ref for h in index.search(PlateRead("ABC-123"))) == ["veh_1", "veh_2"]
    assert index.remove("veh_1")
    assert [h.ref for h in index.search(PlateRead("ABC-123"))] == ["veh_2"]
    index.add("veh_2", "DEF-456")  # moved to another plate
    assert index.search(PlateRead("ABC-123")) == []
    assert [h.ref for h in index.search(PlateRead("DEF-456"))] == ["veh_2"]


def test_the_index_adds_no_garbage_collected_object_per_plate() -> None:
    """A full collection walks every GC-tracked object with the event loop stopped; the
    plate index must not add one per listed plate (a set each did)."""
    gc.collect()
    before = len(gc.get_objects())
    index = PlateIndex()
    for i in range(2000):
        index.add(f"veh_{i}", f"{ALPHABET[i % 26]}{ALPHABET[(i // 26) % 26]}Z-{i % 1000:03d}")
    gc.collect()
    grown = len(gc.get_objects()) - before
    assert len(index) == 2000
    assert grown < 100, f"{grown} tracked objects for 2000 plates"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("abc-123", "ABC123"),
        (" A1B 234 ", "A1B234"),
        ("1234-ab", "1234AB"),
        ("ＡＢＣ－１２３", "ABC123"),
    ],
)
def test_normalisation_examples(text: str, expected: str) -> None:
    assert normalise_plate(text) == expected


@pytest.mark.parametrize("bad", ["", "AB", "ABC-12345678", "ABC*123", "ÑAB-123", "   "])
def test_malformed_plates_are_refused(bad: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        normalise_plate(bad)
    assert info.value.field == "plate.text"


@given(st.text(alphabet=ALPHABET + ALPHABET.lower() + " -._", max_size=14))
@settings(max_examples=300)
def test_normalisation_is_idempotent(text: str) -> None:
    try:
        once = normalise_plate(text)
    except InvalidArgument:
        return
    assert normalise_plate(once) == once
    assert normalise_plate(display_plate(once)) == once


@given(st.text(alphabet=ALPHABET, min_size=4, max_size=10))
def test_distance_to_itself_is_zero(plate: str) -> None:
    assert weighted_distance(plate, plate) == 0.0


def test_formats_and_display() -> None:
    assert plate_format("ABC123") == "car"
    assert display_plate("ABC123") == "ABC-123"
    assert plate_format("A1B234") == "car"
    assert display_plate("A1B234") == "A1B-234"
    assert plate_format("1234AB") == "motorcycle"
    assert display_plate("1234AB") == "1234-AB"
    assert plate_format("AB12") == "other"
    assert display_plate("AB12") == "AB12"


def test_lookalike_table_is_symmetric() -> None:
    for a in ALPHABET:
        for b in ALPHABET:
            assert is_lookalike(a, b) == is_lookalike(b, a)
    assert is_lookalike("0", "O")
    assert is_lookalike("8", "B")
    assert not is_lookalike("A", "X")


@pytest.mark.parametrize(
    ("read", "field"),
    [
        (PlateRead("ABC-123", confidences=[1.0, 1.0]), "plate.confidences"),
        (PlateRead("ABC-123", confidences=[1.0] * 5 + [1.5]), "plate.confidences"),
        (PlateRead("ABC-123", alternatives=["??"]), "plate.alternatives"),
        (PlateRead("ABC-123", alternatives=["ABC123"] * 9), "plate.alternatives"),
    ],
)
def test_malformed_reads_are_refused(read: PlateRead, field: str) -> None:
    index = PlateIndex()
    index.add("veh_1", "ABC-123")
    with pytest.raises(InvalidArgument) as info:
        index.search(read)
    assert info.value.field == field
