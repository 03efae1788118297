#!/usr/bin/env bash
# The device install and the bundles' self-tests on emulated Raspberry Pi 4 / Pi 5 processors (Cortex-A72 / A76).
#
#   bash scripts/arm64_check.sh [ARTIFACTS]     (as root; ARTIFACTS holds mnist-lstm/ and char-rnn/ from `edge-rnn pipeline`)
#
# 1. An arm64 Debian 12 root (debootstrap, minbase + python3) under /var/cache/edge-rnn-arm64, built once and reused;
#    arm64 programs run through qemu-user-static, registered with binfmt_misc (mounted here if it is not).
# 2. The device install in it, from this checkout: `pip install .` into a venv (aarch64 wheels: numpy, onnxruntime).
# 3. Bundles made on this (x86) side, and on each emulated CPU: `edge-rnn verify --run` (the self-test), and every
#    bundled model's answers to the reference inputs through the public API, compared with this host's answers at
#    the same thread count. One table; exit 1 on a failed self-test or an answer outside the bundle's tolerance.
#
# What it proves: the device install and edge-rnn's self-test on ARM's instruction set and onnxruntime's ARM kernels
# (NEON; dot-product on the A76). What it does not: speed — emulated timings say nothing about a real board.
# Found on the way: Debian 12's qemu 7.2 shows the emulated program the host's x86 /proc/cpuinfo, on which
# onnxruntime's cpuinfo library crashes; an ARM cpuinfo is bind-mounted over it in a private mount namespace.
set -euo pipefail
cd "$(dirname "$0")/.."
ARTIFACTS="${1:-artifacts}"
ROOT=/var/cache/edge-rnn-arm64/root
WORK="$(mktemp -d /tmp/edge-rnn-arm64.XXXXXX)"
CPUS=(cortex-a72 cortex-a76)
[ "$(id -u)" = 0 ] || { echo "error: run as root (debootstrap, chroot and mounts need it)" >&2; exit 2; }
for model in mnist-lstm char-rnn; do
  [ -f "$ARTIFACTS/$model/manifest.json" ] || { echo "error: no $ARTIFACTS/$model — run \`edge-rnn pipeline --data sample --out $ARTIFACTS\` first" >&2; exit 2; }
done

cleanup() {
  umount "$ROOT/proc" "$ROOT/sys" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

command -v qemu-aarch64-static >/dev/null && command -v debootstrap >/dev/null || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static debootstrap >/dev/null
}
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register

if [ ! -x "$ROOT/usr/bin/python3" ]; then
  echo "building the arm64 root (about 4 minutes)…"
  rm -rf "$ROOT"
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$ROOT" \
    http://deb.debian.org/debian >/dev/null
fi
# The registries are reached through this host's certificate authorities; /proc and /sys let onnxruntime count CPUs.
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/host-ca.crt"
mountpoint -q "$ROOT/proc" || mount --bind /proc "$ROOT/proc"
mountpoint -q "$ROOT/sys" || mount --bind /sys "$ROOT/sys"

arm() {  # arm CPU COMMAND…: run COMMAND in the arm64 root on the emulated CPU, with an ARM /proc/cpuinfo
  local cpu="$1"; shift
  unshare -m /bin/sh -c 'mount --bind "$0/cpuinfo" "$0/proc/cpuinfo" && exec "$@"' "$ROOT" \
    env -i PATH=/usr/sbin:/usr/bin:/bin HOME=/root COLUMNS=100 QEMU_CPU="$cpu" PIP_CERT=/etc/ssl/certs/host-ca.crt \
    SSL_CERT_FILE=/etc/ssl/certs/host-ca.crt /usr/sbin/chroot "$ROOT" "$@"
}
printf 'processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU part\t: 0xd0b\n\nprocessor\t: 1\nFeatures\t: fp asimd evtstrm crc32 cpuid asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU part\t: 0xd0b\n' > "$ROOT/cpuinfo"

echo "the device install (pip install . in an arm64 venv)…"
rm -rf "$ROOT/src" && mkdir -p "$ROOT/src" && git archive HEAD | tar -x -C "$ROOT/src"
[ -x "$ROOT/venv/bin/python" ] || arm cortex-a72 /usr/bin/python3 -m venv /venv
arm cortex-a72 /venv/bin/pip install -q --disable-pip-version-check /src
if arm cortex-a72 /venv/bin/python -c "import tensorflow" 2>/dev/null; then echo "error: tensorflow in the device install" >&2; exit 1; fi

echo "bundles and this host's answers…"
edge-rnn bundle "$ARTIFACTS/mnist-lstm" --variant fp32 --variant int8 --variant step --variant step-int8 -o "$WORK/mnist-lstm.tar.gz" >/dev/null
edge-rnn bundle "$ARTIFACTS/char-rnn" --variant fp32 --variant int8 --variant fp16 -o "$WORK/char-rnn.tar.gz" >/dev/null
mkdir -p "$ROOT/check" && cp "$WORK"/*.tar.gz "$ROOT/check/"
ANSWERS='
import json, sys, numpy as np, edge_rnn
from edge_rnn.device.bundle import open_bundle
out = {}
for path in sys.argv[2:]:
    bundle = open_bundle(path)
    inputs, _ = bundle.reference()
    for role in bundle.roles:
        if role.endswith("_config"):
            continue
        model = edge_rnn.load(path, role=role, threads=1)
        names = [i.name for i in model.inputs]
        if "_step" in role:
            stream = model.stream(streams=len(next(iter(inputs.values()))))
            seq = {n: inputs[n] for n in names if n in inputs}
            steps = next(iter(seq.values())).shape[1]
            got = [stream.step(**{n: x[:, t] for n, x in seq.items()}) for t in range(steps)]
            answer = got[-1]
        else:
            answer = model.predict(**{n: inputs[n] for n in names if n in inputs})
        for name, y in answer.items():
            out["|".join((path.rsplit("/", 1)[-1], role, name))] = np.asarray(y, np.float64)
np.savez(sys.argv[1], **out)
'
python -c "$ANSWERS" "$WORK/x86.npz" "$WORK"/*.tar.gz

status=0
declare -A SECONDS_OF
for cpu in "${CPUS[@]}"; do
  echo "== $cpu"
  start=$(date +%s)
  for b in mnist-lstm char-rnn; do
    arm "$cpu" /venv/bin/edge-rnn verify "/check/$b.tar.gz" --run >"$WORK/$cpu-$b.verify" 2>&1 || { status=1; cat "$WORK/$cpu-$b.verify"; }
  done
  arm "$cpu" /venv/bin/python -c "$ANSWERS" "/check/$cpu.npz" /check/mnist-lstm.tar.gz /check/char-rnn.tar.gz
  SECONDS_OF[$cpu]=$(( $(date +%s) - start ))
done

python - "$WORK" "$ROOT/check" "${CPUS[@]}" <<'EOF' || status=1
import json, sys, numpy as np
from edge_rnn.device.bundle import open_bundle
work, check, cpus = sys.argv[1], sys.argv[2], sys.argv[3:]
x86 = np.load(f"{work}/x86.npz")
print(f"\n{'CPU':11} {'bundle':11} {'role':15} {'output':8} {'max|Δ| vs x86':>14} {'tolerance':>10} {'top-1 agree':>11} {'self-test':>9}")
bad = 0
for cpu in cpus:
    arm = np.load(f"{check}/{cpu}.npz")
    for key in x86.files:
        bundle, role, output = key.split("|")
        tol = open_bundle(f"{work}/{bundle}").manifest["reference"]["tolerances"].get(role, {}).get(output)
        diff = float(np.max(np.abs(arm[key] - x86[key])))
        agree = float(np.mean(arm[key].argmax(-1) == x86[key].argmax(-1))) if x86[key].ndim >= 2 and x86[key].shape[-1] > 1 else None
        selftest = "ok" if "FAIL" not in open(f"{work}/{cpu}-{bundle.split('.')[0]}.verify").read() else "FAIL"
        ok = selftest == "ok" and (tol is None or diff <= tol["atol"])
        bad += not ok
        print(f"{cpu:11} {bundle.split('.')[0]:11} {role:15} {output:8} {diff:14.2e} {'' if tol is None else format(tol['atol'], '.1e'):>10} "
              f"{'' if agree is None else format(agree, '.0%'):>11} {selftest:>9}{'' if ok else '  FAIL'}")
sys.exit(1 if bad else 0)
EOF
for cpu in "${CPUS[@]}"; do echo "$cpu: ${SECONDS_OF[$cpu]} s (emulated: not a speed figure)"; done
exit $status
