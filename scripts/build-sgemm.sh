#!/usr/bin/env bash
# Builds runtime/native/sgemm_dispatch.c into VENV/lib, where runtime/blas.py looks for it.
# Without a C compiler the server still runs, on OpenBLAS alone (slower batched decoding).
set -euo pipefail
[ "$(uname -s)" = Linux ] || exit 0
venv=${1:?usage: build-sgemm.sh VENV}
cc=${CC:-cc}
if ! command -v "$cc" >/dev/null; then
  echo "build-sgemm: no C compiler ($cc); decoding keeps OpenBLAS for every matmul" >&2
  exit 0
fi
"$cc" -O2 -shared -fPIC -Wall -Wextra -o "$venv/lib/libmlxrunner_sgemm.so" \
  runtime/native/sgemm_dispatch.c -ldl ||
  echo "build-sgemm: the dispatch did not build; decoding keeps OpenBLAS for every matmul" >&2
