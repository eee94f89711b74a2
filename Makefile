# Everything a fresh clone needs: `make demo` and `make test` install what is missing first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build by default; on a GPU box: make install TORCH_SPEC="torch==2.13.0 --index-url <your CUDA index>"
TORCH_SPEC ?= torch==2.13.0
PROTOS := $(shell find protos -name '*.proto' | sort)
DEPS_STAMP := $(VENV)/.deps-installed
GEN_STAMP := tinker_rpc/.generated
INSTALL_STAMP := $(VENV)/.project-installed

.PHONY: install proto proto-lint proto-release test test-oldest-transformers test-node browser demo demo-cluster bench bench-smoke bench-gpu lint clean

install: $(INSTALL_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q "grpcio-tools>=1.66"
	touch $@

# Generated code is never committed: it is rebuilt here whenever a .proto changes.
proto: $(GEN_STAMP)
$(GEN_STAMP): $(PROTOS) $(DEPS_STAMP)
	rm -rf tinker_rpc
	$(PY) scripts/generate_protos.py
	touch $@

$(INSTALL_STAMP): pyproject.toml setup.py $(GEN_STAMP)
	$(PY) -m pip install -q -e ".[server,dev,ray]"
	touch $@

# What the Tinker 0.38 drop-in tests read: the official SDK's wheel (parsed, never installed) and
# the tinker-cookbook with what its recipes import. The cookbook pins tml-renderers>=0.4.1, which the
# registry lacks, and tinker itself, which the alias replaces: hence --no-deps and the names by hand.
COOKBOOK_STAMP := $(VENV)/.cookbook-installed
REFERENCE_WHEEL := $(VENV)/reference/tinker-0.38.0-py3-none-any.whl
COOKBOOK_REQUIREMENTS := aiohttp anyio blobfile chz cloudpickle datasets huggingface-hub pillow pydantic \
	pyrage rich termcolor tiktoken sympy pylatexenc math-verify

$(COOKBOOK_STAMP): | $(PY)
	$(PY) -m pip install -q --no-deps tinker-cookbook==0.6.1 tml-renderers==0.2.1
	$(PY) -m pip install -q $(COOKBOOK_REQUIREMENTS)
	touch $@

$(REFERENCE_WHEEL): | $(PY)
	$(PY) -m pip download -q --no-deps tinker==0.38.0 -d $(VENV)/reference

# The console's browser test drives Debian's chromium through chromium-driver (browser downloads are
# not reachable in CI): installed with apt when missing and apt-get is usable (as root, or by sudo
# without a password); elsewhere that test is skipped, saying why.
APT_BROWSER := apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver
BROWSER_SKIPPED := echo "chromium and chromium-driver are missing and could not be installed here:" \
	"the console's browser test will be skipped"
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then sh -c '$(APT_BROWSER)' || $(BROWSER_SKIPPED); \
	elif command -v apt-get >/dev/null && sudo -n true 2>/dev/null; then sudo sh -c '$(APT_BROWSER)' || $(BROWSER_SKIPPED); \
	else $(BROWSER_SKIPPED); fi

# pytest runs last, so its summary closes the output.
test: install lint proto-lint test-node browser $(COOKBOOK_STAMP) $(REFERENCE_WHEEL)
	$(PY) -m pytest -q tests

# The whole suite on the oldest transformers setup.py accepts (its API moves between releases: 5.17
# read the decoders' cache under another keyword). Not part of `make test`: run it after changing
# how the worker calls transformers, or when raising the floor.
OLDEST_TRANSFORMERS := 5.17.0
test-oldest-transformers: install $(COOKBOOK_STAMP) $(REFERENCE_WHEEL)
	$(PY) -m pip install -q --target $(VENV)/oldest-transformers transformers==$(OLDEST_TRANSFORMERS)
	PYTHONPATH=$(VENV)/oldest-transformers $(PY) -m pytest -q tests --deselect tests/test_packaging.py  # (installs afresh)

# The second-language client (clients/node), end to end against a real server.
test-node: install
	cd clients/node && npm ci --silent --no-audit --no-fund && npm test

demo: install
	$(PY) examples/demo.py

# A two-node local Ray cluster, one server, two base models with a replica each (Ray actors).
demo-cluster: install
	$(PY) examples/demo_cluster.py

# Not part of `make test`. The public Tinker SDK is installed only to compare wire formats.
bench: bench-smoke
	$(PY) -m pip install -q "tinker==0.38.0"
	$(PY) -m bench.run_all $(BENCH_ARGS)

# Every benchmark at tiny sizes (about a minute): what `make test` leaves out to stay quick.
bench-smoke: install
	$(PY) -m pytest -q -m bench tests/test_bench_smoke.py

# On a GPU machine: the sampling engine's benchmarks on a seeded 0.9B Llama written locally
# (no download; `python -m bench.make_model --help` for other sizes), the quickest first.
BENCH_MODEL ?= /tmp/tinker-bench-llama-0.9b
bench-gpu: install
	test -d $(BENCH_MODEL) || $(PY) -m bench.make_model $(BENCH_MODEL)
	$(PY) -m bench.attention_shapes
	$(PY) -m bench.decode_steps --base-model $(BENCH_MODEL) --runs 2
	$(PY) -m bench.fused_norms --base-model $(BENCH_MODEL)
	$(PY) -m bench.sampling --base-model $(BENCH_MODEL) --skip-one-at-a-time
	$(PY) -m bench.train_while_sampling --base-model $(BENCH_MODEL)

# buf (from the npm registry) checks the protos: style, and no breaking change against
# the last released contract (buf/released.binpb; refresh it with `make proto-release`).
BUF := .tools/node_modules/.bin/buf
$(BUF):
	npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@1.75.0

proto-lint: $(BUF)
	$(BUF) lint
	$(BUF) breaking --against buf/released.binpb

proto-release: $(BUF)
	$(BUF) build -o buf/released.binpb

lint: install
	$(PY) -m ruff check tinker_client tinker_server tinker_wire tests examples bench
	$(PY) -m ruff format --check tinker_client tinker_server tinker_wire tests examples bench

clean:
	rm -rf $(VENV) tinker_rpc build *.egg-info
