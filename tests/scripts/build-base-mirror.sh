#!/usr/bin/env bash
# Checks how images/build-base.sh picks its Debian mirror (`--print-mirror`) from sample apt sources
# written into a temp dir: deb822 and one-line files, with security, updates, deb-src, disabled and
# third-party entries before the one that counts, the two override variables, and nothing found.
# Needs neither network nor Docker nor root; exits 1 on the first mismatch.
set -euo pipefail

script="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/images/build-base.sh"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/agentbox-mirror-test.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
unset AGENTBOX_DEBIAN_MIRROR DEBIAN_MIRROR
failures=0

# expect NAME WANT [VAR=VALUE...]: runs --print-mirror against $tmp/NAME with the variables set; WANT is
# the URI it must print, or "fail:TEXT" for a non-zero exit whose stderr contains TEXT.
expect() {
  local name="$1" want="$2" out err rc=0
  shift 2
  out="$(env AGENTBOX_APT_SOURCES_DIR="$tmp/$name" "$@" bash "$script" --print-mirror 2>"$tmp/stderr")" || rc=$?
  err="$(cat "$tmp/stderr")"
  if [[ "$want" == fail:* ]]; then
    if ((rc != 0)) && [[ "$err" == *"${want#fail:}"* ]]; then
      echo "ok   $name: fails as expected"
      return
    fi
  elif ((rc == 0)) && [[ "$out" == "$want" ]]; then
    echo "ok   $name: $out"
    return
  fi
  echo "FAIL $name: want $want; got exit $rc, stdout \"$out\", stderr \"$err\"" >&2
  failures=$((failures + 1))
}

mkdir -p "$tmp"/deb822/sources.list.d
cat >"$tmp/deb822/sources.list.d/debian.sources" <<'EOF'
# security first: never the mirror
Types: deb
URIs: http://security.example.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://src.example.org/debian
Suites: bookworm
Components: main

Types: deb
URIs: http://disabled.example.org/debian
Suites: bookworm
Components: main
Enabled: no

Types: deb
URIs: http://mirror.example.org/debian/
Suites: bookworm bookworm-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
# apt reads *.sources and *.list in sources.list.d in order: a third-party repository that reuses
# Debian's suite name under its own key comes first, and files of other names are ignored.
cat >"$tmp/deb822/sources.list.d/a-vendor.sources" <<'EOF'
Types: deb
URIs: https://vendor.example.org/debian
Suites: bookworm
Components: main
Signed-By:
 -----BEGIN PGP PUBLIC KEY BLOCK-----
 .
 xsBNBGTestKey
 -----END PGP PUBLIC KEY BLOCK-----
EOF
echo 'deb http://ignored.example.org/debian bookworm main' >"$tmp/deb822/sources.list.d/old.list.disabled"
expect deb822 http://mirror.example.org/debian

mkdir -p "$tmp"/oneline
cat >"$tmp/oneline/sources.list" <<'EOF'
# the classic format, security first
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://security.example.org/debian-security bookworm-security main
deb-src http://src.example.org/debian bookworm main
deb [ arch=amd64 signed-by=/etc/apt/keyrings/vendor.gpg ] https://vendor.example.org/linux/debian bookworm main
deb http://updates.example.org/debian bookworm-updates main
deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.example.org/debian bookworm main contrib # a comment
deb http://later.example.org/debian bookworm main
EOF
expect oneline http://mirror.example.org/debian

# sources.list before sources.list.d, as apt reads them.
mkdir -p "$tmp"/both/sources.list.d
echo 'deb http://first.example.org/debian bookworm main' >"$tmp/both/sources.list"
cp "$tmp/deb822/sources.list.d/debian.sources" "$tmp/both/sources.list.d/"
expect both http://first.example.org/debian

# No bookworm entry: another Debian main suite's mirror serves bookworm too; another distribution's
# suite and a suite without `main` never count.
mkdir -p "$tmp"/other-suite/sources.list.d
cat >"$tmp/other-suite/sources.list.d/debian.sources" <<'EOF'
Types: deb
URIs: http://ubuntu.example.org/ubuntu
Suites: jammy
Components: main

Types: deb
URIs: http://nonfree.example.org/debian
Suites: bookworm
Components: non-free

Types: deb
URIs: http://stable.example.org/debian
Suites: stable stable-updates
Components: main
EOF
expect other-suite http://stable.example.org/debian

# The overrides win over the sources; AGENTBOX_DEBIAN_MIRROR over the older DEBIAN_MIRROR.
expect deb822 http://override.example.org/debian AGENTBOX_DEBIAN_MIRROR=http://override.example.org/debian/
expect deb822 http://old.example.org/debian DEBIAN_MIRROR=http://old.example.org/debian
expect deb822 http://override.example.org/debian AGENTBOX_DEBIAN_MIRROR=http://override.example.org/debian DEBIAN_MIRROR=http://old.example.org/debian

# Nothing usable: the error names the variable to set.
mkdir -p "$tmp"/none/sources.list.d
head -n 6 "$tmp/deb822/sources.list.d/debian.sources" >"$tmp/none/sources.list.d/debian.sources"
expect none fail:AGENTBOX_DEBIAN_MIRROR
expect missing-dir fail:AGENTBOX_DEBIAN_MIRROR

if ((failures > 0)); then
  echo "$failures mirror case(s) failed" >&2
  exit 1
fi
