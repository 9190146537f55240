# Two commands on a fresh machine (Debian/Ubuntu; apt-get runs through sudo unless root):
#   make run   - create .venv, install, upgrade the database, serve on config.toml
#   make test  - install what tests need (pip and apt), start PostgreSQL if needed, then
#                ruff, mypy and pytest
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CONFIG ?= config.toml
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test lint typecheck pytest system-deps services samples wheel clean

# Each step says what it does; pip prints a line per package (no silent minute).
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || { echo "==> creating $(VENV)"; $(PY) -m venv $(VENV); }
	@echo "==> upgrading pip in $(VENV)"
	$(BIN)/python -m pip install --upgrade pip
	@echo "==> installing pacs-ai (editable) and its pinned dependencies; torch is large"
	$(BIN)/python -m pip install --progress-bar on -e ".[test]"
	@touch $(STAMP)
	@echo "==> $(VENV) ready"

# The wheel an installation uses (docs/install.md): dist/pacs_ai-<version>-py3-none-any.whl.
wheel: $(STAMP)
	@echo "==> building the wheel into dist/"
	$(BIN)/python -m pip wheel --no-deps --no-build-isolation -w dist .

run: $(STAMP)
	@echo "==> upgrading the database ($(CONFIG))"
	$(BIN)/pacs-ai db upgrade --config $(CONFIG)
	@echo "==> serving ($(CONFIG)); stop with Ctrl-C"
	$(BIN)/pacs-ai serve --config $(CONFIG)

system-deps:
	@missing=""; \
	for tool in storescu:dcmtk Orthanc:orthanc dciodvfy:dicom3tools pg_ctlcluster:postgresql openssl:openssl systemd-analyze:systemd chromium:chromium chromedriver:chromium-driver ceph-mon:ceph-mon ceph-osd:ceph-osd radosgw:radosgw ceph:ceph-common ip:iproute2 setpriv:util-linux; do \
	  command -v $${tool%%:*} >/dev/null 2>&1 || missing="$$missing $${tool#*:}"; \
	done; \
	test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so || missing="$$missing orthanc-dicomweb"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; \
	fi

# PostgreSQL on 127.0.0.1:5432 for the tests (started here if it is not running; no systemd).
services: system-deps
	@pg_isready -q -h 127.0.0.1 -p 5432 || { \
	  echo "starting PostgreSQL"; \
	  $(SUDO) pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql | tail -n1) main start; \
	  for i in $$(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done; \
	  pg_isready -h 127.0.0.1 -p 5432; }
	@url="$${PACS_AI_TEST_POSTGRES_URL:-postgresql://postgres@127.0.0.1:5432/test}"; \
	psql "$$(echo "$$url" | sed 's/+psycopg//')" -qAtc "select 1" >/dev/null 2>&1 || \
	  echo "note: cannot log in to PostgreSQL as the tests do; set PACS_AI_TEST_POSTGRES_URL" \
	       "(SQLAlchemy URL, e.g. postgresql+psycopg://user:pass@127.0.0.1/db) or allow that login"

lint: $(STAMP)
	$(BIN)/ruff check pacs_ai tests benchmarks dicom_samples
	$(BIN)/ruff format --check pacs_ai tests benchmarks dicom_samples

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) services
	$(BIN)/pytest $(PYTEST_ARGS)

test: $(STAMP) services lint typecheck pytest

samples: $(STAMP)
	$(BIN)/python dicom_samples/make_samples.py

clean:
	rm -rf var dist build .pytest_cache .mypy_cache .ruff_cache
