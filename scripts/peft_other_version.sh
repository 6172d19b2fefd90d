#!/usr/bin/env bash
# The PEFT interop suite (parity, export, import, and every other test that imports peft) under
# another PEFT release than the environment's, without touching the environment: that release is
# installed (no dependencies: PEFT 0.21 and 0.22 declare the same ones) into its own folder, which
# goes first on PYTHONPATH.
#
#   scripts/peft_other_version.sh [VERSION=0.21.2] [pytest args...]   e.g. 0.21.2 -m "not slow"
#
# Run from the repository root, in the environment `pip install -e '.[test]'` made.
set -euo pipefail
version="${1:-0.21.2}"
shift || true
dir="${PEFT_OTHER_DIR:-${TMPDIR:-/tmp}/lora-lite-peft-$version}"
if [ ! -f "$dir/peft/__init__.py" ]; then
    python -m pip install --quiet --no-deps --target "$dir" "peft==$version"
fi
export PYTHONPATH="$dir:$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
got=$(python -c "import peft; print(peft.__version__)")
[ "$got" = "$version" ] || { echo "expected peft $version on the path, got $got" >&2; exit 1; }
echo "peft $got from $dir"
# every test file that imports peft (PEFT_TESTS="tests/a.py tests/b.py" narrows it)
tests=${PEFT_TESTS:-$(grep -l "peft" tests/test_*.py | grep -v -e test_bench.py -e test_readme.py -e test_docs.py)}
python -m pytest -q -p no:cacheprovider $tests "$@"
