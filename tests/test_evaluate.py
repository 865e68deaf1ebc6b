"""``diffpo-train eval``: the JSON summary line, scoring, and errors on bad input."""

import json
from types import SimpleNamespace

import pytest

from conftest import tiny_model
from diffpo_serve.dllm.loading import load_model
from diffpo_serve.dllm.sampler import SamplingParams
from training.cli import main
from training.evaluate import evaluate
from training.tasks import get_task


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("model")
    tiny_model().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("sampler", ["steps", "confidence", "eb"])
def test_eval_prints_summary_json_last(model_dir, capsys, sampler):
    code = main(["eval", "--model", str(model_dir), "--task", "countdown", "--limit", "12", "--batch-size", "5",
                 "--sampler", sampler, "--block-length", "8", "--steps", "8"])
    assert code == 0
    summary = last_json(capsys)
    for key in ("task", "n", "accuracy", "exact", "mean_nfe", "tokens_per_second", "sampler", "threshold"):
        assert key in summary
    assert summary["n"] == 12 and summary["sampler"] == sampler
    assert 1 <= summary["mean_nfe"] <= 16
    if sampler == "steps":
        assert summary["mean_nfe"] <= 8
    # the step budget is reported where it rules the decode (steps), the threshold where one does
    assert summary["steps"] == (8 if sampler == "steps" else None)
    assert (summary["threshold"] is None) == (sampler == "steps")


def test_eval_scores_with_the_task_reward(model_dir):
    """Each row's reward is the task's reward of the decoded completion."""
    loaded = load_model(model_dir)
    data = get_task("sudoku").make_dataset("test", 6, seed=1)
    result = evaluate(loaded, "sudoku", data, SamplingParams(gen_length=16), progress=False)
    task = get_task("sudoku")
    for row, ex in zip(result.rows, data):
        assert row["reward"] == task.reward(row["completion"], ex)
    assert result.accuracy == pytest.approx(sum(r["reward"] for r in result.rows) / 6)


def test_eval_reads_public_files(model_dir, tmp_path, capsys):
    csv = tmp_path / "sudoku.csv"
    csv.write_text("Puzzle,Solution\n1234341221434300,1234341221434321\n0234341221434321,1234341221434321\n")
    assert main(["eval", "--model", str(model_dir), "--task", "sudoku", "--data", str(csv)]) == 0
    assert last_json(capsys)["n"] == 2


def test_malformed_data_file_names_file_and_line(model_dir, tmp_path, capsys):
    bad = tmp_path / "countdown.jsonl"
    bad.write_text('{"input": "1,2,3", "output": "6"}\n{"input": "1,2,3", "output": \n')
    assert main(["eval", "--model", str(model_dir), "--task", "countdown", "--data", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "countdown.jsonl" in err and "line 2" in err


def test_eos_id_reaches_the_loader_as_ids_and_a_bad_one_is_named(model_dir, monkeypatch, capsys):
    import training.evaluate as ev
    seen = {}

    class Stop(Exception):
        pass

    def spy(path, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(ev, "load_model", spy)
    with pytest.raises(Stop):
        main(["eval", "--model", str(model_dir), "--task", "sudoku", "--limit", "1", "--eos-id", "5,7"])
    assert seen["eos_ids"] == [5, 7]
    monkeypatch.undo()
    assert main(["eval", "--model", str(model_dir), "--task", "sudoku", "--limit", "1", "--eos-id", "x"]) == 2
    assert "--eos-id must be" in capsys.readouterr().err


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "nope"), "--task", "sudoku", "--limit", "1"]) == 2
    assert "nope" in capsys.readouterr().err


def test_eval_learned_reports_the_chosen_thresholds(tmp_path, tokenizer, capsys):
    from diffpo_serve.dllm.threshold_head import ThresholdHead
    model = tiny_model()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    ThresholdHead(model.config.hidden_size).save(tmp_path)
    assert main(["eval", "--model", str(tmp_path), "--task", "countdown", "--limit", "10", "--sampler", "learned"]) == 0
    summary = last_json(capsys)
    dist = summary["threshold_distribution"]
    assert sum(dist.values()) == 10
    grid = ThresholdHead(8).grid.tolist()
    assert all(any(abs(float(k) - g) / g < 1e-3 for g in grid) for k in dist)
    assert min(map(float, dist)) <= summary["threshold"] <= max(map(float, dist))


def test_eval_in_bfloat16_reports_its_dtype(model_dir, capsys):
    """``--dtype bfloat16`` decodes with bfloat16 weights; the summary names the dtype it ran in."""
    args = ["eval", "--model", str(model_dir), "--task", "sudoku", "--limit", "8", "--sampler", "eb"]
    assert main(args) == 0
    full = last_json(capsys)
    assert main(args + ["--dtype", "bfloat16"]) == 0
    half = last_json(capsys)
    assert (full["dtype"], half["dtype"]) == ("float32", "bfloat16")
    assert half["n"] == 8 and 1 <= half["mean_nfe"] <= 16
    with pytest.raises(SystemExit):  # argparse: not a dtype
        main(args + ["--dtype", "int8"])


def test_eval_aggregates_by_hand(model_dir, monkeypatch):
    """accuracy = mean reward, exact = share of rewards of 1 (a reward of exactly 1.0 counts), mean NFE, tokens
    per second (completion tokens up to EOS, a row without EOS counting gen_length), the mean learned bound and
    its distribution, and example i's seed (seed + i across batches), with decoding, rewards and the clock faked."""
    import training.evaluate as ev
    from training.tasks import sudoku
    loaded = load_model(model_dir)
    data = get_task("sudoku").make_dataset("test", 5, seed=1)
    digit = loaded.tokenizer("1", add_special_tokens=False)["input_ids"][0]
    ends = [3, None, 0, 15, 7]  # EOS position per example (None: no EOS, 16 tokens count)
    nfes, bounds = [3, 5, 7, 9, 11], [0.5, 0.5, 0.25, 0.9, 0.25]
    seeds = []

    def fake_decode(loaded_, denoiser, prompts, params):
        seeds.extend(p.seed for p in params)
        rows = range(len(seeds) - len(prompts), len(seeds))
        seqs = [[loaded.eos_id if k == ends[i] else digit for k in range(16)] for i in rows]
        return seqs, [nfes[i] for i in rows], [bounds[i] for i in rows], [None] * len(prompts)

    rewards = iter([1.0, 0.5, 0.0, 1.0, 0.25])
    seen = []
    monkeypatch.setattr(ev, "_decode", fake_decode)
    monkeypatch.setattr(sudoku, "reward", lambda text, ex: seen.append((text, ex["prompt"])) or next(rewards))
    clock = iter(range(100))
    monkeypatch.setattr(ev, "time", SimpleNamespace(perf_counter=lambda: 0.5 * next(clock)))  # 0.5 s a batch
    params = SamplingParams("learned", 16, block_length=16, temperature=1.0, seed=40)
    r = evaluate(loaded, "sudoku", data, params, batch_size=2, progress=False, chat_template=False)
    assert seeds == [40, 41, 42, 43, 44]
    assert [p for _, p in seen] == data["prompt"] and [t for t, _ in seen][:3] == ["111", "1" * 16, ""]
    assert r.n == 5 and r.accuracy == pytest.approx(2.75 / 5) and r.exact == pytest.approx(2 / 5)
    assert r.mean_nfe == pytest.approx(7.0) and r.seconds == pytest.approx(1.5)
    assert r.tokens_per_second == pytest.approx((3 + 16 + 0 + 15 + 7) / 1.5)
    assert r.threshold == pytest.approx(2.4 / 5)
    assert r.threshold_distribution == {"0.25": 2, "0.5": 2, "0.9": 1}
    assert [row["reward"] for row in r.rows] == [1.0, 0.5, 0.0, 1.0, 0.25]
    assert [row["nfe"] for row in r.rows] == nfes


def test_sudoku_d1_accuracy_divides_totals_by_hand():
    """d1's sudoku number: right blank cells over all blank cells of the set (not the mean of row fractions)."""
    sudoku = get_task("sudoku")
    a = {"puzzle": "0" * 4 + "341221434321", "solution": "1234341221434321"}  # 4 blanks
    b = {"puzzle": "1034341221434321", "solution": "1234341221434321"}  # 1 blank
    pairs = [("<answer>1234341221434321</answer>", b), ("<answer>1111341221434321</answer>", a)]
    # b: 1 of 1 right; a: 1 of 4 right (cell 0 is 1) -> (1 + 1) / 5, where the mean of rows would be 0.625
    assert sudoku.d1_accuracy(pairs) == pytest.approx(2 / 5)
    assert sudoku.d1_accuracy([]) == 0.0


def test_eval_reports_d1s_sudoku_number_beside_the_reward():
    """A puzzle with two solutions, stored with the one the bundled model does not write: the reward accepts the
    model's valid grid (1.0) while d1's number counts its cells against the stored one."""
    import datasets
    from diffpo_serve.dllm.loading import default_model_path
    sudoku = get_task("sudoku")
    loaded = load_model(default_model_path())
    puzzle = "0000342143120043"  # 6 blanks, two solutions
    grids = [g for g in sudoku.all_grids() if all(p in ("0", c) for p, c in zip(puzzle, g))]
    assert len(grids) == 2 == sudoku.solution_count(puzzle)
    params = SamplingParams(sampler="steps", gen_length=16)

    def run(solution):
        data = datasets.Dataset.from_dict({"prompt": [f"sudoku {puzzle}"], "answer": [solution],
                                           "puzzle": [puzzle], "solution": [solution]})
        return evaluate(loaded, "sudoku", data, params, progress=False)
    written = run(grids[0]).rows[0]["completion"]
    assert written in grids  # the bundled model solves it
    other = next(g for g in grids if g != written)
    result = run(other)
    blanks = [i for i, c in enumerate(puzzle) if c == "0"]
    assert result.accuracy == 1.0 and result.exact == 1.0
    assert result.d1_accuracy == pytest.approx(sum(written[i] == other[i] for i in blanks) / len(blanks))
    assert result.d1_accuracy < 1.0
    assert run(written).d1_accuracy == 1.0
