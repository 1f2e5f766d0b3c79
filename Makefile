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

.PHONY: all check test test-pythons lint bench install uninstall

all:
	@echo "targets: check, test, test-pythons, lint, bench, install, uninstall (DESTDIR, PREFIX)"

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
	# journald's rate limit lifted for sshd (Debian's and Fedora/EL's name).
	for unit in ssh sshd; do \
		install -d -m 0755 $(DESTDIR)$(UNITDIR)/$$unit.service.d && \
		install -m 0644 contrib/systemd/pamsignal-ratelimit.conf \
			$(DESTDIR)$(UNITDIR)/$$unit.service.d/ || exit 1; \
	done
	install -d -m 0700 $(CONFDIR)
	# An existing configuration is the admin's: never overwrite it.
	test -e $(CONFDIR)/pamsignal.conf || \
		install -m 0600 pamsignal.conf.example $(CONFDIR)/pamsignal.conf

uninstall:
	rm -f $(BINDIR)/pamsignal $(MANDIR)/man8/pamsignal.8 \
		$(MANDIR)/man5/pamsignal.conf.5
	rm -f $(DESTDIR)$(UNITDIR)/pamsignal.service \
		$(DESTDIR)$(UNITDIR)/ssh.service.d/pamsignal-ratelimit.conf \
		$(DESTDIR)$(UNITDIR)/sshd.service.d/pamsignal-ratelimit.conf
	# The drop-in directories go too, unless they hold other drop-ins.
	for unit in ssh sshd; do \
		rmdir $(DESTDIR)$(UNITDIR)/$$unit.service.d 2>/dev/null || true; \
	done
	rm -rf $(DOCDIR)
	@echo "kept $(CONFDIR)/pamsignal.conf and /var/lib/pamsignal"
