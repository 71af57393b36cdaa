#!/bin/sh
# Headless Chromium for the report test (tests/test_report.py opens report.html in a real browser).
# Installs Debian's `chromium` package when no Chromium is on PATH and we are root with apt-get;
# otherwise says why not, and the browser test is skipped with that reason. Never fails the build.
for b in chromium chromium-browser google-chrome google-chrome-stable; do
    if command -v "$b" >/dev/null 2>&1; then exit 0; fi
done
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium (apt-get) for the report's browser test"
    if apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; then
        exit 0
    fi
    echo "apt-get could not install chromium: the browser test will be skipped" >&2
else
    echo "no Chromium on PATH and not root with apt-get: install Debian's chromium package to run the browser test" >&2
fi
exit 0
