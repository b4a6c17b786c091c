#!/usr/bin/env bash
# Builds agentbox's default image, agentbox/base:bookworm, on a machine that reaches no container
# registry: debootstrap makes a Debian bookworm rootfs from a Debian package mirror, and the engine
# imports it as an image. Where a registry is reachable, `docker build -f images/base.Dockerfile .`
# gives an equivalent image.
#
#   images/build-base.sh                 build the image unless it already exists (then exit 0 at once)
#   images/build-base.sh --force         rebuild it
#   images/build-base.sh --print-mirror  print the Debian mirror a build would use, and exit
#
# Needs a Docker engine the user can reach, and root for debootstrap (run as root, or with passwordless
# sudo: then only the steps that need root go through `sudo -n`). Installs debootstrap when it is missing.
# One build runs at a time: a second one waits for the first and then finds the image there.
#
# The mirror: AGENTBOX_DEBIAN_MIRROR (or the older DEBIAN_MIRROR) if set; otherwise the first `deb` entry
# of the machine's own apt sources that carries Debian's main suite (bookworm, or stable, testing, …;
# not -security, -updates or -backports) with the `main` component, in apt's reading order: sources.list,
# then sources.list.d/*.list and *.sources. AGENTBOX_APT_SOURCES_DIR replaces /etc/apt (for tests).
# AGENTBOX_BASE_IMAGE replaces the image's name.
#
# images/test/build.sh sources this file for docker_check, as_root_setup and lock_builds; the build
# itself runs only when the file is executed.
set -euo pipefail

prog="${AGENTBOX_BUILD_NAME:-images/build-base.sh}"
suite=bookworm
packages="git,ca-certificates,coreutils,bash,procps,less"

log() { printf '%s: %s\n' "$prog" "$*" >&2; }
die() {
  log "error: $1"
  shift
  local line
  for line in "$@"; do printf '  %s\n' "$line" >&2; done
  exit 1
}

# docker_check: returns when the engine answers; otherwise says why not (no engine, or no permission on
# its socket) and how to fix it, and exits 1.
docker_check() {
  command -v docker >/dev/null 2>&1 \
    || die "the docker command is not installed" "install a Docker engine (on Debian: apt-get install docker.io)"
  local err
  err="$(docker info --format '{{.ServerVersion}}' 2>&1 >/dev/null)" && return 0

  local sock=/var/run/docker.sock where
  if [[ "${DOCKER_HOST:-}" == unix://* ]]; then sock="${DOCKER_HOST#unix://}"; fi
  if [[ -n "${DOCKER_HOST:-}" && "$DOCKER_HOST" != unix://* ]]; then
    where="DOCKER_HOST=$DOCKER_HOST"
  else
    where="the socket $sock"
  fi
  local said="docker said: ${err//$'\n'/ }"

  if [[ "$err" == *"ermission denied"* ]] || { ((EUID != 0)) && [[ -S "$sock" && ! -w "$sock" ]]; }; then
    local group
    group="$(stat -c %G "$sock" 2>/dev/null || echo docker)"
    die "permission denied on the Docker socket $sock ($(stat -c 'owner %U:%G, mode %A' "$sock" 2>/dev/null)) for user $(id -un)" \
      "add yourself to its group, then log in again (or run newgrp $group): sudo usermod -aG $group $(id -un)" \
      "or run this script with sudo" \
      "$said"
  fi
  if [[ "$err" == *"Cannot connect"* || "$err" == *"onnection refused"* || "$err" == *"no such file"* ]] \
    || [[ "$where" == "the socket $sock" && ! -S "$sock" ]]; then
    local fix="start it: sudo systemctl start docker (or sudo service docker start; without an init system: sudo dockerd &)"
    [[ -n "${DOCKER_HOST:-}" ]] && fix="check DOCKER_HOST=$DOCKER_HOST (unset it for the local engine), or $fix"
    die "the Docker engine is not reachable at $where" "$fix" "$said"
  fi
  die "the Docker engine does not answer at $where" "$said"
}

# as_root_setup WHAT: sets the array as_root to the prefix that runs a command as root: nothing for root,
# `sudo -n` when passwordless sudo works; otherwise exits 1 naming WHAT needs root.
as_root_setup() {
  as_root=()
  ((EUID == 0)) && return 0
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root=(sudo -n)
    log "not root: running the steps that need root through sudo"
    return 0
  fi
  die "$1 needs root" "run this script as root, or set up passwordless sudo (sudo -n true must succeed)"
}

# lock_builds NAME: waits until this process holds the exclusive lock NAME, then returns; the lock file's
# path is left in lock_file and its descriptor in lock_fd. The lock is the kernel's flock on an open
# descriptor: it is dropped when the process ends, however it ends (exit, error, signal, SIGKILL), and
# cleanup unlocks it explicitly too in case a child process still holds the descriptor. The file itself
# stays behind on purpose and is harmless: it is empty and means nothing unless someone holds the lock on
# it; removing it would let a newcomer lock a fresh file while a waiter still waits on the removed one.
# /run/lock when writable (one place for every user of the machine), else TMPDIR.
lock_builds() {
  local dir=/run/lock
  [[ -d "$dir" && -w "$dir" ]] || dir="${TMPDIR:-/tmp}"
  command -v flock >/dev/null 2>&1 || die "flock is missing (it is part of util-linux)"
  lock_file="$dir/$1.lock"
  # Created readable by all if missing, and opened read-only, which is all flock needs: so the lock file
  # one user created serves every user.
  [[ -e "$lock_file" ]] || { : >>"$lock_file" && chmod a+r "$lock_file"; } 2>/dev/null || true
  exec {lock_fd}<"$lock_file" || die "cannot open the lock file $lock_file"
  if ! flock -n "$lock_fd"; then
    log "another build holds $lock_file; waiting for it to finish"
    flock "$lock_fd"
  fi
}

# apt_source_entries FILE: prints one line per (URI, suite) of the `deb` entries of an apt sources file,
# in the file's order: URI, suite, components (space-separated), the Signed-By value ("" if none), with
# tabs between. FILE is deb822 (*.sources) or the one-line format (anything else).
apt_source_entries() {
  local file="$1"
  if [[ "$file" == *.sources ]]; then
    awk '
      function trim(s) { gsub(/^[ \t]+|[ \t]+$/, "", s); return s }
      function flush(   nu, nsu, u, s, i, j) {
        if ((" " types " ") ~ / deb / && tolower(enabled) !~ /^(no|false|0)$/) {
          nu = split(uris, u, /[ \t]+/); nsu = split(suites, s, /[ \t]+/)
          for (i = 1; i <= nu; i++) for (j = 1; j <= nsu; j++) print u[i] "\t" s[j] "\t" comps "\t" signed
        }
        types = uris = suites = comps = signed = enabled = ""
      }
      /^#/ { next }
      /^[ \t]*$/ { flush(); next }
      /^[ \t]/ { next }                       # a continuation line (an inline key, say)
      {
        colon = index($0, ":"); if (colon == 0) next
        key = tolower(substr($0, 1, colon - 1)); val = trim(substr($0, colon + 1))
        if (key == "types") types = val
        else if (key == "uris") uris = val
        else if (key == "suites") suites = val
        else if (key == "components") comps = val
        else if (key == "enabled") enabled = val
        else if (key == "signed-by") signed = (val == "" ? "(inline key)" : val)
      }
      END { flush() }
    ' "$file"
  else
    awk '
      {
        sub(/#.*/, "")
        opts = ""
        if (match($0, /\[[^]]*\]/)) {
          opts = substr($0, RSTART + 1, RLENGTH - 2)
          $0 = substr($0, 1, RSTART - 1) " " substr($0, RSTART + RLENGTH)
        }
        if ($1 != "deb" || NF < 3) next
        signed = ""
        if (match(opts, /signed-by=[^ \t]*/)) signed = substr(opts, RSTART + 10, RLENGTH - 10)
        comps = ""
        for (i = 4; i <= NF; i++) comps = comps (i > 4 ? " " : "") $i
        print $2 "\t" $3 "\t" comps "\t" signed
      }
    ' "$file"
  fi
}

# find_mirror: sets mirror (a URI without a trailing slash) and mirror_from (where it came from), or
# exits 1 saying to set AGENTBOX_DEBIAN_MIRROR. See the header for the rules.
find_mirror() {
  if [[ -n "${AGENTBOX_DEBIAN_MIRROR:-}" ]]; then
    mirror="${AGENTBOX_DEBIAN_MIRROR%/}" mirror_from=AGENTBOX_DEBIAN_MIRROR
    return 0
  fi
  if [[ -n "${DEBIAN_MIRROR:-}" ]]; then
    mirror="${DEBIAN_MIRROR%/}" mirror_from=DEBIAN_MIRROR
    return 0
  fi
  local dir="${AGENTBOX_APT_SOURCES_DIR:-/etc/apt}"
  local files=() file
  [[ -f "$dir/sources.list" ]] && files+=("$dir/sources.list")
  for file in "$dir"/sources.list.d/*; do
    [[ -f "$file" && ("$file" == *.list || "$file" == *.sources) ]] && files+=("$file")
  done

  # First pass: an entry for the suite being built; second pass: any other main suite of Debian's.
  local wanted uri entry_suite comps signed
  for wanted in "$suite" "stable oldstable testing unstable sid buster bullseye trixie forky"; do
    for file in "${files[@]}"; do
      while IFS=$'\t' read -r uri entry_suite comps signed; do
        [[ " $wanted " == *" $entry_suite "* ]] || continue
        [[ " $comps " == *" main "* ]] || continue
        [[ "$uri" =~ ^(https?|file):// ]] || continue
        # Signed by its own key: a third-party repository that reuses Debian's suite names.
        [[ -z "$signed" || "$signed" == *debian-archive-keyring* ]] || continue
        mirror="${uri%/}" mirror_from="$file"
        return 0
      done < <(apt_source_entries "$file")
    done
  done
  die "found no Debian mirror in the apt sources under $dir (no deb entry for $suite or another Debian suite with component main)" \
    "set AGENTBOX_DEBIAN_MIRROR to a Debian package mirror's URL (the directory holding dists/ and pool/)"
}

main() {
  (($# <= 1)) || die "too many arguments" "usage: $prog [--force | --print-mirror]"
  local force=false
  case "${1:-}" in
    "") ;;
    --force) force=true ;;
    --print-mirror)
      find_mirror
      printf '%s\n' "$mirror"
      return 0
      ;;
    -h | --help)
      sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[0]}"
      return 0
      ;;
    *) die "unknown argument $1" "usage: $prog [--force | --print-mirror]" ;;
  esac

  local tag="${AGENTBOX_BASE_IMAGE:-agentbox/base:bookworm}"
  docker_check
  local old_id
  old_id="$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)"
  if [[ -n "$old_id" ]] && ! $force; then
    log "image $tag already exists (use --force to rebuild)"
    return 0
  fi
  find_mirror
  as_root_setup "debootstrap (building the rootfs)"

  lock_builds agentbox-build-base
  # Another run may have built the image while this one waited: then there is nothing left to do.
  local now_id
  now_id="$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)"
  if [[ -n "$now_id" && "$now_id" != "$old_id" ]]; then
    log "image $tag was built by another run while this one waited"
    return 0
  fi

  local debootstrap
  debootstrap="$(command -v debootstrap || echo /usr/sbin/debootstrap)"
  if ! [[ -x "$debootstrap" ]]; then
    log "debootstrap is missing; installing it"
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap </dev/null >/dev/null
    debootstrap=/usr/sbin/debootstrap
  fi

  work="$(mktemp -d "${TMPDIR:-/tmp}/agentbox-rootfs.XXXXXX")"
  # The rootfs belongs to root; it goes on every exit path, and then the lock is let go.
  trap '"${as_root[@]}" rm -rf "$work"; flock -u "$lock_fd"' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  local rootfs="$work/rootfs"

  log "building $tag: debootstrap $suite from $mirror (from $mirror_from) into $rootfs"
  if ! "${as_root[@]}" "$debootstrap" --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" \
    >"$work/debootstrap.log" 2>&1 </dev/null; then
    tail -n 30 "$work/debootstrap.log" >&2
    # Kept outside the work directory, which goes with the rootfs.
    local kept="${TMPDIR:-/tmp}/agentbox-build-base.debootstrap.log"
    mv -f "$work/debootstrap.log" "$kept" 2>/dev/null \
      || { kept="$(mktemp "${TMPDIR:-/tmp}/agentbox-build-base.debootstrap.XXXXXX")" && cat "$work/debootstrap.log" >"$kept"; }
    die "debootstrap failed; its full log is $kept" \
      "mirror: $mirror (from $mirror_from; set AGENTBOX_DEBIAN_MIRROR to use another)"
  fi

  # Trim what a task container never needs: package caches, docs, manuals, locales.
  "${as_root[@]}" rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
  "${as_root[@]}" find "$rootfs"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'C.*' -exec rm -rf {} + 2>/dev/null || true

  log "importing $rootfs as $tag"
  # Imported without a name and named only once the import is whole, so a failed tar never leaves
  # a broken image under the name.
  local new_id
  if ! new_id="$("${as_root[@]}" tar --numeric-owner -C "$rootfs" -c . | docker import \
    --change 'CMD ["/bin/bash"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'LABEL org.opencontainers.image.title=agentbox-base' \
    -)"; then
    if [[ "$new_id" == sha256:* ]]; then docker image rm "$new_id" >/dev/null 2>&1 || true; fi
    die "importing the rootfs into the engine failed"
  fi
  docker tag "$new_id" "$tag"
  # A rebuild would leave the previous image behind, nameless.
  if [[ -n "$old_id" && "$old_id" != "$new_id" ]] && ! docker image rm "$old_id" >/dev/null 2>&1; then
    log "the previous $tag (${old_id#sha256:}) is still in use (a container or another name); left in place"
  fi
  log "built $tag"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
fi
