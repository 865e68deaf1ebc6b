#!/usr/bin/env bash
# Builds the Dockerfile and checks the image end to end: the server answers /health and a completion
# on the bundled model, the image's own HEALTHCHECK reports healthy, `--compile` works inside it, the
# process runs as uid 1000, and `stop` (SIGTERM) ends it cleanly with exit code 0. Exits non-zero, naming the step, on any failure.
#
#   bash tests/docker_smoke.sh                  # docker (or podman, if no docker daemon answers)
#   ENGINE=podman bash tests/docker_smoke.sh
#
# Offline machines (no container registry, no download.pytorch.org), as the project's CI machines are:
#   --standin-base   build a local stand-in for the base image (python:3.11-slim-bookworm: Debian
#                    bookworm + its python3.11 and headers, by debootstrap from the Debian mirror;
#                    needs root) when the real one cannot be pulled
#   --pip-mirror     (podman) let the build's pip use this machine's pip configuration (`pip config
#                    list`: find-links, indexes, cert; their directories mounted read-only), not the network
# Extra engine arguments: BUILD_ARGS="..." and RUN_ARGS="..."; in a VM without full cgroup support,
# podman may need BUILD_ARGS="--isolation chroot" RUN_ARGS="--runtime runc" and, in
# /etc/containers/containers.conf, `[containers] default_ulimits = []`. With podman's vfs storage
# driver every build step stores a full copy of the file system: leave 25 GB free, and
# `podman system prune -af` afterwards (the image is kept as $TAG for inspection).
# Also run by `pytest -m slow tests/test_packaging.py` when an engine is present.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TAG="${TAG:-diffpo-serve:smoke}"
PORT="${PORT:-18000}"
NAME="diffpo-smoke-$$"
STANDIN=0
MIRROR=0
for arg in "$@"; do
  case "$arg" in
    --standin-base) STANDIN=1 ;;
    --pip-mirror) MIRROR=1 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

if [[ -z "${ENGINE:-}" ]]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker
  elif command -v podman >/dev/null; then ENGINE=podman
  else echo "no container engine: neither a docker daemon nor podman" >&2; exit 3; fi
fi
WORK="$(mktemp -d)"
cleanup() { "$ENGINE" rm -f "$NAME" >/dev/null 2>&1 || true; rm -rf "$WORK"; }
trap cleanup EXIT
step() { echo "== $*"; }
fail() { echo "FAILED: $*" >&2; "$ENGINE" logs "$NAME" 2>&1 | tail -20 >&2 || true; exit 1; }

BASE="$(sed -n 's/^FROM \([^ ]*\).*/\1/p' "$ROOT/Dockerfile" | head -1)"
if [[ "$STANDIN" == 1 ]] && ! "$ENGINE" image inspect "$BASE" >/dev/null 2>&1 \
   && ! "$ENGINE" pull "$BASE" >/dev/null 2>&1; then
  step "building a stand-in for $BASE (Debian bookworm + python3.11)"
  debootstrap --variant=minbase bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
    || fail "debootstrap (log: $WORK/debootstrap.log)"
  cp /etc/resolv.conf "$WORK/rootfs/etc/resolv.conf"
  chroot "$WORK/rootfs" bash -c "apt-get install -y --no-install-recommends python3 python3-dev python3-pip \
    python3-venv ca-certificates && apt-get clean && rm -rf /var/lib/apt/lists/*" >"$WORK/python.log" 2>&1 \
    || fail "installing python3.11 (log: $WORK/python.log)"
  # the python image's shape: `python` and `pip` on PATH, pip free to install system-wide
  rm -f "$WORK"/rootfs/usr/lib/python3.*/EXTERNALLY-MANAGED
  ln -sf /usr/bin/python3 "$WORK/rootfs/usr/local/bin/python"
  ln -sf /usr/bin/pip3 "$WORK/rootfs/usr/local/bin/pip"
  : >"$WORK/rootfs/etc/resolv.conf"
  tar -C "$WORK/rootfs" -cf - . | "$ENGINE" import --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' - "$BASE" >/dev/null \
    || fail "importing the stand-in base"
  rm -rf "$WORK/rootfs"
fi

build=(build --network host -t "$TAG")
[[ "$ENGINE" == podman ]] && build+=(--format docker --pull=never)  # docker format keeps HEALTHCHECK
if [[ "$MIRROR" == 1 ]]; then  # podman only: `docker build` takes no volumes
  { echo "[global]"; pip config list | sed -nE "s/^[^.]*\.(find-links|extra-index-url|index-url|cert)='(.*)'$/\1 = \2/p" \
      | sort -u -t= -k1,1; } >"$WORK/pip.conf"
  build+=(-v "$WORK/pip.conf:/etc/pip.conf:ro")
  for dir in $(sed -nE 's/^[^=]*= //p' "$WORK/pip.conf" | tr ' ' '\n' | sed -E 's|^file://||; s|/simple/?$||; s|/[^/]*\.crt$||'); do
    [[ -d "$dir" ]] && build+=(-v "$dir:$dir:ro")
  done
fi
step "$ENGINE build"
# shellcheck disable=SC2086
"$ENGINE" "${build[@]}" ${BUILD_ARGS:-} "$ROOT" >"$WORK/build.log" 2>&1 \
  || { tail -30 "$WORK/build.log" >&2; fail "$ENGINE build"; }

step "$ENGINE run (port $PORT)"
# shellcheck disable=SC2086
"$ENGINE" run -d --name "$NAME" --network host -e DIFFPO_PORT="$PORT" ${RUN_ARGS:-} "$TAG" >/dev/null \
  || fail "$ENGINE run"
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
  sleep 1
done
curl -sf "http://127.0.0.1:$PORT/health" >/dev/null || fail "/health did not answer 200 within 120 s"

step "a completion on the bundled model"
reply="$(curl -sf "http://127.0.0.1:$PORT/v1/completions" -H 'content-type: application/json' \
  -d '{"model": "bundled_model", "prompt": "3 5 7 -> 22", "max_tokens": 16}')" || fail "POST /v1/completions"
python3 -c 'import json, sys; r = json.loads(sys.argv[1]); c = r["choices"][0]
assert r["usage"]["completion_tokens"] > 0 and c["finish_reason"] in ("stop", "length"), r
print("   text %r, %d passes, threshold %s" % (c["text"], c["nfe"], c["threshold"]))' "$reply" \
  || fail "completion reply: $reply"

step "the image's HEALTHCHECK"
if [[ "$ENGINE" == podman ]]; then
  "$ENGINE" healthcheck run "$NAME" || fail "podman healthcheck run"
else
  for _ in $(seq 40); do  # docker runs it every 15 s
    status="$("$ENGINE" inspect "$NAME" --format '{{.State.Health.Status}}')"
    [[ "$status" == healthy ]] && break
    sleep 2
  done
  [[ "$status" == healthy ]] || fail "health status $status"
fi

step "--compile inside the image (g++ builds torch.compile's kernels)"
compiled="$("$ENGINE" exec "$NAME" python -c 'from diffpo_serve.dllm.loading import load_model
print(load_model(compile=True).compiled)' 2>/dev/null | tail -1)" || fail "load_model(compile=True) in the image"
[[ "$compiled" == "4 Block layers" ]] || fail "compile in the image gave: $compiled"
echo "   compiled: $compiled"

step "user"
uid="$("$ENGINE" exec "$NAME" id -u)"
[[ "$uid" == 1000 ]] || fail "the server runs as uid $uid, not 1000"

step "stop (SIGTERM drains, then exits)"
"$ENGINE" stop -t 70 "$NAME" >/dev/null || fail "$ENGINE stop"
code="$("$ENGINE" inspect "$NAME" --format '{{.State.ExitCode}}')"
[[ "$code" == 0 ]] || fail "exit code $code after SIGTERM"
echo "OK: $ENGINE image $TAG builds, serves, is healthy, compiles, runs as uid 1000 and stops cleanly"
