# PAMSignal: one file, Python 3.6+ standard library only.
PREFIX ?= /usr
SYSCONFDIR ?= /etc
DESTDIR ?=
PYTHON ?= python3

BINDIR = $(DESTDIR)$(PREFIX)/bin
MANDIR = $(DESTDIR)$(PREFIX)/share/man
DOCDIR = $(DESTDIR)$(PREFIX)/share/doc/pamsignal
CONFDIR = $(DESTDIR)$(SYSCONFDIR)/pamsignal
UNITDIR ?= /lib/systemd/system

.PHONY: all check test test-pythons lint bench fuzz install uninstall

all:
	@echo "targets: check, test, test-pythons, lint, bench, fuzz, install, uninstall (DESTDIR, PREFIX)"

# Everything: install what the tests need, start journald, build or reuse
# the cached Debian trees, lint, run the whole suite (root; what CI runs).
check:
	bash tests/check.sh

# The suite alone, on a machine `make check` has prepared.
test:
	$(PYTHON) -m pytest -q tests

# The unit tests on Python 3.6 and 3.13 (pyenv builds), and the
# end-to-end suite on 3.6.
test-pythons:
	.ci/pythons

lint:
	vermin -t=3.6- --violations pamsignal.py
	ruff check pamsignal.py tests bench

bench:
	$(PYTHON) bench/bench_pipeline.py
	$(PYTHON) bench/bench_hostile.py
	$(PYTHON) bench/bench_detection.py
	$(PYTHON) bench/bench_mmdb.py
	$(PYTHON) bench/bench_delivery.py

# Each atheris target in tests/fuzz/ for FUZZ_SECONDS (default 300),
# learning into /var/cache/pamsignal-tests/fuzz-corpus/TARGET; crashes are
# written to FUZZ_CRASHES. FUZZ_TARGETS picks some (e.g. "journal mmdb").
FUZZ_SECONDS ?= 300
FUZZ_TARGETS ?= config http journal metrics mmdb spool state
FUZZ_CRASHES ?= /var/cache/pamsignal-tests/fuzz-crashes
# MaxMind's test databases (tests/check.sh unpacks them): more MMDB seeds.
MMDB_TEST_DATA = /var/cache/pamsignal-tests/maxminddb-sdist/tests/data
fuzz:
	mkdir -p $(FUZZ_CRASHES)
	set -e; for target in $(FUZZ_TARGETS); do \
		echo "==> fuzz_$$target.py for $(FUZZ_SECONDS) s"; \
		PAMSIGNAL_MMDB_TEST_DATA=$${PAMSIGNAL_MMDB_TEST_DATA:-$(MMDB_TEST_DATA)} \
		nice -n 19 $(PYTHON) tests/fuzz/fuzz_$$target.py \
			-max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
			-artifact_prefix=$(FUZZ_CRASHES)/$$target- ; \
	done

install:
	install -d -m 0755 $(BINDIR) $(MANDIR)/man8 $(MANDIR)/man5 $(DOCDIR)
	install -m 0755 pamsignal.py $(BINDIR)/pamsignal
	install -m 0644 pamsignal.8 $(MANDIR)/man8/pamsignal.8
	install -m 0644 pamsignal.conf.5 $(MANDIR)/man5/pamsignal.conf.5
	install -m 0644 README.md pamsignal.conf.example $(DOCDIR)/
	install -d -m 0755 $(DESTDIR)$(UNITDIR)
	sed 's|/usr/bin/pamsignal|$(PREFIX)/bin/pamsignal|g' pamsignal.service \
		> $(DESTDIR)$(UNITDIR)/pamsignal.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/pamsignal.service
	install -d -m 0700 $(CONFDIR)
	# An existing configuration is the admin's: never overwrite it.
	test -e $(CONFDIR)/pamsignal.conf || \
		install -m 0600 pamsignal.conf.example $(CONFDIR)/pamsignal.conf

uninstall:
	rm -f $(BINDIR)/pamsignal $(MANDIR)/man8/pamsignal.8 \
		$(MANDIR)/man5/pamsignal.conf.5
	rm -f $(DESTDIR)$(UNITDIR)/pamsignal.service
	rm -rf $(DOCDIR)
	@echo "kept $(CONFDIR)/pamsignal.conf and /var/lib/pamsignal"
