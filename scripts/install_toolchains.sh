#!/usr/bin/env bash
# Installs the HumanEvalPack toolchains used by octoray/evaluation/execution.py.
# Idempotent: apt-get runs only when a tool or library is missing; js-md5 is installed only once.
# Runs as root on a clean Debian 12 machine (CI) or as a user with sudo.
#   python  : the project's interpreter (+ numpy, imported by the reference harness's header)
#   js      : node + js-md5 (npm registry) in .toolchains/node_modules (gitignored)
#   java    : the machine's JDK (javac/java, 17 here)
#   go      : golang-go + testify, GOPATH mode (GO111MODULE=off GOPATH=/usr/share/gocode)
#   cpp     : g++, boost headers (boost/any.hpp), libssl-dev (md5 in problem 162)
#   rust    : rustc/cargo (the machine's, else Debian's) + Debian crates rand/regex/md5, used
#             offline through a cargo directory source at /usr/share/cargo/registry
#   sandbox : util-linux unshare + setpriv (network/pid/mount namespaces, privilege drop)
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

have() { command -v "$1" >/dev/null 2>&1; }

missing=()
have go || missing+=(golang-go)
[ -d /usr/share/gocode/src/github.com/stretchr/testify ] || missing+=(golang-github-stretchr-testify-dev)
for crate in rand regex md5; do
  ls -d /usr/share/cargo/registry/${crate}-[0-9]* >/dev/null 2>&1 || missing+=(librust-${crate}-dev)
done
[ -f /usr/include/boost/any.hpp ] || missing+=(libboost-dev)
[ -f /usr/include/openssl/md5.h ] || missing+=(libssl-dev)
have g++ || missing+=(g++)
have javac || missing+=(default-jdk-headless)
have node || missing+=(nodejs)
have npm || missing+=(npm)
have unshare || missing+=(util-linux)
have setpriv || missing+=(util-linux)
# Debian's rustc/cargo only when the machine has none (rustup's newer ones are preferred).
have cargo || missing+=(cargo)
have rustc || missing+=(rustc)

if [ ${#missing[@]} -gt 0 ]; then
  echo "install_toolchains: apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "install_toolchains: system packages present (go, testify, rust crates, boost, openssl, g++, jdk, node, unshare)"
fi

if [ -f .toolchains/node_modules/js-md5/package.json ]; then
  echo "install_toolchains: js-md5 present in .toolchains/node_modules"
else
  echo "install_toolchains: npm install js-md5 into .toolchains/"
  mkdir -p .toolchains
  npm install --silent --no-audit --no-fund --prefix .toolchains js-md5
fi

echo "install_toolchains: go $(go version | awk '{print $3}'), $(rustc --version | awk '{print $1, $2}'),"\
     "$(javac -version 2>&1), node $(node --version), $(g++ --version | head -1)"
