#!/usr/bin/env bash
# The main job: build the Swift examples through treemat's persistent worker, run the tally CLI (subcommands,
# @main) and the Swift workspace demo (with a C module), run tally's XCTest + Swift Testing suite and the C
# module's XCTest suite, then show which materialization backend every staged input file took.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/setup.sh

bazel build --config=treemat //examples/...
echo "== tally top 2 (CLI with subcommands)"
bazel run --config=treemat //examples/tally -- top 2 to be or not to be, that is the question
echo "== tally sum / magnitude"
bazel run --config=treemat //examples/tally -- sum 3 -4 10
bazel run --config=treemat //examples/tally -- magnitude 3 -4 10
echo "== tally's tests (XCTest + Swift Testing), checksum's tests (Swift and C)"
bazel test --config=treemat //examples/tally:TallyCoreTests //examples/checksum:ChecksumTests
echo "== invoice demo (its CRC-32 comes from the C module of examples/checksum)"
bazel run --config=treemat //examples/app
python3 -m treemat stats
