#!/usr/bin/env bash
# Set up the emulated aarch64 environment that `onnxopt validate --target arm64` runs models in.
#
#   bash scripts/setup_arm64.sh [SYSROOT]      (default: $ONNXOPT_ARM64_SYSROOT, else /opt/onnxopt-arm64)
#
# What it does, with Debian's and PyPI's ordinary clients only:
#   1. installs Debian's qemu-user-static (apt-get; root, or sudo);
#   2. downloads Debian's arm64 python3 packages and their dependencies with a private apt
#      configuration (the host's sources and keyring, arm64 as the only architecture, lists and
#      archives under SYSROOT/.apt: the host's dpkg and apt state are not touched) and unpacks
#      them with dpkg-deb -x (no maintainer scripts run, so no chroot or binfmt is needed);
#   3. installs PyPI's aarch64 onnxruntime and numpy wheels into SYSROOT/site-packages
#      (pip install --target --platform manylinux..._aarch64 --only-binary=:all:), the same
#      onnxruntime version as the host's when PyPI has it for aarch64;
#   4. writes SYSROOT/bin/python (a launcher: qemu-aarch64-static -L SYSROOT python3.X) and
#      SYSROOT/onnxopt-arm64.json (what was installed), which onnxopt reads to find it.
# Rerunning is safe: it refreshes the packages and wheels in place.
#
# Environment: PYTHON (a Python with pip to download wheels; default: python3, else the one running
# onnxopt), ORT_VERSION (pin another onnxruntime), NUMPY_SPEC (default: numpy).
set -euo pipefail

SYSROOT="${1:-${ONNXOPT_ARM64_SYSROOT:-/opt/onnxopt-arm64}}"
PYTHON="${PYTHON:-python3}"
say() { printf '[setup_arm64] %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 2; }

. /etc/os-release
[ "${ID:-}" = debian ] || [[ " ${ID_LIKE:-} " == *" debian "* && "${ID:-}" != ubuntu ]] \
  || die "this script uses Debian's arm64 packages and the host's Debian apt sources; run it on Debian (found ${PRETTY_NAME:-unknown})"
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON has no pip; set PYTHON=/path/to/python-with-pip (e.g. your venv's python)"

SUDO=()
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || die "installing qemu-user-static and writing $SYSROOT need root (or sudo)"
  SUDO=(sudo)
fi

# 1. qemu-user-static
if ! command -v qemu-aarch64-static >/dev/null; then
  say "installing qemu-user-static"
  "${SUDO[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends qemu-user-static >/dev/null
fi
QEMU="$(command -v qemu-aarch64-static)"

"${SUDO[@]}" mkdir -p "$SYSROOT"
[ -w "$SYSROOT" ] || "${SUDO[@]}" chown "$(id -u):$(id -g)" "$SYSROOT"

# 2. Debian arm64 python, through a private apt configuration
APT_DIR="$SYSROOT/.apt"
mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/archives/partial" "$APT_DIR/cache"
: > "$APT_DIR/status"
APT=(apt-get -qq
  -o APT::Architecture=arm64 -o APT::Architectures=arm64
  -o Dir::State::Lists="$APT_DIR/lists" -o Dir::State::status="$APT_DIR/status"
  -o Dir::Cache="$APT_DIR/cache" -o Dir::Cache::archives="$APT_DIR/archives"
  -o Debug::NoLocking=1 -o APT::Sandbox::User=root)
say "reading Debian's arm64 package lists (${VERSION_CODENAME:-host suite})"
"${APT[@]}" update
PY="$("${APT[@]/apt-get/apt-cache}" depends python3-minimal 2>/dev/null | grep -o 'python3\.[0-9]*-minimal' | head -1 | sed 's/-minimal$//')"
[ -n "$PY" ] || die "could not find Debian's arm64 python3 package"
PYVER="${PY#python}"
say "downloading $PY (arm64) and its dependencies"
rm -f "$APT_DIR/archives/"*.deb
"${APT[@]}" install -y --download-only --no-install-recommends "$PY" "lib$PY-stdlib" libstdc++6 libgcc-s1 >/dev/null
for deb in "$APT_DIR/archives/"*.deb; do
  dpkg-deb -x "$deb" "$SYSROOT"
done
[ -x "$SYSROOT/usr/bin/$PY" ] || die "$PY was not unpacked into $SYSROOT/usr/bin"

# 3. aarch64 wheels from PyPI
HOST_ORT="$("$PYTHON" -c 'import onnxruntime; print(onnxruntime.__version__)' 2>/dev/null || true)"
ORT_SPEC="onnxruntime${ORT_VERSION:+==$ORT_VERSION}"
[ -z "${ORT_VERSION:-}" ] && [ -n "$HOST_ORT" ] && ORT_SPEC="onnxruntime==$HOST_ORT"
PIP=("$PYTHON" -m pip install -q --upgrade --no-compile --target "$SYSROOT/site-packages" --only-binary=:all:
  --implementation cp --python-version "$PYVER" --abi "cp${PYVER/./}"
  --platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 --platform manylinux_2_17_aarch64
  --platform manylinux2014_aarch64)
say "installing $ORT_SPEC and ${NUMPY_SPEC:-numpy} wheels for aarch64 / cp${PYVER/./}"
if ! "${PIP[@]}" "$ORT_SPEC" "${NUMPY_SPEC:-numpy}" 2>"$APT_DIR/pip.log"; then
  [ "$ORT_SPEC" = onnxruntime ] && { cat "$APT_DIR/pip.log" >&2; die "pip could not install onnxruntime for aarch64"; }
  say "no aarch64 wheel of $ORT_SPEC for Python $PYVER; taking the newest onnxruntime instead"
  "${PIP[@]}" onnxruntime "${NUMPY_SPEC:-numpy}" || die "pip could not install onnxruntime for aarch64"
fi

# 4. a /proc/cpuinfo for the emulated CPU, a launcher and a marker
# qemu-user passes the host's (x86) /proc/cpuinfo through; onnxruntime's CPU detection (cpuinfo) finds no Arm core
# in it and crashes on import. qemu -L serves files under SYSROOT first, so an Arm cpuinfo there is what the guest
# reads: two Neoverse-N1 cores (Armv8.2 with the dot-product instructions), matching the default QEMU_CPU.
mkdir -p "$SYSROOT/proc" "$SYSROOT/bin"
for i in 0 1; do
  printf 'processor\t: %s\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\nCPU part\t: 0xd0c\nCPU revision\t: 1\n\n' "$i"
done > "$SYSROOT/proc/cpuinfo"
cat > "$SYSROOT/bin/python" <<LAUNCHER
#!/bin/sh
# aarch64 $PY under qemu-user emulation, with the aarch64 onnxruntime and numpy wheels (no site: only these packages).
# QEMU_CPU picks the emulated CPU (default neoverse-n1, as ROOT/proc/cpuinfo says; e.g. max adds i8mm and SVE).
ROOT="$SYSROOT"
PYTHONHOME="\$ROOT/usr" PYTHONPATH="\$ROOT/site-packages" PYTHONNOUSERSITE=1 PYTHONDONTWRITEBYTECODE=1 \\
  exec "$QEMU" -cpu "\${QEMU_CPU:-neoverse-n1}" -L "\$ROOT" "\$ROOT/usr/bin/$PY" -S "\$@"
LAUNCHER
chmod +x "$SYSROOT/bin/python"
INFO="$("$SYSROOT/bin/python" -c 'import json, platform, numpy, onnxruntime as o; print(json.dumps({"machine": platform.machine(), "python": platform.python_version(), "numpy": numpy.__version__, "onnxruntime": o.__version__, "providers": o.get_available_providers()}))')" \
  || die "the aarch64 python in $SYSROOT does not start under qemu; see the messages above"
printf '{"sysroot": "%s", "qemu": "%s", "python": "%s", "runtime": %s}\n' "$SYSROOT" "$QEMU" "/usr/bin/$PY" "$INFO" > "$SYSROOT/onnxopt-arm64.json"
say "ready: $INFO"
say "use it: onnxopt validate ref.onnx cand.onnx --eval data.npz --target arm64"
