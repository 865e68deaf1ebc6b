"""diffpo's task rewards judge LLaDA-8B-Instruct's real outputs as d1's published evaluator does.

tests/fixtures/d1/ holds every item of d1's generations at length 256 (github.com/dllm-reasoning/d1 at
837888f, eval/eval_baselines/*_256_128_*) with d1's verdict, computed by running d1's own evaluator
(benchmarks/d1_rewards.py --write-fixtures; see the fixtures' README). Per task, the reward gives d1's verdict
on every item except the departures listed below, each an item d1 scores wrongly, in one of these categories.
Then hand-written cases pin the readers, and d1's training reward terms.
"""

import threading

import pytest

from benchmarks.d1_rewards import diffpo_score, read_fixture, summarise
from training.tasks import REWARD_KINDS, countdown, get_task, gsm8k, math500, reward_function, sudoku
from training.tasks import grading, rewards

CATEGORIES = {
    "null_gold": "GSM8K reference d1 reads as null: a negative answer (its '####' pattern has no minus sign)",
    "first_number": "d1 reads a box as its first number: \\boxed{43,500} as 43, \\boxed{\\frac{2}{3}} as 2",
    "unread": "an answer d1's <answer> fallback never reaches (a box whose brace never closes or spans a "
              "line, an answer in <answer> tags without a box, 'boxed{4}' without its backslash)",
    "equal_value": "a MATH answer equal in value to the reference that d1 compares as a different string",
}

# item index (over d1's shards in shard order, see the fixture rows) -> category, at generation length 256
DEPARTURES = {
    "gsm8k": {
        281: "null_gold", 1120: "null_gold",
        34: "first_number", 127: "first_number", 129: "first_number", 596: "first_number", 673: "first_number",
        822: "first_number", 829: "first_number", 957: "first_number", 966: "first_number", 972: "first_number",
        1116: "first_number",  # \boxed{\frac{2}{3}} against a reference 2: d1 reads 2 and scores it right
        202: "unread", 258: "unread", 412: "unread", 559: "unread", 1076: "unread",
    },
    "math500": {
        11: "equal_value",  # 15.975 = \frac{639}{40}
        24: "equal_value",  # \frac{3}{24} = \frac{1}{8}
        37: "equal_value",  # roots 3, 7, 5 = 3, 5, 7
        126: "equal_value",  # 7! \times 2! = 10,\!080
        201: "equal_value",  # 15 = 15\mbox{ cm}^2
        220: "equal_value",  # 4210_5 = 4210_{5}
        235: "equal_value",  # 36.00 = \$36
        280: "equal_value",  # \sqrt{3}/3 = \frac{\sqrt{3}}{3}
        295: "equal_value",  # east = \text{east}
        298: "equal_value",  # a pmatrix of \frac{16}{49} ... = one of 16/49 ...
        306: "equal_value",  # 7i - 2 = -2 + 7i
        437: "equal_value",  # C = \text{(C)}
        471: "equal_value",  # [-2, 7] = x \in [-2,7]
        481: "equal_value",  # 12 cm = 12
        125: "unread", 317: "unread",  # <answer>\boxed{2000</answer>: the box never closes
        137: "unread", 431: "unread",  # <answer>boxed{4}</answer>
    },
    "countdown": {6: "unread"},  # \boxed{95 - 73 + 7 cut off: d1 reads the reasoning's first "95 - 73 = 22"
    "sudoku": {},  # no model grid solves a several-solution puzzle other than by the stored solution
}
D1_WRONGLY_RIGHT = {("gsm8k", 1116)}  # the only items d1 scores right and diffpo wrong: d1 is wrong there


@pytest.fixture(scope="module", params=["gsm8k", "math500", "countdown", "sudoku"])
def scored(request):
    task = request.param
    rows = read_fixture(task)
    return task, rows, [diffpo_score(task, r) for r in rows]


def test_fixture_is_d1s_published_evaluation(scored):
    """The committed verdicts reproduce d1's table at length 256 (d1's evaluator, re-run: 76.37, 32.4, 19.53, 6.69)."""
    task, rows, _ = scored
    assert [r["index"] for r in rows] == list(range(len(rows)))
    n, right = len(rows), sum(r["d1"] for r in rows)
    if task == "sudoku":
        cells = [r["d1_cells"] for r in rows]
        assert (n, sum(c[0] for c in cells), sum(c[1] for c in cells)) == (256, 137, 2048)  # 6.69 %
    else:
        assert (n, right) == {"gsm8k": (1130, 863), "math500": (500, 162), "countdown": (256, 50)}[task]


def test_reward_gives_d1s_verdict_except_listed_departures(scored):
    task, rows, ours = scored
    departures = {r["index"]: (o, r["d1"]) for r, o in zip(rows, ours) if abs(o - r["d1"]) > 1e-9}
    assert set(departures) == set(DEPARTURES[task])  # every departure is listed, every listed one departs
    assert all(c in CATEGORIES for c in DEPARTURES[task].values())
    assert 1 - len(departures) / len(rows) >= {"gsm8k": 0.984, "math500": 0.964, "countdown": 0.996,
                                               "sudoku": 1.0}[task]
    # never below d1 where d1 is right; the one item below d1 is one d1 reads wrongly
    below = {i for i, (o, d) in departures.items() if o < d}
    assert {(task, i) for i in below} <= D1_WRONGLY_RIGHT
    assert all(o > d for i, (o, d) in departures.items() if i not in below)
    total = sum(ours)
    assert total == pytest.approx({"gsm8k": 879, "math500": 180, "countdown": 51, "sudoku": 17.125}[task])


def test_benchmark_summary_counts_agreement_and_accuracies():
    cd = summarise("countdown", 256, read_fixture("countdown"))
    assert (cd["items"], cd["agree"], cd["diffpo > d1"], cd["diffpo < d1"]) == (256, 255, 1, 0)
    assert (cd["diffpo accuracy"], cd["d1 accuracy"]) == (100 * 51 / 256, 100 * 50 / 256)
    sd = summarise("sudoku", 256, read_fixture("sudoku"))  # cells summed over the set, as d1's table
    assert (sd["agree"], sd["d1 metric agree"]) == (256, 256)
    assert sd["diffpo accuracy"] == pytest.approx(100 * 137 / 2048) and sd["d1 accuracy"] == 100 * 137 / 2048


def test_sudoku_d1_metric_is_d1s_verdict_on_every_item():
    rows = read_fixture("sudoku")
    for r in rows:
        right, blank = r["d1_cells"]
        assert sudoku.d1_cell_accuracy(r["completion"], r["example"]) == right / blank, r["index"]


def test_sudoku_any_solution_of_a_several_solution_puzzle_scores_one():
    """Item 0 of the fixture: 4320004330100004 has two solutions; d1 counts the other one half right."""
    row = read_fixture("sudoku")[0]
    ex = row["example"]
    assert (ex["puzzle"], ex["solution"], sudoku.solution_count(ex["puzzle"])) == \
        ("4320004330100004", "4321124334122134", 2)
    other = "4321214334121234"
    completion = f"<reasoning>\nfill the blanks\n</reasoning>\n<answer>\n{other}\n</answer><|eot_id|>"
    assert sudoku.d1_cell_accuracy(completion, ex) == 0.5
    assert sudoku.reward(completion, ex) == 1.0
    assert sudoku.reward(completion.replace(other, ex["solution"]), ex) == 1.0
    broken = other[:3] + "2" + other[4:]  # blank 3 wrong, not a valid grid: cells against the stored solution
    assert sudoku.reward(completion.replace(other, broken), ex) == sudoku.d1_cell_accuracy(
        completion.replace(other, broken), ex) == 3 / 8


# ------------------------------------------------------------------------- hand-written: sudoku

SOL = "1234341221434321"
EX = {"puzzle": "0034341221434300", "solution": SOL}  # blanks at cells 0, 1, 14, 15


@pytest.mark.parametrize("completion,expected", [
    (f"<answer>\n{SOL}\n</answer>", 1.0),
    ("<answer>\n1234\n3412\n2143\n4321\n</answer>", 1.0),  # whitespace between rows is dropped
    ("<answer>\n1034341221434321\n</answer>", 0.75),  # a 0 is one wrong cell: nothing after it shifts
    ("<answer>\n1934341221434321\n</answer>", 0.75),  # so is a 9
    ("<answer>\n12\n</answer>", 0.5),  # missing cells are wrong ('0' padding, as d1)
    (f"<answer>\n{SOL}4321\n</answer>", 1.0),  # cells past the 16th are not read
    (f"the puzzle 0034341221434300 then {SOL}", 0.0),  # no tags: the first 16-digit run, as d1 reads
    (f"<answer>\n```\n{SOL}\n```\n</answer>", 1.0),  # a code block inside the tags
    (f"reasoning</answer>\n{SOL}<|eot_id|>", 1.0),  # text after a stray </answer>, as d1
    (f"the grid 0034341221434300 is {SOL}\n</answer>", 1.0),  # 16 digits just before </answer>, not the first
    ("<answer>\nno solution\n</answer>", 0.0),
])
def test_sudoku_reads_cells_by_position_as_d1(completion, expected):
    assert sudoku.d1_cell_accuracy(completion, EX) == expected
    assert sudoku.reward(completion, EX) == expected


def test_sudoku_reward_reads_a_bare_grid_with_separators_where_d1_reads_nothing():
    bare = "1 2 3 4\n3|4|1|2\n2,1,4,3\n4 3 2 1"
    assert sudoku.d1_cell_accuracy(bare, EX) == 1.0 and sudoku.reward(bare, EX) == 1.0
    assert sudoku.reward("I think 1 2 3 4", EX) == 0.0  # words: not a bare grid
    full = {"puzzle": SOL, "solution": SOL}  # no blanks: d1's metric is 0.0, a solved grid still scores 1
    assert sudoku.d1_cell_accuracy(SOL, full) == 0.0 and sudoku.reward(SOL, full) == 1.0


# ------------------------------------------------------------------------- hand-written: gsm8k

@pytest.mark.parametrize("completion,gold,expected", [
    ("<reasoning>\n...\n</reasoning>\n<answer>\n\\boxed{8}\n</answer><|eot_id|>", "8", 1.0),
    ("so \\boxed{43,500} dollars", "43500", 1.0),  # d1 reads 43
    ("\\boxed{\\frac{2}{3}}", "2", 0.0),  # d1 reads 2
    ("\\boxed{45/3}", "15", 1.0),
    ("\\boxed{\\$18.50}", "18.5", 1.0),
    ("\\boxed{12 \\text{ apples}}", "12", 1.0),
    ("\\boxed{2:00 pm}", "2", 1.0),  # several numbers: the first, as d1
    ("\\boxed{8 + 7 = 15}", "15", 1.0),
    ("\\boxed{...} then \\boxed{7}", "7", 1.0),  # the template's placeholder is no answer
    ("\\boxed{3} and later \\boxed{4}", "3", 1.0),  # the first box that holds a number, as d1
    ("\\boxed{360\\text{ hours} hours.\n</answer>", "360", 1.0),  # a box that never closes: to its first }
    ("<answer>\n\\boxed{120\n</answer}", "120", 1.0),
    ("<answer>\nIt costs $1,234.\n</answer>", "1234", 1.0),  # no box: the tags' last number
    ("<answer>\n-10\n</answer>", "-10", 1.0),
    ("<answer>\n72", "72", 1.0),  # an unclosed tag reads to the end
    ("The answer is 72.", "72", 0.0),  # neither box nor tags: no answer, as d1
    ("\\boxed{72.4}", "72", 0.0),
])
def test_gsm8k_reward_reads_boxes_and_tags(completion, gold, expected):
    assert gsm8k.reward(completion, {"answer": gold}) == expected


# ------------------------------------------------------------------------- hand-written: math500

@pytest.mark.parametrize("completion,gold,expected", [
    ("<answer>\n\\boxed{\\frac{3}{4}}\n</answer>", "\\frac 34", 1.0),
    ("\\boxed{\\dfrac{9}{19}}", "\\frac9{19}", 1.0),
    ("\\boxed{36}", "\\$36", 1.0),
    ("\\boxed{11\\sqrt{2}}", "11\\sqrt2", 1.0),
    ("\\boxed{15}", "15\\mbox{ cm}^2", 1.0),
    ("\\boxed{12 cm}", "12", 1.0),
    ("\\boxed{0.25}", "\\frac14", 1.0),
    ("\\boxed{7i - 2}", "-2 + 7i", 1.0),  # math-verify: equal in value
    ("\\boxed{[-2, 7]}", "x \\in [-2,7]", 1.0),
    ("\\boxed{x + y + z + 1 = 0}", "5x - 7y + 11z + 4 = 0", 0.0),  # an equation is not its right side
    ("\\boxed{3}", "3x", 0.0),
    ("<answer>\n\\frac{1}{4}\n</answer>", "\\frac{1}{4}", 1.0),  # tags without a box (d1: never read)
    ("<answer>\nboxed{4}\n</answer>", "4", 1.0),
    ("<answer>\n\\boxed{2000\n</answer>", "2000", 1.0),
    ("<answer>\n\\boxed{}\n</answer> it is \\pi", "\\pi", 0.0),  # an empty box is no answer
    ("\\frac{1}{2}", "\\frac{1}{2}", 1.0),  # the whole text, as d1 compares it without a box
    ("the answer is \\frac{1}{2}", "\\frac{1}{2}", 0.0),
])
def test_math500_reward(completion, gold, expected):
    assert math500.reward(completion, {"answer": gold}) == expected


def test_math_verify_runs_off_the_main_thread():
    """math-verify's own timeouts use signal.alarm (main thread only); grading disables them."""
    out = []
    t = threading.Thread(target=lambda: out.append(math500.reward("\\boxed{7i - 2}", {"answer": "-2 + 7i"})))
    t.start()
    t.join(60)
    assert out == [1.0]
    assert grading.verify_equal("7i - 2", "-2 + 7i") and not grading.verify_equal("7i + 2", "-2 + 7i")
    long = "+".join(["1"] * 200)  # past MAX_VERIFY_CHARS: compared by string only, never parsed
    assert not grading.math_equal(long, "200") and grading.math_equal(long, long)


# ------------------------------------------------------------------------- hand-written: countdown

CD = {"numbers": [87, 85, 60], "target": 62}


@pytest.mark.parametrize("completion,expected", [
    ("<answer>\n\\boxed{87 - 85 + 60}\n</answer>", 1.0),
    ("\\boxed{(87 - 85) \\times 31}", 0.1),  # well-formed, wrong numbers
    ("\\boxed{60 \\div 60 \\cdot 87 - 85 + 60}", 0.1),
    ("\\boxed{87 - 85 + 60 = 62}", 1.0),
    ("<answer>87 - 85 + 60</answer>", 1.0),  # tags without a box (d1 reads the whole text)
    ("\\boxed{87 - 85 + 60", 1.0),  # a box cut off before its brace
    ("first 87 - 85 = 2, then 2 + 60 = 62", 0.1),  # no box, no tags: the first "expr =", as d1 reads
    ("60 + 87 - 85", 1.0),
    ("\\boxed{}", 0.0),
])
def test_countdown_reads_boxes_and_latex_operators(completion, expected):
    assert countdown.reward(completion, CD) == expected
    assert get_task("cd3").reward(completion, CD) == expected


def test_latex_division_and_times_evaluate():
    ex = {"numbers": [6, 3, 4], "target": 8}
    assert countdown.reward("\\boxed{6 \\div 3 \\times 4}", ex) == 1.0
    assert countdown.reward("\\boxed{6 ÷ 3 × 4}", ex) == 1.0


# ------------------------------------------------------------------------- d1's training reward terms

STRICT = "<reasoning>\nadd them\n</reasoning>\n<answer>\n72\n</answer>\n"


@pytest.mark.parametrize("completion,xml,soft,strict,integer", [
    (STRICT, 0.5, 0.0, 0.5, 0.5),  # soft's "." crosses no newline: d1's soft term misses its own format
    (STRICT[:-1], 0.446, 0.0, 0.0, 0.5),  # no final newline: 0.001 x the whole text's 55 chars, +0.001
    (STRICT + "\n", 0.498, 0.0, 0.5, 0.5),  # "$" tolerates one more newline; xml charges 1 + 1 chars
    (STRICT + "trailing text", 0.474, 0.0, 0.0, 0.5),  # 13 chars past "</answer>\n", twice
    ("<reasoning>\nr\nmore\n</reasoning>\n<answer>\n72\n</answer>\n", 0.5, 0.0, 0.0, 0.5),  # two lines
    ("<reasoning>r</reasoning> <answer>72</answer>", 0.0, 0.5, 0.0, 0.5),
    ("<reasoning>r</reasoning><answer>\\boxed{72}</answer>", 0.0, 0.5, 0.0, 0.0),
    ("<answer>\n 72 \n</answer>", 0.126, 0.0, 0.0, 0.5),
    ("<answer>72", 0.0, 0.0, 0.0, 0.5),
    ("no tags 72", 0.0, 0.0, 0.0, 0.0),
])
def test_d1_gsm8k_format_terms(completion, xml, soft, strict, integer):
    """Values checked against d1's diffu-grpo/reward_func.py on the same strings."""
    assert rewards.xml_count(completion) == pytest.approx(xml, abs=1e-12)
    assert (rewards.soft_format(completion), rewards.strict_format(completion),
            rewards.integer_answer(completion)) == (soft, strict, integer)


def test_d1_math_format_term_never_finds_a_box():
    assert rewards.math_answer_format("<answer>\\boxed{5}</answer>") == 0.75  # d1 looks for "\x08oxed"
    assert rewards.math_answer_format("<answer>5") == 0.75
    assert rewards.math_answer_format("\\boxed{5}") == 0.25
    assert rewards.math_answer_format("<answer>\x08oxed{5}</answer>") == 1.0


def test_reward_function_kinds_sum_d1s_terms():
    assert REWARD_KINDS == ("correctness", "exact", "d1")
    gold = {"answer": "72"}
    assert reward_function("gsm8k")(STRICT, gold) == 1.0
    assert reward_function("gsm8k", "d1")(STRICT, gold) == pytest.approx(0.5 + 0.0 + 0.5 + 0.5 + 2.0)
    assert reward_function("gsm8k", "d1")(STRICT.replace("72", "71"), gold) == pytest.approx(1.5)
    assert reward_function("gsm8k", "d1")("<answer>\\boxed{72}</answer>", gold) == 2.0  # d1: 0 (exact match)
    math = reward_function("math500", "d1")
    assert math("<answer>\\boxed{\\frac34}</answer>", {"answer": "0.75"}) == 2.75
    assert math("\\boxed{1}", {"answer": "0.75"}) == 0.25
    for task in ("countdown", "cd3", "sudoku"):  # d1 trains these with correctness alone
        assert reward_function(task, "d1")("60 + 87 - 85", CD if task != "sudoku" else EX) == \
            get_task(task).reward("60 + 87 - 85", CD if task != "sudoku" else EX)
    assert reward_function("countdown", "d1")("60 + 87 - 85", CD) == 1.0
    with pytest.raises(ValueError, match="correctness, exact, d1"):
        reward_function("gsm8k", "format")
    with pytest.raises(ValueError, match="unknown task"):
        reward_function("chess")


@pytest.mark.parametrize("task", ["gsm8k", "math500", "countdown", "cd3", "sudoku"])
def test_rewards_never_raise(task):
    ex = {"gsm8k": {"answer": "5"}, "math500": {"answer": "\\frac{1}{2}"}, "sudoku": EX}.get(task, CD)
    for junk in ["", "<answer>", "\\boxed{", "\\boxed{\\frac{", "\\boxed{" * 300, "}" * 50 + "\\boxed",
                 "<answer>\\boxed{\\sqrt{\\sqrt{\\sqrt{x^{y^{z}}}}}}</answer>", "\\boxed{1/0}", "\\boxed{10^{10^{10}}}",
                 "<|eot_id|><answer>5</answer>", "9" * 3000, None, 12]:
        for kind in REWARD_KINDS:
            r = reward_function(task, kind)(junk, ex)
            assert isinstance(r, float) and -1.0 <= r <= 4.0


def test_the_exact_reward_gives_no_partial_credit():
    """kind "exact": 1 only where the task's reward is 1: a sudoku grid with one blank wrong (3 of 4 right: 0.75)
    and a well-formed wrong countdown expression (0.1) score 0."""
    one_wrong = ("2" if SOL[0] != "2" else "3") + SOL[1:]
    assert get_task("sudoku").reward(one_wrong, EX) == 0.75 and reward_function("sudoku", "exact")(one_wrong, EX) == 0.0
    assert reward_function("sudoku", "exact")(SOL, EX) == 1.0
    assert get_task("countdown").reward("87 + 85 - 60", CD) == 0.1
    assert reward_function("countdown", "exact")("87 + 85 - 60", CD) == 0.0
    assert reward_function("countdown", "exact")("60 + 87 - 85", CD) == 1.0
    assert reward_function("gsm8k", "exact")("<answer>72</answer>", {"answer": "72"}) == 1.0
