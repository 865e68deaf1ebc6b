"""Tests for training.tasks: generators, splits, rewards, answer parsing and file loaders."""

import json
import re

import pytest

from training.tasks import TASKS, get_task
from training.tasks import countdown, gsm8k, math500, sudoku
from training.tasks.common import DataFileError, extract_answer


# ---------------------------------------------------------------- registry / parsing

def test_registry():
    assert set(TASKS) == {"sudoku", "countdown", "cd3", "gsm8k", "math500", "sudoku_easy", "sudoku_hard"}
    for name, mod in TASKS.items():
        assert get_task(name) is mod and mod.NAME == name
        assert isinstance(mod.GEN_LENGTH, int) and mod.GEN_LENGTH > 0
    with pytest.raises(ValueError, match="sudoku"):
        get_task("chess")


@pytest.mark.parametrize("text,expected", [
    ("plain 42 ", "plain 42"),
    ("think <answer> 7 </answer> tail", "7"),
    ("<answer>1</answer> more <answer>2</answer>", "2"),
    ("<answer>1</answer> then <answer> 3 4", "3 4"),
    ("", ""),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("name", ["sudoku", "countdown", "gsm8k", "math500"])
def test_reward_never_raises(name):
    mod = get_task(name)
    ex = {"sudoku": {"puzzle": "0" * 16, "solution": sudoku.all_grids()[0]},
          "countdown": {"numbers": [1, 2, 3], "target": 6},
          "gsm8k": {"answer": "5"}, "math500": {"answer": "\\frac{1}{2}"}}[name]
    for junk in ["", "<answer>", "</answer>", "\\boxed{", "((((" * 500, "1+" * 5000 + "1",
                 "9" * 5000, "\x00\n\t", "<answer>\\boxed{}}}</answer>", "__import__('os')"]:
        r = mod.reward(junk, ex)
        assert 0.0 <= r <= 1.0


@pytest.mark.parametrize("name", ["gsm8k", "math500"])
def test_real_tasks_need_data_file(name):
    with pytest.raises(ValueError, match="--data"):
        get_task(name).make_dataset("train", 5)


@pytest.mark.parametrize("mod", [sudoku, countdown])
def test_bad_split(mod):
    with pytest.raises(ValueError):
        mod.make_dataset("valid", 3)


# ---------------------------------------------------------------- sudoku

def test_sudoku_grids_and_split():
    grids = sudoku.all_grids()
    assert len(grids) == len(set(grids)) == 288 and list(grids) == sorted(grids)
    assert all(sudoku.is_valid_solution(g) for g in grids)
    train, test = set(sudoku.split_grids("train")), set(sudoku.split_grids("test"))
    assert len(train) == 230 and len(test) == 58
    assert not train & test and train | test == set(grids)


def test_sudoku_generator():
    a = sudoku.make_dataset("train", 300, seed=3)
    assert a.to_dict() == sudoku.make_dataset("train", 300, seed=3).to_dict()
    assert a["puzzle"] != sudoku.make_dataset("train", 300, seed=4)["puzzle"]
    assert set(a.column_names) == {"prompt", "answer", "puzzle", "solution"}
    for split in ("train", "test"):
        grids = set(sudoku.split_grids(split))
        for ex in sudoku.make_dataset(split, 300, seed=1):
            puzzle, sol = ex["puzzle"], ex["solution"]
            assert ex["prompt"] == "sudoku " + puzzle and ex["answer"] == sol
            assert sol in grids and sudoku.is_valid_solution(sol)
            assert 4 <= puzzle.count("0") <= 12
            assert all(p in ("0", s) for p, s in zip(puzzle, sol))
            assert sudoku.reward(ex["answer"], ex) == 1.0
            # exactly one grid completes it (brute force over all 288)
            assert [g for g in sudoku.all_grids() if all(p in ("0", c) for p, c in zip(puzzle, g))] == [sol]
    # the blank counts stay uniform over 4-12 (uniqueness redraws the cells, not the count)
    counts = [p.count("0") for p in sudoku.make_dataset("test", 900, seed=0)["puzzle"]]
    assert set(counts) == set(range(4, 13)) and all(60 <= counts.count(k) <= 140 for k in range(4, 13))


def test_sudoku_solution_count_by_hand():
    grid = "1234341221434321"
    assert sudoku.is_valid_solution(grid) and sudoku.solution_count(grid) == 1
    assert sudoku.solution_count("0" * 16) == 288
    # blanking cells 0, 1, 8, 9 (columns 0-1 of rows 0 and 2) lets "12" / "21" there swap: two grids
    two = "0034341200434321"
    assert {g for g in sudoku.all_grids() if all(p in ("0", c) for p, c in zip(two, g))} == {grid, "2134341212434321"}
    assert sudoku.solution_count(two) == 2
    assert sudoku.solution_count("1134" + grid[4:]) == 0  # a given that breaks a row


def test_sudoku_reward():
    sol = "1234341221434321"
    ex = {"puzzle": "0034341221434300", "solution": sol}  # blanks at cells 0, 1, 14, 15
    assert sudoku.reward(sol, ex) == 1.0
    assert sudoku.reward("<answer>" + sol + "</answer>", ex) == 1.0
    assert sudoku.reward(" ".join(sol), ex) == 1.0
    assert sudoku.reward("1 2 3 4\n3|4|1|2\n2,1,4,3\n4 3 2 1", ex) == 1.0
    assert sudoku.reward("1234341221434311", ex) == 0.75  # 3 of 4 blanks right
    assert sudoku.reward("12", ex) == 0.5  # missing positions count wrong
    assert sudoku.reward("1234341221434311" + "4321", ex) == 0.75  # digits past the 16th are not read
    assert sudoku.reward("2134341221434321", ex) == 0.5  # cells 0 and 1 swapped
    assert sudoku.reward("no digits", ex) == 0.0
    full = {"puzzle": sol, "solution": sol}
    assert sudoku.reward(sol, full) == 1.0 and sudoku.reward(sol[:-1] + "2", full) == 0.0


# ---------------------------------------------------------------- countdown

def test_countdown_generator():
    a = countdown.make_dataset("train", 400, seed=2)
    assert a.to_dict() == countdown.make_dataset("train", 400, seed=2).to_dict()
    assert set(a.column_names) == {"prompt", "answer", "numbers", "target"}
    keys = {}
    for split in ("train", "test"):
        ds = countdown.make_dataset(split, 400, seed=0)
        keys[split] = {(tuple(sorted(e["numbers"])), e["target"]) for e in ds}
        for ex in ds:
            nums, target = ex["numbers"], ex["target"]
            assert len(nums) == 3 and all(1 <= x <= 99 for x in nums) and 1 <= target <= 999
            assert ex["prompt"] == f"countdown {nums[0]},{nums[1]},{nums[2]}={target}"
            assert len(ex["answer"]) <= 15 and " " not in ex["answer"]
            assert countdown.reward(ex["answer"], ex) == 1.0
            assert countdown.split_of(nums, target) == split
    assert not keys["train"] & keys["test"]
    # the reference answers carry no redundant parentheses: a group is there only when its operator binds looser
    # than the one outside, or is the right operand of an operator of equal rank that is - or /
    rank = {"+": 1, "-": 1, "*": 2, "/": 2}
    grouped = 0
    for ex in countdown.make_dataset("train", 400, seed=0):
        m = re.fullmatch(r"\((\d+)(.)(\d+)\)(.)(\d+)|(\d+)(.)\((\d+)(.)(\d+)\)", ex["answer"])
        if m is None:
            assert "(" not in ex["answer"]
            continue
        grouped += 1
        if m[1]:  # (a o b) p c
            assert rank[m[2]] < rank[m[4]], ex["answer"]
        else:  # a p (b o c)
            assert rank[m[9]] < rank[m[7]] or (rank[m[9]] == rank[m[7]] and m[7] in "-/"), ex["answer"]
    assert grouped > 20
    # one key in TEST_BUCKETS (10) goes to test, whatever the order of the numbers
    pairs = [((a, b, c), t) for a in range(1, 13) for b in range(a, 13) for c in range(b, 13) for t in (10, 24, 99)]
    share = sum(countdown.split_of(nums, t) == "test" for nums, t in pairs) / len(pairs)
    assert len(pairs) == 1092 and 0.07 < share < 0.13
    assert all(countdown.split_of(nums[::-1], t) == countdown.split_of(nums, t) for nums, t in pairs)


@pytest.mark.parametrize("completion,expected", [
    ("(12-5)*7", 1.0),
    ("<answer> 7*(12-5) </answer>", 1.0),
    ("(12-5)*7=49", 1.0),
    ("12/12*7", 0.1),  # 12 used twice
    ("7*7", 0.1),  # the target, from 7 used twice and 5, 12 unused: each number exactly once
    ("(12-5)*(12-5)", 0.1),  # the target, with 12 and 5 twice and 7 never
    ("(12-5)*7+5-5", 0.1),  # the target, every number used and 5 used three times: a multiset, not a set
    ("2+3", 0.1),  # wrong numbers
    ("12+5+7", 0.1),  # right numbers, wrong value
    ("(((", 0.0),
    ("", 0.0),
    ("2/0", 0.0),
    ("7*(12-5)/(5-5)", 0.0),
    ("__import__('os')", 0.0),
    ("12**5", 0.0),
    ("-(5-12)*7", 1.0),  # a unary minus is arithmetic, not a typo
    ("-(12-5)*7", 0.1),  # ... and it counts: -49
    ("(10 + 23 - 45 * 67 / 89)", 0.1),  # every allowed character at once is still well-formed
    ("1.5*2", 0.0),
])
def test_countdown_reward(completion, expected):
    assert countdown.reward(completion, {"numbers": [5, 7, 12], "target": 49}) == expected


def test_countdown_reward_counts_a_repeated_number_as_two_uses():
    ex = {"numbers": [3, 3, 9], "target": 15}
    assert countdown.reward("3+3+9", ex) == 1.0
    assert countdown.reward("3*3+9-3", ex) == 0.1  # 3 three times
    assert countdown.reward("9+3+3", ex) == 1.0
    assert countdown.reward("9+6", ex) == 0.1 and countdown.reward("9*3-12", ex) == 0.1
    assert countdown.reward("9+3", {"numbers": [3, 3, 9], "target": 12}) == 0.1  # one 3 left unused


def test_countdown_reward_equals_form():
    ex = {"numbers": [1, 3, 5], "target": 10}
    assert countdown.reward("5*(3-1)=10", ex) == 1.0
    assert countdown.reward("5*(3-1) = 12", ex) == 1.0  # only the left side is judged
    assert countdown.reward("5*(3-1", ex) == 0.0


# ---------------------------------------------------------------- gsm8k / math500

@pytest.mark.parametrize("completion,gold,expected", [
    ("<answer>$1,234</answer>", "1234", 1.0),
    ("The answer is 42.", "42", 0.0),  # neither \boxed{} nor <answer> tags: no answer, as in d1's evaluator
    ("<answer>-3.50</answer>", "-3.5", 1.0),
    ("it is 12 then 13", "12", 0.0),
    ("<answer>forty two</answer>", "42", 0.0),
    ("<answer>42.4</answer>", "42", 0.0),  # near is not equal: only float rounding is forgiven
    ("<answer>42.000</answer>", "42", 1.0),
])
def test_gsm8k_reward(completion, gold, expected):
    assert gsm8k.reward(completion, {"answer": gold}) == expected


@pytest.mark.parametrize("completion,gold,expected", [
    ("<answer>\\boxed{\\frac{1}{2}}</answer>", "1/2", 1.0),
    ("so \\boxed{\\dfrac{1}{2}}.", "\\frac12", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{90^\\circ}", "90", 1.0),
    ("\\boxed{\\text{(C)}}", "(C)", 1.0),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)", 1.0),
    ("\\boxed{x = 5}", "5", 1.0),
    ("\\boxed{\\frac{1}{3}}", "1/2", 0.0),
    ("\\boxed{-\\frac{1}{2}}", "-0.5", 1.0),  # a leading minus keeps its sign
    ("\\boxed{-\\frac{1}{2}}", "0.5", 0.0),
    ("\\boxed{}", "", 0.0),
])
def test_math500_reward(completion, gold, expected):
    assert math500.reward(completion, {"answer": gold}) == expected


# ---------------------------------------------------------------- file loaders

def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def _raises_at(load, path, line, match=None):
    with pytest.raises(DataFileError) as info:
        load(path)
    msg = str(info.value)
    assert path.name in msg and f"line {line}" in msg, msg
    if match:
        assert match in msg, msg


def test_sudoku_load_file(tmp_path):
    good = _write(tmp_path / "ok.csv", "id,Puzzle,Solution\n1,0034341221434300,1234341221434321\n\n")
    ds = sudoku.load_file(good)
    assert ds[0] == {"prompt": "sudoku 0034341221434300", "answer": "1234341221434321",
                     "puzzle": "0034341221434300", "solution": "1234341221434321"}
    head = "Puzzle,Solution\n"
    ok_row = "0034341221434300,1234341221434321\n"
    _raises_at(sudoku.load_file, _write(tmp_path / "hdr.csv", "Quiz,Solution\n" + ok_row), 1, "Puzzle")
    _raises_at(sudoku.load_file, _write(tmp_path / "bad.csv", head + ok_row + "12a,1234341221434321\n"),
               3, "Puzzle must be 16 characters of 0-4")
    _raises_at(sudoku.load_file, _write(tmp_path / "sol.csv", head + "0034341221434300,1234341221434320\n"),
               2, "Solution")
    _raises_at(sudoku.load_file, _write(tmp_path / "inv.csv", head + "0000000000000000,1111222233334444\n"),
               2, "not a valid")
    _raises_at(sudoku.load_file, _write(tmp_path / "dis.csv", head + "4034341221434300,1234341221434321\n"),
               2, "disagrees")
    _raises_at(sudoku.load_file, _write(tmp_path / "cols.csv", head + ok_row + "0034341221434300\n"), 3)
    with pytest.raises(DataFileError, match="missing.csv"):
        sudoku.load_file(tmp_path / "missing.csv")


def test_countdown_load_file(tmp_path):
    good = _write(tmp_path / "cd.jsonl", '{"input": "15,44,79", "output": "50"}\n\n{"input": "1,2,3", "output": 6}\n')
    ds = countdown.load_file(good)
    assert ds["numbers"] == [[15, 44, 79], [1, 2, 3]] and ds["target"] == [50, 6]
    assert ds["prompt"][0] == "countdown 15,44,79=50" and ds["answer"] == ["", ""]
    assert countdown.reward("79-44+15", ds[0]) == 1.0
    ok = '{"input": "1,2,3", "output": "6"}\n'
    _raises_at(countdown.load_file, _write(tmp_path / "json.jsonl", ok + "{oops\n"), 2, "invalid JSON")
    _raises_at(countdown.load_file, _write(tmp_path / "key.jsonl", ok + ok + '{"input": "1,2,3"}\n'), 3, "output")
    _raises_at(countdown.load_file, _write(tmp_path / "num.jsonl", '{"input": "1,x,3", "output": 6}\n'), 1, "input")
    _raises_at(countdown.load_file, _write(tmp_path / "tgt.jsonl", '{"input": "1,2,3", "output": "six"}\n'), 1)
    _raises_at(countdown.load_file, _write(tmp_path / "arr.jsonl", "[1, 2]\n"), 1, "object")
    with pytest.raises(DataFileError, match="empty.jsonl"):
        countdown.load_file(_write(tmp_path / "empty.jsonl", "\n"))
    with pytest.raises(DataFileError, match="nope.jsonl"):
        countdown.load_file(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("mod", [gsm8k, math500])
def test_qa_load_file(tmp_path, mod):
    rows = [{"question": "What is 1000+234?", "answer": "1000+234=1,234\n#### 1,234"},
            {"question": "Half of one?", "answer": "\\frac{1}{2}"}]
    ds = mod.load_file(_write(tmp_path / "qa.jsonl", "".join(json.dumps(r) + "\n" for r in rows)))
    assert set(ds.column_names) == {"prompt", "answer", "question", "reasoning"}
    assert ds["reasoning"] == (["1000+234=1,234", ""] if mod is gsm8k else ["", ""])  # the text before ####
    assert ds["question"][0] == rows[0]["question"]
    assert ds["prompt"][0].startswith(rows[0]["question"]) and "<answer>" in ds["prompt"][0]
    if mod is gsm8k:
        assert ds["answer"][0] == "1234"
        assert gsm8k.reward("<answer>1,234</answer>", ds[0]) == 1.0
    else:
        assert "\\boxed" in ds["prompt"][0]
        assert math500.reward("\\boxed{1/2}", ds[1]) == 1.0
    ok = json.dumps(rows[1]) + "\n"
    _raises_at(mod.load_file, _write(tmp_path / "k.jsonl", ok + '{"answer": "3"}\n'), 2, "question")
    _raises_at(mod.load_file, _write(tmp_path / "t.jsonl", ok + '{"question": "q", "answer": ["3"]}\n'), 2, "answer")
    _raises_at(mod.load_file, _write(tmp_path / "j.jsonl", ok + "\n" + '{"question": \n'), 3, "invalid JSON")
    with pytest.raises(DataFileError, match="gone.jsonl"):
        mod.load_file(tmp_path / "gone.jsonl")


def test_cd3_draws_d1s_countdown_distribution():
    """cd3: three numbers in 1-100, target in 1-100, countdown's prompt format, split and reward."""
    cd3, countdown = get_task("cd3"), get_task("countdown")
    train, test = cd3.make_dataset("train", 3000, 0), cd3.make_dataset("test", 300, 0)
    for ds, split in ((train, "train"), (test, "test")):
        nums = [n for row in ds["numbers"] for n in row]
        assert 1 <= min(nums) and max(nums) == 100  # the full range is drawn, 100 included
        assert 1 <= min(ds["target"]) and max(ds["target"]) == 100
        for ex in ds.select(range(50)):
            assert ex["prompt"] == f"countdown {','.join(map(str, ex['numbers']))}={ex['target']}"
            assert cd3.reward(ex["answer"], ex) == 1.0  # the drawn expression reaches the target
            assert countdown.split_of(ex["numbers"], ex["target"]) == split
    assert not set(train["prompt"]) & set(test["prompt"])
    # countdown keeps its wider range: targets above 100 are most of it
    wide = countdown.make_dataset("train", 500, 0)
    assert max(wide["target"]) > 500 and max(max(r) for r in wide["numbers"]) <= 99


@pytest.mark.parametrize("name,lo,hi", [("sudoku_easy", 4, 8), ("sudoku_hard", 9, 12)])
def test_sudoku_variants_draw_their_blank_range(name, lo, hi):
    """sudoku_easy / sudoku_hard: sudoku's prompts, split, reward and metric with 4-8 / 9-12 blanks, every count
    of the range drawn about equally often, each puzzle with one solution; their own draws, not sudoku's."""
    mod = get_task(name)
    assert mod.NAME == name and mod.GEN_LENGTH == sudoku.GEN_LENGTH and mod.reward is sudoku.reward
    for split in ("train", "test"):
        grids = set(sudoku.split_grids(split))
        ds = mod.make_dataset(split, 200, seed=1)
        for ex in ds:
            puzzle, sol = ex["puzzle"], ex["solution"]
            assert ex["prompt"] == "sudoku " + puzzle and sol in grids and lo <= puzzle.count("0") <= hi
            assert [g for g in sudoku.all_grids() if all(p in ("0", c) for p, c in zip(puzzle, g))] == [sol]
    counts = [p.count("0") for p in mod.make_dataset("test", 800, seed=0)["puzzle"]]
    share = 800 // (hi - lo + 1)
    assert set(counts) == set(range(lo, hi + 1)) and all(share * 0.6 <= counts.count(k) <= share * 1.4
                                                          for k in range(lo, hi + 1))
    assert mod.make_dataset("test", 50, seed=0).to_dict() == mod.make_dataset("test", 50, seed=0).to_dict()
    assert mod.make_dataset("test", 50, seed=0)["puzzle"] != sudoku.make_dataset("test", 50, seed=0)["puzzle"]
    assert mod.d1_accuracy([("1234", {"puzzle": "0" * 16, "solution": "1234" * 4})]) == pytest.approx(0.25)


def test_sudoku_blank_range_outside_the_generator_is_refused():
    for bad in ((3, 8), (9, 13), (8, 4)):
        with pytest.raises(ValueError, match=f"{bad[0]}-{bad[1]}"):
            sudoku.make_dataset("test", 5, blanks=bad)
    assert [p.count("0") for p in sudoku.make_dataset("test", 20, blanks=(7, 7))["puzzle"]] == [7] * 20
