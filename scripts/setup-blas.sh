#!/usr/bin/env bash
# MLX's Linux CPU wheel bundles the reference netlib BLAS (~65x slower matmul than OpenBLAS).
# runtime/blas.py preloads a system OpenBLAS, and where BLIS is installed too and the dispatch
# library is built (scripts/build-sgemm.sh), sends the few-row products of decoding to BLIS.
# This script installs both libraries (Debian's packages).
set -euo pipefail
[ "$(uname -s)" = Linux ] || exit 0
have() { for lib in "$@"; do [ -e "$lib" ] && return 0; done; return 1; }
if have /usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3 /usr/lib64/libopenblas.so.0 &&
  have /usr/lib/*-linux-gnu/blis-pthread/libblis.so.4 /usr/lib64/libblis.so.4; then
  exit 0
fi
packages="libopenblas0-pthread libblis4-pthread"
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "setup-blas: installing OpenBLAS and BLIS ($packages)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $packages >/dev/null
elif command -v apt-get >/dev/null && command -v sudo >/dev/null; then
  sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $packages >/dev/null
else
  echo "setup-blas: cannot install $packages; matmul may use MLX's slow reference BLAS" >&2
fi
