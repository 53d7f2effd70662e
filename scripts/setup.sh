#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine for mmfuse: system packages, then a virtualenv in .venv with
# mmfuse, its test tools and the pinned torch. Idempotent: re-running installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=()
# the local stack and the tests start their own; `redis-server --sentinel` is the sentinel (no redis-sentinel package)
command -v redis-server >/dev/null || packages+=(redis-server)
command -v prometheus >/dev/null || packages+=(prometheus)        # the live dashboard check in the tests
command -v ip >/dev/null || packages+=(iproute2)                 # network namespaces: tests/multihost
command -v unshare >/dev/null || packages+=(util-linux)
python3 -c 'import venv, ensurepip' 2>/dev/null || packages+=(python3-venv)
if ((${#packages[@]})); then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  echo "installing ${packages[*]} ..."
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, at the version constraints.txt pins: a CPU build where one is offered (a local wheel, or
# TORCH_INDEX_URL, e.g. https://download.pytorch.org/whl/cpu); an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q -c constraints.txt torch ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
# The client is a distribution of its own that the server depends on: install it from this checkout first.
.venv/bin/python -m pip install -q -c constraints.txt -e ./client -e '.[test]'
# kubectl, pinned, for its built-in kustomize: tests/test_k8s.py renders deploy/k8s with it.
.venv/bin/python scripts/install_kubectl.py .venv/bin/kubectl
echo "setup done: $(.venv/bin/python -c 'import torch, transformers, celery; print("torch", torch.__version__, "transformers", transformers.__version__, "celery", celery.__version__)')"
