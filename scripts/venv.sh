# Sourced by .ci/run and the README: create (once per setup.py content) and reuse a virtualenv
# outside the clone, so CI and fresh checkouts skip the ~10 min sglang install when nothing changed.
key=$(sha256sum setup.py | cut -c1-12)
VENV="${VLCACHE_VENV_ROOT:-$HOME/.cache/vlcache-sglang}/venv-$key"
if [ ! -x "$VENV/bin/python" ] || [ ! -f "$VENV/.complete" ]; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip setuptools wheel
  "$VENV/bin/pip" install -q -e ".[test,bench]"
  touch "$VENV/.complete"
fi
export VENV
