#!/usr/bin/env bash
# MLX's Linux CPU wheel bundles the reference netlib BLAS (~65x slower matmul than OpenBLAS).
# runtime/blas.py preloads a system OpenBLAS when one is installed; this script installs it.
set -euo pipefail
[ "$(uname -s)" = Linux ] || exit 0
for lib in /usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3 /usr/lib64/libopenblas.so.0; do
  [ -e "$lib" ] && exit 0
done
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "setup-blas: installing OpenBLAS (libopenblas0-pthread)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread >/dev/null
elif command -v apt-get >/dev/null && command -v sudo >/dev/null; then
  sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread >/dev/null
else
  echo "setup-blas: no OpenBLAS found and no way to install it; matmul will use MLX's slow reference BLAS" >&2
fi
