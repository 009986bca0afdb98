# Two commands set everything up on a fresh machine:
#   make run    install, fetch+convert the demo model, serve it on 127.0.0.1:8000
#   make test   install (incl. system packages the tests need), then the whole suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
ARGS   ?=
UNAME  := $(shell uname -s)
# Debian's OpenBLAS makes MLX float32 matmul ~30x faster than the BLAS bundled with mlx-cpu;
# the thread timeout stops its idle worker spinning on a core, and a CPU newer than the library
# gets its kernels named (app/ops/system_blas.py, which `mlx-gateway serve` applies to itself;
# this is for the tests and the bench). Expanded when a recipe runs: after system-deps.
OPENBLAS := /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3
PRELOAD   = $(shell $(PYTHON) app/ops/system_blas.py)
APT_PACKAGES := redis-server caddy libopenblas0-pthread chromium chromium-driver cmake g++
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# The coding agents the end-to-end tests drive, at the versions their wire captures came from
# (shared/docs/CONTRACT.md). npm packages that carry each client's own binary.
CLIENTS := @anthropic-ai/claude-code@2.1.197 @openai/codex@0.171.0 opencode-ai@1.18.33

.PHONY: install system-deps kernels demo-model clients run test test-unit lint bench bench-edit bench-constrained soak clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# The native attention kernel for MLX's CPU backend (app/engine/cpu/kernels), built against the
# installed mlx wheel and so rebuilt whenever the venv is. Linux only (on a Mac MLX computes on
# the GPU); without a compiler the engine keeps its MLX and NumPy attention.
KERNELS := app/engine/cpu/kernels
kernels: $(KERNELS)/.built

$(KERNELS)/.built: $(VENV)/.installed $(KERNELS)/attention.cpp $(KERNELS)/CMakeLists.txt
ifeq ($(UNAME),Linux)
	@if ! command -v cmake >/dev/null || ! command -v c++ >/dev/null; then \
	  echo "cmake or c++ not found: the CPU attention kernel is not built"; exit 0; fi; \
	cmake -S $(KERNELS) -B build/kernels -DPython_EXECUTABLE=$(abspath $(BIN)/python) \
	  -DMLX_DIR=$$($(BIN)/python -c 'import mlx, os; print(os.path.join(mlx.__path__[0], "share/cmake/MLX"))') \
	  -Dnanobind_DIR=$$($(BIN)/python -m nanobind --cmake_dir) >/dev/null && \
	cmake --build build/kernels -j2 >/dev/null && \
	cp build/kernels/_cache_attention*.so $(KERNELS)/ && touch $@
endif

# Real redis-server and caddy for the tests, OpenBLAS for speed, headless Chromium and its
# driver for the console's browser tests. Installed only when missing.
system-deps:
ifeq ($(UNAME),Linux)
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v caddy >/dev/null || missing="$$missing caddy"; \
	[ -e $(OPENBLAS) ] || missing="$$missing libopenblas0-pthread"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	command -v cmake >/dev/null || missing="$$missing cmake"; \
	command -v c++ >/dev/null || missing="$$missing g++"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
else ifeq ($(UNAME),Darwin)
	@command -v redis-server >/dev/null || brew install redis
	@command -v caddy >/dev/null || brew install caddy
endif

clients: .tools/.installed

.tools/.installed: Makefile
	@command -v npm >/dev/null || { echo "npm not found: the client tests will be skipped"; exit 0; }; \
	npm install --silent --no-audit --no-fund --prefix .tools $(CLIENTS) && touch $@

demo-model: install
	$(BIN)/mlx-gateway models demo

run: install kernels demo-model
	$(PRELOAD) $(BIN)/mlx-gateway serve $(ARGS)

test: install system-deps kernels demo-model clients
	$(PRELOAD) $(BIN)/python -m pytest -q --durations=15 $(ARGS)

test-unit: install
	$(BIN)/python -m pytest -q tests/unit $(ARGS)

lint: install
	$(BIN)/ruff check app tests bench
	$(BIN)/mypy

bench: install kernels demo-model
	$(PRELOAD) $(BIN)/python -m bench.compare_mlx_lm \
	  --model-dir $$($(BIN)/python -c 'from app.models.demo import demo_model_dir; from app.settings import load_settings; print(demo_model_dir(load_settings().cache_dir))') \
	  --rounds 3 $(ARGS)

# The edit level alone (speculation on vs off vs mlx_lm.server): ARGS="--edit-rounds 3".
bench-edit: install kernels demo-model
	$(PRELOAD) $(BIN)/python -m bench.edit \
	  --model-dir $$($(BIN)/python -c 'from app.models.demo import demo_model_dir; from app.settings import load_settings; print(demo_model_dir(load_settings().cache_dir))') \
	  $(ARGS)

# N clients for M minutes, every third stream abandoned after its first chunk: errors, the
# in-flight gauges once idle and the RSS drift (ARGS="--minutes 2 --prompt-cache-bytes 50MB").
soak: install kernels demo-model
	$(PRELOAD) $(BIN)/python -m bench.soak $(ARGS)

# Constrained decoding (response_format, forced tool calls) against plain requests, one sitting.
bench-constrained: install kernels demo-model
	$(PRELOAD) $(BIN)/python -m bench.constrained \
	  --model-dir $$($(BIN)/python -c 'from app.models.demo import demo_model_dir; from app.settings import load_settings; print(demo_model_dir(load_settings().cache_dir))') \
	  --rounds 3 $(ARGS)

clean:
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache *.egg-info
