# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test bench clean-venv

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: this exact version is a local CPU wheel; anything looser downloads CUDA builds.
	$(PY) -m pip install -q torch==2.13.0
	# deepspeed without build isolation, or its build environment pulls a second torch.
	$(PY) -m pip install -q --no-build-isolation deepspeed
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/t5adapt run configs/quickstart.yaml

test: $(STAMP)
	# Chromium renders the MLflow UI in tests/test_mlflow_browser.py; CI is root on Debian 12.
	command -v chromium >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)
	# pkill/pgrep (procps) and unshare/setsid (util-linux): cluster/local/down.sh and the multi-node test.
	command -v pkill >/dev/null && command -v unshare >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q procps util-linux)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/adapt_memory.py
	$(PY) bench/adapt_quality.py
	$(PY) bench/prepare_throughput.py
	$(PY) bench/train_overhead.py
	$(PY) bench/adaptation_claim.py
	$(PY) bench/asha_compute.py

clean-venv:
	rm -rf $(VENV)
