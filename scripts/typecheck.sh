#!/usr/bin/env bash
# Static type check (mypy, configured in pyproject.toml's [tool.mypy]) of the package mmfuse and the client.
#
# The package maps the repository's top-level directories onto subpackages (pyproject.toml's package-dir:
# mmfuse.gateway is gateway/, ...), which mypy cannot express, and the editable install's import hook is
# invisible to it. So this builds var/typecheck/mmfuse/ (git-ignored; checked on each run) of symlinks:
#   __init__.py -> mmfuse/__init__.py, gateway -> gateway/, shared -> shared/, workers -> workers/, cli -> cli/
# and runs `mypy -p mmfuse -p mmfuse_client` with mypy_path = var/typecheck and client/ (see [tool.mypy]).
# mypy reports the paths it found the modules at (var/typecheck/mmfuse/gateway/api.py); the output is rewritten
# to the repository's own paths (gateway/api.py), so each message names the file to edit.
# Extra arguments go to mypy, e.g. `bash scripts/typecheck.sh --no-incremental`.
set -euo pipefail
cd "$(dirname "$0")/.."

# Links that are already right are left alone: recreating them would make mypy's cache (var/mypy_cache) stale.
tree=var/typecheck/mmfuse
mkdir -p "$tree"
link() {  # link TARGET NAME: $tree/NAME -> TARGET (relative to $tree)
  [ "$(readlink "$tree/$2" 2>/dev/null)" = "$1" ] || { rm -rf "${tree:?}/$2" && ln -s "$1" "$tree/$2"; }
}
link ../../../mmfuse/__init__.py __init__.py
for sub in gateway shared workers cli; do
  link "../../../$sub" "$sub"
done

# mypy's exit status survives the sed (pipefail); its cache is var/mypy_cache ([tool.mypy] cache_dir).
.venv/bin/python -m mypy -p mmfuse -p mmfuse_client "$@" 2>&1 |
  sed -E -e 's#^var/typecheck/mmfuse/__init__\.py#mmfuse/__init__.py#' -e 's#^var/typecheck/mmfuse/##'
