# unionfs — every target does its own set-up on a fresh machine.
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
PYTEST  := $(VPY) -m pytest

.PHONY: all setup deps venv test test-slow demo bench clean

all: test

# System packages: libfuse3-3 (the library unionfs binds), libfuse2 (fusepy's,
# the fallback), fuse3 (fusermount3, mount.fuse3), and the peers/interop
# tools the tests and benchmark compare against.
APT_PKGS := libfuse3-3 libfuse2 fuse3 fuse-overlayfs attr busybox-static umoci skopeo podman runc passt slirp4netns debootstrap
# The registry tests: a real registry (distribution), htpasswd for Basic auth, openssl for its CA.
APT_PKGS += docker-registry apache2-utils openssl
# Rootless podman in the tests: newuidmap/newgidmap.
APT_PKGS += uidmap

deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=$$(for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$missing" ]; then \
	    echo "installing: $$missing"; \
	    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; \
	  fi; \
	fi

$(VPY):
	$(PY) -m venv $(VENV)

# editable_mode=compat: a path in a .pth file. The default (an import hook
# loaded by site.py) costs ~15 ms of CPU at every start of every unionfs command.
venv: $(VPY)
	$(VPY) -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	$(VPY) -m pip install -q -e '.[test,zstd]' --config-settings editable_mode=compat

setup: deps venv

# pytest exits 5 when it collected nothing: that is a failure, not a pass.
pytest_strict = $(PYTEST) -q $(1); rc=$$?; \
	[ $$rc -ne 5 ] || echo "pytest collected no tests" >&2; [ $$rc -eq 0 ]

# The whole suite on the default binding (/dev/fuse spoken directly), then
# the mount and binding tests again on each libfuse fallback, and the
# differential test on libfuse 3 too (both bindings a user may run).
BINDING_TESTS := tests/test_mount.py tests/test_binding.py tests/test_startup.py
test: setup
	@$(call pytest_strict,)
	@echo "== again with UNIONFS_LIBFUSE=3 (the libfuse 3 fallback)"
	@UNIONFS_LIBFUSE=3 $(call pytest_strict,$(BINDING_TESTS) tests/test_differential.py)
	@echo "== again with UNIONFS_LIBFUSE=2 (the libfuse 2 fallback)"
	@UNIONFS_LIBFUSE=2 $(call pytest_strict,$(BINDING_TESTS))

test-slow: setup
	@$(call pytest_strict,-m slow)

demo: setup
	$(VPY) scripts/demo.py

bench: setup
	$(VPY) scripts/bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
