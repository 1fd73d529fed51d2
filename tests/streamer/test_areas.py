"""The area tree: any depth, containment, leaves, official list import with clear errors."""

from __future__ import annotations

import pytest

from loa.streamer.areas import AreaError, AreaTree, sample_tree


def test_sample_tree_shape_and_containment():
    t = sample_tree()
    assert len(t) == 9
    assert t.contains("T01", "T01-H2-X3")
    assert t.contains("T01-H1", "T01-H1")
    assert not t.contains("T01-H1", "T01-H2-X1")
    assert not t.contains("T01-H1-X1", "T01-H1")
    assert t.ancestors("T01-H2-X1") == ["T01-H2-X1", "T01-H2", "T01"]
    assert t.depth("T01") == 0 and t.depth("T01-H1-X2") == 2


def test_targets_resolve_to_the_leaves_they_cover_without_repeats():
    t = sample_tree()
    assert t.resolve_leaves(["T01-H1", "T01-H1-X2", "T01-H2-X3"]) == [
        "T01-H1-X1", "T01-H1-X2", "T01-H1-X3", "T01-H2-X3"]
    assert len(t.resolve_leaves(["T01"])) == 6
    with pytest.raises(AreaError):
        t.resolve_leaves(["NOPE"])


def test_two_level_and_deep_trees_are_just_data():
    t = AreaTree.from_rows([("P", "Tỉnh", "province", None), ("C1", "Xã 1", "commune", "P")])
    assert t.resolve_leaves(["P"]) == ["C1"]
    deep = AreaTree()
    parent = None
    for i in range(8):
        deep.add(f"L{i}", f"Cấp {i}", f"level{i}", parent)
        parent = f"L{i}"
    assert deep.depth("L7") == 7 and deep.contains("L0", "L7")


CSV = """code,name,level,parent_code
46,Tỉnh Thừa Thiên Huế,province,
474,Thành phố Huế,district,46
19753,Phường Phú Thuận,commune,474
19756,Phường Phú Bình,commune,474
"""


def test_csv_import_of_the_official_list_in_any_order():
    reordered = CSV.splitlines()
    text = "\n".join([reordered[0], reordered[3], reordered[1], reordered[4], reordered[2]])
    t = AreaTree.from_csv(text)
    assert t.get("19753").name == "Phường Phú Thuận"
    assert t.get("19753").parent == "474"
    assert t.resolve_leaves(["46"]) == ["19753", "19756"]


@pytest.mark.parametrize("text,needle", [
    (CSV + "19999,Xã Lạ,commune,999\n", "unknown parent '999'"),
    (CSV + "474,Trùng,district,46\n", "duplicate area code 474"),
    ("code,name,level,parent_code\nA,a,x,B\nB,b,x,A\n", "cycle"),
    ("code,name,level,parent_code\nA,a,x,A\n", "cycle"),
    ("code,name,level,parent_code\nA,a\n", "expected code,name,level,parent_code"),
    ("code,name,level,parent_code\nbad code,a,x,\n", "invalid area code"),
])
def test_csv_import_errors_name_the_problem(text, needle):
    with pytest.raises(AreaError) as ei:
        AreaTree.from_csv(text)
    assert needle in str(ei.value)


def test_a_stored_tree_with_codes_from_before_the_alphabet_still_loads():
    rows = [("T01", "Tỉnh", "province", None), ("Xã 1", "Xã Một", "commune", "T01")]
    with pytest.raises(AreaError):
        AreaTree.from_rows(rows)  # new codes must follow the alphabet ...
    tree = AreaTree.from_rows(rows, strict=False)  # ... a stored tree loads as it was saved
    assert tree.get("Xã 1").parent == "T01"
    with pytest.raises(AreaError):
        tree.add("Thôn 2", "Thôn", parent="T01")  # and nothing new slips in through it
