# The two commands of the README. Each sets up .venv/ from the project's own files on first use.
PYTHON ?= python3
VENV ?= .venv
# A plain `torch` requirement can pull a multi-GB CUDA build; name the one you want here.
TORCH ?= torch==2.13.0

.PHONY: demo test test-fast

demo: $(VENV)/.installed
	$(VENV)/bin/python -m ldm txt2img "a red circle in the top left" --out out.png

# OpenAI's original CLIP tokenizer, a test reference, ships inside this wheel; its package is
# not installed (it pulls in torchvision), the tests read the one file they need from it.
OPEN_CLIP_WHEEL = build/reference/open_clip_torch-3.3.0-py3-none-any.whl
# k-diffusion's sampling.py, the reference for the LMS, DPM2 and DPM++ 2S / SDE / 3M SDE
# samplers, is read out of its wheel the same way (its package, too, pulls in torchvision).
K_DIFFUSION_WHEEL = build/reference/k_diffusion-0.1.1.post1-py3-none-any.whl
REFERENCE_WHEELS = $(OPEN_CLIP_WHEEL) $(K_DIFFUSION_WHEEL)

test: $(VENV)/.installed-test $(REFERENCE_WHEELS)
	$(VENV)/bin/python -m pytest -q

test-fast: $(VENV)/.installed-test $(REFERENCE_WHEELS)
	$(VENV)/bin/python -m pytest -q -m "not slow"

$(OPEN_CLIP_WHEEL): $(VENV)/.installed-test
	$(VENV)/bin/pip download -q --no-deps open_clip_torch==3.3.0 -d build/reference

$(K_DIFFUSION_WHEEL): $(VENV)/.installed-test
	$(VENV)/bin/pip download -q --no-deps k-diffusion==0.1.1.post1 -d build/reference

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q "$(TORCH)" -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q "$(TORCH)" -e ".[test]"
	touch $@ $(VENV)/.installed
