# Set-up and the two entry points the README opens with:
#   make pipeline   a venv with the project installed, Debian's Fashion-MNIST where apt exists, then `dvc repro`
#   make test       the same plus the test extras, then the whole test suite
# Each set-up step is idempotent: a second `make` reuses the venv.

VENV := .venv
PYTHON := $(VENV)/bin/python
# apt-get only where it exists and we may use it (root, or passwordless sudo); elsewhere the download
# stage fetches Fashion-MNIST from upstream instead.
APT := $(shell command -v apt-get >/dev/null 2>&1 && { [ "$$(id -u)" = 0 ] && echo apt-get || { sudo -n true 2>/dev/null && echo "sudo apt-get"; }; })

.PHONY: pipeline test setup setup-test system-packages

pipeline: setup system-packages
	$(VENV)/bin/dvc repro

test: setup-test system-packages
	$(PYTHON) -m pytest

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

$(VENV)/.installed: pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PYTHON) -m pip install --quiet -e '.[test]'
	touch $@

# dataset-fashion-mnist: the offline mirror of the default dataset. chromium: the offline plots check.
system-packages:
ifneq ($(APT),)
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || { $(APT) update -qq && DEBIAN_FRONTEND=noninteractive $(APT) install -y -qq dataset-fashion-mnist; }
else
	@echo "make: no apt-get here (or not root): the download stage will fetch Fashion-MNIST from upstream"
endif
