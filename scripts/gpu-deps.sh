#!/usr/bin/env bash
# Copies the header-only dependencies and GoogleTest's sources from this Debian machine into
# .device/deps (ignored by git), for a GPU machine that has pip LibTorch but none of them and
# no network: carry .device/deps there and run scripts/gpu-check.sh (docs/gpu.md).
set -euo pipefail
cd "$(dirname "$0")/.."
deps=.device/deps
rm -rf "$deps" && mkdir -p "$deps/include" "$deps/gloo"
cp -r /usr/include/nlohmann "$deps/include/"
cp /usr/include/cxxopts.hpp "$deps/include/"
cp -r /usr/include/gloo "$deps/gloo/"      # used only when LibTorch ships no gloo headers
cp -r /usr/src/googletest "$deps/googletest"
mkdir -p "$deps/zlib" && cp /usr/include/zlib.h /usr/include/zconf.h "$deps/zlib/"  # headers only
du -sh "$deps"
