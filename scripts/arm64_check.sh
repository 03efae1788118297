#!/usr/bin/env bash
# The device install and the bundles' self-tests on emulated Raspberry Pi 4 / Pi 5 processors (Cortex-A72 / A76).
#
#   bash scripts/arm64_check.sh [ARTIFACTS]                 (as root)
#   bash scripts/arm64_check.sh --demo-broken [ARTIFACTS]   (shows the self-test catching a broken int8 kernel)
#
# ARTIFACTS holds mnist-lstm/ and char-rnn/ from `edge-rnn pipeline` (and gru-mnist/, an exported and quantized
# user GRU, if you have one). Without it, quick models are made first (a 2-epoch pipeline and a 2-epoch GRU
# from scripts/demo_gru.py, ~2.5 minutes): they test the ARM run's agreement with x86, not accuracy.
#
# 1. An arm64 Debian 12 root (debootstrap, minbase + python3) under /var/cache/edge-rnn-arm64, built once and reused;
#    arm64 programs run through qemu-user-static, registered with binfmt_misc (mounted here if it is not).
# 2. The device install in it, from this checkout: `pip install .` into a venv (aarch64 wheels: numpy, onnxruntime).
# 3. Bundles made on this (x86) side: mnist-lstm (fp32, int8, step, step-int8), the char RNN (fp32, int8, fp16) and
#    the GRU (fp32, int8, step, step-int8). On each emulated CPU: `edge-rnn verify --run` (the self-test, at one
#    thread), every bundled model's answers to the reference inputs through the public API (`edge_rnn.load`), and
#    the CLI's `infer --json` (sequence models) and `stream` (step models) on the first reference input — each
#    compared with this host's answers at the same thread count (one). One table; exit 1 on a failed self-test, a
#    failed command, or an answer outside the bundle's stored tolerance.
#
# What it proves: the device install and edge-rnn's self-test on ARM's instruction set and onnxruntime's ARM kernels
# (NEON; dot-product on the A76). What it does not: speed — emulated timings say nothing about a real board.
# Found on the way:
# - Debian 12's qemu 7.2 shows the emulated program the host's x86 /proc/cpuinfo, on which onnxruntime's cpuinfo
#   library crashes; an ARM cpuinfo is bind-mounted over it in a private mount namespace (`unshare -m`).
# - Without /sys in the root onnxruntime cannot count processors; /proc and /sys are bind-mounted (and unmounted).
# - qemu 7.2's default CPU model (`max`) gives wrong int8 answers (its SME emulation): the CPU is always pinned
#   with QEMU_CPU. `--demo-broken` runs the self-tests on `max` on purpose and passes only if they catch it.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_BROKEN=0
if [ "${1:-}" = "--demo-broken" ]; then DEMO_BROKEN=1; shift; fi
ARTIFACTS="${1:-}"
ROOT=/var/cache/edge-rnn-arm64/root
WORK="$(mktemp -d /tmp/edge-rnn-arm64.XXXXXX)"
CPUS=(cortex-a72 cortex-a76)
[ "$DEMO_BROKEN" = 1 ] && CPUS=(max)
[ "$(id -u)" = 0 ] || { echo "error: run as root (debootstrap, chroot and mounts need it)" >&2; exit 2; }
command -v edge-rnn >/dev/null || { echo "error: no edge-rnn on PATH — install the project first (see the README)" >&2; exit 2; }
T0=$(date +%s)

MOUNTED=()
cleanup() {
  local m
  for m in "${MOUNTED[@]}"; do umount "$m" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

if [ -z "$ARTIFACTS" ]; then
  ARTIFACTS="$WORK/artifacts"
  echo "quick models for the check (a 2-epoch pipeline on the bundled sample, ~1.5 minutes)…"
  edge-rnn pipeline --data sample --epochs 2 --char-iters 20000 --out "$ARTIFACTS" >"$WORK/pipeline.log" 2>&1 \
    || [ -f "$ARTIFACTS/char-rnn/manifest.json" ] || { cat "$WORK/pipeline.log"; echo "error: the quick pipeline failed" >&2; exit 1; }
fi
for model in mnist-lstm char-rnn; do
  [ -f "$ARTIFACTS/$model/manifest.json" ] || { echo "error: no $ARTIFACTS/$model — run \`edge-rnn pipeline --data sample --out $ARTIFACTS\` first" >&2; exit 2; }
done
GRU="$ARTIFACTS/gru-mnist"
if [ ! -f "$GRU/model.int8.onnx" ]; then
  GRU="$WORK/gru-mnist"
  echo "a user's GRU for the check (scripts/demo_gru.py, 2 epochs; export; quantize)…"
  { python scripts/demo_gru.py "$WORK/gru-mnist.keras" 2 && edge-rnn export "$WORK/gru-mnist.keras" --out "$GRU" \
      && edge-rnn quantize "$GRU" --variant int8; } >"$WORK/gru.log" 2>&1 || { cat "$WORK/gru.log"; echo "error: the GRU model failed" >&2; exit 1; }
fi

command -v qemu-aarch64-static >/dev/null && command -v debootstrap >/dev/null || {
  echo "installing qemu-user-static and debootstrap…"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static debootstrap >/dev/null
}
if ! mountpoint -q /proc/sys/fs/binfmt_misc; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc && MOUNTED+=(/proc/sys/fs/binfmt_misc)
fi
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register

if [ ! -x "$ROOT/usr/bin/python3" ] || [ ! -f "$ROOT/.complete" ]; then
  echo "building the arm64 root (about 4 minutes, once; kept in $ROOT)…"
  rm -rf "$ROOT"
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$ROOT" \
    http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; echo "error: debootstrap failed" >&2; exit 1; }
  touch "$ROOT/.complete"
fi
# The registries are reached through this host's certificate authorities; /proc and /sys let onnxruntime count CPUs.
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/host-ca.crt"
for m in proc sys; do
  if ! mountpoint -q "$ROOT/$m"; then mount --bind "/$m" "$ROOT/$m" && MOUNTED=("$ROOT/$m" "${MOUNTED[@]}"); fi
done

arm() {  # arm CPU COMMAND…: run COMMAND in the arm64 root on the emulated CPU, with an ARM /proc/cpuinfo
  local cpu="$1"; shift
  unshare -m /bin/sh -c 'mount --bind "$0/cpuinfo" "$0/proc/cpuinfo" && exec "$@"' "$ROOT" \
    env -i PATH=/usr/sbin:/usr/bin:/bin HOME=/root COLUMNS=100 QEMU_CPU="$cpu" PIP_CERT=/etc/ssl/certs/host-ca.crt \
    SSL_CERT_FILE=/etc/ssl/certs/host-ca.crt /usr/sbin/chroot "$ROOT" "$@"
}
printf 'processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU part\t: 0xd0b\n\nprocessor\t: 1\nFeatures\t: fp asimd evtstrm crc32 cpuid asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU part\t: 0xd0b\n' > "$ROOT/cpuinfo"

echo "the device install (pip install . in an arm64 venv, emulated)…"
rm -rf "$ROOT/src" && mkdir -p "$ROOT/src" && git archive HEAD | tar -x -C "$ROOT/src"
[ -x "$ROOT/venv/bin/python" ] || arm cortex-a72 /usr/bin/python3 -m venv /venv
arm cortex-a72 /venv/bin/pip install -q --disable-pip-version-check /src
if arm cortex-a72 /venv/bin/python -c "import tensorflow" 2>/dev/null; then echo "error: tensorflow in the device install" >&2; exit 1; fi

echo "bundles, their reference inputs and this host's answers…"
edge-rnn bundle "$ARTIFACTS/mnist-lstm" --variant fp32 --variant int8 --variant step --variant step-int8 -o "$WORK/mnist-lstm.tar.gz" >/dev/null
edge-rnn bundle "$ARTIFACTS/char-rnn" --variant fp32 --variant int8 --variant fp16 -o "$WORK/char-rnn.tar.gz" >/dev/null
edge-rnn bundle "$GRU" --variant fp32 --variant int8 --variant step --variant step-int8 -o "$WORK/gru-mnist.tar.gz" >/dev/null
BUNDLES=(mnist-lstm.tar.gz char-rnn.tar.gz gru-mnist.tar.gz)
rm -rf "$ROOT/check" && mkdir -p "$ROOT/check" && cp "$WORK"/*.tar.gz "$ROOT/check/"

# Every bundled model through the public API on the reference inputs, and the CLI commands a device runs (written to
# a file, run on both sides): `infer --json` on the first reference input of each sequence model, `stream` on it for
# each step model (and the char RNN, whose every file is one). The step models' answers are those after the last step.
ANSWERS='
import json, shlex, sys, numpy as np, edge_rnn
from edge_rnn.device.bundle import open_bundle
out_npz, where, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
out, commands = {}, []
for path in paths:
    bundle = open_bundle(path)
    tag = path.rsplit("/", 1)[-1].split(".")[0]
    inputs, _ = bundle.reference()
    for role in bundle.roles:
        if role.endswith("_config"):
            continue
        model = edge_rnn.load(path, role=role, threads=1)
        names = [i.name for i in model.inputs]
        seq = {n: inputs[n] for n in names if n in inputs}
        for n, x in seq.items():
            np.save(f"{where}/{tag}.{n}.npy", x[:1] if x.ndim >= 2 else x)
        cli_inputs = (f"{where}/{tag}.{names[0]}.npy" if len(seq) == 1 else "") + " ".join(f"--input {n}={where}/{tag}.{n}.npy" for n in seq if len(seq) > 1)
        if "_step" in role or model.manifest.get("task") == "generate":
            stream = model.stream(streams=len(next(iter(seq.values()))))
            steps = next(iter(seq.values())).shape[1]
            got = [stream.step(**{n: x[:, t] for n, x in seq.items()}) for t in range(steps)]
            answer = got[-1]
            commands.append(f"stream {path} --role {role} --threads 1 --digits 0 " + " ".join(f"--input {n}={where}/{tag}.{n}.npy" for n in seq))
        else:
            answer = model.predict(**seq)
            commands.append(f"infer {path} --role {role} --threads 1 --json {cli_inputs}")
        for name, y in answer.items():
            out["|".join((tag, role, name))] = np.asarray(y, np.float64)
np.savez(out_npz, **out)
with open(out_npz + ".commands", "w") as f:
    f.write("\n".join(commands) + "\n")
'
# The numbers in a command's output (JSON lines from stream, one JSON document from infer --json), flattened.
NUMBERS='
import json, sys
def walk(v):
    if isinstance(v, bool): return []
    if isinstance(v, (int, float)): return [float(v)]
    if isinstance(v, list): return [x for e in v for x in walk(e)]
    if isinstance(v, dict): return [x for k in sorted(v) if k != "model" for x in walk(v[k])]
    return []
text = sys.stdin.read()
try:
    docs = [json.loads(text)]
except ValueError:
    docs = [json.loads(line) for line in text.splitlines() if line.strip()]
print(json.dumps([x for d in docs for x in walk(d)]))
'
run_cli() {  # run_cli OUTDIR EDGE_RNN_COMMAND… (each command's numbers to OUTDIR/<n>.json; status to OUTDIR/<n>.rc)
  local outdir="$1"; shift; local n=0
  while read -r line; do
    n=$((n + 1))
    # shellcheck disable=SC2086
    "$@" $line > "$outdir/$n.out" 2> "$outdir/$n.err" && echo 0 > "$outdir/$n.rc" || echo $? > "$outdir/$n.rc"
  done
}
mkdir -p "$WORK/x86-cli"
python -c "$ANSWERS" "$WORK/x86.npz" "$ROOT/check" "${BUNDLES[@]/#/$ROOT/check/}" >/dev/null
sed "s#$ROOT/check#/check#g" "$WORK/x86.npz.commands" > "$ROOT/check/commands"
run_cli "$WORK/x86-cli" edge-rnn < "$WORK/x86.npz.commands"

status=0
for cpu in "${CPUS[@]}"; do
  echo "== $cpu"
  mkdir -p "$WORK/$cpu-cli" "$ROOT/check/$cpu-cli"
  for b in "${BUNDLES[@]%.tar.gz}"; do
    start=$(date +%s%N)
    arm "$cpu" /venv/bin/edge-rnn verify "/check/$b.tar.gz" --run >"$WORK/$cpu-$b.verify" 2>&1 && echo ok > "$WORK/$cpu-$b.verdict" \
      || { echo FAIL > "$WORK/$cpu-$b.verdict"; [ "$DEMO_BROKEN" = 1 ] || cat "$WORK/$cpu-$b.verify"; }
    echo "$(( ($(date +%s%N) - start) / 1000000 ))" > "$WORK/$cpu-$b.ms"
  done
  arm "$cpu" /venv/bin/python -c "$ANSWERS" "/check/$cpu.npz" "/check/$cpu-cli" "${BUNDLES[@]/#//check/}" >/dev/null
  arm "$cpu" /bin/sh -c 'n=0; while read -r line; do n=$((n + 1)); /venv/bin/edge-rnn $line > /check/'"$cpu"'-cli/$n.out 2> /check/'"$cpu"'-cli/$n.err; echo $? > /check/'"$cpu"'-cli/$n.rc; done' < "$ROOT/check/commands"
  cp "$ROOT/check/$cpu-cli"/* "$WORK/$cpu-cli/" && cp "$ROOT/check/$cpu.npz" "$WORK/"
done
for dir in "$WORK"/*-cli; do
  for f in "$dir"/*.out; do python -c "$NUMBERS" < "$f" > "${f%.out}.json" 2>/dev/null || echo null > "${f%.out}.json"; done
done

python - "$WORK" "$DEMO_BROKEN" "${CPUS[@]}" <<'EOF' || status=1
import json, sys, numpy as np
from edge_rnn.device.bundle import open_bundle
work, demo, cpus = sys.argv[1], sys.argv[2] == "1", sys.argv[3:]
x86 = np.load(f"{work}/x86.npz")
commands = open(f"{work}/x86.npz.commands").read().split("\n")
tolerance = {b: open_bundle(f"{work}/{b}.tar.gz").manifest["reference"]["tolerances"] for b in ("mnist-lstm", "char-rnn", "gru-mnist")}
print(f"\n{'CPU':5} {'bundle':10} {'role':10} {'via':6} {'max|Δ| x86':>10} {'tolerance':>9} {'top-1':>6} {'self-test':>9} {'wall s':>6}")
short = lambda role: role.removeprefix("onnx_") if role != "onnx" else "fp32"
bad, caught = 0, 0
for cpu in cpus:
    arm = np.load(f"{work}/{cpu}.npz")
    for key in x86.files:
        bundle, role, output = key.split("|")
        tol = tolerance[bundle].get(role, {}).get(output)
        if tol is None:
            continue  # a state output: judged through the outputs it feeds
        diff = float(np.max(np.abs(arm[key] - x86[key])))
        agree = float(np.mean(arm[key].argmax(-1) == x86[key].argmax(-1))) if x86[key].ndim >= 2 and x86[key].shape[-1] > 1 else None
        selftest = open(f"{work}/{cpu}-{bundle}.verdict").read().strip()
        seconds = int(open(f"{work}/{cpu}-{bundle}.ms").read()) / 1000
        ok = selftest == "ok" and diff <= tol["atol"]
        bad += not ok
        print(f"{cpu.removeprefix('cortex-'):5} {bundle:10} {short(role):10} {'API':6} {diff:10.2e} {tol['atol']:9.1e} {'' if agree is None else format(agree, '.0%'):>6} "
              f"{selftest:>9} {seconds:6.1f}{'' if ok or demo else '  FAIL'}")
    for n, command in enumerate(filter(None, commands), start=1):
        words = command.split()
        bundle, role = words[1].rsplit("/", 1)[-1].split(".")[0], words[words.index("--role") + 1]
        rc = int(open(f"{work}/{cpu}-cli/{n}.rc").read())
        got, want = json.load(open(f"{work}/{cpu}-cli/{n}.json")), json.load(open(f"{work}/x86-cli/{n}.json"))
        atol = max((t["atol"] for t in tolerance[bundle].get(role, {}).values()), default=0.0)
        same_shape = got is not None and want is not None and len(got) == len(want) and len(want) > 0
        diff = float(np.max(np.abs(np.subtract(got, want)))) if same_shape else float("inf")
        ok = rc == 0 and diff <= atol
        bad += not ok
        print(f"{cpu.removeprefix('cortex-'):5} {bundle:10} {short(role):10} {words[0]:6} {diff:10.2e} {atol:9.1e} {'':>6} {'exit ' + str(rc) if rc else '':>9} {'':>6}"
              f"{'' if ok or demo else '  FAIL'}")
        if rc and not demo:
            print("    " + open(f"{work}/{cpu}-cli/{n}.err").read().strip()[-300:])
if demo:
    failed = sorted(b for b in tolerance for cpu in cpus if open(f"{work}/{cpu}-{b}.verdict").read().strip() != "ok")
    caught = len(failed)
    print(f"\n--demo-broken: QEMU_CPU=max, whose int8 arithmetic is wrong under qemu 7.2 — `verify --run` failed for "
          f"{', '.join(failed) or 'no bundle'}: {'caught' if caught else 'NOT caught (is this qemu newer than 7.2? its max CPU may be fixed)'}")
    sys.exit(0 if caught else 1)
sys.exit(1 if bad else 0)
EOF
echo "host: $(python -c 'from edge_rnn.device.hostinfo import describe, cpu_features; print(describe(cpu_features()))' 2>/dev/null || uname -m); qemu $(qemu-aarch64-static --version | head -1 | awk '{print $3}')"
echo "whole check: $(( $(date +%s) - T0 )) s (emulated timings are not speed figures)"
exit $status
