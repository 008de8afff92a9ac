# flannel-ebpf: `make demo` runs the namespace lab, `make test` the tests. Both run `make setup` first.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-done
CLANG  ?= clang
BPF_SRC := $(wildcard bpf/*.c)
BPF_OBJ := $(BPF_SRC:.c=.o)

.PHONY: setup demo test test-unit lint bench bench-quick bpf clean lab-cleanup

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

demo: setup
	$(PY) -m flannel_ebpf.lab demo

test: setup bpf
	$(PY) -m pytest -v -rs tests

test-unit: setup
	$(PY) -m pytest -q tests/test_config.py tests/test_allocation.py tests/test_cli.py

lint: setup
	$(VENV)/bin/ruff check flannel_ebpf tests
	$(VENV)/bin/ruff format --check flannel_ebpf tests

bench: setup bpf
	$(PY) -m flannel_ebpf.bench

bench-quick: setup bpf
	$(PY) -m flannel_ebpf.bench --quick

# Precompiled objects for the ELF loader (and for `tc ... bpf obj`): no LLVM or headers needed at run time.
bpf: $(BPF_OBJ)

bpf/%.o: bpf/%.c $(wildcard bpf/lib/*.h)
	$(CLANG) -O2 -g -Wall -Werror -target bpf -I/usr/include/x86_64-linux-gnu -c $< -o $@

lab-cleanup: setup
	$(PY) -m flannel_ebpf.lab cleanup

clean:
	rm -f bpf/*.o
	rm -rf build *.egg-info .pytest_cache .ruff_cache
