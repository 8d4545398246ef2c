# Two commands do all set-up on a fresh machine (README): `make serve`, `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Without a GPU, Triton kernels run in Triton's interpreter.
TRITON_INTERPRET ?= $(shell nvidia-smi >/dev/null 2>&1 || echo 1)
export TRITON_INTERPRET

.PHONY: install serve test protos bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch (an unpinned torch pulls a multi-GB CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,ray]'
	touch $@

install: $(VENV)/.installed

serve: $(VENV)/.installed
	$(VENV)/bin/loraplex serve

test: $(VENV)/.installed
	$(VENV)/bin/pytest -q tests

# Regenerate the gRPC stubs from proto/ (grpcio-tools 1.84.0: stubs from a newer one refuse older grpcio).
protos: $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. --pyi_out=. proto/loraplex/v1/*.proto

# Benchmarks print tables and write JSON under bench/results/ (kernel sweeps need CUDA).
bench: $(VENV)/.installed
	$(PY) bench/engine_mixed.py
	$(PY) bench/lora_kernels.py $(if $(TRITON_INTERPRET),--smoke,)
	$(PY) bench/nf4_matmul.py $(if $(TRITON_INTERPRET),--smoke,)

clean:
	rm -rf $(VENV) build *.egg-info
