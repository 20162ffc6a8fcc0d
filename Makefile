# The two set-up commands of the README. Both work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-real test-hosts test-reliability system-deps hosts-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

## make demo: create the venv, install, provision a local sandbox host end to end, offline
demo: $(STAMP)
	$(BIN)/python -m provisioner.sandbox.demo $(ARGS)

## make test: install what the tests need (openssh-server, git, chromium) and run the whole suite
test: $(STAMP) system-deps
	$(BIN)/python -m pytest -q

## make test-real: the real-upstream tier (real ComfyUI on CPU, the real ComfyUI-nunchaku) over real
## sshd hosts; sources from PROVISION_COMFYUI_REPO / PROVISION_PLUGIN_REPO (default: GitHub), the
## real venv built once into PROVISION_REAL_CACHE (default ~/.cache/provision-real). docs/testing.md
test-real: $(STAMP) system-deps
	$(BIN)/python -m pytest -q -m real tests/real $(ARGS)

## make test-hosts: the real-hosts tier, root only: real systemd (a Debian rootfs booted by
## systemd-nspawn, built once into PROVISION_HOSTS_CACHE, default ~/.cache/provision-hosts) and a real
## dockerd, running real ComfyUI on CPU from the real tier's sources and wheelhouse. docs/testing.md
test-hosts: $(STAMP) system-deps hosts-deps
	$(BIN)/python -m pytest -q -m hosts tests/hosts $(ARGS)

## make test-reliability: generated malformed inputs, the injection corpus, random kill points during
## apply and rollback, the token canary, a disk that fills (not in `make test`); PROVISION_RELIABILITY=full
## for 520 malformed inputs, every payload through apply and 104 + 48 kill points
test-reliability: $(STAMP) system-deps
	$(BIN)/python -m pytest -q -m reliability tests/reliability

system-deps:
	@.ci/system-deps

hosts-deps:
	@.ci/hosts-deps

clean:
	rm -rf $(VENV) .demo .pytest_cache build *.egg-info
