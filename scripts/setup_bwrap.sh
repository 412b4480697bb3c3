#!/usr/bin/env bash
# Bubblewrap for the RL code verifier's sandbox (joyai_megatron/rl/rewards/sandbox, docs/rl.md
# section 10). Installs the Debian/Ubuntu package when missing and checks that it can create the
# namespaces the sandbox uses. Never fails the install: without root it prints what to do, and the
# code rewards refuse to run until bubblewrap works (or rl.unsafe_code_execution: true is set).
set -uo pipefail

if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup_bwrap.sh: installing bubblewrap (apt-get)"
    { apt-get install -y -q bubblewrap >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q bubblewrap >/dev/null 2>&1; }; } \
      || echo "setup_bwrap.sh: apt-get install bubblewrap failed" >&2
  else
    echo "setup_bwrap.sh: bubblewrap is missing and this is not a root apt system; ask an administrator to run:" >&2
    echo "    apt-get install bubblewrap      (or: dnf install bubblewrap / your distribution's package)" >&2
    echo "  code rewards (rl.reward: code | code_io | prompt with code verifiers) refuse to run until then" >&2
    exit 0
  fi
fi
if command -v bwrap >/dev/null 2>&1; then
  if bwrap --ro-bind / / --unshare-pid --unshare-net --unshare-ipc --proc /proc --dev /dev true 2>/dev/null \
     || bwrap --ro-bind / / --unshare-user --unshare-pid --unshare-net --unshare-ipc --proc /proc --dev /dev true 2>/dev/null; then
    echo "setup_bwrap.sh: bubblewrap $(bwrap --version | cut -d' ' -f2) works: the code verifier runs isolated"
  else
    echo "setup_bwrap.sh: bubblewrap is installed but cannot create namespaces here (as non-root it needs" >&2
    echo "  user namespaces: sysctl kernel.unprivileged_userns_clone=1 / user.max_user_namespaces > 0;" >&2
    echo "  in a container: allow unshare, e.g. docker --security-opt seccomp=unconfined or --privileged)" >&2
  fi
fi
