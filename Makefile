# linclass developer commands.  Each target creates .venv when it is missing, installs
# torch first and then linclass (editable, with its C++/CUDA extension), and is safe to
# rerun: the install steps rerun only when their inputs change.
#
#   make test    the test suite (what CI runs)
#   make demo    the demo on the bundled default data (scikit-learn digits)
#   make bench   CPU benchmarks -> bench/results/cpu-*.json, cpu.md, cpu.png
#   make bench-isa  the loss benchmarks under each CPU kernel ISA -> bench/results/cpu-isa.md
#   make wheel   one wheel for every x86-64 CPU -> dist/linclass-*-cp310-abi3-*.whl
#
# TORCH_SPEC picks the torch build (the default is the one this project is developed
# against); FORCE_CUDA=1 compiles the CUDA kernels without a GPU (needs nvcc).

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
EXTRAS     ?= test,data,plots,progress
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip --disable-pip-version-check
# The build stamp names the build flavour, so switching FORCE_CUDA rebuilds.
BUILD      := $(VENV)/.build-cuda$(FORCE_CUDA)
SOURCES    := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h \
                                   csrc/cuda/*.cu csrc/cuda/*.cpp csrc/cuda/*.h csrc/cuda/*.cuh)

.PHONY: install test demo bench bench-isa wheel wheel-matrix clean

$(VENV)/.torch: 
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel ninja
	$(PIP) install -q $(TORCH_SPEC)
	touch $@

# linclass itself, its extras and its extension; reruns when a source changes.
$(BUILD): $(VENV)/.torch pyproject.toml $(SOURCES)
	$(PIP) install -q --no-build-isolation -e ".[$(EXTRAS)]"
	rm -f $(VENV)/.build-cuda*
	touch $@

install: $(BUILD)

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) -m linclass demo

# The suite runs BENCH_RUNS times (this kind of machine drifts between runs); the
# report takes the median of the runs' medians.
BENCH_RUNS ?= 3
bench: install
	for i in $$(seq $(BENCH_RUNS)); do \
		OMP_NUM_THREADS=2 $(PY) -m pytest -q -p no:cacheprovider bench --benchmark-only \
			--benchmark-json=bench/results/cpu-$$i.json || exit 1; \
	done
	$(PY) bench/report.py $$(seq -f 'bench/results/cpu-%g.json' $(BENCH_RUNS)) \
		--md bench/results/cpu.md --png bench/results/cpu.png

# The loss benchmarks with each ISA's CPU kernels forced (LINCLASS_CPU_ISA), BENCH_RUNS
# times, interleaved; the JSON files stay out of git, the table goes in.
bench-isa: install
	for i in $$(seq $(BENCH_RUNS)); do for isa in default avx2 avx512; do \
		LINCLASS_CPU_ISA=$$isa OMP_NUM_THREADS=2 $(PY) -m pytest -q -p no:cacheprovider \
			bench/test_bench_losses.py --benchmark-only \
			--benchmark-json=bench/results/cpu-isa-$$isa-$$i.json || exit 1; \
	done; done
	$(PY) bench/isa_table.py bench/results $(BENCH_RUNS) --md bench/results/cpu-isa.md

wheel: $(VENV)/.torch
	$(PIP) wheel -q --no-build-isolation --no-deps -w dist .

# The wheel built once, tested in fresh venvs with several torch releases (downloads
# them; not part of `make test`).  Table: bench/results/wheel-matrix.md.
wheel-matrix: install
	PY=$(PY) bash bench/wheel_matrix.sh

clean:
	rm -rf build dist *.egg-info linclass/_C*.so linclass/_cpu_*.so
