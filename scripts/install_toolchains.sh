#!/usr/bin/env bash
# Installs the HumanEvalPack toolchains used by octoray/evaluation/sandbox/execution.py, then proves them:
# one trivial program per language is compiled and run the way the sandbox runs samples, and the
# script fails, naming the missing piece, if any of them does not work.
#
#   scripts/install_toolchains.sh           install what is missing, then check (CI, make test)
#   scripts/install_toolchains.sh --check   check only, install nothing (exit 1 naming what fails)
#
# Idempotent: apt-get runs only when a package is missing; js-md5 is installed only once; the
# check is skipped when nothing changed since it last passed (.toolchains/checked holds the
# versions it passed with). Runs as root on a clean Debian 12 machine (CI) or with sudo.
#   python  : the project's interpreter (+ numpy, imported by the reference harness's header)
#   js      : node + js-md5 (npm registry) in .toolchains/node_modules (gitignored)
#   java    : the machine's JDK (javac/java, 17 here)
#   go      : golang-go + testify, GOPATH mode (GO111MODULE=off GOPATH=/usr/share/gocode)
#   cpp     : g++, boost headers (boost/any.hpp), libssl-dev (md5 in problem 162)
#   rust    : rustc/cargo (the machine's, else Debian's) + Debian crates rand/regex/md5, used
#             offline through a cargo directory source at /usr/share/cargo/registry. regex's
#             default features (aho-corasick, memchr) are a separate package that is only a
#             Recommends, so --no-install-recommends skips it unless it is named here.
#   sandbox : util-linux unshare + setpriv (network/pid/mount namespaces, privilege drop)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

CHECK_ONLY=0
case "${1:-}" in
  --check) CHECK_ONLY=1 ;;
  "") ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

have() { command -v "$1" >/dev/null 2>&1; }
installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }

# Debian packages the sandbox's programs need, whatever else the machine has.
PACKAGES=(golang-go golang-github-stretchr-testify-dev
          librust-rand-dev librust-regex-dev "librust-regex+default-dev" librust-md5-dev
          libboost-dev libssl-dev util-linux)
missing=()
for pkg in "${PACKAGES[@]}"; do installed "$pkg" || missing+=("$pkg"); done
have g++ || missing+=(g++)
have javac || missing+=(default-jdk-headless)
have node || missing+=(nodejs)
have npm || missing+=(npm)
# Debian's rustc/cargo only when the machine has none (rustup's newer ones are preferred).
have cargo || missing+=(cargo)
have rustc || missing+=(rustc)

if [ ${#missing[@]} -gt 0 ] && [ $CHECK_ONLY = 1 ]; then
  echo "install_toolchains: FAILED: missing Debian packages: ${missing[*]}" >&2
  exit 1
elif [ ${#missing[@]} -gt 0 ]; then
  echo "install_toolchains: apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "install_toolchains: system packages present (go, testify, rust crates, boost, openssl, g++, jdk, node, unshare)"
fi

if [ -f .toolchains/node_modules/js-md5/package.json ]; then
  echo "install_toolchains: js-md5 present in .toolchains/node_modules"
elif [ $CHECK_ONLY = 1 ]; then
  echo "install_toolchains: FAILED: js-md5 missing in .toolchains/node_modules (run $0)" >&2
  exit 1
else
  echo "install_toolchains: npm install js-md5 into .toolchains/"
  mkdir -p .toolchains
  npm install --silent --no-audit --no-fund --prefix .toolchains js-md5
fi

# ---- prove the result: one program per language ------------------------------------------------
PYTHON="$(command -v python3)"
[ -x .venv/bin/python ] && PYTHON="$REPO/.venv/bin/python"
versions="$(go version) | $(rustc --version) | $(cargo --version) | $(javac -version 2>&1) | node $(node --version)"
versions+=" | $(g++ --version | head -1) | $($PYTHON --version 2>&1)"
versions+=" | $(dpkg-query -W -f='${Package}=${Version} ' "${PACKAGES[@]}" 2>/dev/null)"
versions+=" | js-md5 $(sed -n 's/.*"version": *"\([^"]*\)".*/\1/p' .toolchains/node_modules/js-md5/package.json)"
versions+=" | $(sha1sum "$0" | cut -c1-12)"
if [ -f .toolchains/checked ] && [ "$(cat .toolchains/checked)" = "$versions" ]; then
  echo "install_toolchains: check passed before with these versions; not repeated"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
fail() { echo "install_toolchains: FAILED: $1" >&2; [ -f "$work/log" ] && tail -5 "$work/log" >&2; exit 1; }
step() { mkdir -p "$work/$1"; cd "$work/$1"; }  # back with: cd "$REPO"

step python
"$PYTHON" -c 'import numpy, hashlib; assert hashlib.md5(b"a").hexdigest()' >"$work/log" 2>&1 \
  || fail "python: numpy not importable by $PYTHON (pip install -e '.[dev]')"
cd "$REPO"

step js
NODE_PATH="$REPO/.toolchains/node_modules" node -e \
  'const md5 = require("js-md5"); if (md5("a") !== "0cc175b9c0f1b6a831c399e269772661") process.exit(1)' \
  >"$work/log" 2>&1 || fail "js: node cannot use js-md5 (npm install --prefix .toolchains js-md5)"
cd "$REPO"

step java
printf 'import java.util.*;\npublic class Main { public static void main(String[] a) { List<Integer> l = new ArrayList<>(); l.add(1); if (l.size() != 1) throw new AssertionError(); } }\n' > Main.java
{ javac Main.java && java -cp . Main; } >"$work/log" 2>&1 || fail "java: javac/java cannot build and run a program (apt-get install default-jdk-headless)"
cd "$REPO"

step go
printf 'package main\n\nimport (\n\t"testing"\n\n\t"github.com/stretchr/testify/assert"\n)\n\nfunc TestOne(t *testing.T) { assert.Equal(t, 2, 1+1) }\n' > main_test.go
GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE="$work/go-cache" GOFLAGS="" GOTOOLCHAIN=local \
  go test -count=1 main_test.go >"$work/log" 2>&1 \
  || fail "go: 'go test' with testify failed (apt-get install golang-go golang-github-stretchr-testify-dev)"
cd "$REPO"

step cpp
printf '#include <boost/any.hpp>\n#include <openssl/md5.h>\n#include <cstring>\nint main() { boost::any a = 1; unsigned char d[MD5_DIGEST_LENGTH]; MD5((const unsigned char*)"a", 1, d); return boost::any_cast<int>(a) == 1 && d[0] == 0x0c ? 0 : 1; }\n' > test.cpp
{ g++ -std=c++11 test.cpp -lcrypto -lssl -o test && ./test; } >"$work/log" 2>&1 \
  || fail "cpp: g++ with boost and OpenSSL failed (apt-get install g++ libboost-dev libssl-dev)"
cd "$REPO"

# The same dependency set and cargo set-up as octoray/evaluation/sandbox/execution.py (RUST_DEPS).
step rust
mkdir -p src cargo-home
printf '[package]\nname = "toolchain-check"\nversion = "0.1.0"\nedition = "2021"\n\n[dependencies]\nrand = "0.8"\nregex = "1"\nmd5 = "0.7"\n' > Cargo.toml
printf '[source.crates-io]\nreplace-with = "debian"\n\n[source.debian]\ndirectory = "/usr/share/cargo/registry"\n' > cargo-home/config.toml
printf 'use rand::Rng;\nfn main() {\n    let n: u32 = rand::thread_rng().gen_range(0..10);\n    assert!(n < 10);\n    assert!(regex::Regex::new(r"^a+$").unwrap().is_match("aa"));\n    assert_eq!(format!("{:x}", md5::compute(b"a")), "0cc175b9c0f1b6a831c399e269772661");\n}\n' > src/main.rs
CARGO_HOME="$work/rust/cargo-home" cargo generate-lockfile --offline >"$work/log" 2>&1 \
  || fail "rust: the crates rand 0.8, regex 1 and md5 0.7 do not resolve offline from /usr/share/cargo/registry (apt-get install librust-rand-dev librust-regex-dev 'librust-regex+default-dev' librust-md5-dev): $(grep -m1 -o 'no matching package named `[^`]*`' "$work/log" || true)"
echo "install_toolchains: building the rust crates once (about a minute)"
{ CARGO_HOME="$work/rust/cargo-home" cargo build --offline -q && ./target/debug/toolchain-check; } >"$work/log" 2>&1 \
  || fail "rust: building or running a program with rand/regex/md5 failed"
cd "$REPO"

mkdir -p .toolchains
printf '%s' "$versions" > .toolchains/checked
echo "install_toolchains: checked: python, js, java, go, cpp and rust programs build and run"
echo "install_toolchains: go $(go version | awk '{print $3}'), $(rustc --version | awk '{print $1, $2}'),"\
     "$(javac -version 2>&1), node $(node --version), $(g++ --version | head -1)"
