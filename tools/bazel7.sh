#!/usr/bin/env bash
# Bazel 7.7.1 (Debian sid's bazel-bootstrap) on a bookworm machine, in a cached sid chroot.
#
#   tools/bazel7.sh setup                         create (or finish, or update) the chroot; idempotent
#   tools/bazel7.sh run [--bind DIR]... -- CMD..  run CMD in the chroot (creating it first if needed)
#   tools/bazel7.sh test [PYTEST ARGS]..          setup, then the adoption e2e test on Bazel 7 (both modes)
#   tools/bazel7.sh root                          print where the chroot lives
#   tools/bazel7.sh bot-extra                     print where the bot extra (buildgrid, grpc) is installed, after
#                                                 installing it if needed (for `treemat bot` in the chroot)
#
# The chroot lives in $TREEMAT_BAZEL7_ROOT (default ~/.cache/treemat/bazel7-sid; never inside the repository).
# It is created with `debootstrap --variant=minbase sid` from the Debian mirror this machine's apt uses, then
# gets bazel-bootstrap (7.7.1), the shared libraries swiftc needs, python3 with treemat's dependencies from
# PyPI (not treemat itself: `run` puts this checkout's tools/ on PYTHONPATH), and stub modules that let
# Bzlmod resolve @bazel_tools offline. Recipe and measurements: docs/bazel.md "Bazel 7 (Debian sid chroot)".
#
# `run` mounts proc, /sys, /dev, /opt/swift (read-only), this checkout and every --bind DIR at the same paths
# inside the chroot, in a private mount namespace (unshare --mount) whose root it pivots to the chroot (the
# rest of the host is not visible): the host never sees those mounts, and
# the kernel drops them when the last process of the namespace exits, whatever the exit status. A Bazel
# server started by CMD keeps its namespace alive until `bazel shutdown` or its idle timeout (15 minutes,
# set in the chroot's /etc/bazel/bazelrc); a later `run` reaches it over its localhost port.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
ROOT="${TREEMAT_BAZEL7_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/treemat/bazel7-sid}"
# Bump when the recipe below changes: `setup` then re-runs every step after debootstrap.
RECIPE=3
READY="$ROOT/.treemat-bazel7-ready"
STUBS=/usr/share/treemat/bzlmod-stubs
SWIFT_DIR="${TREEMAT_SWIFT_DIR:-/opt/swift}"
# Bazel 7.7.1 (pulls OpenJDK 25 and g++), swiftc 6.x's runtime libraries (its clang driver links with
# binutils' ld, crt files and libstdc++ from g++), python3 + pip for treemat's dependencies.
PACKAGES=(bazel-bootstrap g++ libncurses6 libcurl4t64 libedit2 libxml2 libsqlite3-0 python3 python3-pip
  ca-certificates)

log() { echo "bazel7: $*" >&2; }
die() { log "$*"; exit 1; }

usage() {
  sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

need_root() {
  [ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, chroot, mount): run it with sudo"
}

mirror() {
  # The first Debian (not security) mirror of this machine's apt sources, one-line or deb822 format.
  if [ -n "${TREEMAT_DEBIAN_MIRROR:-}" ]; then echo "$TREEMAT_DEBIAN_MIRROR"; return; fi
  local uri
  uri="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | grep -oE '^(deb|URIs:)[[:space:]]+(\[[^]]*\][[:space:]]+)?https?://[^[:space:]]+/debian/?([[:space:]]|$)' \
    | grep -oE 'https?://[^[:space:]]+' | head -n 1 || true)"
  echo "${uri:-http://deb.debian.org/debian}"
}

# in_namespace NBINDS DIR... CMD...: runs CMD inside the chroot, in a private mount namespace with the
# chroot's mounts in place: proc, sys, dev, the Swift toolchain (read-only), then the NBINDS bind dirs
# (absolute, existing) at the same paths. The binds are arguments, never shared state: a first `run` once lost
# its binds (and so the checkout) because `setup`, called from it, reset a global list. The
# namespace's root is pivoted to the chroot (pivot_root, not chroot(2): the kernel refuses user namespaces to
# chrooted processes, and Bazel's linux-sandbox and treemat's hardlink isolation need them).
in_namespace() {
  local nbinds="$1"
  shift
  local binds=("${@:1:$nbinds}")
  shift "$nbinds"
  unshare --mount --propagation private -- bash -euo pipefail -c '
    root="$1"; swift="$2"; nbinds="$3"; shift 3
    binds=("${@:1:$nbinds}"); shift "$nbinds"
    mount --bind "$root" "$root"
    mount -t proc proc "$root/proc"
    mount --rbind /sys "$root/sys" && mount --make-rslave "$root/sys"
    mount --rbind /dev "$root/dev" && mount --make-rslave "$root/dev"
    if [ -d "$swift" ]; then
      mkdir -p "$root$swift"
      mount --bind "$swift" "$root$swift" && mount -o remount,bind,ro "$root$swift"
    fi
    for dir in "${binds[@]}"; do
      mkdir -p "$root$dir"
      mount --rbind "$dir" "$root$dir"
    done
    cd "$root"
    mkdir -p .treemat-oldroot
    pivot_root . .treemat-oldroot
    exec chroot . /bin/sh -c "umount -l /.treemat-oldroot && exec \"\$@\"" sh "$@"
  ' bash "$ROOT" "$SWIFT_DIR" "${#binds[@]}" "${binds[@]}" "$@"
}

in_chroot() {
  # Runs a command in the chroot with a clean, predictable environment (setup steps only).
  in_namespace 0 /usr/bin/env -i HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
}

write_stubs() {
  # @bazel_tools (Bazel 7.7.1's MODULE.tools) depends on apple_support, buildozer, protobuf and zlib, which
  # Debian's /etc/bazel/bazelrc does not override: offline, Bzlmod cannot resolve them. Empty modules with
  # the right names do (nothing of theirs is used on Linux without Java/proto rules); buildozer's
  # MODULE.tools use_extension needs a buildozer_binary extension that creates the repo it names.
  local dir="$ROOT$STUBS" name
  rm -rf "$dir"
  for name in apple_support buildozer protobuf zlib; do
    mkdir -p "$dir/$name"
    printf 'module(name = "%s")\n' "$name" >"$dir/$name/MODULE.bazel"
    printf '# Offline stub module written by treemat tools/bazel7.sh.\n' >"$dir/$name/BUILD.bazel"
    : >"$dir/$name/WORKSPACE"
  done
  cat >"$dir/buildozer/buildozer_binary.bzl" <<'EOF'
"""Offline stub of buildozer's buildozer_binary extension (treemat tools/bazel7.sh): an empty repo."""

def _empty_repo_impl(repository_ctx):
    repository_ctx.file("BUILD.bazel", "")
    repository_ctx.file("WORKSPACE", "")

_empty_repo = repository_rule(implementation = _empty_repo_impl)

def _buildozer_binary_impl(module_ctx):
    _empty_repo(name = "buildozer_binary")

buildozer_binary = module_extension(
    implementation = _buildozer_binary_impl,
    tag_classes = {"buildozer": tag_class(attrs = {"sha256": attr.string_dict(), "version": attr.string()})},
)
EOF
  local rc="$ROOT/etc/bazel/bazelrc" begin="# >>> treemat tools/bazel7.sh" end="# <<< treemat tools/bazel7.sh"
  [ -f "$rc" ] || die "$rc is missing: is bazel-bootstrap installed in the chroot?"
  sed -i "\\|^$begin|,\\|^$end|d" "$rc"
  {
    echo "$begin"
    for name in apple_support buildozer protobuf zlib; do
      echo "common --override_module=$name=$STUBS/$name"
    done
    echo "startup --max_idle_secs=900"
    echo "$end"
  } >>"$rc"
}

setup() {
  need_root
  if [ -f "$READY" ] && [ "$(head -n 1 "$READY")" = "recipe $RECIPE" ]; then
    return 0
  fi
  local start=$SECONDS
  if [ ! -f "$ROOT/.treemat-debootstrap-done" ]; then
    command -v debootstrap >/dev/null 2>&1 || {
      log "apt-get install debootstrap"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    }
    # A half-made chroot (interrupted debootstrap) is started over. Its mounts only ever existed in private
    # namespaces, so nothing under it is mounted on the host; check anyway before deleting.
    if [ -e "$ROOT" ]; then
      if findmnt -rno TARGET | grep -qF "$ROOT/"; then die "something is mounted under $ROOT: not deleting it"; fi
      log "removing the incomplete chroot $ROOT"
      rm -rf "$ROOT"
    fi
    mkdir -p "$(dirname "$ROOT")"
    local m
    m="$(mirror)"
    log "debootstrap --variant=minbase sid $ROOT $m"
    debootstrap --variant=minbase sid "$ROOT" "$m" >"$ROOT.debootstrap.log" 2>&1 \
      || die "debootstrap failed: see $ROOT.debootstrap.log"
    rm -f "$ROOT.debootstrap.log"
    touch "$ROOT/.treemat-debootstrap-done"
    log "debootstrap took $((SECONDS - start)) s"
  fi
  cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
  # The mirror's sid Release file may be past its Valid-Until date; services must not start in a chroot.
  echo 'Acquire::Check-Valid-Until "false";' >"$ROOT/etc/apt/apt.conf.d/99treemat"
  printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d" && chmod 755 "$ROOT/usr/sbin/policy-rc.d"
  local step=$SECONDS
  log "apt-get install ${PACKAGES[*]}"
  in_chroot sh -c 'apt-get update -qq && apt-get install -y -qq "$@" >/dev/null && apt-get clean' sh "${PACKAGES[@]}"
  log "apt-get took $((SECONDS - step)) s"
  # pip (PyPI through this machine's TLS proxy, if any): trust the same extra CA certificates as the host.
  if [ -d /usr/local/share/ca-certificates ]; then
    mkdir -p "$ROOT/usr/local/share/ca-certificates"
    cp -a /usr/local/share/ca-certificates/. "$ROOT/usr/local/share/ca-certificates/"
    in_chroot update-ca-certificates >/dev/null
  fi
  step=$SECONDS
  # treemat's runtime and test dependencies (pytest, hypothesis), read from pyproject.toml; treemat itself
  # comes from PYTHONPATH in `run`.
  cp "$REPO/pyproject.toml" "$ROOT/tmp/treemat-pyproject.toml"
  cat >"$ROOT/tmp/treemat-requirements.py" <<'EOF'
import tomllib

project = tomllib.load(open("/tmp/treemat-pyproject.toml", "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["test"]))
EOF
  in_chroot sh -c 'python3 /tmp/treemat-requirements.py >/tmp/treemat-requirements.txt &&
    python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --break-system-packages \
      -r /tmp/treemat-requirements.txt'
  log "pip took $((SECONDS - step)) s"
  write_stubs
  local label
  label="$(cat "$ROOT/usr/share/bazel/build-label.txt" 2>/dev/null || echo unknown)"
  printf 'recipe %s\nbazel %s\n' "$RECIPE" "$label" >"$READY"
  log "chroot ready: $ROOT (Bazel $label), setup took $((SECONDS - start)) s"
}

# The bot extra (`treemat bot`'s buildgrid + grpc, pinned in pyproject.toml), installed with pip --target into
# BOT_EXTRA inside the chroot, apart from the system site-packages the other legs use (it brings its own protobuf):
# put it first on PYTHONPATH for a bot only. Its own marker, not the RECIPE: a checkout without this step never
# sees it and never rebuilds because of it.
BOT_EXTRA=/opt/treemat-bot-extra
bot_extra() {
  setup
  local wanted marker="$ROOT$BOT_EXTRA/.treemat-bot-extra"
  wanted="$(grep -E '^bot = ' "$REPO/pyproject.toml")"
  if [ -f "$marker" ] && [ "$(cat "$marker")" = "$wanted" ]; then
    return 0
  fi
  log "pip install --target $BOT_EXTRA: $wanted"
  cp "$REPO/pyproject.toml" "$ROOT/tmp/treemat-pyproject.toml"
  rm -rf "$ROOT$BOT_EXTRA"
  in_chroot python3 -c '
import subprocess, sys, tomllib
bot = tomllib.load(open("/tmp/treemat-pyproject.toml", "rb"))["project"]["optional-dependencies"]["bot"]
subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                "--root-user-action=ignore", "--target", sys.argv[1], *bot], check=True)
' "$BOT_EXTRA"
  echo "$wanted" >"$marker"
}

run() {
  local binds=("$REPO")
  while [ $# -gt 0 ]; do
    case "$1" in
      --bind) [ $# -ge 2 ] || usage; binds+=("$(realpath "$2")"); shift 2 ;;
      --) shift; break ;;
      *) break ;;
    esac
  done
  [ $# -gt 0 ] || usage
  setup
  local dir cwd=/
  for dir in "${binds[@]}"; do
    [ -d "$dir" ] || die "--bind $dir: no such directory"
    case "$PWD/" in "$dir"/*) cwd="$PWD" ;; esac
  done
  # The caller's environment, minus what points at host-only places; treemat from this checkout.
  in_namespace "${#binds[@]}" "${binds[@]}" /usr/bin/env -u TMPDIR -u VIRTUAL_ENV -u PYTHONHOME \
    PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$SWIFT_DIR/usr/bin" \
    PYTHONPATH="$REPO/tools${PYTHONPATH:+:$PYTHONPATH}" HOME=/root TREEMAT_BAZEL7_CHROOT="$ROOT" \
    sh -c 'cd "$1" && shift && exec "$@"' sh "$cwd" "$@"
}

main() {
  [ $# -gt 0 ] || usage
  local command="$1"
  shift
  case "$command" in
    root) echo "$ROOT" ;;
    setup) setup; echo "$ROOT" ;;
    bot-extra) need_root; bot_extra >&2; echo "$BOT_EXTRA" ;;
    run) need_root; run "$@" ;;
    test)
      # Both Bazel 7 flavors of the adoption e2e test, run by pytest inside the chroot (one session, so each
      # flavor keeps its Bazel server). Scratch space: $TREEMAT_BAZEL7_TMP (kept), else a fresh dir in /var/tmp
      # (removed after a pass).
      need_root
      local tmp="${TREEMAT_BAZEL7_TMP:-}"
      [ -n "$tmp" ] || tmp="$(mktemp -d /var/tmp/treemat-bazel7.XXXXXX)"
      mkdir -p "$tmp"
      tmp="$(realpath "$tmp")"
      cd "$REPO"
      local status=0
      run --bind "$tmp" -- python3 -m pytest -q -ra -p no:cacheprovider tests/e2e/test_adoption_e2e.py \
        --basetemp="$tmp/pytest" "$@" || status=$?
      if [ "$status" -eq 0 ] && [ -z "${TREEMAT_BAZEL7_TMP:-}" ]; then
        rm -rf "$tmp"
      else
        log "workspaces and output bases kept in $tmp"
      fi
      return "$status"
      ;;
    *) usage ;;
  esac
}

main "$@"
