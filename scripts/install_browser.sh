#!/usr/bin/env bash
# Idempotent: install headless Chromium + chromedriver (Debian packages) for the Space's browser test.
# Does nothing when /usr/bin/chromium is already there; never fails the caller (the test skips without a browser).
set -u
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
    echo "install_browser.sh: not root and no sudo; skipping Chromium (the browser test will be skipped)." >&2
    exit 0
  fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_browser.sh: no apt-get on this system; skipping Chromium (the browser test will be skipped)." >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q chromium chromium-driver >/dev/null; then
  echo "install_browser.sh: installed $(/usr/bin/chromium --version 2>/dev/null || echo chromium)."
else
  echo "install_browser.sh: could not install chromium/chromium-driver with apt-get; the browser test will be skipped." >&2
fi
exit 0
