"""Mutation testing: plant one small bug at a time in a module and check that its tests fail.

Each mutant changes one AST node (a flipped + / - or * / /, a comparison's strictness, a dropped minus
or ``not``, mean <-> sum, min <-> max, exp <-> log, a ``dim=`` swapped, the two arguments of a call
swapped), writes the module, runs the given test files (``-x``, slow tests excluded) and restores it.
A mutant the tests pass "survived": either the suite misses that bug or the change is equivalent. One whose
tests run past MUTATE_TIMEOUT seconds (environment, default 300; a mutant can stall the sampler's loop)
counts as killed (rc -9).
Results go to OUT.jsonl (one line per mutant; a rerun skips those done).

Run it in a scratch copy of the repository, never in a working tree (it rewrites the modules):

    git archive HEAD | tar -x -C /tmp/mut && cd /tmp/mut
    PYTHONPATH=$PWD python tools/mutate.py /tmp/mut.jsonl \
        training/loss.py:tests/test_rl_wiring.py,tests/test_rl.py  [module[@func+func][#FIRST-LAST]:tests ...]

``@func+func`` keeps the sites inside those functions/classes, ``#FIRST-LAST`` those on lines FIRST..LAST;
tests may be pytest node ids (``tests/test_x.py::test_y``). A mutant's ``index`` counts the module's sites in
source order (unfiltered), so differently filtered runs of one module share OUT.jsonl's record of what is done.
"""
import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SWAP_BIN = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult}
SWAP_CMP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq}
SWAP_ATTR = {"mean": "sum", "sum": "mean", "amax": "amin", "amin": "amax", "max": "min", "min": "max",
             "logsumexp": "sum", "log_softmax": "softmax", "exp": "log", "log": "exp", "clamp_min": "clamp_max"}


def sites(tree):
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and type(node.op) in SWAP_BIN:
            out.append((node, "binop"))
        elif isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in SWAP_CMP:
            out.append((node, "cmp"))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
            out.append((node, "unary"))
        elif isinstance(node, ast.Attribute) and node.attr in SWAP_ATTR and isinstance(node.ctx, ast.Load):
            out.append((node, "attr"))
        elif isinstance(node, ast.keyword) and node.arg == "dim" and isinstance(node.value, (ast.Constant, ast.UnaryOp)):
            out.append((node, "dim"))
        elif isinstance(node, ast.Call) and len(node.args) == 2 and isinstance(node.func, (ast.Name, ast.Attribute)):
            out.append((node, "swapargs"))
    return out


def apply(node, kind):
    """Mutate in place; return an undo closure and a label."""
    if kind == "binop":
        old = node.op
        node.op = SWAP_BIN[type(old)]()
        return (lambda: setattr(node, "op", old)), f"{type(old).__name__}->{type(node.op).__name__}"
    if kind == "cmp":
        old = node.ops[0]
        node.ops = [SWAP_CMP[type(old)]()]
        return (lambda: setattr(node, "ops", [old])), f"{type(old).__name__}->{type(node.ops[0]).__name__}"
    if kind == "unary":
        # replace operand-wrapping by making it a no-op: -x -> +x, not x -> x (via UAdd / double not)
        old = node.op
        node.op = ast.UAdd() if isinstance(old, ast.USub) else ast.Invert()  # Invert on bool tensor == not
        if isinstance(old, ast.Not):
            node.op = ast.UAdd()  # +bool -> int: keeps truthiness, drops the not
        return (lambda: setattr(node, "op", old)), f"drop {type(old).__name__}"
    if kind == "attr":
        old = node.attr
        node.attr = SWAP_ATTR[old]
        return (lambda: setattr(node, "attr", old)), f".{old}->.{node.attr}"
    if kind == "dim":
        old = node.value
        val = ast.literal_eval(old)
        new = 0 if val != 0 else -1
        node.value = ast.Constant(new)
        return (lambda: setattr(node, "value", old)), f"dim={val}->{new}"
    if kind == "swapargs":
        old = list(node.args)
        node.args = [old[1], old[0]]
        return (lambda: setattr(node, "args", old)), "swap args"
    raise ValueError(kind)


def main():
    out = Path(sys.argv[1])
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["file"], r["index"]))
    for spec in sys.argv[2:]:
        fname, tests = spec.split(":", 1)
        funcs, lines = None, None
        if "#" in fname:
            fname, span = fname.split("#")
            first, last = (int(x) for x in span.split("-"))
            lines = range(first, last + 1)
        if "@" in fname:
            fname, f = fname.split("@")
            funcs = set(f.split("+"))
        path = Path(fname)
        src = path.read_text()
        tree = ast.parse(src)
        # skip docstring/annotation-only and f-string noise: only nodes with a lineno
        cand = [(n, k) for n, k in sites(tree) if hasattr(n, "lineno")]
        cand.sort(key=lambda nk: (nk[0].lineno, nk[0].col_offset, nk[1]))
        keep = set(range(len(cand)))
        if funcs:
            scopes = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in funcs]
            inside = {(id(n), k) for sc in scopes for n, k in sites(sc)}
            keep = {i for i in keep if (id(cand[i][0]), cand[i][1]) in inside}
        if lines is not None:
            keep = {i for i in keep if cand[i][0].lineno in lines}
        for i, (node, kind) in enumerate(cand):
            if i not in keep or (fname, i) in done:
                continue
            undo, label = apply(node, kind)
            mutated = ast.unparse(tree)
            undo()
            path.write_text(mutated)
            t = time.time()
            try:
                r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                                    "-m", "not slow", *tests.split(",")], capture_output=True, text=True,
                                   timeout=float(os.environ.get("MUTATE_TIMEOUT", 300)))
                rc = r.returncode
                tail = r.stdout.strip().splitlines()[-1:] if r.stdout else []
            except subprocess.TimeoutExpired:
                rc, tail = -9, ["timeout"]
            finally:
                path.write_text(src)
            rec = {"file": fname, "index": i, "line": node.lineno, "kind": kind, "label": label,
                   "code": src.splitlines()[node.lineno - 1].strip(), "rc": rc, "tail": tail,
                   "seconds": round(time.time() - t, 1)}
            with out.open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
            print(("SURVIVED " if rc == 0 else "killed   ") + f"{fname}:{node.lineno} {label} | {rec['code'][:90]}",
                  flush=True)


if __name__ == "__main__":
    main()
