#!/usr/bin/env bash
# Installs the Debian 12 packages lockstep needs, only those missing. As root it runs apt-get;
# otherwise it prints the exact command and exits non-zero.
set -euo pipefail

packages=(
  build-essential cmake ninja-build ccache pkg-config zlib1g-dev
  libtorch-dev libgloo-dev libcxxopts-dev nlohmann-json3-dev libgtest-dev
  libopenblas0-pthread dataset-fashion-mnist
  fortunes        # English text for the char_lm recipe (BSD licence)
  python3-torch   # test oracle and benchmark peer only; never a runtime dependency
  clang libclang-rt-14-dev  # libFuzzer with ASan/UBSan for tests/fuzz; never a runtime dependency
  chromium        # renders the HTML report in a test (tests/train/test_metrics.cpp); never a runtime dependency
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "lockstep: missing Debian packages: ${missing[*]}" >&2
  echo "Run as root:  apt-get update && apt-get install -y --no-install-recommends ${missing[*]}" >&2
  exit 1
fi

echo "lockstep: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
