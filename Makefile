# Set-up and the entry points the README opens with:
#   make pipeline   a venv with the project installed, Debian's Fashion-MNIST where apt exists, then `dvc repro`
#   make check      the quick loop: ruff, and the tests that start no DVC, stage, server or real dataset
#   make test       the same plus the test system packages, then ruff and the whole test suite (CI runs this)
# Each set-up step is idempotent: a second `make` reuses the venv.

VENV := .venv
PYTHON := $(VENV)/bin/python
# dvc.yaml's commands say `python -m stages...`: the venv's bin must come first on PATH for them too.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# apt-get only where it exists and we may use it (root, or passwordless sudo); elsewhere the download
# stage fetches Fashion-MNIST from upstream instead.
APT := $(shell command -v apt-get >/dev/null 2>&1 && { [ "$$(id -u)" = 0 ] && echo apt-get || { sudo -n true 2>/dev/null && echo "sudo apt-get"; }; })

# The tests `make check` leaves out, by their markers (pyproject.toml says what each marks).
NOT_QUICK := e2e or server or s3 or slow

.PHONY: pipeline check test lint setup setup-test system-packages test-system-packages ascii-cache

pipeline: setup system-packages ascii-cache
	dvc repro

check: lint
	$(PYTHON) -m pytest -m "not ($(NOT_QUICK))"

# One pytest worker per CPU (pytest-xdist): most tests wait on subprocesses that use one core each. A test
# file stays on one worker (its module fixtures are made once); conftest.py starts the slow ones first.
test: lint test-system-packages ascii-cache
	$(PYTHON) -m pytest -n logical --dist loadfile --durations=15

lint: setup-test
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

$(VENV)/.installed: pyproject.toml
	$(call pip_install,.)
	touch $@

# In a fresh clone, the project and its test extras in one pip run (one resolution and editable build, not two).
$(VENV)/.installed-test: pyproject.toml
	$(call pip_install,.[test])
	touch $(VENV)/.installed $@

define pip_install
test -x $(PYTHON) || python3 -m venv $(VENV)
$(PYTHON) -m pip install --quiet --upgrade pip
$(PYTHON) -m pip install --quiet -e '$(1)'
endef

# dataset-fashion-mnist: the offline mirror of the default dataset.
system-packages:
	@$(call apt_install,dataset-fashion-mnist)

# chromium: the test that opens `dvc plots show`'s page offline in a real browser (skipped without it);
# postgresql: the server the search's two workers share a study through (tests/test_search_workers.py).
test-system-packages:
	@$(call apt_install,dataset-fashion-mnist chromium postgresql)

# Install the Debian packages not installed yet, where apt is usable; say what happens instead elsewhere.
define apt_install
missing=$$(for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
if [ -z "$$missing" ]; then :; \
elif [ -n "$(APT)" ]; then { $(APT) update -qq && DEBIAN_FRONTEND=noninteractive $(APT) install -y -qq $$missing; } \
  || echo "make: warning: apt-get install $$missing failed: Fashion-MNIST comes from upstream, the tests that need them skip"; \
else echo "make: cannot apt-get install $$missing here (no apt or not root): Fashion-MNIST comes from upstream, the browser and PostgreSQL tests skip"; fi
endef

# DVC 3.67's temporary experiment workers (`dvc exp run --temp`, `dvc queue start`) copy the cache's
# absolute path into a config file through configobj, which encodes with ASCII whatever the locale
# (dvc/repo/experiments/executor/local.py, _update_config): in a checkout whose path is not ASCII every
# such experiment fails. A cache at an ASCII path (set in .dvc/config.local, this clone only) avoids it;
# an ASCII checkout, or a cache dir already chosen, is left alone.
ascii-cache:
	@if printf '%s' "$(CURDIR)" | LC_ALL=C grep -q '[^ -~]' && ! dvc config --local cache.dir >/dev/null 2>&1; then \
	  cache="$${XDG_CACHE_HOME:-$$HOME/.cache}/dvc-ascii/$$(printf '%s' "$(CURDIR)" | sha256sum | cut -c1-16)"; \
	  if printf '%s' "$$cache" | LC_ALL=C grep -q '[^ -~]'; then \
	    echo "make: warning: $(CURDIR) is not ASCII and neither is $$cache: dvc exp run --temp and dvc queue will fail (README, Experiments)"; \
	  else mkdir -p "$$cache" && dvc cache dir --local "$$cache" && echo "make: DVC cache at $$cache (this checkout's path is not ASCII; see README)"; fi; \
	fi
