#!/usr/bin/env bash
# Sets up mm-fusion on a fresh machine (idempotent: a second run reuses .venv) and runs the main job on the
# built-in default. Everything it needs comes from this file: Python 3.10+ with venv is the only prerequisite, and
# the tests need nothing more than what it sets up.
set -euo pipefail
cd "$(dirname "$0")"

BROWSER_PACKAGES=(chromium chromium-driver)

# The demo's browser test drives Debian's Chromium at /usr/bin/chromium through Playwright (never
# `playwright install`, which downloads a browser of its own). Installed here where the machine allows it (root
# with apt-get); elsewhere this says what to run, and the set-up and main job carry on without it.
install_browser() {
    if [ -x /usr/bin/chromium ] && command -v chromedriver >/dev/null; then
        return 0
    fi
    local how="apt-get install -y ${BROWSER_PACKAGES[*]}"
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        echo "==> installing ${BROWSER_PACKAGES[*]} from Debian (the demo's browser test drives it)"
        export DEBIAN_FRONTEND=noninteractive
        # a fresh image often has no package lists yet: update only when the plain install fails
        if apt-get install -y -q "${BROWSER_PACKAGES[@]}" \
            || { apt-get update -q && apt-get install -y -q "${BROWSER_PACKAGES[@]}"; }; then
            return 0
        fi
        echo "==> WARNING: could not install ${BROWSER_PACKAGES[*]} (see apt-get's messages above)." >&2
    elif command -v apt-get >/dev/null; then
        how="sudo $how"
    else
        how="install Chromium as /usr/bin/chromium and chromedriver on PATH (Debian: $how)"
    fi
    echo "==> NOTE: the demo's browser test (tests/test_demo.py) needs Chromium at /usr/bin/chromium and" \
         "chromedriver, and fails without them. Run: $how" >&2
}

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "==> creating .venv"
    "$PYTHON" -m venv .venv
fi
echo "==> installing torch 2.14.1 and mm-fusion[dev,demo] into .venv"
# torch first and pinned: pip then takes the release this project is tested on instead of resolving a newer one
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[dev,demo]"
install_browser

echo "==> main job"
exec .venv/bin/python -m training.main_job "$@"
