# meshca: `make demo` sets up .venv and runs the demo; `make test` sets up .venv and runs the whole suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo protos dev clean bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

dev: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check meshca tests benchmarks
	$(PY) -m pytest -q -ra

demo: $(STAMP)
	$(VENV)/bin/meshca demo $(DEMO_ARGS)

# Quick profile by default (a few minutes); BENCH_ARGS=--full for the 10,000-stream rows.
bench: $(STAMP)
	$(PY) -m benchmarks.run $(BENCH_ARGS)

protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/meshca/v1/certificate.proto
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. protos/meshca/v1/xds_wire.proto

clean:
	rm -rf $(VENV) build *.egg-info
