#!/usr/bin/env bash
# MLX's Linux CPU wheel bundles the reference netlib BLAS (~65x slower matmul than OpenBLAS).
# runtime/blas.py preloads a system OpenBLAS, and where BLIS is installed too and the dispatch
# library is built (scripts/build-sgemm.sh), sends the few-row products of decoding to BLIS.
# This script installs both libraries (Debian's packages); BLIS is optional: where its package
# is missing (another distribution or release), decoding stays on OpenBLAS.
set -euo pipefail
[ "$(uname -s)" = Linux ] || exit 0
have() { for lib in "$@"; do [ -e "$lib" ] && return 0; done; return 1; }
have_openblas() { have /usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3 /usr/lib64/libopenblas.so.0; }
have_blis() { have /usr/lib/*-linux-gnu/blis-pthread/libblis.so.4 /usr/lib64/libblis.so.4; }
have_openblas && have_blis && exit 0
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt=(env DEBIAN_FRONTEND=noninteractive apt-get)
elif command -v apt-get >/dev/null && command -v sudo >/dev/null; then
  apt=(sudo DEBIAN_FRONTEND=noninteractive apt-get)
else
  have_openblas || echo "setup-blas: cannot install OpenBLAS; matmul will use MLX's slow reference BLAS" >&2
  exit 0
fi
install() { "${apt[@]}" install -y -qq "$@" >/dev/null; }
"${apt[@]}" update -qq
if ! have_openblas; then
  echo "setup-blas: installing OpenBLAS (libopenblas0-pthread)"
  install libopenblas0-pthread
fi
if ! have_blis; then
  echo "setup-blas: installing BLIS (libblis4-pthread)"
  install libblis4-pthread || echo "setup-blas: no BLIS package here; decoding stays on OpenBLAS" >&2
fi
