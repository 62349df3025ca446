# vmportal: `make run` starts the whole stack, `make test` runs the tests.
SHELL := /bin/bash
PORT ?= 8000
export LIBVIRT_URI ?= qemu:///system
PY := .venv/bin/python

.PHONY: run test lint setup setup-test services prepare bench fuzz fmt clean demo-debian

run: setup services prepare
	@echo "vmportal: open http://127.0.0.1:$(PORT)/ (log in as admin); Ctrl-C stops everything"
	VMPORTAL_PORT=$(PORT) exec .venv/bin/honcho start -f Procfile

test: setup-test
	scripts/test.sh $(ARGS)

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy vmportal provisioning
	.venv/bin/lint-imports

fmt: setup
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

setup:
	scripts/setup.sh

setup-test:
	scripts/setup.sh --test

services:
	scripts/ensure-redis.sh
	scripts/ensure-libvirtd.sh

prepare:
	$(PY) manage.py collectstatic --noinput -v0
	$(PY) manage.py migrate --noinput -v0
	$(PY) manage.py ensure_admin
	$(PY) manage.py seed_demo --network --methods

# The Debian 12 cloud-init demo template: its image (provisioning/demo/debian.py, built from
# Debian packages in 2-3 minutes once, cached in /var/cache/vmportal/demo/debian), a NAT network, the template.
demo-debian: setup services
	$(PY) manage.py migrate --noinput -v0
	$(PY) manage.py seed_demo --debian

bench: setup-test
	@dpkg-query -W -f='$${Status}' virtinst 2>/dev/null | grep -q "install ok installed" || { \
	  echo "bench: installing Debian package virtinst (virt-install)"; apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends virtinst; }
	scripts/ensure-libvirtd.sh
	LIBVIRT_URI=test+unix:///default scripts/ensure-libvirtd.sh
	$(PY) manage.py collectstatic --noinput -v0
	$(PY) -m bench.run $(if $(filter 1 yes true,$(QUICK)),--quick)

# The long contract-fuzzing pass of the REST API (schemathesis against the live web server,
# tests/support/fuzz.py): FUZZ_REQUESTS requests (10,000 by default); the counts are printed
# and written to test-artifacts/fuzz.json. FUZZ_SEED=<the seed it printed> repeats a run.
FUZZ_REQUESTS ?= 10000
fuzz: setup-test
	scripts/ensure-libvirtd.sh
	LIBVIRT_URI=test+unix:///default scripts/ensure-libvirtd.sh
	mkdir -p test-artifacts
	FUZZ_REQUESTS=$(FUZZ_REQUESTS) $(PY) -m pytest tests/api/test_fuzz.py -k long -p no:cacheprovider -s -q $(ARGS)

clean:
	rm -rf .venv node_modules static/vendor var/staticfiles
