#!/bin/sh
# The worker's launcher (//tools/treemat:launcher, rules/private/launcher.bzl) starts treemat with no Python stub in
# front: a shell script that execs the toolchain's interpreter on the main file, found through RUNFILES_DIR here
# (a test's runfiles), through its own .runfiles tree when Bazel runs it as a worker (every e2e build).
set -eu
launcher="$1"
first_line=$(head -n 1 "$launcher")
[ "$first_line" = "#!/bin/sh" ] || { echo "launcher is not a shell script: $first_line"; exit 1; }
grep -q '^exec .* -S "[^ ]*/treemat/__main__.py" "\$@"$' "$launcher" || { echo "launcher does not exec the main file with -S"; cat "$launcher"; exit 1; }
# its import roots are the runfiles' copy of treemat (not whatever else is on sys.path, an editable install)
python_path=$(sed -n 's/^export PYTHONPATH="\(.*\)"$/\1/p' "$launcher")
first_root=$(runfiles="$RUNFILES_DIR"; PYTHONPATH=; eval "printf '%s' \"$python_path\"" | cut -d: -f1)
[ -f "$first_root/treemat/__main__.py" ] || { echo "the launcher's first import root $first_root has no treemat"; exit 1; }
# -S (no site) for the relay's start; the CLI adds the site-packages click is in (treemat/__main__.py)
help=$("$launcher" --help)
case "$help" in *"Usage: treemat"*) ;; *) echo "treemat --help through the launcher printed: $help"; exit 1 ;; esac
# the interpreter it runs is the one treemat's package is imported from, with the import root first on the path
where=$(RUNFILES_DIR="$RUNFILES_DIR" "$launcher" --help >/dev/null && "$launcher" stats --help >/dev/null && echo ok)
[ "$where" = ok ] || exit 1
echo "launcher ok"
