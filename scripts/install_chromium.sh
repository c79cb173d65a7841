#!/usr/bin/env bash
# Idempotent: installs Debian's headless-capable `chromium` (used by tests/test_report_chromium.py
# to render the batch HTML report). Skips when /usr/bin/chromium already exists. Needs root.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
