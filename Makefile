# Benchmarks (docs/benchmarks.md). Each bench prints its table; the figures also go to
# $(BENCH_OUT)/NAME.json (NAME.txt for bench.sim_fleet, which prints a table only), so the
# document can be filled from one run. Every bench runs even when an earlier one failed,
# and the target fails at the end if any did; a figure that misses its bar is said in the
# bench's table (exit status 3) and is no failure. Run on a quiet machine and note the
# load average each bench prints.
#
#   make bench         the figures of docs/benchmarks.md, default sizes (some 20 minutes)
#   make bench-quick   small sizes: a check that every bench runs (a few minutes)

PYTHON ?= .venv/bin/python
BENCH_OUT ?= bench-results

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c

.PHONY: bench bench-quick

# $(call run,NAME,ARGUMENTS,DIR): run bench.NAME if bench/NAME.py exists, its JSON to DIR.
define run
if [ -f bench/$(1).py ]; then \
  echo "== python -m bench.$(1) $(2)"; \
  $(PYTHON) -m bench.$(1) $(2) --json $(3)/$(1).json; \
  case $$? in 0) ;; 3) echo "== bench.$(1): a figure missed its bar (see the table)";; \
  *) echo "== bench.$(1) FAILED"; status=1;; esac; \
else \
  echo "== bench/$(1).py does not exist: skipped"; \
fi;
endef

bench:
	@mkdir -p $(BENCH_OUT); status=0; \
	echo "== python -m bench.sim_fleet --devices 1000"; \
	$(PYTHON) -m bench.sim_fleet --devices 1000 | tee $(BENCH_OUT)/sim_fleet.txt || status=1; \
	$(call run,pipeline,,$(BENCH_OUT)) \
	$(call run,footprint,,$(BENCH_OUT)) \
	$(call run,fleet,,$(BENCH_OUT)) \
	$(call run,revocation,,$(BENCH_OUT)) \
	$(call run,battery,,$(BENCH_OUT)) \
	exit $$status

QUICK_OUT := $(BENCH_OUT)/quick

bench-quick:
	@mkdir -p $(QUICK_OUT); status=0; \
	echo "== python -m bench.sim_fleet --devices 100 --sessions 20 --budget 60"; \
	$(PYTHON) -m bench.sim_fleet --devices 100 --sessions 20 --budget 60 \
	  | tee $(QUICK_OUT)/sim_fleet.txt || status=1; \
	$(call run,pipeline,--devices 4 --records 2000 --repeat 1,$(QUICK_OUT)) \
	$(call run,footprint,--devices 20 --records 20 --startups 2 --sim-devices 100 --sim-sessions 10,$(QUICK_OUT)) \
	$(call run,fleet,--gateways 3 --devices 2,$(QUICK_OUT)) \
	$(call run,revocation,--devices 20 --trials 1 --skip-transfers,$(QUICK_OUT)) \
	$(call run,battery,--devices 5 --days 3,$(QUICK_OUT)) \
	exit $$status
