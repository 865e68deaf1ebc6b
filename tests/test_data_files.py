"""Data files everywhere a task is used: the task readers (JSONL, CSV, Parquet; the public GSM8K and MATH-500
layouts, d1's countdown and sudoku files and their alternatives), ``--data`` / ``--eval-data`` (training/data.py)
and their use by ``diffpo-train rl`` (model, sampler, joint), ``sft`` and ``distill``.

The fixtures under tests/fixtures/data are small files written for these tests in the exact field layout of
openai/grade-school-math's ``grade_school_math/data/test.jsonl`` and openai/prm800k's MATH-500 test file
(``prm800k/math_splits/test.jsonl``); CSV and Parquet variants are written from them here.

The end-to-end RL test decodes with a tiny native LLaDA whose output layer is forced (:func:`forced_llada`): every
token it can produce reads ``<answer>7</answer>`` or ``<answer>9</answer>``, so each rollout's GSM8K reward is
known by hand from its last token and the gold number typed into :data:`GOLD` (not read by the code under test).
"""

import csv
import json
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from training import cli, rl, sft
from training.config import DistillConfig, SFTConfig
from training.data import chat_target, data_files, eval_sets, example_pool, sft_examples
from training.distill import DATA_FILE, train_distill
from training.sft import train_sft
from training.tasks import DataFileError, countdown, gsm8k, math500, sudoku

import test_family_llada as llada_files

FIXTURES = Path(__file__).parent / "fixtures" / "data"
GSM_TRAIN, GSM_TEST = FIXTURES / "gsm8k_train.jsonl", FIXTURES / "gsm8k_test.jsonl"
MATH = FIXTURES / "math500_test.jsonl"
# the gold numbers of the GSM8K fixtures, typed by hand from their questions
GOLD = {"Mia has 3 boxes": 7, "A baker makes 27": 9, "Tom reads 8 pages": 72, "A school buys 250": 1500,
        "Sam had 10 apples": 7, "A car travels 15": 45}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def gold_of(question: str) -> int:
    return next(v for k, v in GOLD.items() if question.startswith(k))


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


def raises_at(load, path, where: str, *words):
    with pytest.raises(DataFileError) as info:
        load(path)
    msg = str(info.value)
    assert f"{path} {where}:" in msg, msg
    for w in words:
        assert w in msg, msg


# ----------------------------------------------------------------------------- the task readers


def test_gsm8k_file_gives_final_number_reasoning_and_prompt():
    ds = gsm8k.load_file(GSM_TRAIN)
    assert ds["answer"] == ["7", "9", "72", "1500"]  # after '####', thousands comma dropped
    assert ds["reasoning"][0] == "Mia has 3 * 4 = 12 pencils.\nAfter giving 5 away she has 12 - 5 = 7 pencils."
    assert ds["reasoning"][3] == "It spends 250 * 6 = $1,500."  # calculator annotations <<...>> removed
    first = rows_of(GSM_TRAIN)[0]["question"]
    assert ds["question"][0] == first and ds["prompt"][0] == f"{first}\n{gsm8k.INSTRUCTION}"


def test_math500_file_takes_answer_else_last_boxed_of_solution(tmp_path):
    ds = math500.load_file(MATH)
    rows = rows_of(MATH)
    assert ds["answer"] == ["\\frac{5}{6}", "4", "6"]
    assert ds["question"] == [r["problem"] for r in rows] and ds["reasoning"] == [r["solution"] for r in rows]
    no_answer = [{k: v for k, v in r.items() if k != "answer"} for r in rows]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in no_answer))
    assert math500.load_file(path)["answer"] == ["\\frac{5}{6}", "4", "6"]  # nested braces kept whole
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(no_answer[0]) + "\n" + json.dumps({"problem": "p", "solution": "no box"}) + "\n")
    raises_at(math500.load_file, bad, "line 2", "'answer'", "boxed")


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
@pytest.mark.parametrize("task,path", [(gsm8k, GSM_TRAIN), (math500, MATH)])
def test_csv_and_parquet_read_as_the_jsonl(tmp_path, fmt, task, path):
    rows = rows_of(path)
    other = (write_csv if fmt == "csv" else write_parquet)(tmp_path / f"d.{fmt}", rows)
    assert task.load_file(other).to_dict() == task.load_file(path).to_dict()


def test_bad_rows_name_file_line_or_row_and_field(tmp_path):
    rows = rows_of(GSM_TRAIN)
    # CSV: the file's line; GSM8K's multi-line answers make a row span lines (row 2 ends on line 5)
    broken = rows[:2] + [{"question": rows[2]["question"], "answer": "no number here"}]
    raises_at(gsm8k.load_file, write_csv(tmp_path / "g.csv", broken), "line 7", "'answer'", "final number")
    raises_at(gsm8k.load_file, write_parquet(tmp_path / "g.parquet", broken), "row 3", "'answer'")
    jsonl = tmp_path / "g.jsonl"
    jsonl.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps({"question": "  ", "answer": "#### 3"}) + "\n")
    raises_at(gsm8k.load_file, jsonl, "line 3", "'question' is empty")
    header = write_csv(tmp_path / "h.csv", [{"query": "q", "answer": "1"}])
    raises_at(gsm8k.load_file, header, "line 1", "header lacks column(s) question")
    with pytest.raises(DataFileError, match=r"g\.txt: unknown data file extension '\.txt'"):
        gsm8k.load_file(jsonl.rename(tmp_path / "g.txt"))
    with pytest.raises(DataFileError, match=r"x\.parquet: file not found"):
        gsm8k.load_file(tmp_path / "x.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataFileError, match=r"junk\.parquet: not a readable Parquet file"):
        gsm8k.load_file(tmp_path / "junk.parquet")


def test_countdown_reads_d1_format_and_nums_target_alternatives(tmp_path):
    d1 = tmp_path / "cd.jsonl"
    d1.write_text('{"input": "30,100,93", "output": "23"}\n{"input": "83,18,75", "output": "10"}\n')
    want = {"numbers": [[30, 100, 93], [83, 18, 75]], "target": [23, 10]}
    ds = countdown.load_file(d1)
    assert {k: ds[k] for k in want} == want and ds["prompt"][0] == "countdown 30,100,93=23"
    alt = [{"nums": [30, 100, 93], "target": 23}, {"nums": [83, 18, 75], "target": 10}]
    for path in (write_parquet(tmp_path / "cd.parquet", alt),
                 write_csv(tmp_path / "cd.csv", [{"numbers": "[30, 100, 93]", "target": "23"},
                                                 {"numbers": "83,18,75", "target": "10"}])):
        got = countdown.load_file(path)
        assert {k: got[k] for k in want} == want
    raises_at(countdown.load_file, write_parquet(tmp_path / "bad.parquet", alt + [{"nums": [1, 2], "target": None}]),
              "row 3", "'target' is empty")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nums": [1, 2], "target": 3}\n{"nums": "1,x", "target": 3}\n')
    raises_at(countdown.load_file, bad, "line 2", "'nums' must be comma-separated integers")


def test_sudoku_reads_lowercase_csv_jsonl_and_parquet(tmp_path):
    rows = [{"puzzle": "0034341221434300", "solution": "1234341221434321"}]
    want = sudoku.load_file(write_csv(tmp_path / "a.csv", [{"Puzzle": r["puzzle"], "Solution": r["solution"]}
                                                          for r in rows])).to_dict()
    assert want["puzzle"] == ["0034341221434300"]  # a CSV cell stays a string: its leading zeros survive
    jsonl = tmp_path / "s.jsonl"
    jsonl.write_text(json.dumps(rows[0]) + "\n")
    for path in (write_csv(tmp_path / "b.csv", rows), jsonl, write_parquet(tmp_path / "s.parquet", rows)):
        assert sudoku.load_file(path).to_dict() == want
    raises_at(sudoku.load_file, write_parquet(tmp_path / "n.parquet", [{"puzzle": 34341221434300,
                                                                         "solution": "1234341221434321"}]),
              "row 1", "'puzzle' must be str")


# ----------------------------------------------------------------------------- --data / --eval-data


def test_data_option_rule():
    assert data_files(None, ["gsm8k"]) == {}
    assert data_files("a.jsonl", ["gsm8k"]) == {"gsm8k": "a.jsonl"}
    assert data_files("gsm8k=a.jsonl", ["gsm8k"]) == {"gsm8k": "a.jsonl"}
    assert data_files("dir/x=1.jsonl", ["gsm8k"]) == {"gsm8k": "dir/x=1.jsonl"}  # not a task name: a path
    assert data_files(" gsm8k = a.jsonl , sudoku=b.csv", ["sudoku", "gsm8k"]) == {"gsm8k": "a.jsonl",
                                                                                  "sudoku": "b.csv"}
    with pytest.raises(ValueError, match=r"--data 'a.jsonl': with several --tasks \(sudoku,gsm8k\) name each"):
        data_files("a.jsonl", ["sudoku", "gsm8k"])
    with pytest.raises(ValueError, match="--eval-data: math500 is not one of --tasks gsm8k"):
        data_files("math500=a.jsonl", ["gsm8k"], "--eval-data")
    with pytest.raises(ValueError, match="gsm8k is given twice"):
        data_files("gsm8k=a.jsonl,gsm8k=b.jsonl", ["gsm8k", "sudoku"])
    with pytest.raises(ValueError, match="gsm8k has no file after '='"):
        data_files("gsm8k=", ["gsm8k"])


def test_pools_mix_files_and_generators():
    pool = example_pool(["sudoku", "gsm8k"], 3, 0, f"gsm8k={GSM_TRAIN}")
    assert [ex["task"] for ex in pool] == ["sudoku"] * 3 + ["gsm8k"] * 3  # a file gives its first n rows
    assert [ex["answer"] for ex in pool[3:]] == ["7", "9", "72"]
    assert [ex["prompt"] for ex in pool[:3]] == sudoku.make_dataset("train", 3, 0)["prompt"]
    with pytest.raises(ValueError, match="gsm8k has no procedural generator.*--data"):
        example_pool(["gsm8k"], 3, 0)
    sets = eval_sets(["gsm8k", "cd3"], 1, f"gsm8k={GSM_TEST}")
    assert sets["gsm8k"]["answer"] == ["7"] and len(sets["cd3"]) == 1
    with pytest.raises(ValueError, match=r"--eval-every: gsm8k has no generated test split.*--eval-data"):
        eval_sets(["gsm8k"], 2, None)


def test_sft_needs_a_reference_answer(tmp_path):
    d1 = tmp_path / "cd.jsonl"
    d1.write_text('{"input": "1,2,3", "output": "6"}\n')
    with pytest.raises(ValueError, match=r"cd.jsonl: 1 of 1 examples have no reference answer"):
        sft_examples(["countdown"], 5, 0, str(d1))


def test_cli_reports_bad_data_as_a_usage_error(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q"}\n')
    for command in (["rl", "--tasks", "gsm8k", "--data", str(bad)],
                    ["sft", "--tasks", "gsm8k", "--data", str(bad)],
                    ["distill", "--tasks", "gsm8k", "--data", str(bad)],
                    ["rl", "--tasks", "gsm8k", "--data", str(GSM_TRAIN), "--eval-every", "1", "--eval-data", str(bad)]):
        assert cli.main(command + ["--output-dir", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert f"diffpo-train {command[0]}: error: {bad} line 2: missing key 'answer'" in err, err
        assert "Traceback" not in err
    assert cli.main(["rl", "--tasks", "gsm8k", "--output-dir", str(tmp_path / "out")]) == 2
    assert "gsm8k has no procedural generator" in capsys.readouterr().err
    assert cli.main(["rl", "--tasks", "gsm8k", "--data", str(GSM_TRAIN), "--eval-every", "1",
                     "--output-dir", str(tmp_path / "out")]) == 2
    assert "--eval-every: gsm8k has no generated test split" in capsys.readouterr().err


# ----------------------------------------------------------------------------- end to end

SEVEN, NINE = 4 + 7, 4 + 9  # the token ids of words 7 and 9 of test_family_llada's vocabulary


def forced_llada(path: Path) -> Path:
    """A tiny native LLaDA that writes only ``<answer>7</answer>`` (logit bias 31) or ``<answer>9</answer>``
    (30; the two share their output row, so greedy decoding writes 7s and sampling mostly 7s, some 9s)."""
    llada_files.write_checkpoint(path, shards=1, include_bias=True)
    words = [f"<answer>{i}</answer>" if i in (7, 9) else f"w{i}" for i in range(40)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(llada_files.SPECIAL + words)},
                                     unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                            bos_token="<|startoftext|>").save_pretrained(path)
    shard = path / "model-00001-of-00001.safetensors"
    tensors = load_file(str(shard))
    bias, weight = tensors["model.transformer.ff_out.bias"], tensors["model.transformer.ff_out.weight"]
    bias.fill_(-30.0)
    bias[SEVEN], bias[NINE] = 31.0, 30.0
    weight[NINE] = weight[SEVEN]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def forced(tmp_path_factory):
    return forced_llada(tmp_path_factory.mktemp("forced") / "llada")


def hand_reward(text: str, question: str) -> float:
    """GSM8K's reward of a forced completion, by hand: the last <answer> tag's digit against the gold number."""
    last = text.split()[-1]
    assert last in ("<answer>7</answer>", "<answer>9</answer>"), text
    return 1.0 if int(last[len("<answer>")]) == gold_of(question) else 0.0


def spy_rollouts(monkeypatch) -> list:
    seen, real = [], rl.rollout

    def spy(model, loaded, examples, *args, **kw):
        batch = real(model, loaded, examples, *args, **kw)
        seen.append((examples, batch))
        return batch
    monkeypatch.setattr(rl, "rollout", spy)
    return seen


def rl_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["rl", "--model", str(model), "--output-dir", str(out), "--tasks", "gsm8k", "--data", str(GSM_TRAIN),
            "--max-steps", "2", "--gen-length", "8", "--block-length", "8", "--num-generations", "2",
            "--prompts-per-step", "2", "--num-iterations", "1", "--lr", "1e-4", "--save-every", "2",
            "--device", "cpu", "--seed", "0", *extra]


def check_rewards(seen: list, out: Path) -> list[float]:
    """Every rollout's reward is the hand-computed GSM8K reward, and each step's logged mean is theirs."""
    logged = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get("rollouts")]
    assert len(seen) == len(logged) == 2
    every = []
    for (examples, batch), record in zip(seen, logged):
        questions = [ex["question"] for ex in examples for _ in range(2)]  # G = 2 rows per prompt
        file_questions = {r["question"] for r in rows_of(GSM_TRAIN)}
        assert all(ex["task"] == "gsm8k" and ex["question"] in file_questions for ex in examples)
        hand = [hand_reward(t, q) for t, q in zip(batch.texts, questions)]
        assert batch.rewards.tolist() == hand
        assert record["reward"] == round(sum(hand) / len(hand), 4)
        every += hand
    return every


def test_rl_trains_on_a_gsm8k_file_with_the_task_reward(forced, tmp_path, monkeypatch):
    seen = spy_rollouts(monkeypatch)
    out = tmp_path / "rl"
    assert cli.main(rl_args(forced, out, "--temperature", "1.0", "--eval-every", "2", "--eval-data", str(GSM_TEST),
                            "--eval-examples", "2")) == 0
    rewards = check_rewards(seen, out)
    assert 0.0 in rewards and 1.0 in rewards  # the rewards differ: a constant one would not pass
    # eval on the held-out file, greedy: every token is 7, right for its first question (gold 7), not its second
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval_gsm8k_accuracy" in r]
    assert [(r["step"], r["eval_gsm8k_accuracy"]) for r in evals] == [(0, 0.5), (2, 0.5)]
    assert (out / "model.safetensors").exists() or (out / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("train", ["sampler", "joint"])
def test_rl_sampler_and_joint_train_on_a_data_file(forced, tmp_path, monkeypatch, train):
    seen = spy_rollouts(monkeypatch)
    out = tmp_path / train
    assert cli.main(rl_args(forced, out, "--train", train, "--temperature", "1.0")) == 0
    check_rewards(seen, out)
    assert (out / "threshold_head.safetensors").exists() or any(out.glob("threshold_head*"))


def sft_cfg(out, **kw):
    base = dict(output_dir=str(out), tasks="gsm8k", data=str(GSM_TRAIN), train_examples=3, max_steps=2,
                batch_size=4, lr=1e-3, warmup_steps=0, save_every=2, log_every=1, gen_length=8, hidden_size=32,
                num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return SFTConfig(**{**base, **kw})


def spy_encode(monkeypatch) -> list:
    seen, real = [], sft.encode_examples

    def spy(encode, prompts, answers, *args):
        seen.append((list(prompts), list(answers)))
        return real(encode, prompts, answers, *args)
    monkeypatch.setattr(sft, "encode_examples", spy)
    return seen


def test_sft_trains_on_a_gsm8k_file(tmp_path, monkeypatch):
    """A raw-prompt model learns the final number after the file's question and instruction."""
    seen = spy_encode(monkeypatch)
    out = train_sft(sft_cfg(tmp_path / "sft", eval_every=2, eval_data=str(GSM_TEST), eval_examples=2))
    [(prompts, answers)] = seen
    rows = rows_of(GSM_TRAIN)[:3]  # --train-examples 3: the file's first three rows
    by_prompt = dict(zip(prompts, answers))
    assert by_prompt == {f"{r['question']}\n{gsm8k.INSTRUCTION}": str(gold_of(r["question"])) for r in rows}
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_gsm8k_accuracy" in r] == [2]


def test_sft_chat_model_learns_d1s_format(tmp_path, monkeypatch):
    """A model whose tokenizer has a chat template reads the prompt in it and learns reasoning then answer."""
    model, tokenizer = sft.new_model(sft_cfg(tmp_path))
    tokenizer.chat_template = ("{% for m in messages %}<user>{{ m['content'] }}</user>{% endfor %}"
                               "{% if add_generation_prompt %}<bot>{% endif %}")
    model.save_pretrained(tmp_path / "chat")
    tokenizer.save_pretrained(tmp_path / "chat")
    seen = spy_encode(monkeypatch)
    train_sft(sft_cfg(tmp_path / "sft", model=str(tmp_path / "chat"), train_examples=1, max_steps=1))
    [(prompts, answers)] = seen
    assert answers == ["<reasoning>Mia has 3 * 4 = 12 pencils.\nAfter giving 5 away she has 12 - 5 = 7 pencils."
                       "</reasoning>\n<answer>7</answer>"]
    assert prompts[0].startswith("<user>") and prompts[0].endswith("</user><bot>")
    assert rows_of(GSM_TRAIN)[0]["question"] in prompts[0]
    assert chat_target({"answer": "6"}) == "<reasoning></reasoning>\n<answer>6</answer>"
    seen.clear()
    train_sft(sft_cfg(tmp_path / "raw", model=str(tmp_path / "chat"), train_examples=1, max_steps=1,
                      chat_template=False))
    assert seen[0][1] == ["7"]


def test_distill_decodes_the_files_prompts(model_path, tmp_path):
    cfg = DistillConfig(output_dir=str(tmp_path / "d"), model=model_path, tasks="gsm8k", data=str(GSM_TRAIN),
                        train_examples=3, min_reward=0.0, gen_length=8, max_steps=1, batch_size=4, save_every=1,
                        log_every=1, teacher_batch_size=4)
    out = train_distill(cfg)
    rows = [json.loads(x) for x in (out / DATA_FILE).read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [f"{r['question']}\n{gsm8k.INSTRUCTION}" for r in rows_of(GSM_TRAIN)[:3]]
    assert all(r["task"] == "gsm8k" for r in rows)


def test_rl_reward_d1_adds_d1s_terms_and_logs_accuracy_from_correctness(forced, tmp_path, monkeypatch):
    """``--reward d1`` on gsm8k: a forced completion has no reasoning tags and no newlines, so d1's XML-count and
    both format terms give 0, its integer term 0.5 (the last tag holds a digit), and correctness counts x2:
    reward = 0.5 + 2 * correct. The logged accuracy stays the fraction correct, not the fraction of reward >= 1."""
    seen = spy_rollouts(monkeypatch)
    out = tmp_path / "rl-d1"
    assert cli.main(rl_args(forced, out, "--temperature", "1.0", "--reward", "d1")) == 0
    logged = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r.get("rollouts")]
    correct_seen = []
    for (examples, batch), record in zip(seen, logged, strict=True):
        questions = [ex["question"] for ex in examples for _ in range(2)]
        correct = [hand_reward(t, q) for t, q in zip(batch.texts, questions)]
        assert batch.rewards.tolist() == [0.5 + 2 * c for c in correct]
        assert batch.correctness.tolist() == correct  # what the accuracy reads (d1's 2.5 / 0.5 never do)
        assert record["accuracy"] == round(sum(correct) / len(correct), 4)
        assert record["reward"] == round(sum(0.5 + 2 * c for c in correct) / len(correct), 4)
        correct_seen += correct
    assert 0.0 in correct_seen and 1.0 in correct_seen


def test_exact_reads_correctness_when_recorded():
    """A d1 reward of 2.0 can be perfect format with a wrong answer: exact match follows correctness then."""
    from types import SimpleNamespace
    import torch
    from training.rollout import RolloutBatch
    exact = RolloutBatch.exact.fget
    assert exact(SimpleNamespace(rewards=torch.tensor([2.0, 0.5, 1.0]), correctness=None)).tolist() == [1.0, 0.0, 1.0]
    both = SimpleNamespace(rewards=torch.tensor([2.0, 0.5, 1.0]), correctness=torch.tensor([0.0, 1.0, 0.1]))
    assert exact(both).tolist() == [0.0, 1.0, 0.0]
