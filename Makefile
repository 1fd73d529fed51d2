# Loa — developer entry points. `make demo`, `make test`, `make bench`.
PY_SYS ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Debian packages the tests and the demo use (decoders, the Vietnamese voice).
DEB_PKGS := ffmpeg espeak-ng libasound2-data chromium fonts-dejavu-core vlc-bin vlc-plugin-base gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good mosquitto

.PHONY: demo test lint typecheck pytest bench sysdeps console clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' > $(VENV)/pip.log 2>&1 || (cat $(VENV)/pip.log; exit 1)
	touch $(STAMP)

# The console's browser modules (web/console): npm ci from the lockfile, then copy the ES modules
# the page imports to static/vendor/ (no bundler, no build step beyond the copy).
CONSOLE := web/console
CONSOLE_STAMP := $(CONSOLE)/static/vendor/.stamp
$(CONSOLE_STAMP): $(CONSOLE)/package.json $(CONSOLE)/package-lock.json $(CONSOLE)/vendor.mjs $(CONSOLE)/static/index.html
	cd $(CONSOLE) && npm ci --no-audit --no-fund --loglevel=error && node vendor.mjs
	touch $@

console: $(CONSOLE_STAMP)

# Installs the Debian packages only when one is missing (needs root and apt-get).
sysdeps:
	@missing=""; for p in $(DEB_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

demo: $(STAMP) sysdeps console
	$(VENV)/bin/loa demo

lint: $(STAMP)
	$(VENV)/bin/ruff check streamer codecs relay web tests

# mypy cannot see setuptools' editable import hook, so it checks a symlink tree loa/<folder>.
typecheck: $(STAMP)
	@mkdir -p .typecheck/loa
	@for d in streamer codecs relay web; do ln -sfn ../../$$d .typecheck/loa/$$d; done
	cd .typecheck && MYPYPATH=. ../$(VENV)/bin/mypy --namespace-packages --explicit-package-bases -p loa

pytest: $(STAMP) sysdeps console
	$(PY) -m pytest -q

test: sysdeps lint typecheck pytest

bench: $(STAMP)
	$(VENV)/bin/loa bench mix --zones 20 --seconds 10
	$(VENV)/bin/loa bench mix --find
	$(VENV)/bin/loa bench mix --find --paced

clean:
	rm -rf $(VENV) .typecheck .pytest_cache .mypy_cache .ruff_cache *.egg-info \
	       $(CONSOLE)/node_modules $(CONSOLE)/static/vendor
