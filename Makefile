# flannel-ebpf: `make demo` runs the namespace lab, `make test` the tests. Both run `make setup` first.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-done
CLANG  ?= clang
BPF_SRC := $(wildcard bpf/*.c)
BPF_OBJ := $(BPF_SRC:.c=.o)

.PHONY: setup demo test test-unit lint bench bench-quick bench-scale bench-profile soak bpf wheel charm clean lab-cleanup \
	vagrant-box vagrant-up vagrant-check vagrant-bench vagrant-switch vagrant-destroy

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

demo: setup
	$(PY) -m flannel_ebpf.lab demo

# On a machine `make setup` prepared nothing may be skipped: a skip (no root, no etcd, a missing tool) fails.
test: setup bpf
	FLANNEL_EBPF_NO_SKIPS=1 $(PY) -m pytest -v -rs --durations=25 tests charm/tests

# The unit tests: every test that needs no root and starts no service (etcd, moto, vagrant, a build), in
# seconds; `make test` runs them all.
test-unit: setup
	$(PY) -m pytest -q -m "not root and not service" tests charm/tests

# mypy: strict on the package ([tool.mypy] in pyproject.toml); lint-imports: the import contract
# of docs/CONTRACT.md ([tool.importlinter]).
lint: setup
	$(VENV)/bin/ruff check flannel_ebpf tests charm
	$(VENV)/bin/ruff format --check flannel_ebpf tests charm
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: setup bpf
	$(PY) -m flannel_ebpf.bench

bench-quick: setup bpf
	$(PY) -m flannel_ebpf.bench --quick

# perf record -a -g of one TCP stream per backend (host-gw, udp eBPF, vxlan): self cycles per skb of each
# kernel function side by side (bench/results/profile-*.{md,json}); PROFILE_SECONDS= shortens the runs,
# PROFILE_STREAMS= runs that many streams.
bench-profile: setup bpf
	nice -n 19 $(PY) -m flannel_ebpf.bench.profile $(if $(PROFILE_SECONDS),--seconds $(PROFILE_SECONDS)) \
		$(if $(PROFILE_STREAMS),--streams $(PROFILE_STREAMS))

# 10,000 flanneld-format leases in a real etcd, one agent per backend: start to ready, listing, sync,
# a 1,000-lease burst, a periodic relist, event-loop stalls, memory (bench/results/scale-*.md).
bench-scale: setup bpf
	$(PY) -m flannel_ebpf.bench.scale

# An hour of churn on one backend (flannel_ebpf/bench/soak.py): six hosts, a three-member etcd, all pairs
# flooding, a seeded fault schedule (SEED= replays one); writes bench/results/soak-<backend>-*.{md,json}.
MINUTES ?= 60
BACKEND ?= udp
SEED    ?=
soak: setup bpf
	$(PY) -m flannel_ebpf.bench.soak --backend $(BACKEND) --minutes $(MINUTES) $(if $(SEED),--seed $(SEED))

# Precompiled objects for the ELF loader (and for `tc ... bpf obj`): no LLVM or headers needed at run time.
# bpf/sources.sha256 records the sources they were built from: the agent's `--loader auto` takes the
# objects only when those sources are the ones next to them.
BPF_HDR := $(wildcard bpf/lib/*.h)
bpf: $(BPF_OBJ) bpf/sources.sha256

bpf/%.o: bpf/%.c $(BPF_HDR)
	$(CLANG) -O2 -g -Wall -Werror -target bpf -I/usr/include/x86_64-linux-gnu -c $< -o $@.tmp && mv $@.tmp $@

bpf/sources.sha256: $(BPF_OBJ)
	cd bpf && sha256sum $(notdir $(BPF_SRC)) $(BPF_HDR:bpf/%=%) > sources.sha256.tmp && mv sources.sha256.tmp sources.sha256

# An sdist and a wheel built from it, in dist/: both carry the eBPF sources and the objects (setup.py
# runs `make bpf`). `pip install dist/*.whl` gives a host the agent with no clang, bcc or headers.
wheel: setup bpf
	rm -rf dist
	$(PY) -m build --outdir dist .

# The juju charm (charm/README.md): a .charm archive with the wheel above, the agent's dependencies as wheels
# for the bases' Pythons and ops, packed by charm/build_charm.py (charmcraft needs LXD/multipass and the store).
CHARM := build/flannel-ebpf_amd64.charm
charm: wheel
	$(PY) charm/build_charm.py --dist dist --out $(CHARM)

# The Vagrant multi-VM lab (vagrant/README.md). Not part of `make test` (it boots VMs); `vagrant validate` is.
# vagrant-box: a Debian 12 libvirt box built here from this host's apt mirror (no box download; root).
# vagrant-up: one etcd VM + $(VAGRANT_HOSTS) host VMs, backend $(VAGRANT_BACKEND) (udp, vxlan, host-gw).
VAGRANT_HOSTS   ?= 3
VAGRANT_BACKEND ?= udp
# vagrant runs inside vagrant/lab-ns.sh's namespaces (a libvirt session with qemu user networking only);
# FLANNEL_VAGRANT_DIRECT=1 (VirtualBox, a system libvirt) runs it as it is.
VAGRANT_NS := $(if $(filter 1,$(FLANNEL_VAGRANT_DIRECT)),,./lab-ns.sh)
VAGRANT := cd vagrant && FLANNEL_VAGRANT_HOSTS=$(VAGRANT_HOSTS) FLANNEL_VAGRANT_BACKEND=$(VAGRANT_BACKEND) $(VAGRANT_NS) vagrant

vagrant-box: setup
	@t0=$$(date +%s); bash vagrant/build-box.sh && echo "vagrant-box: $$(( $$(date +%s) - t0 )) s"

# The VMs have no internet: the agent's Python dependencies go in with the synced checkout.
# (setup.sh installs the checkout itself, editable: its build backend goes in too).
vagrant/.wheelhouse/.done: pyproject.toml
	mkdir -p vagrant/.wheelhouse
	$(PY) -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
	  > vagrant/.wheelhouse/requirements.txt
	$(PY) -m pip wheel -q --wheel-dir vagrant/.wheelhouse -r vagrant/.wheelhouse/requirements.txt 'setuptools>=77' wheel
	touch $@

vagrant-up: setup vagrant/.wheelhouse/.done
	@t0=$$(date +%s); $(VAGRANT) up --no-parallel --provider $${VAGRANT_DEFAULT_PROVIDER:-libvirt} \
	  && echo "vagrant-up: $$(( $$(date +%s) - t0 )) s"

vagrant-check: setup
	$(PY) -m flannel_ebpf.lab.vagrant check

# vagrant-bench: each data path in turn on the running lab (VARIANTS=udp-xdp,udp-tc,vxlan,host-gw by default).
vagrant-bench: setup
	$(PY) -m flannel_ebpf.lab.vagrant bench $(if $(VARIANTS),--variants $(VARIANTS))

# vagrant-switch: the running lab to another data path, without rebuilding it (VARIANT=udp-xdp|udp-tc|vxlan|host-gw).
vagrant-switch: setup
	$(PY) -m flannel_ebpf.lab.vagrant switch --variants $(VARIANT)

vagrant-destroy:
	$(VAGRANT) destroy -f
	$(if $(VAGRANT_NS),cd vagrant && ./lab-ns.sh --delete)

lab-cleanup: setup
	$(PY) -m flannel_ebpf.lab cleanup

clean:
	rm -f bpf/*.o bpf/sources.sha256
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache .import_linter_cache
