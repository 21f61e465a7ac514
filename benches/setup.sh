#!/usr/bin/env bash
# What dom-bench compares dom with, installed on a fresh Debian machine: etcd (Debian's
# etcd-server, for `dom-bench writes`) and b3sum (for `scan` and `ingest`). sha512sum and tar
# come with coreutils. Run as root; idempotent.
set -euo pipefail
if ! command -v etcd >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q etcd-server
    # The package starts a system etcd on the default ports; the benchmark runs its own.
    systemctl disable --now etcd 2>/dev/null || pkill -x etcd || true
fi
command -v b3sum >/dev/null || cargo install --locked b3sum
