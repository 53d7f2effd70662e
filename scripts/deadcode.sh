#!/usr/bin/env bash
# Dead-code survey (vulture): functions, classes, attributes and variables of the package and the client that
# nothing reads. Not part of scripts/test.sh: vulture matches by name only, so read each finding before
# removing anything. tests/, bench/ and examples/ are scanned as readers only (their own findings are not
# shown). Names a framework reads are in scripts/vulture_whitelist.py or ignored by decorator below.
# Exit status: 0 when nothing is reported, 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

decorators="@*.get,@*.post,@*.route,@*.errorhandler,@*.before_request,@*.after_request,@*.teardown_request"
decorators+=",@*.task,@*.connect,@field_validator,@model_validator"
report=$(.venv/bin/vulture gateway shared workers cli client mmfuse tests bench examples \
  scripts/vulture_whitelist.py --min-confidence 60 --ignore-decorators "$decorators" |
  grep -vE '^(tests|bench|examples)/' || true)
[ -z "$report" ] || { printf '%s\n' "$report"; exit 1; }
